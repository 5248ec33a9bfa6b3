"""Cache metadata, shard naming and the key -> shard rule."""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError

FORMAT_NAME = "caption-feature-cache"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
META_FILE = "meta.json"


class CacheFormatError(UserError, ValueError):
    """A cache that is missing, incomplete, of another version, or not what the caller expects."""


def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}"


def shard_of(image_id: str, num_shards: int) -> int:
    """Which shard holds ``image_id``: crc32 of its UTF-8 bytes modulo the shard count (stable everywhere)."""
    return zlib.crc32(image_id.encode("utf-8")) % num_shards


@dataclass(frozen=True)
class TokenSet:
    """One feature map stored per image, flattened to ``(tokens, channels)``."""

    name: str
    tokens: int
    channels: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.tokens, self.channels)


@dataclass
class CacheMeta:
    backbone: str
    weights: dict[str, Any]  # {"source": "random-init" | "timm-pretrained" | "file", "path"?, "sha256"?}
    preprocessing: dict[str, Any]  # the backbone data config actually used (input_size, mean, std, ...)
    token_sets: list[TokenSet]
    dtype: str
    num_shards: int
    records: int = 0
    content_sha256: str = ""
    sharding: str = "crc32(utf8(image_id)) % num_shards"
    config: dict[str, Any] = field(default_factory=dict)  # the resolved stage config that wrote it
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def record_nbytes(self) -> int:
        return sum(t.tokens * t.channels for t in self.token_sets) * self.np_dtype.itemsize

    def fingerprint(self) -> dict[str, Any]:
        """What must match for two runs to write the same cache (counts and hashes excluded)."""
        return {
            "backbone": self.backbone,
            "weights": self.weights,
            "preprocessing": self.preprocessing,
            "token_sets": [asdict(t) for t in self.token_sets],
            "dtype": self.dtype,
            "num_shards": self.num_shards,
            "version": self.version,
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["token_sets"] = [asdict(t) for t in self.token_sets]
        return d

    def write(self, directory: Path) -> None:
        path = Path(directory) / META_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "meta") -> "CacheMeta":
        if d.get("format") != FORMAT_NAME:
            raise CacheFormatError(f"{source}: not a feature cache (format {d.get('format')!r}, expected {FORMAT_NAME!r})")
        if d.get("version") != FORMAT_VERSION:
            raise CacheFormatError(
                f"{source}: cache format version {d.get('version')!r}, this code reads version {FORMAT_VERSION}; "
                "re-extract with `pipeline extract`"
            )
        d = dict(d)
        d["token_sets"] = [TokenSet(**t) for t in d["token_sets"]]
        if d["dtype"] not in DTYPES:
            raise CacheFormatError(f"{source}: unsupported dtype {d['dtype']!r}")
        return cls(**d)

    @classmethod
    def read(cls, directory: Path) -> "CacheMeta":
        path = Path(directory) / META_FILE
        if not path.exists():
            raise CacheFormatError(
                f"{directory}: no {META_FILE} — not a feature cache, or its extraction has not finished "
                "(rerun `pipeline extract`; it resumes)"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CacheFormatError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
        return cls.from_dict(data, source=str(path))
