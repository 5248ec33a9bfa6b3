"""`filter`: score every (image, caption) pair with an open_clip model and keep the pairs at or above a threshold.

Inputs: ``cfg.manifest`` (by default the synthetic noisy social variant) and its images;
the CLIP weights (``cfg.clip_model`` + ``cfg.clip_pretrained``: a local checkpoint file or
folder, or, online, a named open_clip tag); optionally ground-truth labels.

Image embeddings are computed once per image (never once per caption) into an LMDB
feature cache, ``cfg.embeddings_dir/<model key>/`` (the same format as the backbone
features: one token set ``image`` of shape ``(1, D)``, key = image id), where the model
key is the architecture, input size and checkpoint sha256. The cache is written like
`extract` writes its own: per shard, one committed transaction per batch, so a killed
run resumes and a rerun (say with another threshold) computes nothing. Caption
embeddings are cheap and computed on every run.

Outputs in ``cfg.out_dir``:

* ``manifest.jsonl`` — images with at least one kept caption, only their kept captions
  (``extra.clip_filter``: the kept captions' original indices and scores), image paths
  rewritten relative to this folder;
* ``scores.jsonl`` — every pair: image_id, caption_index, caption, score (cosine), kept;
* ``rejects.jsonl`` — every rejected pair ("score below threshold"), every dropped image
  ("no caption above threshold") and every unreadable image (its decode reason);
* ``retention.json`` — the threshold used, kept/total pairs and images overall, per source
  and per split; with ``cfg.labels``: precision/recall/F1 of the matching captions at the
  threshold, per split, retention per label kind, a table across thresholds 0.0..1.0 and
  the threshold that maximises F1 on the ``val`` split (how the default was chosen);
* ``histogram.png`` — the score histogram with the threshold marked (split by label when known);
* ``retention_curve.png`` + ``retention_curve.tsv`` — pairs and images kept per threshold.

The threshold: ``clip_threshold`` (tuned for one CLIP model, ``threshold_tuned_for``: a warning
when ``clip_model`` is another), or ``keep_fraction``, never both (:class:`FilterConfig`); with
``keep_fraction`` the threshold becomes the score of the ``ceil(F * pairs)``-th best pair, so the
top fraction is kept (ties at the cut kept too).

This module is the stage: inputs -> image embeddings (:func:`pipeline.data.cache_fill.fill_cache`) ->
scores -> selection -> outputs. Selection and its precision/recall maths are
:mod:`pipeline.data.filtering`'s, the plots :mod:`pipeline.evaluation.plots`'s.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from cache.format import CacheMeta, FeatureSpec, TokenSet
from cache.reader import FeatureCache
from cache.writer import CacheWriter
from pipeline.config import FilterConfig, config_to_dict
from pipeline.data.cache_fill import cache_sharding, fill_cache, shards_for
from pipeline.data.filtering import (
    fraction,
    label_report,
    retention_by,
    retention_curve,
    score_stats,
    select,
)
from pipeline.data.manifest import (
    ManifestRecord,
    read_manifest,
    resolve_image,
    resolve_image_path,
    write_manifest,
)
from pipeline.distributed import DistContext, run_distributed
from pipeline.errors import UserError
from pipeline.evaluation.plots import score_histogram, threshold_curves
from pipeline.files import write_json, write_jsonl, write_text
from pipeline.models.clip import ClipModel, load_clip
from pipeline.progress import progress as progress_bar

log = logging.getLogger(__name__)

REASON_BELOW = "score below threshold"
REASON_NO_CAPTION = "no caption above threshold"


# --------------------------------------------------------------------------- the embedding cache
def _cache_meta(clip: ClipModel, cfg: FilterConfig, sharding: str) -> CacheMeta:
    weights = {k: v for k, v in clip.weights.items() if k != "path"}  # where the file lies is not what it is
    spec = FeatureSpec(backbone=clip.arch, weights=weights, preprocessing=clip.preprocessing,
                       token_sets=(TokenSet("image", 1, clip.embed_dim),), dtype="float32")
    computed_with = {"batch_size": cfg.batch_size, "device": clip.device.type}
    return CacheMeta(spec=spec, num_shards=cfg.num_shards, extra={"model_key": clip.key}, computed_with=computed_with,
                     sharding=sharding)


def image_embeddings(clip: ClipModel, records: list[ManifestRecord], cfg: FilterConfig,
                     ctx: DistContext = DistContext()) -> tuple[FeatureCache | None, dict]:
    """The finished embedding cache holding every readable image of ``records``, and what this run computed.

    Embeddings are computed once per image file (by content) and CLIP model: another threshold reuses
    them all; a changed manifest computes only its new and changed images (:func:`pipeline.data.cache_fill.fill_cache`).
    Under torchrun each rank computes every ``world_size``-th shard and only rank 0 gets the cache (the others
    None); with ``cfg.shard_index`` this process computes that shard alone and gets None."""
    cache_dir = Path(cfg.embeddings_dir) / clip.key
    meta = _cache_meta(clip, cfg, cache_sharding(records))
    writer = CacheWriter(cache_dir, meta)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if ctx.is_main and cfg.shard_index is None:
        writer.remove_foreign_files()
    ctx.barrier()
    mine = shards_for(cfg.num_shards, ctx, cfg.shard_index)
    fill = fill_cache(writer, records, cfg.manifest, mine,
                      transform=clip.preprocess, encode=lambda images: [clip.encode_images(images).numpy()[:, None]],
                      batch_size=cfg.batch_size, workers=cfg.workers, max_pixels=cfg.max_pixels,
                      max_file_bytes=cfg.max_file_bytes, desc="clip images")
    # what this run reused or computed goes to the log only: retention.json holds what was selected, the same
    # bytes however many embeddings a run found cached
    log.info("filter: image embeddings of %d images: %d computed%s, %d rejected, %d reused -> %s", len(records),
             fill.computed, f" in {fill.seconds:.1f} s" if fill.computed else "", fill.rejected,
             len(records) - fill.computed - fill.rejected, cache_dir)
    ctx.barrier()
    if cfg.shard_index is not None:
        pending = writer.pending_shards()
        log.info("filter: embeddings of shard %d written to %s; %s", cfg.shard_index, cache_dir,
                 f"shard(s) {pending} still to compute" if pending else
                 "every shard is there: run `pipeline filter` without --shard-index to score the pairs")
        return None, {}
    if not ctx.is_main:
        return None, {}
    meta = writer.finalize()
    if meta is None:  # pragma: no cover - every shard was just written
        raise UserError(f"{cache_dir}: embedding cache incomplete; rerun `pipeline filter` (it resumes)")
    return FeatureCache(cache_dir), {"dir": str(cache_dir), "model_key": clip.key}


# --------------------------------------------------------------------------- the stage
def read_labels(path: Path) -> dict[tuple[str, int], dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: labels file not found")
    labels = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                labels[(str(row["image_id"]), int(row["caption_index"]))] = row
                bool(row["match"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise UserError(f"{path}:{lineno}: expected JSON with image_id, caption_index, match: {e}") from None
    return labels


def run(cfg: FilterConfig) -> dict | None:
    """Filter ``cfg.manifest``; the summary written to retention.json (None: a process that only computed image
    embeddings, a torchrun rank other than 0 or a ``--shard-index`` run)."""
    return run_distributed(_run, cfg, cfg.device, cfg.threads)


def _run(cfg: FilterConfig, device, ctx: DistContext) -> dict | None:
    start = time.perf_counter()
    # -- inputs ------------------------------------------------------------------------------
    clip = load_clip(cfg.clip_model, cfg.clip_pretrained, device)  # fails at once if the weights cannot be had
    warning = cfg.threshold_warning(clip.arch)
    if warning:
        log.warning("filter: %s", warning)
    records = read_manifest(cfg.manifest)
    labels = read_labels(cfg.labels) if cfg.labels else None
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # -- embeddings, scores, selection ---------------------------------------------------------
    cache, emb_stats = image_embeddings(clip, records, cfg, ctx)
    if cache is None:
        return None
    unreadable = {r["id"]: r for r in cache.rejects()}
    usable = [r for r in records if r.image_id not in unreadable]
    pairs = [(rec, j, cap) for rec in usable for j, cap in enumerate(rec.captions)]
    scores = pair_scores(clip, pairs, cache)
    cache.close()
    kept, threshold = select(scores, cfg.threshold, cfg.keep_fraction)

    # -- outputs -------------------------------------------------------------------------------
    out_records, rejects = _kept_records(cfg, out_dir, records, unreadable, pairs, scores, kept)
    write_manifest(out_dir / "manifest.jsonl", out_records)
    write_jsonl(out_dir / "scores.jsonl", (
        {"image_id": rec.image_id, "caption_index": j, "caption": cap, "score": round(float(scores[k]), 6),
         "kept": bool(kept[k]), "split": rec.split, "source": rec.source}
        for k, (rec, j, cap) in enumerate(pairs)))
    write_jsonl(out_dir / "rejects.jsonl", rejects)

    match = kinds = None
    if labels is not None:
        match, kinds = pair_labels(labels, pairs, cfg.labels)
    summary = _retention(cfg, clip, records, pairs, scores, kept, threshold, out_records, unreadable, match, kinds,
                         emb_stats)
    write_json(out_dir / "retention.json", summary, sort_keys=False)
    curve = retention_curve(scores, np.array([rec.image_id for rec, _, _ in pairs]), match)
    _write_tsv(out_dir / "retention_curve.tsv", curve)
    score_histogram(out_dir / "histogram.png", scores, threshold, match, xlabel=f"image-caption cosine ({clip.arch})",
                    title="CLIP scores of every (image, caption) pair")
    threshold_curves(out_dir / "retention_curve.png", curve, threshold, CURVES, xlabel="threshold (cosine)")
    log.info("filter: kept %d of %d pairs (%.1f %%), %d of %d images, threshold %.4f%s in %.1f s -> %s",
             int(kept.sum()), len(pairs), 100 * summary["pairs"]["fraction"], len(out_records), len(records),
             threshold, (f"; precision {summary['labels']['at_threshold']['precision']:.3f}, recall "
                         f"{summary['labels']['at_threshold']['recall']:.3f}") if labels is not None else "",
             time.perf_counter() - start, out_dir)
    return summary


CURVES = (("pairs_kept", "pairs kept"), ("images_kept", "images kept"), ("precision", "precision"),
          ("recall", "recall"))  # the lines of retention_curve.png (those present in the rows)


SCORE_CHUNK = 4096  # pairs scored at a time: their caption and image embeddings are all that is held


def pair_scores(clip: ClipModel, pairs: list[tuple[ManifestRecord, int, str]], image_emb: FeatureCache) -> np.ndarray:
    """The image-caption cosine of every pair (float32): a chunk of pairs at a time, captions encoded here and
    the chunk's images read from the embedding cache, so memory holds one chunk's embeddings (not the
    pool's) and the scores, 4 bytes a pair."""
    scores = np.zeros(len(pairs), np.float32)
    with progress_bar(total=len(pairs), unit="pair", desc="clip scores") as bar:
        for start in range(0, len(pairs), SCORE_CHUNK):
            chunk = pairs[start:start + SCORE_CHUNK]
            text = np.concatenate([clip.encode_texts([cap for _, _, cap in chunk[i:i + 1024]]).numpy()
                                   for i in range(0, len(chunk), 1024)])
            ids = [rec.image_id for rec, _, _ in chunk]
            unique = list(dict.fromkeys(ids))
            row = {image_id: k for k, image_id in enumerate(unique)}
            images = image_emb.get_batch(unique)["image"][:, 0].astype(np.float32)
            scores[start:start + len(chunk)] = (images[[row[i] for i in ids]] * text).sum(1)
            bar.update(len(chunk))
    return scores


def pair_labels(labels: dict, pairs: list[tuple[ManifestRecord, int, str]], where) -> tuple[np.ndarray, np.ndarray]:
    """(match, kind) of every pair from the labels file ``where``; a pair without a label is an error."""
    missing = [(rec.image_id, j) for rec, j, _ in pairs if (rec.image_id, j) not in labels]
    if missing:
        raise UserError(f"{where}: no label for {len(missing)} pair(s), e.g. {missing[0]}")
    match = np.array([bool(labels[(rec.image_id, j)]["match"]) for rec, j, _ in pairs])
    kinds = np.array([str(labels[(rec.image_id, j)].get("kind", "match" if m else "no match"))
                      for (rec, j, _), m in zip(pairs, match)])
    return match, kinds


def _kept_records(cfg: FilterConfig, out_dir: Path, records, unreadable, pairs, scores, kept):
    """The output manifest's records (kept captions only, paths relative to ``out_dir``) and the rejects."""
    kept_by_image: dict[str, list[int]] = defaultdict(list)
    for k, (rec, _, _) in enumerate(pairs):
        if kept[k]:
            kept_by_image[rec.image_id].append(k)
    out_records = []
    rejects: list[dict] = []
    for rec in records:
        if rec.image_id in unreadable:
            r = unreadable[rec.image_id]
            rejects.append({"id": rec.image_id, "file": r.get("file", rec.path), "reason": r.get("reason", "unreadable image"),
                            **({"detail": r["detail"]} if r.get("detail") else {})})
            continue
        ks = kept_by_image.get(rec.image_id, [])
        if not ks:
            rejects.append({"id": rec.image_id, "file": str(resolve_image(rec, cfg.manifest)),
                            "reason": REASON_NO_CAPTION})
            continue
        path = resolve_image_path(rec, cfg.manifest)
        rel = path if path.is_absolute() else Path(os.path.relpath(path.resolve(), out_dir.resolve()))
        extra = dict(rec.extra)
        extra["clip_filter"] = {"caption_indices": [pairs[k][1] for k in ks],
                                "scores": [round(float(scores[k]), 4) for k in ks]}
        out_records.append(ManifestRecord(image_id=rec.image_id, path=str(rel), captions=[pairs[k][2] for k in ks],
                                          split=rec.split, source=rec.source, extra=extra,
                                          member=rec.member))
    for k, (rec, j, cap) in enumerate(pairs):
        if not kept[k]:
            rejects.append({"id": rec.image_id, "caption_index": j, "caption": cap, "score": round(float(scores[k]), 6),
                            "reason": REASON_BELOW})
    return out_records, rejects


def _retention(cfg, clip, records, pairs, scores, kept, threshold, out_records, unreadable, match, kinds,
               emb_stats) -> dict:
    """retention.json: the selection, what it kept (overall, per source and split), with labels how well."""
    n_pairs, n_kept = len(pairs), int(kept.sum())
    summary: dict = {
        "mode": "keep_fraction" if cfg.keep_fraction is not None else "threshold",
        "threshold": round(threshold, 6) if not math.isnan(threshold) else None,
        "keep_fraction": cfg.keep_fraction,
        "clip_model": clip.arch, "clip_pretrained": cfg.clip_pretrained, "model_key": clip.key,
        "pairs": {"total": n_pairs, "kept": n_kept, "fraction": fraction(n_kept, n_pairs)},
        "images": {"total": len(records), "kept": len(out_records), "fraction": fraction(len(out_records), len(records)),
                   "unreadable": len(unreadable)},
    }
    for field, key in (("by_source", lambda r: r.source), ("by_split", lambda r: r.split)):
        summary[field] = retention_by([key(rec) for rec, _, _ in pairs], kept, [key(r) for r in records],
                                      [key(r) for r in out_records])
    if n_pairs:
        summary["scores"] = score_stats(scores)
    if match is not None and n_pairs:
        splits = np.array([rec.split for rec, _, _ in pairs])
        summary["labels"] = {"file": str(cfg.labels), **label_report(scores, kept, threshold, match, kinds, splits)}
    summary["embeddings"] = emb_stats
    summary["config"] = config_to_dict(cfg)
    return summary


def _write_tsv(path: Path, rows: list[dict]) -> None:
    cols = list(rows[0]) if rows else ["threshold", "pairs_kept", "images_kept"]
    lines = ["\t".join(cols)] + ["\t".join(str(r[c]) for c in cols) for r in rows]
    write_text(path, "\n".join(lines) + "\n")
