"""What a cache holds: the feature contract, the cache's metadata, record layout and sharding.

Two facts every later stage relies on live here, and only here:

* :class:`FeatureSpec` — what a set of visual features *is*: backbone, weights (by the
  sha256 of their bytes, never by a path), preprocessing, token sets (with the backbone
  stage each comes from, as an integer), dtype. The cache's ``meta.json`` holds one; so
  does a model bundle's ``config.json`` (the features its decoder was trained on).
* :func:`spec_mismatches` / :func:`check_spec` — the one answer to "do these features fit
  that model?", used by every stage and by the server.

A record is keyed by image id and carries the sha256 of the image file it was computed
from (:data:`DIGEST_BYTES` bytes before the features), so features of other pixels are
never served: a changed image is re-extracted, and readers can check the digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

FORMAT_NAME = "caption-feature-cache"
FORMAT_VERSION = 2
DTYPES = ("float16", "float32", "bfloat16")
META_FILE = "meta.json"
WEIGHTS_FILE = "backbone.safetensors"  # the backbone weights the features were computed with (a copy)
DIGEST_BYTES = 32  # sha256 of the image file, at the start of every record


class CacheError(Exception):
    """Base of the cache's errors; messages name the folder or file and what to do."""


class CacheFormatError(CacheError, ValueError):
    """A cache that is missing, incomplete, of another version, or not what the caller expects."""


class EmptyCacheError(CacheFormatError):
    """A finished extraction that holds no record: every image was rejected."""


class FeatureMismatchError(CacheFormatError):
    """Features (a cache, a tensor, an image pipeline) that do not fit a model; the message lists every difference."""


def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}"


# How records are spread over shards (``CacheMeta.sharding``). By image: a hash of the id, so shards are even
# whatever the ids. By input shard: every record of one input shard (an img2dataset tar, whose images have ids
# ``<source>/<input shard>/<key>``) goes to the same cache shard — input shard ``n`` (a numbered one, as
# img2dataset's are) to cache shard ``n % num_shards`` — so the process that writes a cache shard reads whole
# input shards, and ranks given cache shards round-robin read disjoint sets of input shards.
SHARD_BY_IMAGE = "crc32(utf8(image_id)) % num_shards"
SHARD_BY_INPUT_SHARD = ("input shard: image id <source>/<input shard>/<key>; int(<input shard>) % num_shards when "
                        "it is a number, else crc32(utf8(<source>/<input shard>)) % num_shards")
SHARDINGS = (SHARD_BY_IMAGE, SHARD_BY_INPUT_SHARD)


def shard_of(image_id: str, num_shards: int, sharding: str = SHARD_BY_IMAGE) -> int:
    """Which shard holds ``image_id`` (stable everywhere): by default crc32 of its UTF-8 bytes modulo the shard
    count; with :data:`SHARD_BY_INPUT_SHARD` the cache shard of the input shard the id names."""
    if sharding == SHARD_BY_INPUT_SHARD:
        group = image_id.rpartition("/")[0]
        number = group.rpartition("/")[2]
        if number.isdigit() and number.isascii():
            return int(number) % num_shards
        image_id = group
    return zlib.crc32(image_id.encode("utf-8")) % num_shards


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def storage_dtype(dtype: str) -> np.dtype:
    """How features of ``dtype`` are stored: numpy has no bfloat16, so bfloat16 features are kept as their raw
    16-bit words (the upper half of the float32 bits), i.e. ``uint16``."""
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)


def to_bfloat16_words(values: np.ndarray) -> np.ndarray:
    """float values -> bfloat16 words (``uint16``), rounded to nearest even like ``torch.Tensor.bfloat16()``."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded.astype(np.uint16))


def from_bfloat16_words(words: np.ndarray) -> np.ndarray:
    """bfloat16 words (``uint16``) -> float32 (exact: every bfloat16 value is a float32)."""
    return (words.astype(np.uint32) << 16).view(np.float32)


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as indented, key-sorted JSON, written to a temporary file and renamed into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@dataclass(frozen=True)
class TokenSet:
    """One feature map stored per image, flattened to ``(tokens, channels)``.

    ``index`` is the backbone stage it comes from (timm ``forward_intermediates`` index),
    ``None`` for the final feature map (``forward_features``)."""

    name: str
    tokens: int
    channels: int
    index: Optional[int] = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.tokens, self.channels)

    @classmethod
    def from_dict(cls, d: Any) -> "TokenSet":
        if isinstance(d, dict):
            return cls(str(d["name"]), int(d["tokens"]), int(d["channels"]),
                       None if d.get("index") is None else int(d["index"]))
        raise CacheFormatError(f"token set {d!r}: expected an object with name, tokens, channels, index")


@dataclass(frozen=True)
class FeatureSpec:
    """What visual features are: everything that determines their values, and nothing else.

    ``weights`` identifies the backbone weights by content: ``{"source": "file" | "timm-pretrained"
    | "random-init" | "finetuned", "sha256": <of the weights file the cache or bundle carries>, ...}``.
    ``source`` says where a model's features come from: ``"cache"`` (precomputed with these weights)
    or ``"finetuned"`` (the model's own backbone, trained with it; cached features do not fit it).
    """

    backbone: str
    weights: dict[str, Any]
    preprocessing: dict[str, Any]
    token_sets: tuple[TokenSet, ...]
    dtype: str = "float16"
    source: str = "cache"

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_sets", tuple(self.token_sets))

    @property
    def out_indices(self) -> Optional[list[int]]:
        """The backbone stages to read (None: the final feature map only)."""
        if all(t.index is None for t in self.token_sets):
            return None
        return [int(t.index) for t in self.token_sets]

    @property
    def feature_dim(self) -> int:
        """The channels of the features tensor a decoder reads: the widest token set's (the others are
        zero-padded to it; see ``pipeline.data.features.select_features``)."""
        return max(int(t.channels) for t in self.token_sets)

    @property
    def num_tokens(self) -> int:
        return sum(t.tokens for t in self.token_sets)

    @property
    def input_size(self) -> int:
        return int(self.preprocessing["input_size"][-1])

    def select(self, names: Optional[Sequence[str]]) -> "FeatureSpec":
        """The spec of a subset of the token sets, in the order given (all when ``names`` is None)."""
        if names is None:
            return self
        have = {t.name: t for t in self.token_sets}
        missing = [n for n in names if n not in have]
        if missing:
            raise FeatureMismatchError(
                f"token set(s) {missing} not among the features' token sets {list(have)}; "
                f"choose from those, or re-extract with the stages you need (`pipeline extract --out-indices ...`)")
        return replace(self, token_sets=tuple(have[n] for n in names))

    def identity(self) -> dict[str, Any]:
        """What determines the feature bytes (comparable, JSON-ready)."""
        return {
            "backbone": self.backbone,
            "weights_sha256": self.weights.get("sha256"),
            "preprocessing": self.preprocessing,
            "token_sets": [asdict(t) for t in self.token_sets],
            "dtype": self.dtype,
        }

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["token_sets"] = [asdict(t) for t in self.token_sets]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "features") -> "FeatureSpec":
        if not isinstance(d, dict):
            raise CacheFormatError(f"{where}: expected an object describing the features, got {type(d).__name__}")
        missing = [k for k in ("backbone", "weights", "preprocessing", "token_sets") if k not in d]
        if missing:
            raise CacheFormatError(f"{where}: missing keys {missing}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known and k != "token_sets"},
                   token_sets=tuple(TokenSet.from_dict(t) for t in d["token_sets"]))


def spec_mismatches(have: FeatureSpec, want: FeatureSpec) -> list[str]:
    """Every way the features ``have`` differ from the ones a model was trained on (``want``); [] when they fit.

    Compared: feature source, backbone, weights (by sha256), every preprocessing key, and the token
    sets the model reads (each must exist in ``have`` with the same shape and backbone stage; ``have``
    may hold more). The dtype is not compared: float16 and float32 features of the same pixels fit."""
    problems = []
    if have.source != want.source:
        problems.append(f"source: {have.source!r} vs {want.source!r}")
    if have.backbone != want.backbone:
        problems.append(f"backbone: {have.backbone!r} vs {want.backbone!r}")
    ha, wa = have.weights.get("sha256"), want.weights.get("sha256")
    if ha != wa:
        problems.append(f"weights: sha256 {str(ha)[:12]} ({have.weights.get('source')}) vs {str(wa)[:12]} "
                        f"({want.weights.get('source')})")
    for key in sorted(set(have.preprocessing) | set(want.preprocessing)):
        a, b = have.preprocessing.get(key), want.preprocessing.get(key)
        if a != b:
            problems.append(f"preprocessing.{key}: {a!r} vs {b!r}")
    by_name = {t.name: t for t in have.token_sets}
    for t in want.token_sets:
        h = by_name.get(t.name)
        if h is None:
            problems.append(f"token set {t.name!r}: missing (have {list(by_name)})")
        elif (h.tokens, h.channels, h.index) != (t.tokens, t.channels, t.index):
            problems.append(f"token set {t.name!r}: {h.tokens}x{h.channels} from stage {h.index} vs "
                            f"{t.tokens}x{t.channels} from stage {t.index}")
    return problems


def check_spec(have: FeatureSpec, want: FeatureSpec, *, have_label: str, want_label: str, remedy: str = "") -> None:
    """Raise :class:`FeatureMismatchError` naming every difference (``have`` vs ``want``) and what to do."""
    problems = spec_mismatches(have, want)
    if problems:
        if not remedy:
            remedy = (f"re-extract with the model's settings (`pipeline extract --backbone {want.backbone}` at input "
                      f"size {want.preprocessing.get('input_size')}, the same weights) or use a model trained on "
                      f"these features")
        raise FeatureMismatchError(f"the features of {have_label} do not fit {want_label} (found vs expected): "
                                   + "; ".join(problems) + f". {remedy}")


@dataclass
class CacheMeta:
    """``meta.json``: the features' spec, how they are stored, and a content hash of every record.

    ``identity()`` — spec, shard count, format version, ``computed_with`` and ``views`` — is what must match for a
    cache folder to be reused. ``computed_with`` holds what else a record's bytes depend on besides the
    spec: the batch the encoder ran at (kernels differ with the batch's size: the encoder always runs at
    that size, a short last batch padded, so *which* batch a record lands in does not matter), the device
    type, autocast and memory format. Counts and hashes follow from the records; nothing that changes no
    byte (paths, workers) and nothing about a particular run (what it reused, how long it took) is here:
    the same records give the same ``meta.json``."""

    spec: FeatureSpec
    num_shards: int
    records: int = 0
    content_sha256: str = ""
    weights_file: Optional[str] = None  # WEIGHTS_FILE when the cache carries its backbone's weights
    sharding: str = SHARD_BY_IMAGE  # or SHARD_BY_INPUT_SHARD (see shard_of)
    record_layout: str = "sha256(image file) [32 bytes], then each token set's (tokens, channels) array"
    extra: dict[str, Any] = field(default_factory=dict)  # what a producer records beside (e.g. a CLIP model key)
    computed_with: dict[str, Any] = field(default_factory=dict)  # batch size, device type, autocast, memory format
    # Augmented views of the training images beside their plain records (`extract --views K`; see
    # pipeline.data.views): their count, seed and augmentation. None (not written): plain records only.
    views: Optional[dict[str, Any]] = None
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    # -- conveniences (the spec's) ------------------------------------------------------------
    @property
    def backbone(self) -> str:
        return self.spec.backbone

    @property
    def token_sets(self) -> tuple[TokenSet, ...]:
        return self.spec.token_sets

    @property
    def dtype(self) -> str:
        return self.spec.dtype

    @property
    def weights(self) -> dict[str, Any]:
        return self.spec.weights

    @property
    def preprocessing(self) -> dict[str, Any]:
        return self.spec.preprocessing

    @property
    def np_dtype(self) -> np.dtype:
        """The dtype of the stored bytes (:func:`storage_dtype`: bfloat16 as ``uint16`` words)."""
        return storage_dtype(self.spec.dtype)

    @property
    def feature_nbytes(self) -> int:
        return sum(t.tokens * t.channels for t in self.spec.token_sets) * self.np_dtype.itemsize

    @property
    def record_nbytes(self) -> int:
        return DIGEST_BYTES + self.feature_nbytes

    def shard_of(self, image_id: str) -> int:
        """The shard that holds ``image_id`` in this cache."""
        return shard_of(image_id, self.num_shards, self.sharding)

    def identity(self) -> dict[str, Any]:
        identity = {**self.spec.identity(), "num_shards": self.num_shards, "version": self.version,
                    "extra": self.extra, "computed_with": self.computed_with}
        if self.sharding != SHARD_BY_IMAGE:  # a cache sharded by image keeps the identity it always had
            identity["sharding"] = self.sharding
        if self.views is not None:
            identity["views"] = self.views
        return identity

    # -- files --------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        if d["views"] is None:
            del d["views"]  # a cache without views reads as it always did
        return d

    def write(self, directory: Path) -> None:
        write_json_atomic(Path(directory) / META_FILE, self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "meta") -> "CacheMeta":
        if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise CacheFormatError(f"{source}: not a feature cache (format {found!r}, expected {FORMAT_NAME!r})")
        if d.get("version") != FORMAT_VERSION:
            raise CacheFormatError(
                f"{source}: cache format version {d.get('version')!r}, this code reads version {FORMAT_VERSION}; "
                "re-extract with `pipeline extract`"
            )
        d = dict(d)
        d["spec"] = FeatureSpec.from_dict(d["spec"], where=f"{source}: spec")
        if d["spec"].dtype not in DTYPES:
            raise CacheFormatError(f"{source}: unsupported dtype {d['spec'].dtype!r}")
        if d.get("sharding", SHARD_BY_IMAGE) not in SHARDINGS:
            raise CacheFormatError(f"{source}: unknown sharding {d['sharding']!r}; re-extract with `pipeline extract`")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

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
