"""The feature cache: the only code that knows how cached features are stored.

Layout of a cache folder::

    meta.json                      what is inside (see :class:`cache.format.CacheMeta`): the features'
                                   spec (:class:`cache.format.FeatureSpec`), shard count, record count, hash
    backbone.safetensors           the backbone weights the features were computed with (sha256 in meta)
    shard-00000-of-00004.lmdb      LMDB, one file per shard (subdir=False), key = image id
    shard-00000-of-00004.json      the shard's record count, content hash, identity and coverage (when done)
    rejects.jsonl                  images that could not be encoded, and why

A value is the 32-byte sha256 of the image file it was computed from, then the raw bytes
of each token set, in ``meta.token_sets`` order, each a C-contiguous ``(tokens, channels)``
array of ``meta.dtype`` (bfloat16 as its raw 16-bit words: numpy has no bfloat16).

``cache`` is storage only: it imports nothing from the library (``pipeline``) or the stages.
"""

from cache.format import (
    CacheError,
    CacheFormatError,
    CacheMeta,
    EmptyCacheError,
    FeatureMismatchError,
    FeatureSpec,
    TokenSet,
    check_spec,
    shard_of,
    spec_mismatches,
)
from cache.reader import FeatureCache
from cache.writer import CacheWriter

__all__ = [
    "CacheError",
    "CacheFormatError",
    "EmptyCacheError",
    "FeatureMismatchError",
    "FeatureSpec",
    "check_spec",
    "spec_mismatches",
    "CacheMeta",
    "TokenSet",
    "shard_of",
    "FeatureCache",
    "CacheWriter",
]
