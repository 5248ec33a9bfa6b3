"""Caption-safe image augmentation: what `finetune` applies to each training batch and `extract --views` stores.

:func:`augment` renders one augmented view — rotation, random resized crop, colour jitter and, when it is
caption-safe, a horizontal flip whose captions have left and right swapped (:func:`flip_caption`) — from an
:class:`Augmentation` (the settings) and an :class:`AugmentDraws` (every random number the view uses, drawn
before the image is read, so whether a view is mirrored is known without the image).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["AugmentDraws", "Augmentation", "augment", "flip_caption"]


_FLIP_RE = re.compile(r"\b(left|right)(?=(?:most|ward|wards|hand|-hand|-most|-side|side)?\b)", re.IGNORECASE)


def _same_case(like: str, word: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    if like[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def flip_caption(text: str) -> str:
    """The caption of the horizontally mirrored image: ``left`` and ``right`` swapped as whole words, with
    their compounds (``leftmost``, ``right-hand``, ``lefthand``, ``leftward(s)``) and the case kept; "to the
    left of", "on the right", "left side" follow. Words merely containing them ("bright", "copyright",
    "leftover") are untouched. ("right" meaning "correct" would be swapped too: rare in captions.)"""

    def swap(m: re.Match) -> str:
        word = m.group(1)
        return _same_case(word, "right" if word.lower() == "left" else "left")

    return _FLIP_RE.sub(swap, text)


@dataclass(frozen=True)
class Augmentation:
    """Train-time augmentation; the identity when every knob is off (scale 1, no rotation, no jitter, no flip).

    Applied with torchvision's functional ops, not timm's ``create_transform(is_training=True)``: timm's
    transforms draw from the global ``random``/torch generators, so batches built in a thread pool could
    not be recomputed from ``(seed, epoch, batch)`` on resume, and a caption-aware flip must know whether
    the image was mirrored to swap left and right in its captions."""

    crop_scale: float = 0.85
    rotation: float = 8.0
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.0
    hflip: str = "swap"

    @classmethod
    def from_config(cls, cfg: Any) -> "Augmentation":
        return cls(crop_scale=cfg.crop_scale, rotation=cfg.rotation, brightness=cfg.brightness,
                   contrast=cfg.contrast, saturation=cfg.saturation, hue=cfg.hue, hflip=cfg.hflip)


@dataclass(frozen=True)
class AugmentDraws:
    """Every random number one augmented view uses, drawn whatever the settings (turning one knob off does not
    reshuffle the others), and before the image is read: whether a view is mirrored is known without it."""

    angle_unit: float  # in [0, 1): the rotation, -rotation..+rotation
    crop: np.ndarray  # (10, 4) in [0, 1): RandomResizedCrop's tries
    factors: np.ndarray  # (4,) in [-1, 1): brightness, contrast, saturation, hue
    jitter_order: np.ndarray  # a permutation of the four jitters
    flip: float  # in [0, 1): mirrored below 0.5

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "AugmentDraws":
        angle_unit = float(rng.uniform(0, 1))
        crop = rng.uniform(size=(10, 4))
        factors = rng.uniform(-1, 1, size=4)
        jitter_order = rng.permutation(4)
        return cls(angle_unit, crop, factors, jitter_order, float(rng.random()))

    def flipped(self, a: Augmentation) -> bool:
        return a.hflip == "swap" and self.flip < 0.5


def augment(img, a: Augmentation, draws: AugmentDraws, *, size: int, mean: torch.Tensor, std: torch.Tensor,
            interpolation: str) -> tuple[torch.Tensor, bool]:
    """One augmented view of the PIL image ``img`` as a normalised ``(3, size, size)`` tensor, and whether it is
    mirrored (its captions then have left/right swapped): rotation, random resized crop, colour jitter, flip."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    if a.rotation > 0:
        fill = tuple(int(v) for v in np.asarray(img).reshape(-1, 3).mean(0))
        angle = -a.rotation + 2 * a.rotation * draws.angle_unit
        img = TF.rotate(img, angle, interpolation=InterpolationMode.BILINEAR, fill=fill)
    top, left, h, w = _crop_box(img.size, a.crop_scale, draws.crop)
    mode = InterpolationMode(interpolation) if interpolation in ("bilinear", "bicubic", "nearest") \
        else InterpolationMode.BICUBIC
    img = TF.resized_crop(img, top, left, h, w, [size, size], interpolation=mode, antialias=True)
    jitters = [(a.brightness, TF.adjust_brightness), (a.contrast, TF.adjust_contrast),
               (a.saturation, TF.adjust_saturation), (a.hue, TF.adjust_hue)]
    for j in draws.jitter_order:
        amount, fn = jitters[j]
        if amount > 0:
            factor = float(draws.factors[j] * amount)
            img = fn(img, factor if fn is TF.adjust_hue else 1.0 + factor)
    flipped = draws.flipped(a)
    if flipped:
        img = TF.hflip(img)
    x = TF.pil_to_tensor(img).float().div_(255.0)
    return (x - mean) / std, flipped


def _crop_box(size: tuple[int, int], min_scale: float, draws: np.ndarray) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, height, width): area fraction in [min_scale, 1], aspect ratio in
    [3/4, 4/3]; the whole image when none of the ten tries (``draws``, (10, 4) in [0, 1)) fits."""
    width, height = size
    area = width * height
    if min_scale < 1.0:
        for s, r, u, v in draws:
            target = area * (min_scale + (1 - min_scale) * s)
            ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r)
            w = int(round(math.sqrt(target * ratio)))
            h = int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                return int(u * (height - h + 1)), int(v * (width - w + 1)), h, w
    return 0, 0, height, width
