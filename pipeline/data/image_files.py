"""Manifest images as a torch Dataset for encoders (feature extraction, CLIP embeddings).

Each item is decoded once from its file, with the sha256 of the bytes read (what a cached
feature is keyed by), or the reason it could not be used — a bad image never stops a batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import Dataset

from pipeline.data.images import (
    DEFAULT_MAX_FILE_BYTES,
    ImageDecodeError,
    read_image_file,
)
from pipeline.data.manifest import ManifestRecord, resolve_image


class ImageFiles(Dataset):
    """``(index, digest, tensor, None)`` per image, or ``(index, digest or None, None, reject)`` for a bad one
    (among them files over ``max_file_bytes``, refused by their size before they are read). With ``views``
    (:class:`pipeline.data.views.ViewRenderer`), a view record's tensor is its augmented view."""

    def __init__(self, records: list[ManifestRecord], manifest: Path, transform: Callable, max_pixels: int,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                 views: Optional[Callable[[Any, str], Optional[torch.Tensor]]] = None) -> None:
        self.records = records
        self.manifest = manifest
        self.transform = transform
        self.max_pixels = max_pixels
        self.max_file_bytes = max_file_bytes
        self.views = views  # (image, record id) -> an augmented view's tensor, or None: ``transform`` applies

    def _tensor(self, image, image_id: str) -> torch.Tensor:
        view = self.views(image, image_id) if self.views is not None else None
        return self.transform(image) if view is None else view

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        path = resolve_image(self.records[i], self.manifest)
        try:
            digest, image = read_image_file(path, self.max_pixels, self.max_file_bytes)
            return i, digest, self._tensor(image, self.records[i].image_id), None
        except ImageDecodeError as e:
            reject = {"file": str(path), "id": self.records[i].image_id, "digest": e.digest, "reason": e.reason,
                      "detail": e.detail}
            return i, e.digest, None, reject


def collate_image_files(items) -> tuple[list[int], list[str], Optional[torch.Tensor], list[dict]]:
    """``(indices, digests, stacked images or None, rejects)`` of a batch of :class:`ImageFiles` items."""
    good = [(i, d, x) for i, d, x, err in items if err is None]
    bad = [err for *_, err in items if err is not None]
    return ([i for i, _, _ in good], [d for _, d, _ in good],
            torch.stack([x for _, _, x in good]) if good else None, bad)
