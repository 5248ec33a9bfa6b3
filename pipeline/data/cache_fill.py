"""Fill a feature cache from manifest images with any encoder: the loop `extract` and `filter` share.

:func:`fill_cache` hashes the images of the shards it is given, leaves alone the shards that
already cover them (same ids, same image bytes, same cache identity), and for the others
computes exactly the missing and changed records — one pass of batches over all of them, so a
decode worker's start-up is paid once per run, not once per shard, and without workers the
images are decoded on one torch thread (:func:`_image_batches`). Bad images are recorded as
rejects (with the digest of their bytes, so a fixed file is retried), never dropped silently.

The encoder always runs on exactly ``batch_size`` images: a short batch (the last one, or one
left short by rejected images) is padded with blank images whose outputs are dropped. Kernels
are chosen by the batch's shape, so a record's bytes would otherwise depend on which batch it
landed in (a resumed or updated extraction splits the work differently from a fresh one); this
way they depend on the batch size only, which the cache records as part of its identity
(``CacheMeta.computed_with``).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from cache.format import SHARD_BY_IMAGE, SHARD_BY_INPUT_SHARD
from cache.writer import CacheWriter, ShardWriter
from pipeline.data.image_files import ImageFiles, collate_image_files
from pipeline.data.images import ImageDecodeError, image_sha256
from pipeline.data.manifest import ManifestRecord, resolve_image
from pipeline.distributed import DistContext
from pipeline.errors import UserError
from pipeline.progress import progress as progress_bar

log = logging.getLogger(__name__)


def cache_sharding(records: list[ManifestRecord]) -> str:
    """How a cache of ``records``' images is sharded: by input shard when every image lies in one (img2dataset),
    so that each process reads whole input shards, else by image id (:func:`cache.format.shard_of`)."""
    if records and all(r.member is not None for r in records):
        return SHARD_BY_INPUT_SHARD
    return SHARD_BY_IMAGE


def shards_for(num_shards: int, ctx: DistContext, shard_index: Optional[int]) -> list[int]:
    """The cache shards this process writes: ``shard_index`` alone (separate machines), else every
    ``world_size``-th from its rank (torchrun; all of them in a single process)."""
    if shard_index is not None:
        return [shard_index]
    return [i for i in range(num_shards) if i % ctx.world_size == ctx.rank]


def _log_input_shards(sharding: str, by_shard: dict[int, list[ManifestRecord]]) -> None:
    """Say which input shards the cache shards ``by_shard`` read, when the cache is sharded by input shard."""
    if sharding != SHARD_BY_INPUT_SHARD:
        return
    files = sorted({r.path for recs in by_shard.values() for r in recs})
    log.info("cache sharded by input shard: cache shard(s) %s read %d whole input shard(s) (%s)",
             _ranges(sorted(by_shard)), len(files),
             ", ".join(Path(f).name for f in files[:4]) + (" ..." if len(files) > 4 else ""))


def _ranges(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:8])) + (f" ... ({len(numbers)})" if len(numbers) > 8 else "")


class StaleManifestError(UserError, ValueError):
    """Images that no longer match the sha256 their manifest records."""


HASH_CHUNK = 4096  # images hashed per round of the thread pool (the pool holds one round's futures)


def image_digests(records: list[ManifestRecord], manifest: Path) -> dict[str, Optional[str]]:
    """sha256 of every image file (None: missing or unreadable), read by two threads a chunk at a time.

    A manifest that records digests (``prepare`` does) must agree with the files: otherwise the
    images changed after ``prepare`` and the manifest's other facts may be stale too. Memory: the digests
    and one chunk's locations (an image shared by records, e.g. its augmented views, is read once)."""

    def one(record: ManifestRecord) -> Optional[str]:
        try:
            return image_sha256(resolve_image(record, manifest))
        except (OSError, ImageDecodeError):
            return None

    def file_key(record: ManifestRecord) -> tuple:  # the image's bytes: its file, and its place in a shard
        return (record.path, record.member["offset"]) if record.member is not None else (record.path,)

    by_file: dict[tuple, Optional[str]] = {}
    out: dict[str, Optional[str]] = {}
    with ThreadPoolExecutor(2) as pool, progress_bar(total=len(records), unit="img", desc="hash images",
                                                     disable=len(records) < 2000) as bar:
        for start in range(0, len(records), HASH_CHUNK):
            chunk = records[start:start + HASH_CHUNK]
            keys = [file_key(r) for r in chunk]
            todo = {k: r for k, r in zip(keys, chunk) if k not in by_file}  # each file once
            by_file.update(zip(todo, pool.map(one, todo.values())))
            for r, k in zip(chunk, keys):
                out[r.image_id] = by_file[k]
            bar.update(len(chunk))
    stale = [r.image_id for r in records if r.sha256 and out[r.image_id] and r.sha256 != out[r.image_id]]
    if stale:
        raise StaleManifestError(
            f"{manifest}: {len(stale)} image(s) differ from the sha256 the manifest records (e.g. {stale[:3]}): "
            "the images changed after `pipeline prepare`; rerun `pipeline prepare` so the manifest describes them")
    return out


@dataclass
class FillStats:
    """What one :func:`fill_cache` call did."""

    shards_current: int = 0
    shards_updated: int = 0
    kept: int = 0
    changed: int = 0
    dropped: int = 0
    computed: int = 0
    rejected: int = 0
    seconds: float = 0.0
    per_shard: dict[int, dict] = field(default_factory=dict)


Encoder = Callable[[torch.Tensor], list[np.ndarray]]  # a batch of preprocessed images -> one array per token set


def fill_cache(
    writer: CacheWriter, records: list[ManifestRecord], manifest: Path, shards: list[int], *, transform: Callable,
    encode: Encoder, batch_size: int, workers: int = 0, max_pixels: int, max_file_bytes: int,
    pin_memory: bool = False, desc: str = "encode", views: Optional[Callable] = None,
) -> FillStats:
    """Bring ``shards`` of ``writer``'s cache up to date with the images of ``records`` that belong to them
    (``views``: how view records are rendered, :class:`pipeline.data.views.ViewRenderer`)."""
    by_shard: dict[int, list[ManifestRecord]] = {i: [] for i in shards}
    for rec in records:
        s = writer.meta.shard_of(rec.image_id)
        if s in by_shard:
            by_shard[s].append(rec)
    _log_input_shards(writer.meta.sharding, by_shard)
    fill = _Fill(writer, image_digests([r for recs in by_shard.values() for r in recs], manifest))
    try:
        items = fill.plan(by_shard)
        if items:
            start = time.perf_counter()
            dataset = ImageFiles([r for _, r in items], manifest, transform, max_pixels, max_file_bytes, views=views)
            fill.compute(items, dataset, encode, batch_size=batch_size, workers=workers, pin_memory=pin_memory,
                         desc=desc)
            fill.stats.seconds = time.perf_counter() - start
            log.info("%s: %d images in %.1f s (%.1f images/s)", desc, len(items), fill.stats.seconds,
                     len(items) / max(fill.stats.seconds, 1e-9))
        return fill.stats
    finally:
        fill.close()


class _Fill:
    """One :func:`fill_cache` call: the shards it opened, what each still waits for, and what it did."""

    def __init__(self, writer: CacheWriter, digests: dict[str, Optional[str]]) -> None:
        self.writer, self.digests = writer, digests
        self.stats = FillStats()
        self.open_shards: dict[int, ShardWriter] = {}
        self.remaining: dict[int, int] = {}  # records (or rejects) each open shard still waits for

    def plan(self, by_shard: dict[int, list[ManifestRecord]]) -> list[tuple[int, ManifestRecord]]:
        """Open every shard that does not cover its images yet; ``(shard, record)`` of each record to compute.
        A shard with nothing to compute (only records dropped) is finished here."""
        items: list[tuple[int, ManifestRecord]] = []
        for i, recs in by_shard.items():
            wanted = {r.image_id: self.digests[r.image_id] for r in recs}
            sw = self.writer.shard(i)
            if sw.is_current(wanted):
                self.stats.shards_current += 1
                continue
            plan = sw.open(wanted)
            self.open_shards[i] = sw
            self.stats.shards_updated += 1
            self.stats.kept += plan.kept
            self.stats.changed += plan.changed
            self.stats.dropped += plan.dropped
            self.stats.per_shard[i] = {"kept": plan.kept, "changed": plan.changed, "dropped": plan.dropped,
                                       "computed": len(plan.todo)}
            by_id = {r.image_id: r for r in recs}
            items.extend((i, by_id[image_id]) for image_id in plan.todo)
            self.remaining[i] = len(plan.todo)
            log.info("%s: %d record(s) kept, %d changed, %d dropped (no longer in the manifest), %d to compute",
                     sw.name, plan.kept, plan.changed, plan.dropped, len(plan.todo))
        for i in [i for i, n in self.remaining.items() if n == 0]:
            _finish(self.open_shards.pop(i))
        return items

    def compute(self, items: list[tuple[int, ManifestRecord]], dataset: ImageFiles, encode: Encoder, *,
                batch_size: int, workers: int, pin_memory: bool, desc: str) -> None:
        """Encode ``items`` in batches of ``batch_size``; each batch's records commit in a background thread while
        the next batch runs through the encoder."""
        batches = [list(range(k, min(k + batch_size, len(items)))) for k in range(0, len(items), batch_size)]
        pending: Optional[Future] = None
        with _image_batches(dataset, batches, workers=workers, pin_memory=pin_memory) as loader, \
                ThreadPoolExecutor(max_workers=1) as io, \
                progress_bar(total=len(items), unit="img", desc=desc) as bar:
            for idx, batch_digests, images, bad in loader:
                values = self._encode(items, idx, batch_digests, images, encode, batch_size)
                if pending is not None:
                    pending.result()
                self._reject(bad)
                for shard, vals in values.items():
                    self.remaining[shard] -= len(vals)
                done_now = [s for s in self.open_shards if self.remaining[s] == 0]
                pending = io.submit(_commit, dict(self.open_shards), values, done_now)
                for s in done_now:
                    self.open_shards.pop(s)
                self.stats.computed += sum(len(v) for v in values.values())
                self.stats.rejected += len(bad)
                bar.update(len(idx) + len(bad))
            if pending is not None:
                pending.result()

    def _encode(self, items, idx: list[int], digests: list[str], images: Optional[torch.Tensor], encode: Encoder,
                batch_size: int) -> dict[int, list[tuple[str, bytes]]]:
        """``{shard: [(image id, record value)]}`` of one batch's readable images."""
        values: dict[int, list[tuple[str, bytes]]] = {}
        if images is not None:
            arrays = encode_padded(encode, images, batch_size)
            for j, (k, digest) in enumerate(zip(idx, digests)):
                shard, rec = items[k]
                values.setdefault(shard, []).append(
                    (rec.image_id, self.open_shards[shard].encode(digest, [a[j] for a in arrays])))
        return values

    def _reject(self, bad: list[dict]) -> None:
        """Record a batch's unreadable images; appended before the batch's records commit, so a resumed run skips
        them too. Each is keyed by the file's digest (hashed up front even when it was refused unread, e.g. too
        large), so an unchanged bad file is not retried on the next run, a fixed one is."""
        for err in bad:
            err["digest"] = err.get("digest") or self.digests.get(err["id"])
            shard = self.writer.meta.shard_of(err["id"])
            self.open_shards[shard].add_rejects([err])
            log.warning("skipped %s: %s%s", err["file"], err["reason"], f" ({err['detail']})" if err["detail"] else "")
            self.remaining[shard] -= 1

    def close(self) -> None:
        for sw in self.open_shards.values():
            sw.close()


def encode_padded(encode: Encoder, images: torch.Tensor, batch_size: int) -> list[np.ndarray]:
    """``encode`` run on exactly ``batch_size`` images (``images`` padded with zeros), the padding's outputs
    dropped: each image's outputs are the same whatever batch it came in."""
    n = images.shape[0]
    if n < batch_size:
        images = torch.cat([images, images.new_zeros((batch_size - n, *images.shape[1:]))])
    return [a[:n] for a in encode(images)]


@contextmanager
def _image_batches(dataset: ImageFiles, batches: list[list[int]], *, workers: int,
                   pin_memory: bool) -> Iterator[Iterable[tuple]]:
    """The collated batches of ``dataset`` (``collate_image_files``): decoded by ``workers`` DataLoader
    processes, or with ``workers=0`` by one thread of this process, a batch at a time between forward passes.

    That thread runs torch on one intra-op thread. Decoding is PIL work on one thread plus a few torch ops on
    one image at a time, far too small to split: on the forward pass's threads every op waits for all of them
    (measured on a busy 2-core CPU: the eval transform took 2-25x its one-thread time), and its tensors are
    the same on any number of threads. A thread of its own rather than switching this thread's count per
    batch: ``torch.set_num_threads`` also empties PyTorch's cache of oneDNN convolutions, which the next
    forward pass would then rebuild."""
    if workers > 0:
        yield DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_image_files,
                         prefetch_factor=4, persistent_workers=False, pin_memory=pin_memory)
        return
    # torch's thread count is per thread once a thread has used it; the call fixes this thread's before the
    # decode thread's set_num_threads(1) changes the default that new threads start with (restored below).
    threads = torch.get_num_threads()

    def decode(batch: list[int]) -> tuple:
        idx, digests, images, bad = collate_image_files([dataset[i] for i in batch])
        return idx, digests, images.pin_memory() if pin_memory and images is not None else images, bad

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="decode", initializer=torch.set_num_threads,
                                initargs=(1,)) as pool:
            yield (pool.submit(decode, batch).result() for batch in batches)
    finally:
        torch.set_num_threads(threads)


def _commit(shards: dict[int, ShardWriter], values: dict[int, list[tuple[str, bytes]]], finish: list[int]) -> None:
    for shard, vals in values.items():
        shards[shard].put_batch(vals)
    for shard in finish:
        _finish(shards[shard])


def _finish(sw: ShardWriter) -> None:
    info = sw.finish()
    sw.close()
    log.info("shard %d done: %d records, %d rejected", sw.index, info["records"], info["rejects"])
