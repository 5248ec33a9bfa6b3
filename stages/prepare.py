"""`prepare`: import one or more datasets into one normalised manifest.

Inputs: the sources named in ``cfg.sources`` (annotation files and images), or
nothing for the built-in synthetic dataset.
Outputs in ``cfg.out_dir``:

* ``manifest.jsonl`` — one row per image (see :mod:`pipeline.data.manifest`);
* ``rejects.jsonl`` — every refused item with file, line or id, and reason;
* ``stats.json`` — counts per split and source, rejects by reason, duplicates, the config;
* ``duplicates.json`` — the groups of one image found under several ids, and the split each group went to;
* ``images/`` — rendered images, for the synthetic source;
* ``noisy/manifest.jsonl`` + ``noisy/labels.jsonl`` — the synthetic noisy social
  variant and its ground-truth match labels (kept out of the manifest).

Each source's ``split`` option says where its images go (auto: the source's own split where it has
one); the images left without one get a seeded image-level split. Then one image found under several
ids (COCO 2014 and 2017, a dataset photo re-posted in a social table; compared by decoded pixels, or by
file bytes with ``duplicates: bytes``) is kept in one split: every member of a group takes the most
held-out split among the members' (test > val > train), so no evaluation image is trained on.
When every item is rejected, only ``rejects.jsonl`` is written and :class:`PrepareError` says so.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from pipeline.config import PrepareConfig, SyntheticSource, config_to_dict
from pipeline.data.manifest import (
    MANIFEST_VERSION,
    SPLITS,
    ManifestRecord,
    RejectsReport,
    resolve_image,
    write_manifest,
)
from pipeline.errors import UserError
from pipeline.files import write_json, write_jsonl

if TYPE_CHECKING:
    from pipeline.data.importers import ImportLimits

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
    from pipeline.data.importers import resolve_split
    from pipeline.data.synthetic import generate_synthetic

    result = generate_synthetic(
        out_dir, num_images=src.num_images, noisy_images=src.noisy_images, image_size=src.image_size,
        seed=src.seed, name=src.name,
    )
    split = resolve_split(src.split, None)  # the synthetic source has no split of its own
    for rec in result.records + result.noisy_records:
        if split is None:
            rec.extra["needs_split"] = True
        else:
            rec.split = split
    return result.records, result.noisy_records, result.noisy_labels


def record_digests(records: list[ManifestRecord], manifest: Path, workers: int, *, pixels: bool = False,
                   limits: Optional[ImportLimits] = None) -> int:
    """Set each record's ``sha256`` (of its image file: later stages check cached features against it) and,
    with ``pixels``, its ``pixels_sha256``, reading and decoding each file once, in ``workers`` threads.

    Records an import already hashed (``check_images: full``) are not read again. Returns how many images
    could not be decoded (possible with ``check_images`` header or none); their ``pixels_sha256`` stays None.
    ``limits`` (:class:`pipeline.data.importers.ImportLimits`, default: the defaults) bound the decoding.
    """
    from pipeline.data.images import ImageDecodeError, image_sha256, read_image_file
    from pipeline.data.importers import ImportLimits, pixels_sha256

    limits = limits or ImportLimits()

    def digests(rec: ManifestRecord) -> tuple[str, str | None]:
        path = resolve_image(rec, manifest)
        if not pixels:
            return image_sha256(path), None
        try:
            digest, img = read_image_file(path, limits.max_pixels, limits.max_file_bytes)
        except ImageDecodeError as e:
            return e.digest or image_sha256(path), None
        return digest, pixels_sha256(img)

    todo = [r for r in records if r.sha256 is None or (pixels and r.pixels_sha256 is None)]
    undecoded = 0
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="hash-image") as pool:
        for rec, (digest, pixel_digest) in zip(todo, pool.map(digests, todo)):
            rec.sha256 = digest
            rec.pixels_sha256 = pixel_digest
            if pixels and pixel_digest is None:
                undecoded += 1
    return undecoded


# A group of one image under several ids goes to the most held-out split of its members.
HELD_OUT_RANK = {"train": 0, "val": 1, "test": 2}
assert set(HELD_OUT_RANK) == set(SPLITS)


def keep_duplicates_together(records: list[ManifestRecord], key: str = "pixels") -> list[dict]:
    """Find the images shown under several ids and put each group in one split; returns the groups.

    ``key``: ``pixels`` compares ``pixels_sha256`` (records without one, undecodable, fall back to their
    file's ``sha256``), ``bytes`` compares ``sha256`` only. Every member of a group takes the most held-out
    split among its members' (test > val > train). A group is ``{"key", "split", "images": [{"image_id",
    "source", "path", "split_before"}]}``; groups are ordered by their first image id.
    """
    by_key: dict[str, list[ManifestRecord]] = {}
    for rec in records:
        if key == "pixels" and rec.pixels_sha256 is not None:
            k = f"pixels:{rec.pixels_sha256}"
        elif rec.sha256 is not None:
            k = f"bytes:{rec.sha256}"
        else:
            raise ValueError(f"{rec.image_id}: no digest to compare (record_digests first)")
        by_key.setdefault(k, []).append(rec)
    groups = []
    for k, members in by_key.items():
        if len(members) < 2:
            continue
        members = sorted(members, key=lambda r: r.image_id)
        split = max((r.split for r in members), key=HELD_OUT_RANK.__getitem__)
        groups.append({
            "key": k,
            "split": split,
            "images": [{"image_id": r.image_id, "source": r.source, "path": r.path, "split_before": r.split}
                       for r in members],
        })
        for r in members:
            r.split = split
    return sorted(groups, key=lambda g: g["images"][0]["image_id"])


def _duplicates_summary(groups: list[dict], key: str, undecoded: int) -> dict:
    return {
        "key": key,
        "groups": len(groups),
        "images": sum(len(g["images"]) for g in groups),
        "moved": sum(m["split_before"] != g["split"] for g in groups for m in g["images"]),
        "across_sources": sum(len({m["source"] for m in g["images"]}) > 1 for g in groups),
        "undecoded": undecoded,
    }


def run(cfg: PrepareConfig) -> dict:
    from pipeline.data.importers import ImportLimits

    limits = ImportLimits(max_file_bytes=cfg.max_file_bytes, max_pixels=cfg.max_pixels,
                          max_caption_chars=cfg.max_caption_chars)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rejects = RejectsReport()
    records, noisy, noisy_labels = _import_sources(cfg, out_dir, rejects, limits)
    records = _one_record_per_id(records, rejects)
    if not records:
        raise _nothing_imported(out_dir, rejects)

    assign_splits(records, seed=cfg.seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
    undecoded = record_digests(records, out_dir / "manifest.jsonl", cfg.workers, pixels=cfg.duplicates == "pixels",
                               limits=limits)
    record_digests(noisy, out_dir / "manifest.jsonl", cfg.workers)
    groups = keep_duplicates_together(records, cfg.duplicates)
    duplicates = _duplicates_summary(groups, cfg.duplicates, undecoded)
    n = write_manifest(out_dir / "manifest.jsonl", records)
    rejects.write(out_dir / "rejects.jsonl")
    write_json(out_dir / "duplicates.json", {
        "rule": "every image of a group takes the most held-out split among its members' (test > val > train)",
        "summary": duplicates,
        "groups": groups,
    })
    if noisy:
        _write_noisy(cfg, out_dir, noisy, noisy_labels)

    stats = {
        "manifest_version": MANIFEST_VERSION,
        "images": n,
        "captions": sum(len(r.captions) for r in records),
        "by_split": dict(sorted(Counter(r.split for r in records).items())),
        "by_source": dict(sorted(Counter(r.source for r in records).items())),
        "noisy_images": len(noisy),
        "rejects": rejects.summary(),
        "duplicates": duplicates,
        "config": config_to_dict(cfg),
    }
    write_json(out_dir / "stats.json", stats)
    _log_summary(cfg, out_dir, stats, len(rejects))
    return stats


def _import_sources(cfg: PrepareConfig, out_dir: Path, rejects: RejectsReport,
                    limits: ImportLimits) -> tuple[list[ManifestRecord], list[ManifestRecord], list[dict]]:
    """Every source's records, in source order: the clean ones, the synthetic noisy ones and their labels."""
    from pipeline.data.importers import import_source

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
            records.extend(import_source(src, rejects, check_images=cfg.check_images, workers=cfg.workers,
                                         limits=limits))
    return records, noisy, noisy_labels


def _one_record_per_id(records: list[ManifestRecord], rejects: RejectsReport) -> list[ManifestRecord]:
    """The records sorted by id, the first of each id kept. Several sources merged: ids are prefixed by source
    name, so a clash means two sources share a name (the later ones are rejects)."""
    unique: dict[str, ManifestRecord] = {}
    for rec in records:
        if rec.image_id in unique:
            rejects.add(rec.path, "duplicate id: image id already imported from another source", id=rec.image_id)
            continue
        unique[rec.image_id] = rec
    return sorted(unique.values(), key=lambda r: r.image_id)


def _nothing_imported(out_dir: Path, rejects: RejectsReport) -> PrepareError:
    """Writes ``rejects.jsonl`` alone and returns the error that says why nothing was imported."""
    rejects.write(out_dir / "rejects.jsonl")
    reasons = ", ".join(f"{k}: {v}" for k, v in rejects.summary()["by_reason"].items())
    why = f"all {len(rejects)} item(s) were rejected ({reasons})" if len(rejects) else "the sources hold no images"
    return PrepareError(f"no image imported: {why}; see {out_dir / 'rejects.jsonl'}")


def _write_noisy(cfg: PrepareConfig, out_dir: Path, noisy: list[ManifestRecord], labels: list[dict]) -> None:
    """``noisy/manifest.jsonl`` (seeded splits of its own) and ``noisy/labels.jsonl``."""
    assign_splits(noisy, seed=cfg.seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction)
    for rec in noisy:  # the noisy manifest lives one folder down; keep its paths relative to itself
        if not Path(rec.path).is_absolute():
            rec.path = f"../{rec.path}"
    write_manifest(out_dir / "noisy" / "manifest.jsonl", noisy)
    write_jsonl(out_dir / "noisy" / "labels.jsonl", labels, sort_keys=True)


def _log_summary(cfg: PrepareConfig, out_dir: Path, stats: dict, rejected: int) -> None:
    duplicates = stats["duplicates"]
    log.info(
        "prepare: %d images (%s), %d captions, %d rejected%s -> %s",
        stats["images"], ", ".join(f"{k} {v}" for k, v in stats["by_split"].items()), stats["captions"], rejected,
        f" ({', '.join(f'{k}: {v}' for k, v in stats['rejects']['by_reason'].items())})" if rejected else "",
        out_dir / "manifest.jsonl",
    )
    log.info(
        "prepare: %d group(s) of one image under several ids (%d images, %d groups across sources, compared by "
        "%s%s); %d image(s) moved to keep each group in one split -> %s",
        duplicates["groups"], duplicates["images"], duplicates["across_sources"], cfg.duplicates,
        f"; {duplicates['undecoded']} undecodable, compared by bytes" if duplicates["undecoded"] else "",
        duplicates["moved"], out_dir / "duplicates.json",
    )
    if "train" not in stats["by_split"]:
        log.warning(
            "prepare: no image is in the train split, so training on %s will fail; set `split: seeded` on a "
            "source whose own split is val or test (a COCO captions_val*.json) for a seeded train/val/test split",
            out_dir / "manifest.jsonl",
        )
