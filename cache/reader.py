"""Reading a cache: lazily opened per process, read-only, lock-free, one transaction per batch."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import lmdb
import numpy as np

from cache.format import (
    DIGEST_BYTES,
    CacheFormatError,
    CacheMeta,
    FeatureSpec,
    check_spec,
    file_sha256,
    from_bfloat16_words,
    shard_name,
)
from cache.writer import read_rejects

# LMDB refuses to open the same file twice in one process, so every FeatureCache of a process shares
# one environment per shard file (keyed by the file's identity, like lmdb's own guard: a cache rebuilt
# at the same path is a new file), counted by its users and closed when the last one closes.
_SHARED: dict[tuple[int, int], list] = {}  # (st_dev, st_ino) -> [pid, environment, users]
_SHARED_LOCK = threading.Lock()


def _file_key(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def _acquire_environment(path: Path) -> lmdb.Environment:
    key = _file_key(path)
    with _SHARED_LOCK:
        entry = _SHARED.get(key)
        if entry is not None and entry[0] != os.getpid():
            # Inherited through fork: unusable here, and it blocks reopening the file; read-only
            # lock-free environments share no reader table, so closing the child's copy is safe.
            entry[1].close()
            entry = None
        if entry is None:
            env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=True, max_readers=256)
            entry = _SHARED[key] = [os.getpid(), env, 0]
        entry[2] += 1
        return entry[1]


def _release_environment(env: lmdb.Environment) -> None:
    with _SHARED_LOCK:
        for key, entry in list(_SHARED.items()):
            if entry[1] is env and entry[0] == os.getpid():
                entry[2] -= 1
                if entry[2] <= 0:
                    del _SHARED[key]
                    env.close()
                return


class FeatureCache:
    """Read access to a finished cache folder.

    ``expect`` is the :class:`~cache.format.FeatureSpec` the caller needs (e.g. a model bundle's);
    a cache whose features differ is refused with every difference named
    (:func:`~cache.format.check_spec`).

    LMDB environments are opened on first use in each process (an environment
    opened before ``fork`` is unusable in the child), so a ``FeatureCache`` can be
    created once and handed to DataLoader workers or ``torchrun`` ranks.
    """

    def __init__(self, directory: str | Path, expect: FeatureSpec | None = None) -> None:
        self.directory = Path(directory)
        self.meta = CacheMeta.read(self.directory)
        self._rejected: frozenset[str] | None = None
        self._paths = [self.directory / f"{shard_name(i, self.meta.num_shards)}.lmdb" for i in range(self.meta.num_shards)]
        missing = [p.name for p in self._paths if not p.exists()]
        if missing:
            raise CacheFormatError(f"{self.directory}: shard files missing: {', '.join(missing)}")
        self._envs: list[lmdb.Environment] | None = None
        self._pid: int | None = None
        if expect is not None:
            self.check(expect)

    @property
    def spec(self) -> FeatureSpec:
        return self.meta.spec

    # -- checks -----------------------------------------------------------------------------
    def check(self, expect: FeatureSpec, want_label: str = "the model", remedy: str = "") -> None:
        """Refuse (FeatureMismatchError) unless this cache's features are the ones ``expect`` describes."""
        check_spec(self.meta.spec, expect, have_label=f"the cache {self.directory}", want_label=want_label,
                   remedy=remedy)

    def weights_file(self) -> Path:
        """The backbone weights the features were computed with, verified against their recorded sha256."""
        if not self.meta.weights_file:
            raise CacheFormatError(f"{self.directory}: this cache carries no backbone weights (re-extract it)")
        path = self.directory / self.meta.weights_file
        if not path.is_file():
            raise CacheFormatError(f"{path}: the cache's backbone weights are missing; re-extract with `pipeline extract`")
        found, recorded = file_sha256(path), self.meta.spec.weights.get("sha256")
        if found != recorded:
            raise CacheFormatError(
                f"{path}: backbone weights changed since extraction (sha256 {found} now, {recorded} when the "
                "features were computed); re-extract with `pipeline extract` (the weights must be the ones the "
                "features came from)")
        return path

    def digests(self, image_ids: Sequence[str]) -> dict[str, str | None]:
        """The sha256 of the image file each record was computed from (None: not in the cache)."""
        out: dict[str, str | None] = {}
        by_shard: dict[int, list[str]] = {}
        for image_id in image_ids:
            by_shard.setdefault(self.meta.shard_of(image_id), []).append(image_id)
        envs = self._environments()
        for shard, ids in by_shard.items():
            with envs[shard].begin(buffers=True) as txn:
                for image_id in ids:
                    value = txn.get(image_id.encode("utf-8"))
                    out[image_id] = None if value is None else bytes(value[:DIGEST_BYTES]).hex()
        return out

    def rejects(self) -> list[dict]:
        """Images the extraction could not encode (``id``, ``digest``, ``file``, ``reason``)."""
        return read_rejects(self.directory / "rejects.jsonl")

    def stale(self, wanted: dict[str, str | None]) -> dict[str, list[str]]:
        """Which of ``{image_id: image sha256 or None (unknown)}`` the cache cannot serve: ``missing`` ids
        (``rejected`` ones listed apart) and ``changed`` ones (the record was computed from other bytes)."""
        found = self.digests(list(wanted))
        if self._rejected is None:  # a finished cache's rejects do not change: read once
            self._rejected = frozenset(r["id"] for r in self.rejects())
        rejected = self._rejected
        out: dict[str, list[str]] = {"missing": [], "rejected": [], "changed": []}
        for image_id, digest in wanted.items():
            have = found[image_id]
            if have is None:
                out["rejected" if image_id in rejected else "missing"].append(image_id)
            elif digest is not None and have != digest:
                out["changed"].append(image_id)
        return out

    def require(self, wanted: dict[str, str | None], source: str) -> list[str]:
        """Refuse unless every image of ``wanted`` (``{image_id: sha256 or None}``, from ``source``) has
        features computed from those bytes; returns the ids to skip because extraction rejected them."""
        coverage = Coverage(self, source)
        skip = coverage.check(wanted)
        coverage.raise_if_incomplete()
        return skip

    # -- access -----------------------------------------------------------------------------
    def _environments(self) -> list[lmdb.Environment]:
        if self._envs is None or self._pid != os.getpid():
            # First use in this process (a fork's inherited handles are replaced by _acquire_environment).
            self._envs = [_acquire_environment(p) for p in self._paths]
            self._pid = os.getpid()
        return self._envs

    def close(self) -> None:
        if self._envs is not None and self._pid == os.getpid():
            for env in self._envs:
                _release_environment(env)
        self._envs = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: module globals may be gone already
            pass

    def __getstate__(self) -> dict:  # picklable for spawn-based workers: environments reopen lazily
        state = dict(self.__dict__)
        state["_envs"] = None
        state["_pid"] = None
        return state

    def __len__(self) -> int:
        return self.meta.records

    def __contains__(self, image_id: str) -> bool:
        env = self._environments()[self.meta.shard_of(image_id)]
        with env.begin(buffers=True) as txn:
            return txn.get(image_id.encode("utf-8")) is not None

    def keys(self) -> Iterator[str]:
        for env in self._environments():
            with env.begin() as txn:
                for key in txn.cursor().iternext(keys=True, values=False):
                    yield bytes(key).decode("utf-8")

    def get_batch(self, image_ids: Sequence[str], *, raw: bool = False) -> dict[str, np.ndarray]:
        """Features of ``image_ids`` as ``{token_set: (B, tokens, channels)}``, read one transaction per shard.

        Arrays have the cache's dtype; bfloat16 features (numpy has none) come as float32, exactly, or with
        ``raw`` as their stored ``uint16`` words (``torch.from_numpy(words).view(torch.bfloat16)``).
        (Each record's leading image digest is skipped; :meth:`digests` reads it.)

        A missing id raises ``KeyError`` naming the id and the cache: features are never invented.
        """
        meta = self.meta
        dtype = meta.np_dtype
        expected = meta.record_nbytes
        feature_nbytes = meta.feature_nbytes
        # One copy per record into a (B, record bytes) buffer (a memoryview slice assignment: a plain memcpy,
        # no numpy object per record); token sets are views of it.
        buffer = np.empty((len(image_ids), feature_nbytes), dtype=np.uint8)
        flat = buffer.reshape(-1).data  # 1-D uint8 memoryview of the buffer
        by_shard: dict[int, list[int]] = {}
        for row, image_id in enumerate(image_ids):
            by_shard.setdefault(meta.shard_of(image_id), []).append(row)
        envs = self._environments()
        for shard, rows in by_shard.items():
            with envs[shard].begin(buffers=True) as txn:
                for row in rows:
                    value = txn.get(image_ids[row].encode("utf-8"))
                    if value is None:
                        raise KeyError(f"image {image_ids[row]!r} is not in the feature cache {self.directory}")
                    if len(value) != expected:
                        raise CacheFormatError(
                            f"{self.directory}: record {image_ids[row]!r} has {len(value)} bytes, expected {expected}"
                        )
                    flat[row * feature_nbytes : (row + 1) * feature_nbytes] = value[DIGEST_BYTES:]
        values = buffer.view(dtype)
        if meta.dtype == "bfloat16" and not raw:
            values = from_bfloat16_words(values)
        out, offset = {}, 0
        for t in meta.token_sets:
            n = t.tokens * t.channels
            part = values[:, offset : offset + n]
            # one token set: a view of the buffer; several: each copied out contiguous
            out[t.name] = (part if len(meta.token_sets) == 1 else np.ascontiguousarray(part)).reshape(
                len(image_ids), t.tokens, t.channels)
            offset += n
        return out

    def get(self, image_id: str) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.get_batch([image_id]).items()}

    def iter_batches(self, image_ids: Iterable[str], batch_size: int) -> Iterator[tuple[list[str], dict[str, np.ndarray]]]:
        batch: list[str] = []
        for image_id in image_ids:
            batch.append(image_id)
            if len(batch) == batch_size:
                yield batch, self.get_batch(batch)
                batch = []
        if batch:
            yield batch, self.get_batch(batch)


class Coverage:
    """Whether a cache serves the images a run needs (as :meth:`FeatureCache.require`), checked a chunk of them at
    a time: :meth:`check` each chunk, then :meth:`raise_if_incomplete`. It keeps counts and a few examples only,
    so a manifest of millions of images is checked in the memory of one chunk."""

    EXAMPLES = 3

    def __init__(self, cache: FeatureCache, source: str) -> None:
        self.cache, self.source = cache, source
        self.counts = {"missing": 0, "changed": 0, "rejected": 0}
        self.examples: dict[str, list[str]] = {k: [] for k in self.counts}

    def check(self, wanted: dict[str, str | None]) -> list[str]:
        """Check one chunk (``{image_id: sha256 or None}``); returns its ids to skip because extraction rejected them."""
        stale = self.cache.stale(wanted)
        for kind, ids in stale.items():
            self.counts[kind] += len(ids)
            self.examples[kind].extend(ids[: self.EXAMPLES - len(self.examples[kind])])
        return stale["rejected"]

    def raise_if_incomplete(self) -> None:
        """Refuse, naming how many images are missing or changed (and examples) and what to do."""
        problems = []
        if self.counts["missing"]:
            problems.append(f"{self.counts['missing']} image(s) are not in it (e.g. {self.examples['missing']})")
        if self.counts["changed"]:
            problems.append(f"{self.counts['changed']} image(s) changed since their features were computed "
                            f"(e.g. {self.examples['changed']})")
        if problems:
            raise CacheFormatError(f"the feature cache {self.cache.directory} does not cover {self.source}: "
                                   + "; ".join(problems) + ". Run `pipeline extract` on this manifest (it computes "
                                   "only the missing and changed images)")
