"""Images with their captions, decoded per batch and augmented caption-safely: the data of end-to-end
fine-tuning (and of SCST on a fine-tuned bundle's own backbone).

:class:`ImageCaptionDataset` decodes and augments images per batch (a thread pool, no DataLoader): random
resized crop, mild rotation, colour jitter and, only when it is caption-safe, a horizontal flip whose
captions have left/right swapped (:func:`flip_caption`). Every random draw of a batch comes from a generator
seeded by ``(seed, epoch, batch, rank)``, so a resumed run sees exactly the augmentations of an
uninterrupted one.
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from pipeline.data.features import pad_tokens
from pipeline.data.images import DEFAULT_MAX_PIXELS, load_rgb
from pipeline.data.manifest import ManifestRecord, resolve_image_path
from pipeline.text.tokenizers import CaptionTokenizer

__all__ = ["Augmentation", "ImageCaptionBatch", "ImageCaptionDataset", "ImageItem", "flip_caption", "image_items"]


# --------------------------------------------------------------------------- caption-safe flips
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


# --------------------------------------------------------------------------- images and augmentation
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


@dataclass
class ImageItem:
    image_id: str
    path: Path
    captions: list[list[int]]  # token ids (bos ... eos) of each caption
    flipped: list[list[int]]  # the same captions with left/right swapped (for mirrored images)


@dataclass
class ImageCaptionBatch:
    image_ids: list[str]
    pixels: torch.Tensor  # (B, 3, H, W) normalised
    tokens: torch.Tensor  # (M, T) the captions of the images, M >= B
    lengths: torch.Tensor  # (M,)
    image_index: torch.Tensor  # (M,) row of `pixels` each caption belongs to
    flipped: list[bool]

    def __len__(self) -> int:
        return len(self.image_ids)


def image_items(records: Sequence[ManifestRecord], manifest: Path, tokenizer: CaptionTokenizer) -> list[ImageItem]:
    """One item per image: its path (relative paths resolved against the manifest's folder) and its captions
    tokenised as written and mirrored."""
    items = []
    for r in records:
        items.append(ImageItem(r.image_id, resolve_image_path(r, manifest), tokenizer.encode_captions(r.captions),
                               tokenizer.encode_captions([flip_caption(c) for c in r.captions])))
    return items


class ImageCaptionDataset:
    """Images (decoded per batch, augmented when asked) with all their captions.

    ``__getitems__(indices)`` gives the evaluation view (the backbone's eval transform, no augmentation);
    :meth:`batch` the augmented view of one training batch, every random draw from ``key``."""

    def __init__(
        self, items: Sequence[ImageItem], *, pad_id: int, data_config: dict[str, Any], eval_transform: Callable,
        augmentation: Optional[Augmentation] = None, captions_per_image: Optional[int] = None, workers: int = 2,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.items = list(items)
        self.pad_id = pad_id
        self.size = int(data_config["input_size"][-1])
        self.mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(data_config["std"], dtype=torch.float32).view(3, 1, 1)
        self.interpolation = data_config.get("interpolation", "bicubic")
        self.eval_transform = eval_transform
        self.augmentation = augmentation
        self.captions_per_image = captions_per_image
        self.workers = workers
        self.max_pixels = max_pixels
        self._pool: Optional[ThreadPoolExecutor] = None

    def __len__(self) -> int:
        return len(self.items)

    def _map(self, fn, args: list) -> list:
        if self.workers <= 1 or len(args) <= 1:
            return [fn(*a) for a in args]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="augment")
        return list(self._pool.map(lambda a: fn(*a), args))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- views
    def __getitems__(self, indices: Sequence[int]) -> ImageCaptionBatch:
        return self._collate(self._map(self._eval_one, [(i,) for i in indices]))

    def batch(self, indices: Sequence[int], key: Sequence[int]) -> ImageCaptionBatch:
        """The augmented batch of ``indices``; ``key`` (e.g. seed, epoch, batch, rank) seeds every draw."""
        if self.augmentation is None:
            raise ValueError("this dataset has no augmentation")
        seeds = np.random.default_rng([int(k) for k in key]).integers(0, 2**63 - 1, size=len(indices))
        return self._collate(self._map(self._train_one, list(zip(indices, seeds.tolist()))))

    def pixels(self, indices: Sequence[int]) -> torch.Tensor:
        """Evaluation-view pixels only."""
        return torch.stack(self._map(lambda i: self.eval_transform(self._load(i)), [(i,) for i in indices]))

    # -- one image
    def _load(self, i: int):
        return load_rgb(self.items[i].path, max_pixels=self.max_pixels)

    def _eval_one(self, i: int):
        item = self.items[i]
        return item.image_id, self.eval_transform(self._load(i)), item.captions, False

    def _train_one(self, i: int, seed: int):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        item, a, rng = self.items[i], self.augmentation, np.random.default_rng(seed)
        img = self._load(i)
        # every draw happens whatever the settings, so turning one knob off does not reshuffle the others
        angle = float(rng.uniform(-a.rotation, a.rotation))
        crop = _crop_box(img.size, a.crop_scale, rng)
        factors = rng.uniform(-1, 1, size=4)
        jitter_order = rng.permutation(4)
        flip_draw = rng.random()
        pick = rng.permutation(len(item.captions))
        if a.rotation > 0:
            mean = tuple(int(v) for v in np.asarray(img).reshape(-1, 3).mean(0))
            img = TF.rotate(img, angle, interpolation=InterpolationMode.BILINEAR, fill=mean)
        top, left, h, w = crop
        mode = InterpolationMode(self.interpolation) if self.interpolation in ("bilinear", "bicubic", "nearest") \
            else InterpolationMode.BICUBIC
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], interpolation=mode, antialias=True)
        jitters = [(a.brightness, TF.adjust_brightness), (a.contrast, TF.adjust_contrast),
                   (a.saturation, TF.adjust_saturation), (a.hue, TF.adjust_hue)]
        for j in jitter_order:
            amount, fn = jitters[j]
            if amount > 0:
                img = fn(img, float(factors[j] * amount) if fn is TF.adjust_hue else 1.0 + float(factors[j] * amount))
        flipped = a.hflip == "swap" and flip_draw < 0.5
        if flipped:
            img = TF.hflip(img)
        x = TF.pil_to_tensor(img).float().div_(255.0)
        x = (x - self.mean) / self.std
        captions = item.flipped if flipped else item.captions
        if self.captions_per_image is not None and self.captions_per_image < len(captions):
            captions = [captions[k] for k in sorted(pick[: self.captions_per_image].tolist())]
        return item.image_id, x, captions, flipped

    def _collate(self, rows: list) -> ImageCaptionBatch:
        ids, pixels, caps, index, flipped = [], [], [], [], []
        for b, (image_id, x, captions, flip) in enumerate(rows):
            ids.append(image_id)
            pixels.append(x)
            caps.extend(captions)
            index.extend([b] * len(captions))
            flipped.append(flip)
        tokens, lengths = pad_tokens(caps, self.pad_id)
        return ImageCaptionBatch(ids, torch.stack(pixels), tokens, lengths, torch.tensor(index, dtype=torch.long),
                                 flipped)


def _crop_box(size: tuple[int, int], min_scale: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, height, width): area fraction in [min_scale, 1], aspect ratio in
    [3/4, 4/3]; the whole image when no draw fits (ten draws are always made, so the stream is fixed)."""
    width, height = size
    area = width * height
    draws = rng.uniform(size=(10, 4))
    if min_scale < 1.0:
        for s, r, u, v in draws:
            target = area * (min_scale + (1 - min_scale) * s)
            ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r)
            w = int(round(math.sqrt(target * ratio)))
            h = int(round(math.sqrt(target / ratio)))
            if 0 < w <= width and 0 < h <= height:
                return int(u * (height - h + 1)), int(v * (width - w + 1)), h, w
    return 0, 0, height, width
