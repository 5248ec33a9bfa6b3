"""Images with their captions, decoded per batch and augmented caption-safely: the data of end-to-end
fine-tuning (and of SCST on a fine-tuned bundle's own backbone).

:class:`ImageCaptionDataset` decodes and augments images per batch (a thread pool, no DataLoader): random
resized crop, mild rotation, colour jitter and, only when it is caption-safe, a horizontal flip whose
captions have left/right swapped (:func:`flip_caption`). Every random draw of a batch comes from a generator
seeded by ``(seed, epoch, batch, rank)``, so a resumed run sees exactly the augmentations of an
uninterrupted one.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from pipeline.data.augment import Augmentation, AugmentDraws, augment, flip_caption
from pipeline.data.features import pad_tokens
from pipeline.data.images import DEFAULT_MAX_PIXELS, ImageLocation, load_rgb
from pipeline.data.manifest import ManifestRecord, resolve_image
from pipeline.text.tokenizers import CaptionTokenizer

__all__ = ["ImageCaptionBatch", "ImageCaptionDataset", "ImageItem", "image_items"]


# --------------------------------------------------------------------------- images with their captions
@dataclass
class ImageItem:
    image_id: str
    path: ImageLocation  # a file, or a member of a tar shard
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
        items.append(ImageItem(r.image_id, resolve_image(r, manifest), tokenizer.encode_captions(r.captions),
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
        item, rng = self.items[i], np.random.default_rng(seed)
        x, flipped = augment(self._load(i), self.augmentation, AugmentDraws.sample(rng), size=self.size, mean=self.mean,
                             std=self.std, interpolation=self.interpolation)
        pick = rng.permutation(len(item.captions))
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
