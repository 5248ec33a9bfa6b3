"""Augmented views in the feature cache: augmentation that survives precomputation.

`extract --views K` stores, beside each training image's plain record, K augmented views of it under the
keys ``<image id>#view1`` .. ``#viewK``: a random resized crop, a mild rotation, colour jitter and a
horizontal flip (:func:`pipeline.data.image_captions.augment`, the augmentation `finetune` applies), every
draw from ``(seed, image id, view)``. The views are therefore a pure function of the image and the cache's
:class:`CachedViews` (which ``meta.json`` records under ``views``): a rerun, a resumed extraction or another
rank computes the same view, and whether a view is mirrored — so that its captions have left and right
swapped — is known from the same draws without reading the image (:meth:`CachedViews.flipped`).

`train` and `scst` draw one view per training image per epoch (:func:`view_of_epoch`): the plain view and
the K augmented ones in an order drawn per image from the seed, a different one each epoch until all were
used. Val and test images have the plain view only; a cache without views is trained on exactly as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from pipeline.data.augment import Augmentation, AugmentDraws, augment
from pipeline.data.manifest import ManifestRecord
from pipeline.errors import UserError

VIEW_MARK = "#view"


def view_key(image_id: str, view: int) -> str:
    """The cache key of ``view`` of ``image_id`` (view 0: the plain record, the image id itself)."""
    return image_id if view == 0 else f"{image_id}{VIEW_MARK}{view}"


def parse_view_key(key: str) -> tuple[str, int]:
    """``(image id, view)`` of a cache key (view 0 for a plain record)."""
    base, mark, view = key.rpartition(VIEW_MARK)
    if mark and view.isdigit() and int(view) > 0:
        return base, int(view)
    return key, 0


def _id_words(image_id: str) -> list[int]:
    """An image id as seed words (the first 16 bytes of its sha256)."""
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    return [int.from_bytes(digest[k:k + 4], "little") for k in range(0, 16, 4)]


@dataclass(frozen=True)
class CachedViews:
    """How many augmented views of each training image a cache holds, and how they are drawn."""

    count: int
    seed: int
    augmentation: Augmentation
    splits: tuple[str, ...] = ("train",)

    def draws(self, image_id: str, view: int) -> AugmentDraws:
        return AugmentDraws.sample(np.random.default_rng([self.seed, view, *_id_words(image_id)]))

    def flipped(self, image_id: str, view: int) -> bool:
        """Whether ``view`` of ``image_id`` is mirrored (the plain view never is)."""
        return view > 0 and self.draws(image_id, view).flipped(self.augmentation)

    def records(self, records: Sequence[ManifestRecord]) -> list[ManifestRecord]:
        """The view records of ``records`` (those of :attr:`splits`): the same image file under each view's key."""
        return [dataclasses.replace(r, image_id=view_key(r.image_id, v))
                for r in records if r.split in self.splits for v in range(1, self.count + 1)]

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "seed": self.seed, "splits": list(self.splits),
                "augmentation": dataclasses.asdict(self.augmentation),
                "keys": f"<image id>{VIEW_MARK}<1..count>", "drawn_from": "(seed, view, sha256(image id)[:16])"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CachedViews":
        return cls(int(d["count"]), int(d["seed"]), Augmentation(**d["augmentation"]), tuple(d["splits"]))


class ViewRenderer:
    """Renders a view record's pixels at the backbone's input size and normalisation (``data_config``: timm's
    ``input_size``, ``mean``, ``std``, ``interpolation``)."""

    def __init__(self, views: CachedViews, data_config: dict[str, Any]) -> None:
        self.views = views
        self.size = int(data_config["input_size"][-1])
        self.mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(data_config["std"], dtype=torch.float32).view(3, 1, 1)
        self.interpolation = data_config.get("interpolation", "bicubic")

    def __call__(self, image, key: str) -> Optional[torch.Tensor]:
        """The view's tensor, or None when ``key`` is a plain record's (the caller's eval transform applies)."""
        image_id, view = parse_view_key(key)
        if view == 0:
            return None
        x, _ = augment(image, self.views.augmentation, self.views.draws(image_id, view), size=self.size,
                       mean=self.mean, std=self.std, interpolation=self.interpolation)
        return x


def view_of_epoch(image_id: str, epoch: int, views: int, seed: int) -> int:
    """The view of ``image_id`` that epoch ``epoch`` trains on, out of the plain one and ``views`` augmented
    ones: each run of ``views + 1`` epochs uses every view once, in an order drawn from ``(seed, run, image)``."""
    if views == 0:
        return 0
    cycle, position = divmod(epoch, views + 1)
    order = np.random.default_rng([seed, cycle, *_id_words(image_id)]).permutation(views + 1)
    return int(order[position])


class ViewsError(UserError, ValueError):
    """Views asked for that the feature cache does not hold."""


@dataclass(frozen=True)
class ViewSchedule:
    """Which view of each training image an epoch reads: out of the plain record and the first ``count`` of
    the cache's views (:func:`view_of_epoch`, from ``seed``), with whether it is mirrored."""

    cached: CachedViews
    count: int
    seed: int

    def pick(self, image_id: str, epoch: int) -> tuple[str, bool]:
        """``(cache key, mirrored)`` of ``image_id``'s view in ``epoch``."""
        view = view_of_epoch(image_id, epoch, self.count, self.seed)
        return view_key(image_id, view), self.cached.flipped(image_id, view)

    @classmethod
    def of_cache(cls, cache: Any, wanted: Optional[int], seed: int,
                 digests: dict[str, Optional[str]]) -> Optional["ViewSchedule"]:
        """The schedule for training the images of ``digests`` (image id -> the sha256 its manifest records) on
        ``cache`` (a :class:`cache.FeatureCache`) with ``wanted`` views (None: all the cache holds); None when
        there are none to draw from. Every view of every image must be in the cache, computed from that image:
        an error names the first that is not, and what to do."""
        meta = cache.meta.views
        have = 0 if meta is None else int(meta["count"])
        count = have if wanted is None else wanted
        if count > have:
            raise ViewsError(f"{cache.directory}: {count} augmented view(s) asked for, the cache holds {have}; "
                             f"re-extract with `pipeline extract --views {count}` or ask for at most {have}")
        if count == 0:
            return None
        keys = {view_key(i, v): i for i in digests for v in range(1, count + 1)}
        found = cache.digests(list(keys))
        bad = next((k for k, i in keys.items() if found[k] is None or (digests[i] and found[k] != digests[i])), None)
        if bad is not None:
            problem = "not in the cache" if found[bad] is None else "computed from another version of the image"
            raise ViewsError(f"{cache.directory}: view {bad!r} is {problem}: re-extract with this manifest "
                             f"(`pipeline extract --views {have}`; it computes what is missing), or train with --views 0")
        return cls(CachedViews.from_dict(meta), count, seed)
