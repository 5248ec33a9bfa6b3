"""Extraction throughput: ``stages.extract.run`` end to end vs a bare decode + forward of the same images.

``stages.extract.run`` on a generated image set (file read and sha256, PNG/JPEG decode, resize,
normalise, collate, forward, fp16 conversion, LMDB writes, shard compaction and hashing,
``meta.json``, and the run's fixed costs: backbone build, weights hash, probe forward) is timed
as a whole, in images/s, and divided by the throughput of a bare loop over the same images in
the same batches (the per-shard batches extraction forms): each image file decoded by the same
decoder and eval transform (``load_rgb``, ``backbone.eval_transform()``, one torch thread in a
helper thread, the way extraction decodes without workers), then ``backbone.tokens(x)`` under
``torch.inference_mode``. Target: ratio >= 0.9, i.e. the cache machinery (hashing, shard
planning, serialisation, LMDB, fixed costs) costs under a tenth.

Decoding is in the baseline because extraction cannot skip it: on a CPU-only machine whose
cores the forward pass already fills (the default DAG's 2 cores) it costs the same CPU whoever
does it, and no worker can hide it. The ratio to the forward pass alone (``backbone.tokens`` on
the same batches pre-decoded into memory) is reported too: where cores are spare (a GPU, a decode
worker on a big CPU) decoding can hide behind the forward, and that ratio shows how far it does.

The measured extraction uses the stage's own default number of decode workers for the CPU
(``stages.extract.default_workers``: none on <= 2 cores, else 1) unless ``--workers`` says
otherwise, and is also run with the other setting (``--compare-workers``) so the ratio
``workers=1 / workers=0`` says whether a decode worker pays on this machine.

Also timed: a run over one image per shard, i.e. what a run costs besides its batches
(backbone build, weights hash, probe forward, decode worker start, shard compaction and hashing,
``meta.json``); the table shows the ratio with it subtracted too, since it amortises over real
image sets.

Every round times the variants back to back (order alternating between rounds) after a
warm-up; the reported numbers are medians over rounds, and the ratios are medians of per-round
ratios. ``--threads 1`` (or any N) sets this process's torch threads, e.g. for a smoke run on a
busy machine.

    python -m bench.extract            # defaults: 256 images, sizes 224 and 160, 2 rounds
    python -m bench.extract --quick    # smoke run
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import BenchRun, base_parser, log, markdown_table, median, timed

NAME = "extract"
TARGET_RATIO = 0.9


def _parser():
    p = base_parser(NAME, __doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256, help="generated images (default 256)")
    p.add_argument("--source-px", type=int, default=128, help="side of the generated images, pixels (default 128)")
    p.add_argument("--format", choices=("png", "jpeg"), default="png", help="file format of the generated images")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 160], help="backbone input sizes (default 224 160)")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers of the measured extraction (default: the stage's default on this CPU, "
                        "stages.extract.default_workers: 0 on <= 2 cores, else 1)")
    p.add_argument("--compare-workers", type=int, default=None,
                   help="also run extraction with this many workers (default: 1 if --workers is 0, else 0); -1: skip")
    p.add_argument("--num-shards", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of this process (forward and extraction main process); default: torch's own")
    return p


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the stage's progress bars and info/warning logs (they cost nothing measurable)."""
    import pipeline.data.cache_fill as ex
    from pipeline.progress import progress

    saved_bar = ex.progress_bar
    loggers = [logging.getLogger(n) for n in ("stages", "pipeline", "cache")]
    levels = [lg.level for lg in loggers]
    ex.progress_bar = functools.partial(progress, disable=True)
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ex.progress_bar = saved_bar
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    saved = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def make_images(root: Path, n: int, px: int, fmt: str, seed: int) -> Path:
    """``n`` synthetic scenes as PNG (or JPEG q90) files and their manifest; returns the manifest path."""
    from PIL import Image

    from pipeline.data.manifest import write_manifest
    from pipeline.data.synthetic import generate_synthetic

    result = generate_synthetic(root, num_images=n, noisy_images=0, image_size=px, seed=seed, progress=False)
    records = result.records
    if fmt == "jpeg":
        for rec in records:
            png = root / rec.path
            jpg = png.with_suffix(".jpg")
            Image.open(png).convert("RGB").save(jpg, quality=90)
            png.unlink()
            rec.path = str(Path(rec.path).with_suffix(".jpg"))
    manifest = root / "manifest.jsonl"
    write_manifest(manifest, records)
    return manifest


def extraction_batches(records: list, num_shards: int, batch_size: int) -> list[list]:
    """The batches ``stages.extract`` forms: shard by shard, ids sorted within a shard, ``batch_size`` at a time."""
    from cache.format import shard_of

    by_shard: dict[int, list] = {i: [] for i in range(num_shards)}
    for rec in records:
        by_shard[shard_of(rec.image_id, num_shards)].append(rec)
    batches = []
    for i in range(num_shards):
        recs = sorted(by_shard[i], key=lambda r: r.image_id)
        batches += [recs[j : j + batch_size] for j in range(0, len(recs), batch_size)]
    return batches


def _bare_forward(backbone, tensors) -> None:
    import torch

    with torch.inference_mode():
        for x in tensors:
            backbone.tokens(x)


def _bare_decode_forward(backbone, transform, path_batches) -> None:
    """Decode each batch's files (the same decoder and transform as extraction), then the forward pass.

    The decoding runs in a helper thread on one torch thread, synchronously, as extraction's decoding
    without workers does (``pipeline.data.cache_fill``): the cheapest way on a CPU the forward pass fills (its
    threads would make the transform's small ops several times slower, and switching this thread's count
    per batch would empty PyTorch's oneDNN cache)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from pipeline.data.images import load_rgb

    def decode(paths):
        return torch.stack([transform(load_rgb(p)) for p in paths])

    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,)) as decoder, \
                torch.inference_mode():
            for paths in path_batches:
                backbone.tokens(decoder.submit(decode, paths).result())
    finally:
        torch.set_num_threads(threads)


def _ratio_excluding(bare: list[float], full: list[float], fixed: list[float]) -> float | None:
    """Median per-round ``bare / (full - fixed)``; None when the fixed cost is not small next to the run (noise)."""
    ratios = [b / (e - f) for b, e, f in zip(bare, full, fixed) if e - f > 0.5 * e]
    return median(ratios) if ratios else None


def bench_size(args, manifest: Path, small_manifests: dict[str, Path], work: Path, size: int) -> dict[str, Any]:
    import torch

    from pipeline.config import ExtractConfig
    from pipeline.data.images import load_rgb
    from pipeline.data.manifest import read_manifest, resolve_image_path
    from pipeline.models.backbones import create_backbone
    from stages import extract

    records = read_manifest(manifest)
    base = {"backbone": args.backbone, "image_size": size, "batch_size": args.batch_size,
            "num_shards": args.num_shards, "device": "cpu", "weights": None, "pretrained": False}
    cfg0 = ExtractConfig(manifest=manifest, out_dir=work / "unused", **base)
    backbone = create_backbone(cfg0.backbone, image_size=size, crop_pct=cfg0.crop_pct, out_indices=cfg0.out_indices)
    tf = backbone.eval_transform()
    batches = extraction_batches(records, args.num_shards, args.batch_size)
    path_batches = [[resolve_image_path(r, manifest) for r in b] for b in batches]
    tensors = [torch.stack([tf(load_rgb(p)) for p in b]) for b in path_batches]
    n = sum(len(b) for b in batches)
    assert n == len(records)

    variants = [args.workers]
    if args.compare_workers >= 0 and args.compare_workers != args.workers:
        variants.append(args.compare_workers)

    def run_extract(workers: int, m: Path = manifest) -> float:
        out = work / f"feat-{size}-w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = ExtractConfig(manifest=m, out_dir=out, workers=workers, **base)
        seconds, meta = timed(lambda: extract.run(cfg))
        assert meta is not None and meta.records == len(read_manifest(m)), "extraction did not complete"
        shutil.rmtree(out, ignore_errors=True)
        return seconds

    # Warm-up: allocator, kernels, transform code, DataLoader start, page cache of the images.
    log(f"[extract {size}px] warm-up ({len(batches)} batches of <= {args.batch_size}, {n} images)")
    _bare_forward(backbone, tensors)
    _bare_decode_forward(backbone, tf, path_batches)
    for w in variants if not args.quick else []:
        run_extract(w, small_manifests["warm"])

    main_key = f"w{args.workers}"
    times: dict[str, list[float]] = {"forward": [], "decode": []} | {f"w{w}": [] for w in variants} | {"fixed": []}
    order = list(times)
    for r in range(args.rounds):
        for key in (order if r % 2 == 0 else order[::-1]):
            if key == "forward":
                t, _ = timed(lambda: _bare_forward(backbone, tensors))
            elif key == "decode":
                t, _ = timed(lambda: _bare_decode_forward(backbone, tf, path_batches))
            elif key == "fixed":  # one image per shard: what a run costs besides its batches
                t = run_extract(args.workers, small_manifests["fixed"])
            else:
                t = run_extract(int(key[1:]))
            times[key].append(t)
            rate = "" if key == "fixed" else f"{n / t:7.1f} img/s"
            log(f"[extract {size}px] round {r + 1}/{args.rounds} {key:>7}: {t:6.2f} s  {rate}", load=True)

    def per_round(key: str, baseline: str = "decode") -> list[float]:
        return [b / e for b, e in zip(times[baseline], times[key])]

    out: dict[str, Any] = {
        "image_size": size,
        "images": n,
        "batches": len(batches),
        "batch_sizes": [len(b) for b in batches],
        "workers": args.workers,
        "seconds": times,
        "bare_forward_images_per_s": n / median(times["forward"]),
        "bare_decode_forward_images_per_s": n / median(times["decode"]),
        "extract_images_per_s": {k: n / median(v) for k, v in times.items() if k.startswith("w")},
        "ratio_extract_vs_decode_forward": median(per_round(main_key)),
        "ratio_extract_vs_decode_forward_per_round": per_round(main_key),
        "ratio_extract_vs_forward": median(per_round(main_key, "forward")),
        "ratio_extract_vs_forward_per_round": per_round(main_key, "forward"),
        "ratio_decode_forward_vs_forward": median(per_round("decode", "forward")),
        "target_ratio": TARGET_RATIO,
        # A run's fixed cost (backbone build, weights hash, probe forward, decode worker start, compaction,
        # hashing, meta.json), measured as a run over one image per shard; it amortises over larger image sets.
        "fixed_cost_s": median(times["fixed"]),
        "ratio_extract_vs_decode_forward_excluding_fixed_cost": _ratio_excluding(times["decode"], times[main_key],
                                                                                 times["fixed"]),
    }
    if len(variants) > 1:
        other = f"w{variants[1]}"
        out[f"ratio_extract_{other}_vs_decode_forward"] = median(per_round(other))
        out[f"ratio_extract_{other}_vs_forward"] = median(per_round(other, "forward"))
        hi, lo = max(variants), min(variants)  # named by worker counts: the same key whichever is measured first
        out[f"ratio_workers{hi}_vs_workers{lo}"] = median([a / b for a, b in zip(times[f"w{lo}"], times[f"w{hi}"])])
    return out


def _default_workers() -> int:
    import torch

    from stages.extract import default_workers

    return default_workers(torch.device("cpu"))


def _excl_cell(r: dict[str, Any]) -> str:
    x = r["ratio_extract_vs_decode_forward_excluding_fixed_cost"]
    return ("n/a" if x is None else f"{x:.2f}") + f" ({r['fixed_cost_s']:.2f} s)"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    if args.quick:
        args.images, args.batch_size, args.num_shards, args.rounds = 8, 4, 2, 1
    if args.workers is None:
        args.workers = _default_workers()  # what `pipeline extract` uses on this machine
    if args.compare_workers is None:
        args.compare_workers = 1 if args.workers == 0 else 0
    from cache.format import shard_of
    from pipeline.data.manifest import read_manifest, write_manifest

    run = BenchRun(NAME, args)
    if args.threads is not None:
        run.machine["torch_threads"] = args.threads
    with run.work_folder("bench-extract-") as work:
        log(f"[extract] generating {args.images} {args.source_px}px {args.format.upper()} images in {work}")
        manifest = make_images(work / "data", args.images, args.source_px, args.format, args.seed)
        records = read_manifest(manifest)
        small = {"warm": work / "data" / "warm.jsonl", "fixed": work / "data" / "fixed.jsonl"}
        write_manifest(small["warm"], records[: args.batch_size])
        first_per_shard = {shard_of(r.image_id, args.num_shards): r for r in reversed(records)}
        write_manifest(small["fixed"], [first_per_shard[k] for k in sorted(first_per_shard)])
        with _quiet(), _torch_threads(args.threads):
            rows = [bench_size(args, manifest, small, work, s) for s in args.sizes]

    w, cw = args.workers, args.compare_workers
    compare = cw >= 0 and cw != w
    hi, lo = max(w, cw), min(w, cw)
    header = ["input size", "forward alone (img/s)", "decode + forward (img/s)", f"extract, workers={w} (img/s)",
              f"ratio to decode + forward (target >= {TARGET_RATIO})", "ratio to forward alone",
              "ratio to decode + forward without the run's fixed cost"]
    if compare:
        header += [f"extract, workers={cw} (img/s)", "its ratio to decode + forward", f"workers={hi} / workers={lo}"]
    table_rows = []
    for r in rows:
        row = [f"{r['image_size']} px", r["bare_forward_images_per_s"], r["bare_decode_forward_images_per_s"],
               r["extract_images_per_s"][f"w{w}"], f"**{r['ratio_extract_vs_decode_forward']:.2f}**",
               r["ratio_extract_vs_forward"], _excl_cell(r)]
        if compare:
            row += [r["extract_images_per_s"][f"w{cw}"], r[f"ratio_extract_w{cw}_vs_decode_forward"],
                    r[f"ratio_workers{hi}_vs_workers{lo}"]]
        table_rows.append(row)
    table = markdown_table(header, table_rows)
    caption = (
        f"`stages.extract.run` ({args.backbone}, random init, batch {args.batch_size}, {args.num_shards} shards, "
        f"fp16 cache, CPU, {run.machine.get('torch_threads')} torch threads, workers={w}: "
        f"{'the stage default here' if w == _default_workers() else 'set by --workers'}) on {args.images} "
        f"{args.source_px}px {args.format.upper()} images vs a bare loop over the same batches: the files decoded "
        f"by the same decoder and eval transform, then `backbone.tokens(x)` (decode + forward); also vs "
        f"`backbone.tokens(x)` alone on the batches pre-decoded in memory (forward alone); median of "
        f"{args.rounds} round(s){' (QUICK smoke run: not a measurement)' if args.quick else ''}. "
        f"Fixed cost: a run over one image per shard (backbone build, weights hash, probe forward, decode worker "
        f"start, shard compaction and hashing), subtracted in the third ratio column; it amortises over larger "
        f"sets. {run.machine_note()}"
    )
    markdown = f"### Extraction throughput\n\n{table}\n\n{caption}\n"
    return run.publish({
        "results": rows,
        "ratios": {
            **{f"extract_vs_decode_forward_{r['image_size']}": r["ratio_extract_vs_decode_forward"] for r in rows},
            **{f"extract_vs_forward_{r['image_size']}": r["ratio_extract_vs_forward"] for r in rows},
            **({f"workers{hi}_vs_workers{lo}_{r['image_size']}": r[f"ratio_workers{hi}_vs_workers{lo}"] for r in rows}
               if compare else {}),
        },
        "targets": {"extract_vs_decode_forward": TARGET_RATIO},
    }, markdown)


if __name__ == "__main__":
    main()
