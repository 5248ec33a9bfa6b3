"""`prepare`: import one or more datasets into one normalised manifest.

Inputs: the sources named in ``cfg.sources`` (annotation files and images), or
nothing for the built-in synthetic dataset.
Outputs in ``cfg.out_dir``:

* ``manifest.jsonl`` — one row per image (see :mod:`pipeline.data.manifest`);
* ``rejects.jsonl`` — every refused item with file, line or id, and reason;
* ``stats.json`` — counts per split and source, rejects by reason, the config;
* ``images/`` — rendered images, for the synthetic source;
* ``noisy/manifest.jsonl`` + ``noisy/labels.jsonl`` — the synthetic noisy social
  variant and its ground-truth match labels (kept out of the manifest).

Sources with a split keep it; the others get a seeded image-level split. When every item is
rejected, only ``rejects.jsonl`` is written and :class:`PrepareError` says so.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.config import PrepareConfig, SyntheticSource, config_to_dict
from pipeline.data.manifest import (
    MANIFEST_VERSION,
    ManifestRecord,
    RejectsReport,
    write_manifest,
)
from pipeline.errors import UserError
from pipeline.files import write_json, write_jsonl

log = logging.getLogger(__name__)


class PrepareError(UserError, ValueError):
    """Sources that give nothing to write (every item rejected)."""


def assign_splits(records: list[ManifestRecord], *, seed: int, val_fraction: float, test_fraction: float) -> None:
    """Give every record flagged ``needs_split`` a split: a seeded permutation of image ids.

    The split is per image, so no image's captions land in two splits; the same ids
    and seed always give the same split.
    """
    if val_fraction + test_fraction >= 1:
        raise ValueError("val_fraction + test_fraction must be below 1")
    pending = sorted((r for r in records if r.extra.pop("needs_split", False)), key=lambda r: r.image_id)
    if not pending:
        return
    order = np.random.default_rng(seed).permutation(len(pending))
    n_test = int(round(len(pending) * test_fraction))
    n_val = int(round(len(pending) * val_fraction))
    for rank, i in enumerate(order):
        pending[i].split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"


def _import_synthetic(src: SyntheticSource, out_dir: Path) -> tuple[list[ManifestRecord], list[ManifestRecord], list[dict]]:
    from pipeline.data.synthetic import generate_synthetic

    result = generate_synthetic(
        out_dir, num_images=src.num_images, noisy_images=src.noisy_images, image_size=src.image_size,
        seed=src.seed, name=src.name,
    )
    for rec in result.records + result.noisy_records:
        rec.extra["needs_split"] = True
    return result.records, result.noisy_records, result.noisy_labels


def record_digests(records: list[ManifestRecord], manifest: Path, workers: int) -> None:
    """Set each record's ``sha256`` (of its image file): later stages check cached features against it."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.data.images import image_sha256
    from pipeline.data.manifest import resolve_image_path

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for rec, digest in zip(records, pool.map(lambda r: image_sha256(resolve_image_path(r, manifest)), records)):
            rec.sha256 = digest


def run(cfg: PrepareConfig) -> dict:
    from pipeline.data.importers import import_source

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rejects = RejectsReport()
    records: list[ManifestRecord] = []
    noisy: list[ManifestRecord] = []
    noisy_labels: list[dict] = []
    for src in cfg.sources:
        log.info("importing %s source %r", src.kind, src.name)
        if isinstance(src, SyntheticSource):
            clean, noisy_part, labels = _import_synthetic(src, out_dir)
            records.extend(clean)
            noisy.extend(noisy_part)
            noisy_labels.extend(labels)
        else:
            records.extend(import_source(src, rejects, check_images=cfg.check_images, workers=cfg.workers))

    # Several sources merged: ids are prefixed by source name, so a clash means two sources share a name.
    unique: dict[str, ManifestRecord] = {}
    for rec in records:
        if rec.image_id in unique:
            rejects.add(rec.path, "duplicate id: image id already imported from another source", id=rec.image_id)
            continue
        unique[rec.image_id] = rec
    records = sorted(unique.values(), key=lambda r: r.image_id)
    if not records:
        rejects.write(out_dir / "rejects.jsonl")
        reasons = ", ".join(f"{k}: {v}" for k, v in rejects.summary()["by_reason"].items())
        why = f"all {len(rejects)} item(s) were rejected ({reasons})" if len(rejects) else "the sources hold no images"
        raise PrepareError(f"no image imported: {why}; see {out_dir / 'rejects.jsonl'}")

    assign_splits(records, seed=cfg.seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
    record_digests(records, out_dir / "manifest.jsonl", cfg.workers)
    record_digests(noisy, out_dir / "manifest.jsonl", cfg.workers)
    n = write_manifest(out_dir / "manifest.jsonl", records)
    rejects.write(out_dir / "rejects.jsonl")

    if noisy:
        assign_splits(noisy, seed=cfg.seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
        for rec in noisy:  # the noisy manifest lives one folder down; keep its paths relative to itself
            if not Path(rec.path).is_absolute():
                rec.path = f"../{rec.path}"
        write_manifest(out_dir / "noisy" / "manifest.jsonl", noisy)
        write_jsonl(out_dir / "noisy" / "labels.jsonl", noisy_labels, sort_keys=True)

    stats = {
        "manifest_version": MANIFEST_VERSION,
        "images": n,
        "captions": sum(len(r.captions) for r in records),
        "by_split": dict(sorted(Counter(r.split for r in records).items())),
        "by_source": dict(sorted(Counter(r.source for r in records).items())),
        "noisy_images": len(noisy),
        "rejects": rejects.summary(),
        "config": config_to_dict(cfg),
    }
    write_json(out_dir / "stats.json", stats)
    log.info(
        "prepare: %d images (%s), %d captions, %d rejected%s -> %s",
        n, ", ".join(f"{k} {v}" for k, v in stats["by_split"].items()), stats["captions"], len(rejects),
        f" ({', '.join(f'{k}: {v}' for k, v in stats['rejects']['by_reason'].items())})" if len(rejects) else "",
        out_dir / "manifest.jsonl",
    )
    return stats
