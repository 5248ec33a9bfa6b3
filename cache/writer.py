"""Writing a cache: one :class:`ShardWriter` per shard, then :meth:`CacheWriter.finalize`.

Crash safety, in order of events for one shard:

1. records go into ``<shard>.lmdb.partial``, committed one batch per transaction;
   a rerun reopens it and skips the keys already committed (resume);
2. when every record is in, the partial file is compacted into ``<shard>.lmdb.tmp``
   (a canonical copy: page order depends only on the contents), renamed to
   ``<shard>.lmdb``, and only then ``<shard>.json`` is written — its presence
   is what marks the shard done;
3. when every shard is done, ``meta.json`` is written from the shard files.

Same inputs, same batching -> byte-identical shard files, so DVC sees no change.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Iterable

import lmdb
import numpy as np

from cache.format import META_FILE, CacheFormatError, CacheMeta, shard_name

INITIAL_MAP_SIZE = 1 << 30  # grown on demand (MapFullError)


def _open_env(path: Path, map_size: int, readonly: bool) -> lmdb.Environment:
    # subdir=False: one file per shard; lock=False: no lock file inside a DVC output.
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


class ShardWriter:
    """Append-only writer of one shard, resumable after a crash."""

    def __init__(self, directory: Path, index: int, meta: CacheMeta) -> None:
        self.directory = Path(directory)
        self.index = index
        self.meta = meta
        self.name = shard_name(index, meta.num_shards)
        self.final_path = self.directory / f"{self.name}.lmdb"
        self.partial_path = self.directory / f"{self.name}.lmdb.partial"
        self.done_path = self.directory / f"{self.name}.json"
        self.rejects_path = self.directory / f"{self.name}.rejects.jsonl"
        self.partial_fingerprint_path = self.directory / f"{self.name}.lmdb.partial.json"
        self._env: lmdb.Environment | None = None
        self._map_size = INITIAL_MAP_SIZE

    # -- state --------------------------------------------------------------------------------
    def is_done(self) -> bool:
        """True when the shard was finished by a run with the same fingerprint."""
        if not (self.done_path.exists() and self.final_path.exists()):
            return False
        info = json.loads(self.done_path.read_text(encoding="utf-8"))
        return info.get("fingerprint") == self.meta.fingerprint()

    def open(self) -> set[bytes]:
        """Open the partial shard for writing; return the keys already committed.

        A partial shard left by a run with another fingerprint (other backbone, weights,
        preprocessing...) is discarded, never mixed with new records.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        # Finished files are replaced, never written in place: under DVC they may be read-only hardlinks.
        for stale in (self.done_path, self.final_path, self.final_path.with_suffix(".lmdb.tmp")):
            stale.unlink(missing_ok=True)
        fingerprint = json.dumps(self.meta.fingerprint(), sort_keys=True)
        resumable = (
            self.partial_path.exists()
            and self.partial_fingerprint_path.exists()
            and self.partial_fingerprint_path.read_text(encoding="utf-8") == fingerprint
        )
        if not resumable:
            self.partial_path.unlink(missing_ok=True)
            self.rejects_path.unlink(missing_ok=True)
            self.partial_fingerprint_path.write_text(fingerprint, encoding="utf-8")
        if self.partial_path.exists():
            self._map_size = max(self._map_size, self.partial_path.stat().st_size * 2)
        self._env = _open_env(self.partial_path, self._map_size, readonly=False)
        with self._env.begin() as txn:
            return {bytes(k) for k in txn.cursor().iternext(keys=True, values=False)}

    # -- writing ------------------------------------------------------------------------------
    def encode(self, arrays: list[np.ndarray]) -> bytes:
        """One record's value: each token set's array, cast and concatenated."""
        if len(arrays) != len(self.meta.token_sets):
            raise ValueError(f"expected {len(self.meta.token_sets)} token sets, got {len(arrays)}")
        parts = []
        for arr, ts in zip(arrays, self.meta.token_sets):
            if tuple(arr.shape) != ts.shape:
                raise ValueError(f"token set {ts.name!r}: shape {tuple(arr.shape)}, expected {ts.shape}")
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
        tmp.unlink(missing_ok=True)
        self._env.copy(str(tmp), compact=True)
        self._env.close()
        self._env = None
        os.replace(tmp, self.final_path)
        env = _open_env(self.final_path, 0, readonly=True)
        try:
            count, digest = hash_shard(env)
        finally:
            env.close()
        rejects = []
        if self.rejects_path.exists():
            rejects = [json.loads(line) for line in self.rejects_path.read_text(encoding="utf-8").splitlines() if line]
        info = {"records": count, "sha256": digest, "rejects": len(rejects), "fingerprint": self.meta.fingerprint()}
        tmp_json = self.done_path.with_suffix(".json.tmp")
        tmp_json.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp_json, self.done_path)
        self.partial_path.unlink(missing_ok=True)
        self.partial_fingerprint_path.unlink(missing_ok=True)
        return info

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None


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
        """Delete shards of another shard count or an old meta.json: the folder is rebuilt."""
        mine = {shard_name(i, self.meta.num_shards) for i in range(self.meta.num_shards)}
        for p in self.directory.glob("shard-*"):
            if p.name.split(".")[0] not in mine:
                p.unlink()
        meta_path = self.directory / META_FILE
        if meta_path.exists():
            try:
                old = CacheMeta.read(self.directory)
                if old.fingerprint() != self.meta.fingerprint():
                    meta_path.unlink()
            except CacheFormatError:
                meta_path.unlink()

    def pending_shards(self) -> list[int]:
        return [i for i in range(self.meta.num_shards) if not self.shard(i).is_done()]

    def finalize(self) -> CacheMeta | None:
        """Write ``meta.json`` and ``rejects.jsonl`` if every shard is done; return the meta, else None."""
        if self.pending_shards():
            return None
        total = 0
        h = hashlib.sha256()
        rejects: list[str] = []
        for i in range(self.meta.num_shards):
            sw = self.shard(i)
            info = json.loads(sw.done_path.read_text(encoding="utf-8"))
            total += info["records"]
            h.update(info["sha256"].encode("ascii"))
            if sw.rejects_path.exists():
                rejects.extend(line for line in sw.rejects_path.read_text(encoding="utf-8").splitlines() if line)
        tmp = self.directory / "rejects.jsonl.tmp"
        tmp.write_text("".join(r + "\n" for r in sorted(rejects)), encoding="utf-8")
        os.replace(tmp, self.directory / "rejects.jsonl")
        self.meta.records = total
        self.meta.content_sha256 = h.hexdigest()
        self.meta.write(self.directory)
        return self.meta
