"""End-to-end fine-tuning: a timm backbone, partly unfrozen, trained with the caption decoder from images.

* :func:`backbone_stages` finds a timm model's stages generically (timm's coarse
  ``group_matcher`` — stem, then one group per stage, head layers merged into the last —
  restricted to the parameters that actually compute the features, found by one probe
  backward pass); :func:`trainable_backbone_parameters` picks the last N of them (``"all"``:
  the stem too).
* :class:`FinetuneForward` is backbone + decoder as one module (DDP wraps it). Frozen parts
  stay in eval mode whatever ``train()`` is called with, so their batch-norm statistics never
  move; during the frozen warm-up the whole backbone runs without gradients.
* :class:`ImageCaptionDataset` decodes and augments images per batch (a thread pool, no
  DataLoader): random resized crop, mild rotation, colour jitter and — only when it is
  caption-safe — a horizontal flip whose captions have left/right swapped
  (:func:`flip_caption`). Every random draw of a batch comes from a generator seeded by
  ``(seed, epoch, batch, rank)``, so a resumed run sees exactly the augmentations of an
  uninterrupted one.
* :class:`FinetuneTrainer` is :class:`pipeline.training.Trainer` with two learning rates
  (decoder, backbone; each with a no-decay group), the backbone's schedule starting when it
  is unfrozen, image batches, and checkpoints of backbone + decoder.
"""

from __future__ import annotations

import logging
import math
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from pipeline.data.features import concat_token_maps, pad_tokens
from pipeline.errors import ConfigError
from pipeline.data.images import DEFAULT_MAX_PIXELS, load_rgb
from pipeline.data.manifest import ManifestRecord, resolve_image_path
from pipeline.models.backbones import Backbone
from pipeline.text.tokenizers import CaptionTokenizer
from pipeline.optim import is_no_decay, warmup_cosine
from pipeline.training import Trainer, caption_loss, epoch_order

log = logging.getLogger(__name__)

__all__ = [
    "flip_caption",
    "backbone_stages",
    "trainable_backbone_parameters",
    "FinetuneForward",
    "Augmentation",
    "ImageItem",
    "ImageCaptionBatch",
    "ImageCaptionDataset",
    "FinetuneTrainer",
    "image_items",
    "subset",
]


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


# --------------------------------------------------------------------------- backbone stages
def used_parameters(backbone: Backbone, image_size: int) -> set[str]:
    """Names of the backbone parameters that the features depend on (one probe forward/backward in eval mode,
    on a copy of nothing: gradients are cleared afterwards, requires_grad is restored)."""
    model = backbone.model
    was_training = model.training
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    model.eval()
    try:
        device = next(model.parameters()).device
        x = torch.zeros(1, 3, image_size, image_size, device=device)
        maps = backbone.tokens(x)
        sum(m.float().sum() for m in maps).backward()
        used = {n for n, p in model.named_parameters() if p.grad is not None}
    finally:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(saved[n])
        model.train(was_training)
    return used


def backbone_stages(backbone: Backbone, image_size: int) -> list[list[str]]:
    """Parameter names grouped by stage, input side first: the stem, then each stage. Uses timm's coarse
    ``group_matcher`` (head layers such as EfficientNet's ``conv_head`` or a ViT's final norm join the
    last stage); a model without one is grouped by its top-level children. Parameters the features do not
    depend on (the classifier, stages after the last one used) are left out."""
    model = backbone.model
    names = [n for n, _ in model.named_parameters()]
    if hasattr(model, "group_matcher"):
        from timm.models import group_parameters

        groups = group_parameters(model, model.group_matcher(coarse=True))
        ordered = [groups[k] for k in sorted(groups)]
    else:
        ordered = [[n for n in names if n == child or n.startswith(child + ".")]
                   for child, _ in model.named_children()]
    used = used_parameters(backbone, image_size)
    stages = [[n for n in g if n in used] for g in ordered]
    return [s for s in stages if s]


def trainable_backbone_parameters(backbone: Backbone, unfreeze: Union[int, str], image_size: int) -> list[str]:
    """Names of the parameters trained for ``unfreeze`` = N (the last N stages, counted from the output side;
    the stem is not a stage) or ``"all"`` (every stage and the stem)."""
    stages = backbone_stages(backbone, image_size)
    if unfreeze == "all":
        return [n for s in stages for n in s]
    n = int(unfreeze)
    available = len(stages) - 1  # stages after the stem
    if n < 0 or n > available:
        raise ConfigError(f"unfreeze_stages={n}: {backbone.name} has {available} stages after its stem "
                          f"(use 0..{available}, or `all` to train the stem too)")
    return [name for s in (stages[len(stages) - n :] if n else []) for name in s]


# --------------------------------------------------------------------------- the model
class FinetuneForward(nn.Module):
    """Backbone + decoder: images ``(B, 3, H, W)`` -> visual tokens -> teacher-forced caption logits.

    ``trainable``: the backbone parameter names that are trained (after the frozen warm-up). Everything
    else in the backbone has ``requires_grad=False`` and is kept in eval mode (batch-norm statistics fixed).
    ``bn="frozen"`` also keeps the batch norms of trained stages in eval mode (their affine parameters still
    learn)."""

    def __init__(self, backbone: Backbone, decoder: nn.Module, trainable: Sequence[str], bn: str = "train") -> None:
        super().__init__()
        self.backbone = backbone.model
        self.decoder = decoder
        self._tokens = backbone.tokens  # the Backbone wrapper (not a module) knows which maps to return
        self.trainable = frozenset(trainable)
        unknown = self.trainable - {n for n, _ in self.backbone.named_parameters()}
        if unknown:
            raise ValueError(f"unknown backbone parameters {sorted(unknown)[:5]}")
        self.bn = bn
        self.backbone_trainable = True
        self.set_backbone_trainable(True)

    def set_backbone_trainable(self, flag: bool) -> None:
        """``False``: the frozen warm-up (whole backbone frozen, in eval mode, run without gradients)."""
        self.backbone_trainable = bool(flag) and bool(self.trainable)
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(self.backbone_trainable and name in self.trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> "FinetuneForward":
        super().train(mode)
        if mode:
            self._freeze_modes()
        return self

    def _freeze_modes(self) -> None:
        if not self.backbone_trainable:
            self.backbone.eval()
            return
        for _, module in self.backbone.named_modules():
            own = list(module.parameters())
            if own and not any(p.requires_grad for p in own):
                module.eval()  # a frozen part (recursively): its batch norms keep their statistics
            elif self.bn == "frozen" and isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images -> visual tokens ``(B, N, C)`` (the token sets concatenated, as the decoder reads them)."""
        if self.backbone_trainable and torch.is_grad_enabled():
            maps = self._tokens(pixels)
        else:
            with torch.no_grad():
                maps = self._tokens(pixels)
        return concat_token_maps(maps)

    def forward(self, pixels, tokens, lengths, image_index=None):
        feats = self.encode(pixels)
        if image_index is not None:
            feats = feats.index_select(0, image_index)
        out = self.decoder(feats, tokens, lengths)
        return out.logits, out.aux_loss


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


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


def subset(records: list, n: Optional[int], seed: int) -> list:
    """A seeded subset of ``n`` records in their original order (all when ``n`` is None or too large)."""
    if n is None or n >= len(records):
        return list(records)
    keep = sorted(np.random.default_rng(seed).choice(len(records), n, replace=False).tolist())
    return [records[i] for i in keep]


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


# --------------------------------------------------------------------------- the trainer
class FinetuneTrainer(Trainer):
    """:class:`Trainer` over image batches, with a decoder and a backbone learning rate and the frozen warm-up.

    Parameter groups (each has a ``name``): ``decoder`` / ``decoder_no_decay`` at ``cfg.lr``, ``backbone`` /
    ``backbone_no_decay`` at ``cfg.backbone_lr``. The decoder's rate follows warm-up + cosine over the whole
    run; the backbone's is 0 for the ``cfg.frozen_epochs`` warm-up epochs, then warm-up + cosine over the
    rest. The next batch is prepared in a background thread while the current one trains."""

    def __init__(self, cfg, model: nn.Module, dataset: ImageCaptionDataset, **kw) -> None:
        self.core: FinetuneForward = kw.get("checkpoint_module")
        if self.core is None:
            raise ValueError("FinetuneTrainer needs checkpoint_module= the FinetuneForward (unwrapped)")
        self._prefetch: Optional[tuple[tuple, Future]] = None
        self._prefetcher: Optional[ThreadPoolExecutor] = None
        super().__init__(cfg, model, dataset, **kw)

    def param_groups(self) -> list[dict[str, Any]]:
        core, cfg = self.core, self.cfg
        groups: dict[str, list] = {"decoder": [], "decoder_no_decay": [], "backbone": [], "backbone_no_decay": []}
        for name, p in core.decoder.named_parameters():
            if p.requires_grad:
                groups["decoder_no_decay" if is_no_decay(name, p) else "decoder"].append(p)
        for name, p in core.backbone.named_parameters():
            if name in core.trainable:
                groups["backbone_no_decay" if is_no_decay(name, p) else "backbone"].append(p)
        out = []
        for name, params in groups.items():
            if params:
                out.append({"name": name, "params": params, "lr": cfg.backbone_lr if name.startswith("backbone") else cfg.lr,
                            "weight_decay": 0.0 if name.endswith("no_decay") else cfg.weight_decay})
        return out

    def lr_lambdas(self) -> list[Callable[[int], float]]:
        cfg = self.cfg
        decoder = warmup_cosine(self.total_steps, cfg.warmup_steps, cfg.min_lr_ratio)
        frozen_steps = self.frozen_epochs * self.batches_per_epoch
        after = warmup_cosine(max(1, self.total_steps - frozen_steps), cfg.warmup_steps, cfg.min_lr_ratio)

        def backbone(step: int) -> float:
            return 0.0 if step < frozen_steps else after(step - frozen_steps)

        return [backbone if g["name"].startswith("backbone") else decoder for g in self.optimizer.param_groups]

    @property
    def frozen_epochs(self) -> int:
        return min(self.cfg.frozen_epochs, self.cfg.epochs)

    def begin_epoch(self, epoch: int) -> None:
        self.core.set_backbone_trainable(epoch >= self.frozen_epochs)  # also re-applies the eval-mode parts

    def _key(self, epoch: int, batch_index: int) -> tuple[int, int, int, int]:
        return (self.cfg.seed, epoch, batch_index, self.ctx.rank)

    def fetch(self, indices: list[int], epoch: int, batch_index: int) -> ImageCaptionBatch:
        key = self._key(epoch, batch_index)
        if self._prefetch is not None and self._prefetch[0] == (key, tuple(indices)):
            batch = self._prefetch[1].result()
        else:
            batch = self.dataset.batch(indices, key)
        self._prefetch = None
        # prepare the next batch of this epoch while this one trains (a pure function of its position)
        nxt = batch_index + 1
        if nxt < self.batches_per_epoch:
            order = self._order(epoch)
            idx = order[nxt * self.cfg.batch_size : (nxt + 1) * self.cfg.batch_size]
            if idx:
                if self._prefetcher is None:
                    self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
                k = self._key(epoch, nxt)
                self._prefetch = ((k, tuple(idx)), self._prefetcher.submit(self.dataset.batch, idx, k))
        return batch

    def _order(self, epoch: int) -> list[int]:
        cached = getattr(self, "_order_cache", None)
        if cached is None or cached[0] != epoch:
            self._order_cache = (epoch, epoch_order(len(self.dataset), self.cfg.seed, epoch, self.ctx))
        return self._order_cache[1]

    def _forward(self, batch: ImageCaptionBatch) -> torch.Tensor:
        dev = self.device
        pixels = batch.pixels.to(dev, non_blocking=True)
        if self.cfg.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        tokens = batch.tokens.to(dev, non_blocking=True)
        lengths = batch.lengths.to(dev, non_blocking=True)
        index = batch.image_index.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            logits, aux = self.model(pixels, tokens, lengths, index)
            loss = caption_loss(logits, tokens, lengths, self.label_smoothing)
        if aux is not None:
            loss = loss + aux.float()
        return loss

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch[1].cancel()
            self._prefetch = None
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
            self._prefetcher = None
        self.dataset.close()
