"""`mix`: combine the filtered noisy set with a clean set at a chosen ratio into one training manifest.

Inputs: ``cfg.clean`` (e.g. ``data/prepared/manifest.jsonl``) and ``cfg.filtered`` (the
`filter` stage's ``data/filtered/manifest.jsonl``).
Outputs in ``cfg.out_dir``: ``manifest.jsonl`` and ``stats.json``.

Only the training split is mixed: the clean set's ``val`` and ``test`` images pass
unchanged (so models trained on mixes are evaluated on the same clean images), and the
filtered set's own val/test images are left out. ``ratio`` is filtered:clean in ``unit``
(images or captions); whichever side has more than the ratio allows is subsampled
(seeded, whole images), the other is used whole. ``ratio: 0`` gives the clean set alone
(the control); no ratio gives everything from both. Every row records where it came from
in ``extra.mix`` (``clean`` / ``filtered``); image ids stay unique (a filtered id that
clashes with a clean one is prefixed ``filtered/``) and image paths are rewritten
relative to the new manifest.

The reference "filtered + clean" recovery experiment is then a DVC experiment, e.g.
``dvc exp run -S mix.ratio=0.25`` with training reading ``data/mixed/manifest.jsonl``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.config import MixConfig, config_to_dict
from pipeline.data.manifest import (
    ManifestRecord,
    read_manifest,
    rebased,
    write_manifest,
)
from pipeline.errors import UserError
from pipeline.files import write_json

log = logging.getLogger(__name__)


def _units(records: list[ManifestRecord], unit: str) -> int:
    return sum(len(r.captions) for r in records) if unit == "captions" else len(records)


def _subsample(records: list[ManifestRecord], target: float, unit: str, rng: np.random.Generator) -> list[ManifestRecord]:
    """Whole images in a seeded random order until ``target`` units are reached (the closest count, at least 0)."""
    if target >= _units(records, unit):
        return list(records)
    order = rng.permutation(len(records))
    chosen, total = [], 0
    for i in order:
        n = len(records[i].captions) if unit == "captions" else 1
        if total + n > target and abs(total + n - target) >= abs(total - target):
            continue  # adding it would overshoot more than leaving it out
        chosen.append(records[i])
        total += n
        if total >= target:
            break
    return sorted(chosen, key=lambda r: r.image_id)


def _rebase(rec: ManifestRecord, manifest: Path, out_dir: Path, origin: str, image_id: str) -> ManifestRecord:
    moved = rebased(rec, manifest, out_dir)
    return dataclasses.replace(moved, image_id=image_id, extra={**rec.extra, "mix": origin})


def run(cfg: MixConfig) -> dict:
    out_dir = Path(cfg.out_dir)
    clean = read_manifest(cfg.clean)
    filtered_all = read_manifest(cfg.filtered)
    clean_train = [r for r in clean if r.split == "train"] if cfg.clean_train else []
    filtered = [r for r in filtered_all if r.split == "train"]
    if not clean_train and not filtered:
        raise UserError(f"{cfg.clean} and {cfg.filtered}: no training images to mix")
    rng = np.random.default_rng(cfg.seed)
    c_units, f_units = _units(clean_train, cfg.unit), _units(filtered, cfg.unit)
    if cfg.ratio is None:
        use_clean, use_filtered = clean_train, filtered
    elif cfg.ratio == 0:
        use_clean, use_filtered = clean_train, []
    elif f_units >= cfg.ratio * c_units:  # enough filtered data: all clean, the filtered side subsampled
        use_clean, use_filtered = clean_train, _subsample(filtered, cfg.ratio * c_units, cfg.unit, rng)
    else:  # too little filtered data: all of it, the clean side subsampled
        use_clean, use_filtered = _subsample(clean_train, f_units / cfg.ratio, cfg.unit, rng), filtered

    rows: list[ManifestRecord] = []
    ids: set[str] = set()
    use_clean_ids = {r.image_id for r in use_clean}
    for rec in clean:
        if rec.split == "train" and rec.image_id not in use_clean_ids:
            continue
        rows.append(_rebase(rec, cfg.clean, out_dir, "clean", rec.image_id))
        ids.add(rec.image_id)
    renamed = 0
    for rec in use_filtered:
        image_id = rec.image_id
        if image_id in ids:
            image_id = f"filtered/{image_id}"
            renamed += 1
            if image_id in ids:
                raise UserError(f"{cfg.filtered}: image id {rec.image_id!r} clashes with the clean set even prefixed")
        rows.append(_rebase(rec, cfg.filtered, out_dir, "filtered", image_id))
        ids.add(image_id)
    rows.sort(key=lambda r: (r.split != "train", r.image_id))
    n = write_manifest(out_dir / "manifest.jsonl", rows)

    train = [r for r in rows if r.split == "train"]
    got_f = _units([r for r in train if r.extra["mix"] == "filtered"], cfg.unit)
    got_c = _units([r for r in train if r.extra["mix"] == "clean"], cfg.unit)
    stats = {
        "images": n,
        "by_split": dict(sorted(Counter(r.split for r in rows).items())),
        "train": {
            origin: {"images": sum(1 for r in train if r.extra["mix"] == origin),
                     "captions": sum(len(r.captions) for r in train if r.extra["mix"] == origin),
                     "available_images": len(pool), "available_captions": sum(len(r.captions) for r in pool)}
            for origin, pool in (("clean", clean_train), ("filtered", filtered))
        },
        "ratio_requested": cfg.ratio,
        "ratio_achieved": round(got_f / got_c, 4) if got_c else None,
        "unit": cfg.unit,
        "renamed_ids": renamed,
        "config": config_to_dict(cfg),
    }
    write_json(out_dir / "stats.json", stats, sort_keys=False)
    log.info("mix: %d train images (%d clean, %d filtered; filtered:clean %s = %s) + clean val/test -> %s",
             len(train), stats["train"]["clean"]["images"], stats["train"]["filtered"]["images"], cfg.unit,
             stats["ratio_achieved"], out_dir / "manifest.jsonl")
    return stats
