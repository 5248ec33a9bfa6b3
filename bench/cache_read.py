"""Cached feature reads: the sharded LMDB cache vs a numpy memmap vs one .npy file per image.

The same records (float16, 49x1280 by default: ``tf_efficientnet_lite0``'s last stage,
~125 KB each) are written three ways:

* ``lmdb``      the feature cache (``cache.writer``), read with ``FeatureCache.get_batch``;
* ``memmap``    one ``.npy`` of shape (N, 49, 1280) opened with ``mmap_mode='r'``: a random
  batch is fancy-indexed and made contiguous (the fastest layout there is; no keys, no
  resume, no sharding — the ceiling);
* ``npy_files`` one ``.npy`` per image read with ``np.load`` and stacked (the layout many
  captioning codebases use).

Every layout reads the same random batches of 64 ids, warm (each layout is read in full
once first), in rounds that alternate the order; the numbers are medians over rounds.
Targets: lmdb/memmap >= 0.8, lmdb/npy_files >= 2.5.

Also timed: ``CachedCaptionDataset`` + ``DataLoader(num_workers=0)`` over the same batches
(a ``batch_sampler`` feeding ``__getitems__``), and a cold-ish pass per layout (every record
once, after ``posix_fadvise(DONTNEED)`` dropped the files from the page cache; the
hypervisor may still cache the disk).

    python -m bench.cache_read           # defaults: 3000 records, 4 shards, 150 batches x 3 rounds
    python -m bench.cache_read --quick   # smoke run
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import BenchRun, base_parser, log, markdown_table, median

NAME = "cache_read"
TARGETS = {"lmdb_vs_memmap": 0.8, "lmdb_vs_npy_files": 2.5}
LAYOUTS = ("lmdb", "memmap", "npy_files", "dataloader")


def _parser():
    p = base_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=3000)
    p.add_argument("--tokens", type=int, default=49)
    p.add_argument("--channels", type=int, default=1280)
    p.add_argument("--num-shards", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=150, help="random batches per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-cold", action="store_true", help="skip the cold-ish pass")
    return p


def image_id(i: int) -> str:
    return f"bench/{i:06d}"


def _record(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32).astype(np.float16)


def write_layouts(root: Path, n: int, shape: tuple[int, int], num_shards: int, seed: int) -> dict[str, Path]:
    """The same ``n`` records as an LMDB cache, one memmapped .npy, and one .npy per image."""
    import hashlib

    from cache.format import CacheMeta, FeatureSpec, TokenSet, shard_of
    from cache.writer import CacheWriter

    rng = np.random.default_rng(seed)
    data = np.empty((n, *shape), dtype=np.float16)
    for i in range(n):
        data[i] = _record(rng, shape)

    lmdb_dir = root / "lmdb"
    spec = FeatureSpec(backbone="bench", weights={"source": "random-init"}, preprocessing={},
                       token_sets=(TokenSet("last", *shape),), dtype="float16")
    meta = CacheMeta(spec=spec, num_shards=num_shards)
    writer = CacheWriter(lmdb_dir, meta)
    for s in range(num_shards):
        sw = writer.shard(s)
        rows = sorted((i for i in range(n) if shard_of(image_id(i), num_shards) == s), key=image_id)
        digest = {i: hashlib.sha256(image_id(i).encode()).hexdigest() for i in rows}  # stands in for image bytes
        sw.open({image_id(i): digest[i] for i in rows})
        for j in range(0, len(rows), 64):
            sw.put_batch([(image_id(i), sw.encode(digest[i], [data[i]])) for i in rows[j : j + 64]])
        sw.finish()
    assert writer.finalize() is not None

    memmap = root / "features.npy"
    np.save(memmap, data)

    files = root / "npy"
    files.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        np.save(files / f"{i:06d}.npy", data[i])
    return {"lmdb": lmdb_dir, "memmap": memmap, "npy_files": files}


class Readers:
    """One ``read(batch_of_row_indices) -> (B, tokens, channels) array`` per layout, over the same records."""

    def __init__(self, paths: dict[str, Path], n: int, batch_size: int) -> None:
        import torch
        from torch.utils.data import DataLoader

        from cache import FeatureCache
        from pipeline.data.captions import CaptionTable
        from pipeline.data.features import CachedCaptionDataset, caption_collate

        self.paths = paths
        self.n = n
        self.ids = [image_id(i) for i in range(n)]
        self.cache = FeatureCache(paths["lmdb"])
        self.mm = np.load(paths["memmap"], mmap_mode="r")
        self.files = [paths["npy_files"] / f"{i:06d}.npy" for i in range(n)]
        rng = np.random.default_rng(1)
        samples = [(self.ids[i], [1] + rng.integers(3, 1000, rng.integers(8, 20)).tolist() + [2]) for i in range(n)]
        self.dataset = CachedCaptionDataset(self.cache, CaptionTable.from_pairs(samples), pad_id=0)
        self._torch = torch
        self._DataLoader = DataLoader
        self._collate = caption_collate

    def lmdb(self, rows) -> np.ndarray:
        return self.cache.get_batch([self.ids[i] for i in rows])["last"]

    def memmap(self, rows) -> np.ndarray:
        return np.ascontiguousarray(self.mm[np.asarray(rows)])

    def npy_files(self, rows) -> np.ndarray:
        return np.stack([np.load(self.files[i]) for i in rows])

    def dataloader_pass(self, batches: list[list[int]]) -> int:
        """Iterate a DataLoader(num_workers=0) whose batch_sampler yields ``batches``; returns records read."""
        loader = self._DataLoader(self.dataset, batch_sampler=batches, num_workers=0, collate_fn=self._collate)
        n = 0
        for batch in loader:
            n += batch.features.shape[0]
        return n

    def reopen(self) -> None:
        """Close every handle (so the page cache can be dropped) and open again lazily."""
        self.cache.close()
        del self.mm
        self.mm = np.load(self.paths["memmap"], mmap_mode="r")


def drop_page_cache(paths: list[Path]) -> bool:
    """Ask the kernel to forget these files' cached pages (no root needed; only these files)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped: write them back first
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _time_layout(fn: Callable[[list[int]], np.ndarray], batches: list[list[int]]) -> float:
    t = time.perf_counter()
    for rows in batches:
        fn(rows)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    if args.quick:
        args.records, args.batches, args.rounds = 256, 10, 1
    shape = (args.tokens, args.channels)
    run = BenchRun(NAME, args)
    with run.work_folder("bench-cache-") as work:
        shutil.rmtree(work / "layouts", ignore_errors=True)  # a kept work folder starts clean
        root = work / "layouts"
        rec_kb = np.prod(shape) * 2 / 1024
        log(f"[cache_read] writing {args.records} records of {shape} float16 ({rec_kb:.0f} KB each, "
            f"{args.records * rec_kb / 1024:.0f} MB per layout) in {root}")
        t = time.perf_counter()
        paths = write_layouts(root, args.records, shape, args.num_shards, args.seed)
        log(f"[cache_read] written in {time.perf_counter() - t:.1f} s")
        r = Readers(paths, args.records, args.batch_size)

        # Correctness first: every layout returns the same arrays.
        probe = list(np.random.default_rng(7).choice(args.records, size=min(args.batch_size, args.records), replace=False))
        ref = r.memmap(probe)
        assert np.array_equal(r.lmdb(probe), ref) and np.array_equal(r.npy_files(probe), ref)

        # Cold-ish pass: every record once, in random batches, right after dropping the files from the page cache.
        cold: dict[str, float] = {}
        if not args.no_cold:
            perm = np.random.default_rng(args.seed + 1).permutation(args.records).tolist()
            cold_batches = [perm[i : i + args.batch_size] for i in range(0, len(perm), args.batch_size)]
            files = {
                "lmdb": sorted(paths["lmdb"].glob("*.lmdb")),
                "memmap": [paths["memmap"]],
                "npy_files": r.files,
            }
            for name in ("lmdb", "memmap", "npy_files"):
                r.reopen()
                if not drop_page_cache(files[name]):
                    break
                cold[name] = args.records / _time_layout(getattr(r, name), cold_batches)
                log(f"[cache_read] cold-ish {name:>9}: {cold[name]:9,.0f} records/s")

        # Warm: read everything once per layout, then the timed rounds.
        everything = list(range(args.records))
        for name in ("lmdb", "memmap", "npy_files"):
            _time_layout(getattr(r, name), [everything[i : i + 256] for i in range(0, args.records, 256)])
        rng = np.random.default_rng(args.seed)
        batches = [rng.choice(args.records, size=args.batch_size, replace=False).tolist() for _ in range(args.batches)]
        r.dataloader_pass(batches[:2])
        times: dict[str, list[float]] = {k: [] for k in LAYOUTS}
        for rnd in range(args.rounds):
            for name in (LAYOUTS if rnd % 2 == 0 else LAYOUTS[::-1]):
                if name == "dataloader":
                    t = time.perf_counter()
                    got = r.dataloader_pass(batches)
                    dt = time.perf_counter() - t
                    assert got == args.batches * args.batch_size
                else:
                    dt = _time_layout(getattr(r, name), batches)
                times[name].append(dt)
                log(f"[cache_read] round {rnd + 1}/{args.rounds} {name:>10}: "
                    f"{args.batches * args.batch_size / dt:9,.0f} records/s", load=True)
        r.cache.close()

    total = args.batches * args.batch_size
    warm = {k: total / median(v) for k, v in times.items()}

    def per_round(a: str, b: str) -> list[float]:
        return [tb / ta for ta, tb in zip(times[a], times[b])]

    ratios = {
        "lmdb_vs_memmap": median(per_round("lmdb", "memmap")),
        "lmdb_vs_npy_files": median(per_round("lmdb", "npy_files")),
        "dataloader_vs_lmdb": median(per_round("dataloader", "lmdb")),
    }
    if cold:
        ratios.update({f"cold_lmdb_vs_{k}": cold["lmdb"] / v for k, v in cold.items() if k != "lmdb"})

    labels = {
        "lmdb": "LMDB cache, `FeatureCache.get_batch`",
        "memmap": "one `.npy`, `mmap_mode='r'` + fancy index",
        "npy_files": "one `.npy` per image, `np.load` + stack",
        "dataloader": "`CachedCaptionDataset` + `DataLoader(num_workers=0)`",
    }
    ratio_cell = {
        "lmdb": ("1.00", ""),
        "memmap": (f"{ratios['lmdb_vs_memmap']:.2f}", f">= {TARGETS['lmdb_vs_memmap']}"),
        "npy_files": (f"{ratios['lmdb_vs_npy_files']:.2f}", f">= {TARGETS['lmdb_vs_npy_files']}"),
        "dataloader": (f"{1 / ratios['dataloader_vs_lmdb']:.2f}", ""),
    }
    header = ["layout", "warm records/s", "LMDB speed / this", "target"] + (["cold-ish records/s"] if cold else [])
    rows = []
    for k in LAYOUTS:
        row = [labels[k], warm[k], *ratio_cell[k]]
        if cold:
            row.append(cold.get(k, ""))
        rows.append(row)
    table = markdown_table(header, rows)
    caption = (
        f"{args.records} float16 records of {shape[0]}x{shape[1]} ({np.prod(shape) * 2 / 1024:.0f} KB), "
        f"{args.num_shards} LMDB shards; the same {args.batches} random batches of {args.batch_size} for every layout, "
        f"warm page cache, median of {args.rounds} round(s)"
        f"{' (QUICK smoke run: not a measurement)' if args.quick else ''}. "
        + ("Cold-ish: every record once after `posix_fadvise(DONTNEED)` on the files. " if cold else "")
        + run.machine_note()
    )
    markdown = f"### Cached feature reads\n\n{table}\n\n{caption}\n"
    return run.publish({
        "seconds": times,
        "warm_records_per_s": warm,
        "cold_records_per_s": cold,
        "ratios": ratios,
        "targets": TARGETS,
    }, markdown)


if __name__ == "__main__":
    main()
