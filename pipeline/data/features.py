"""A torch Dataset over (image, caption) pairs whose features come from the cache, and the padding helpers.

The library side of cached features (``cache`` itself is storage only).

Reading a whole batch in one LMDB transaction in the main process is several
times faster than per-item reads through DataLoader workers (measured: 22-27k vs
6k records/s), so :class:`CachedCaptionDataset` implements ``__getitems__``:
PyTorch's DataLoader hands it a batch of indices at once. Use it with
``num_workers=0`` and any sampler (``DistributedSampler`` included)::

    ds = CachedCaptionDataset(cache, captions, pad_id=tok.pad_id)   # captions: a CaptionTable
    loader = DataLoader(ds, batch_size=64, shuffle=True, collate_fn=caption_collate)

Memory holds the captions' token ids in flat arrays (:mod:`pipeline.data.captions`); features are read per
batch, so it does not grow with the size of the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from cache.format import TokenSet
from cache.reader import FeatureCache
from pipeline.data.captions import CaptionTable

if TYPE_CHECKING:
    from pipeline.data.views import ViewSchedule


@dataclass
class CaptionBatch:
    image_ids: list[str]
    features: torch.Tensor  # (B, N, C), the cache dtype (bfloat16 included); several token sets: see select_features
    tokens: torch.Tensor  # (B, T) int64: bos, caption, eos, then padding
    lengths: torch.Tensor  # (B,) int64: real tokens per row (padding is found from these only)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "CaptionBatch":
        return CaptionBatch(
            self.image_ids,
            self.features.to(device, non_blocking=non_blocking),
            self.tokens.to(device, non_blocking=non_blocking),
            self.lengths.to(device, non_blocking=non_blocking),
        )

    def __len__(self) -> int:
        return len(self.image_ids)


def select_features(arrays: dict[str, np.ndarray], token_sets: Sequence[str] | None) -> np.ndarray:
    """One ``(B, N, C)`` array from the cached token sets: one set as it is, or several concatenated along N,
    each zero-padded to the widest set's channels (sets of equal width: plain concatenation).

    A decoder told the layout (:func:`token_layout`) projects each set's slice with a Linear of its own
    (:class:`pipeline.models.decoders.layers.VisualProjection`), so the padding is never read."""
    names = list(token_sets) if token_sets else list(arrays)
    missing = [n for n in names if n not in arrays]
    if missing:
        raise KeyError(f"token set(s) {missing} not in the cache (it has {list(arrays)})")
    if len(names) == 1:
        return arrays[names[0]]
    parts = [arrays[n] for n in names]
    width = max(a.shape[-1] for a in parts)
    if all(a.shape[-1] == width for a in parts):
        return np.concatenate(parts, axis=1)
    out = np.zeros((parts[0].shape[0], sum(a.shape[1] for a in parts), width), dtype=parts[0].dtype)
    start = 0
    for a in parts:  # zero bytes are 0.0 in every cache dtype, bfloat16 words included
        out[:, start:start + a.shape[1], : a.shape[-1]] = a
        start += a.shape[1]
    return out


def concat_token_maps(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The token sets a backbone computes (``(B, n_i, c_i)`` each) as the one ``(B, N, C)`` tensor
    :func:`select_features` makes of the cached ones: concatenated along N, zero-padded to the widest."""
    if len(maps) == 1:
        return maps[0]
    width = max(m.shape[-1] for m in maps)
    return torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[-1])) for m in maps], dim=1)


def token_layout(token_sets: Sequence[TokenSet]) -> tuple[tuple[int, int], ...]:
    """``(tokens, channels)`` of each token set: the layout a decoder reading these features is built for
    (``create_decoder(..., token_sets=token_layout(spec.token_sets))``)."""
    return tuple((int(t.tokens), int(t.channels)) for t in token_sets)


def features_tensor(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A tensor of the cache's ``dtype`` from an array :meth:`FeatureCache.get_batch` returned with ``raw=True``
    (bfloat16 arrives as its 16-bit words; the tensor shares their memory)."""
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def pad_tokens(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens (B, T), lengths (B,))``: the sequences left-aligned, padded with ``pad_id``."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    tokens = np.full((len(sequences), int(lengths.max()) if len(sequences) else 0), pad_id, dtype=np.int64)
    mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    if len(sequences):
        tokens[mask] = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
    return torch.from_numpy(tokens), torch.from_numpy(lengths)


class CachedCaptionDataset(Dataset):
    """One entry per caption of ``captions`` (a :class:`pipeline.data.captions.CaptionTable`: token ids include
    bos and eos); its image's features are read from ``cache`` a batch at a time.

    With ``views`` (a :class:`pipeline.data.views.ViewSchedule`), each image is read under the augmented view its
    epoch draws (:meth:`set_epoch`, as with ``DistributedSampler``), and a mirrored view's caption is the table's
    mirrored one (left and right swapped)."""

    def __init__(
        self,
        cache: FeatureCache,
        captions: CaptionTable,
        *,
        pad_id: int,
        token_sets: Sequence[str] | None = None,
        zero_features: bool = False,
        views: Optional[ViewSchedule] = None,
    ) -> None:
        self.cache = cache
        self.captions = captions
        self.pad_id = pad_id
        self.token_sets = token_sets
        self.zero_features = zero_features  # the image-blind control: same shapes, no visual information
        if views is not None and captions.mirrored is None:
            raise ValueError("views need the mirrored caption of every sample (a CaptionTable built with mirrored)")
        self.views, self.epoch = views, 0
        first = captions.caption_image_ids([0]) if len(captions) else []
        if first and first[0] not in cache:
            raise KeyError(f"image {first[0]!r} is not in the feature cache {cache.directory}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.captions)

    def shard_of_samples(self) -> np.ndarray:
        """The cache shard each sample's image is in (int32): what a shard-bounded shuffle groups by
        (:func:`pipeline.training.loop.epoch_order`)."""
        table, meta = self.captions, self.cache.meta
        of_image = np.fromiter((meta.shard_of(table.image_id(i)) for i in range(table.num_images)), dtype=np.int32,
                               count=table.num_images)
        return of_image[table.image_of]

    def __getitem__(self, index: int) -> CaptionBatch:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> CaptionBatch:
        image_ids = self.captions.caption_image_ids(indices)
        keys, mirrored = image_ids, None
        if self.views is not None:
            views = [self.views.pick(image_id, self.epoch) for image_id in image_ids]
            keys, mirrored = [key for key, _ in views], [m for _, m in views]
        features = features_tensor(select_features(self.cache.get_batch(keys, raw=True), self.token_sets),
                                   self.cache.meta.dtype)
        if self.zero_features:
            features = torch.zeros_like(features)
        tokens, lengths = pad_tokens(self.captions.token_rows(indices, mirrored), self.pad_id)
        return CaptionBatch(image_ids, features, tokens, lengths)


def caption_collate(batch: CaptionBatch) -> CaptionBatch:
    """Collate for DataLoader: ``__getitems__`` already returns a collated :class:`CaptionBatch`."""
    if not isinstance(batch, CaptionBatch):
        raise TypeError(f"expected a CaptionBatch from CachedCaptionDataset.__getitems__, got {type(batch).__name__}")
    return batch


@dataclass
class FeatureBatch:
    image_ids: list[str]
    features: torch.Tensor  # (B, N, C)
    flipped: Optional[list[bool]] = None  # each image's view mirrored (its references then have left/right swapped)

    def __len__(self) -> int:
        return len(self.image_ids)


class CachedImageDataset:
    """One entry per image: its cached features (float32); with ``views``, the view each epoch draws
    (:meth:`set_epoch`) and whether it is mirrored."""

    def __init__(self, cache: FeatureCache, image_ids: Sequence[str], token_sets: Optional[Sequence[str]] = None,
                 views: Optional[ViewSchedule] = None):
        self.cache, self.image_ids, self.token_sets = cache, list(image_ids), token_sets
        self.views, self.epoch = views, 0
        missing = [i for i in self.image_ids if i not in cache]
        if missing:
            raise KeyError(f"{len(missing)} image(s) are not in the feature cache {cache.directory}, "
                           f"e.g. {missing[:3]}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.image_ids)

    def features(self, keys: Sequence[str]) -> torch.Tensor:
        return torch.from_numpy(select_features(self.cache.get_batch(list(keys)), self.token_sets)).float()

    def __getitems__(self, indices: Sequence[int]) -> FeatureBatch:
        ids = [self.image_ids[i] for i in indices]
        if self.views is None:
            return FeatureBatch(ids, self.features(ids))
        views = [self.views.pick(image_id, self.epoch) for image_id in ids]
        return FeatureBatch(ids, self.features([key for key, _ in views]), [mirrored for _, mirrored in views])
