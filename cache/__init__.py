"""The feature cache: the only code that knows how cached features are stored.

Layout of a cache folder::

    meta.json                      what is inside (see :class:`cache.format.CacheMeta`)
    shard-00000-of-00004.lmdb      LMDB, one file per shard (subdir=False), key = image id
    shard-00000-of-00004.json      the shard's record count and content hash (written when the shard is done)
    rejects.jsonl                  images that could not be encoded, and why

A value is the raw bytes of each token set, in ``meta.token_sets`` order, each a
C-contiguous ``(tokens, channels)`` array of ``meta.dtype``.
"""

from cache.format import CacheFormatError, CacheMeta, TokenSet, shard_of
from cache.loader import CachedCaptionDataset, CaptionBatch, caption_collate
from cache.reader import FeatureCache
from cache.writer import CacheWriter

__all__ = [
    "CacheFormatError",
    "CacheMeta",
    "TokenSet",
    "shard_of",
    "FeatureCache",
    "CacheWriter",
    "CachedCaptionDataset",
    "CaptionBatch",
    "caption_collate",
]
