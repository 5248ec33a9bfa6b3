"""Writing a cache: bring each shard up to date with the images wanted, then :meth:`CacheWriter.finalize`.

The caller says which images a shard must cover — ``{image_id: sha256 of the image file}`` —
and the shard works out the rest (:meth:`ShardWriter.open`): records and rejects of the same
id *and* digest are kept, records of changed or no-longer-wanted images are deleted, and only
the missing ones are returned to compute. A finished shard that already covers exactly the
wanted images is left untouched (:meth:`ShardWriter.is_current`), so an unchanged rerun
writes nothing and its files stay byte-identical.

Crash safety, in order of events for one shard:

1. records go into ``<shard>.lmdb.partial`` (a fresh file, or a copy of the finished shard
   being extended), committed one batch per transaction; rejects are appended to
   ``<shard>.rejects.jsonl`` before their batch commits; a rerun reopens the partial file and
   keeps what it holds (resume);
2. when every record is in, the partial file is compacted into ``<shard>.lmdb.tmp`` (a
   canonical copy: page order depends only on the contents), renamed to ``<shard>.lmdb``, and
   only then ``<shard>.json`` is written — its presence is what marks the shard done;
3. when every shard is done, ``meta.json`` is written from the shard files (it is removed as
   soon as any shard is reopened, so a half-updated cache is never read as complete).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import lmdb
import numpy as np

from cache.format import (
    DIGEST_BYTES,
    META_FILE,
    CacheFormatError,
    CacheMeta,
    EmptyCacheError,
    shard_name,
    to_bfloat16_words,
    write_json_atomic,
)

log = logging.getLogger(__name__)

INITIAL_MAP_SIZE = 1 << 30  # grown on demand (MapFullError)


def open_env(path: Path, map_size: int = 0, readonly: bool = True) -> lmdb.Environment:
    """An LMDB environment on one shard file (subdir=False), with no lock file inside a DVC output."""
    return lmdb.open(
        str(path), subdir=False, lock=False, readonly=readonly, map_size=map_size,
        meminit=True, readahead=True, max_readers=64, sync=not readonly, metasync=not readonly,
    )


def hash_shard(env: lmdb.Environment) -> tuple[int, str]:
    """(record count, sha256 over length-prefixed keys and values in key order)."""
    h = hashlib.sha256()
    n = 0
    with env.begin(buffers=True) as txn:
        for key, value in txn.cursor():
            h.update(struct.pack("<II", len(key), len(value)))
            h.update(key)
            h.update(value)
            n += 1
    return n, h.hexdigest()


def coverage_sha256(covered: dict[str, str]) -> str:
    """A digest of ``{image_id: image sha256}``: what a shard covers (records and rejects alike)."""
    h = hashlib.sha256()
    for image_id in sorted(covered):
        h.update(f"{image_id}\t{covered[image_id]}\n".encode("utf-8"))
    return h.hexdigest()


def read_rejects(path: Path) -> list[dict]:
    """The rejects of a shard or a cache (JSON Lines: ``id``, ``digest``, ``file``, ``reason``, ...)."""
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]


@dataclass
class ShardPlan:
    """What :meth:`ShardWriter.open` found: ids still to compute, and how many were kept or dropped."""

    todo: list[str]
    kept: int = 0
    changed: int = 0
    dropped: int = 0


class ShardWriter:
    """Writer of one shard: reuses what is still valid, resumable after a crash."""

    def __init__(self, directory: Path, index: int, meta: CacheMeta) -> None:
        self.directory = Path(directory)
        self.index = index
        self.meta = meta
        self.name = shard_name(index, meta.num_shards)
        self.final_path = self.directory / f"{self.name}.lmdb"
        self.partial_path = self.directory / f"{self.name}.lmdb.partial"
        self.done_path = self.directory / f"{self.name}.json"
        self.rejects_path = self.directory / f"{self.name}.rejects.jsonl"
        self.partial_identity_path = self.directory / f"{self.name}.lmdb.partial.json"
        self._env: lmdb.Environment | None = None
        self._map_size = INITIAL_MAP_SIZE

    # -- state --------------------------------------------------------------------------------
    def _identity(self) -> str:
        return json.dumps(self.meta.identity(), sort_keys=True)

    def done_info(self) -> Optional[dict]:
        """The shard's done marker, if the shard is finished and was written with this cache's identity."""
        if not (self.done_path.exists() and self.final_path.exists()):
            return None
        info = json.loads(self.done_path.read_text(encoding="utf-8"))
        return info if info.get("identity") == self.meta.identity() else None

    def is_done(self) -> bool:
        return self.done_info() is not None

    def is_current(self, wanted: dict[str, str]) -> bool:
        """Finished, with this identity, covering exactly ``wanted`` (same ids, same image digests)."""
        info = self.done_info()
        return info is not None and info.get("coverage_sha256") == coverage_sha256(wanted)

    def open(self, wanted: dict[str, str]) -> ShardPlan:
        """Open the shard for writing so that it will cover ``wanted``; return the ids still to compute.

        Reuses, in this order: a partial shard of the same identity (an interrupted run), else the
        finished shard of the same identity (extended in a copy: finished files may be read-only DVC
        hardlinks), else nothing. Records and rejects whose id is not wanted, or whose image digest
        changed, are deleted."""
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / META_FILE).unlink(missing_ok=True)  # the cache is incomplete from now on
        identity = self._identity()
        resumable = (self.partial_path.exists() and self.partial_identity_path.exists()
                     and self.partial_identity_path.read_text(encoding="utf-8") == identity)
        if not resumable:
            self.partial_path.unlink(missing_ok=True)
            if self.is_done():
                tmp = self.partial_path.with_name(self.partial_path.name + ".copy")
                shutil.copyfile(self.final_path, tmp)
                os.replace(tmp, self.partial_path)
            else:
                self.rejects_path.unlink(missing_ok=True)
            self.partial_identity_path.write_text(identity, encoding="utf-8")
        for stale in (self.done_path, self.final_path, self.final_path.with_suffix(".lmdb.tmp")):
            stale.unlink(missing_ok=True)
        if self.partial_path.exists():
            self._map_size = max(self._map_size, self.partial_path.stat().st_size * 2)
        self._env = open_env(self.partial_path, self._map_size, readonly=False)

        plan = ShardPlan(todo=[])
        valid: set[str] = set()
        stale_keys: list[bytes] = []
        with self._env.begin(buffers=True) as txn:
            for key, value in txn.cursor():
                image_id = bytes(key).decode("utf-8")
                digest = bytes(value[:DIGEST_BYTES]).hex()
                if wanted.get(image_id) == digest:
                    valid.add(image_id)
                else:
                    stale_keys.append(bytes(key))
                    if image_id in wanted:
                        plan.changed += 1
                    else:
                        plan.dropped += 1
        if stale_keys:
            with self._env.begin(write=True) as txn:
                for key in stale_keys:
                    txn.delete(key)
        kept_rejects = []
        for r in read_rejects(self.rejects_path):
            if wanted.get(r.get("id")) == r.get("digest") and r["id"] not in valid:
                kept_rejects.append(r)
                valid.add(r["id"])
        if self.rejects_path.exists():
            _write_jsonl(self.rejects_path, kept_rejects)
        plan.kept = len(valid)
        plan.todo = sorted(i for i in wanted if i not in valid)
        return plan

    # -- writing ------------------------------------------------------------------------------
    def encode(self, digest: str, arrays: list[np.ndarray]) -> bytes:
        """One record's value: the image file's sha256, then each token set's array, cast and concatenated."""
        token_sets = self.meta.token_sets
        if len(arrays) != len(token_sets):
            raise ValueError(f"expected {len(token_sets)} token sets, got {len(arrays)}")
        raw = bytes.fromhex(digest)
        if len(raw) != DIGEST_BYTES:
            raise ValueError(f"image digest {digest!r} is not a sha256 hex digest")
        parts = [raw]
        for arr, ts in zip(arrays, token_sets):
            if tuple(arr.shape) != ts.shape:
                raise ValueError(f"token set {ts.name!r}: shape {tuple(arr.shape)}, expected {ts.shape}")
            if self.meta.dtype == "bfloat16":
                arr = to_bfloat16_words(arr)
            parts.append(np.ascontiguousarray(arr, dtype=self.meta.np_dtype).tobytes())
        return b"".join(parts)

    def put_batch(self, items: Iterable[tuple[str, bytes]]) -> None:
        """Commit a batch of (image_id, value) in one transaction, growing the map when full."""
        items = list(items)
        assert self._env is not None, "call open() first"
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for key, value in items:
                        if not txn.put(key.encode("utf-8"), value, overwrite=False):
                            raise CacheFormatError(f"{self.partial_path}: duplicate key {key!r}")
                return
            except lmdb.MapFullError:
                self._map_size *= 2
                self._env.set_mapsize(self._map_size)

    def add_rejects(self, rejects: list[dict]) -> None:
        """Record images that could not be encoded: each a dict with ``id``, ``digest`` (None if unreadable),
        ``file`` and ``reason``. Appended and synced before the batch they belong to commits."""
        if not rejects:
            return
        with open(self.rejects_path, "a", encoding="utf-8") as f:
            for r in rejects:
                f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> dict:
        """Compact the partial shard into its final file and mark the shard done."""
        assert self._env is not None
        self._env.sync(True)
        tmp = self.final_path.with_suffix(".lmdb.tmp")
        self._write_canonical(tmp)
        self._env.close()
        self._env = None
        os.replace(tmp, self.final_path)
        env = open_env(self.final_path)
        covered: dict[str, str] = {}
        try:
            count, digest = hash_shard(env)
            with env.begin(buffers=True) as txn:
                for key, value in txn.cursor():
                    covered[bytes(key).decode("utf-8")] = bytes(value[:DIGEST_BYTES]).hex()
        finally:
            env.close()
        rejects = read_rejects(self.rejects_path)
        for r in rejects:
            covered.setdefault(r["id"], r.get("digest"))
        info = {"records": count, "sha256": digest, "rejects": len(rejects), "identity": self.meta.identity(),
                "coverage_sha256": coverage_sha256(covered)}
        write_json_atomic(self.done_path, info)
        self.partial_path.unlink(missing_ok=True)
        self.partial_identity_path.unlink(missing_ok=True)
        return info

    def _write_canonical(self, path: Path) -> None:
        """Copy the partial shard's records into ``path`` so that its bytes depend on the records alone.

        The partial file's B-tree shape depends on its history (batch boundaries, a resume, deleted
        records), and LMDB's compacting copy keeps that shape. Rewriting every record in key order in
        one transaction, then compacting, gives the same file for the same records however they came."""
        staging = path.with_name(path.name + ".staging")
        map_size = max(INITIAL_MAP_SIZE, self.partial_path.stat().st_size * 2)
        while True:
            for p in (staging, path):
                p.unlink(missing_ok=True)
            env = open_env(staging, map_size, readonly=False)
            try:
                with self._env.begin(buffers=True) as src, env.begin(write=True) as dst:
                    for key, value in src.cursor():
                        dst.put(bytes(key), bytes(value), append=True)
                env.copy(str(path), compact=True)
                break
            except lmdb.MapFullError:
                map_size *= 2
            finally:
                env.close()
        staging.unlink(missing_ok=True)

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


class CacheWriter:
    """The shards of one cache folder, and the step that turns finished shards into ``meta.json``."""

    def __init__(self, directory: Path, meta: CacheMeta) -> None:
        self.directory = Path(directory)
        self.meta = meta

    def shard(self, index: int) -> ShardWriter:
        if not 0 <= index < self.meta.num_shards:
            raise ValueError(f"shard index {index} outside 0..{self.meta.num_shards - 1}")
        return ShardWriter(self.directory, index, self.meta)

    def remove_foreign_files(self) -> None:
        """Delete shards of another shard count and a meta.json of another identity: the folder is rebuilt."""
        mine = {shard_name(i, self.meta.num_shards) for i in range(self.meta.num_shards)}
        for p in self.directory.glob("shard-*"):
            if p.name.split(".")[0] not in mine:
                p.unlink()
        meta_path = self.directory / META_FILE
        if meta_path.exists():
            try:
                if CacheMeta.read(self.directory).identity() != self.meta.identity():
                    meta_path.unlink()
            except CacheFormatError:
                meta_path.unlink()

    def pending_shards(self) -> list[int]:
        return [i for i in range(self.meta.num_shards) if not self.shard(i).is_done()]

    def finalize(self, *, require_records: bool = False) -> CacheMeta | None:
        """Write ``meta.json`` and ``rejects.jsonl`` if every shard is done; return the meta, else None.

        Both follow from the finished shards alone, so the same records give the same bytes however they were
        computed (in one run, resumed, updated), and an unchanged cache is not rewritten (its files keep their
        bytes and times).

        With ``require_records``, a cache of no record gets ``rejects.jsonl`` but no ``meta.json`` (it is not a
        usable cache): :class:`~cache.format.EmptyCacheError` says why, from the rejects."""
        if self.pending_shards():
            return None
        meta_path = self.directory / META_FILE
        total = 0
        h = hashlib.sha256()
        rejects: list[dict] = []
        for i in range(self.meta.num_shards):
            sw = self.shard(i)
            info = json.loads(sw.done_path.read_text(encoding="utf-8"))
            total += info["records"]
            h.update(info["sha256"].encode("ascii"))
            rejects.extend(read_rejects(sw.rejects_path))
        rejects.sort(key=lambda r: json.dumps(r, sort_keys=True))
        self.meta.records = total
        self.meta.content_sha256 = h.hexdigest()
        rejects_path = self.directory / "rejects.jsonl"
        new_rejects = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rejects)
        if not rejects_path.exists() or rejects_path.read_text(encoding="utf-8") != new_rejects:
            _write_jsonl(rejects_path, rejects)
        if require_records and total == 0:
            meta_path.unlink(missing_ok=True)
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(Counter(r.get("reason") for r in rejects).items()))
            raise EmptyCacheError(f"{self.directory}: no features written: all {len(rejects)} image(s) were rejected "
                                  f"({reasons}); see {rejects_path}")
        new_meta = json.dumps(self.meta.to_dict(), indent=2, sort_keys=True) + "\n"
        if not meta_path.exists() or meta_path.read_text(encoding="utf-8") != new_meta:
            self.meta.write(self.directory)
        return self.meta
