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

``keep_fraction`` (when set, instead of ``clip_threshold``): the threshold becomes the score
of the ``ceil(F * pairs)``-th best pair, so the top fraction is kept (ties at the cut kept too).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cache.format import CacheMeta, FeatureSpec, TokenSet
from cache.reader import FeatureCache
from cache.writer import CacheWriter
from pipeline.config import FilterConfig, config_to_dict
from pipeline.data.manifest import (
    ManifestRecord,
    read_manifest,
    resolve_image_path,
    write_manifest,
)
from pipeline.distributed import resolve_device
from pipeline.errors import UserError
from pipeline.models.clip import ClipModel, load_clip
from pipeline.progress import progress as progress_bar
from pipeline.encode import fill_cache

log = logging.getLogger(__name__)

TABLE_THRESHOLDS = [round(0.05 * i, 2) for i in range(21)]  # 0.00 .. 1.00
REASON_BELOW = "score below threshold"
REASON_NO_CAPTION = "no caption above threshold"


# --------------------------------------------------------------------------- selection
def select(scores: np.ndarray, threshold: Optional[float] = None,
           keep_fraction: Optional[float] = None) -> tuple[np.ndarray, float]:
    """(kept mask, threshold used): ``score >= threshold``, or the top ``keep_fraction`` of the pairs.

    With ``keep_fraction`` the threshold is the score of the ``ceil(F * n)``-th best pair; pairs
    tied with it are kept too, so at least that many are kept.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if keep_fraction is not None:
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], not {keep_fraction}")
        if scores.size == 0:
            return np.zeros(0, dtype=bool), float("nan")
        k = max(1, math.ceil(keep_fraction * scores.size - 1e-9))
        threshold = float(np.sort(scores)[::-1][k - 1])
    elif threshold is None:
        raise ValueError("give a threshold or a keep_fraction")
    return scores >= threshold, float(threshold)


def precision_recall(scores: np.ndarray, match: np.ndarray, threshold: float) -> dict:
    """Precision, recall and F1 of the matching pairs among those kept at ``threshold``."""
    kept = np.asarray(scores) >= threshold
    match = np.asarray(match, dtype=bool)
    tp = int((kept & match).sum())
    fp = int((kept & ~match).sum())
    fn = int((~kept & match).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"threshold": round(float(threshold), 4), "precision": round(precision, 4), "recall": round(recall, 4),
            "f1": round(f1, 4), "kept": int(kept.sum()), "tp": tp, "fp": fp, "fn": fn}


def best_f1_threshold(scores: np.ndarray, match: np.ndarray, step: float = 0.005) -> dict:
    """The threshold with the highest F1 on a ``step`` grid: the middle of the first run of grid points reaching it.

    A small labelled set reaches its best F1 on a plateau of thresholds; its middle is the
    choice least tied to the few pairs that bound it.
    """
    lo = math.floor(float(np.min(scores)) / step) * step
    hi = math.ceil(float(np.max(scores)) / step) * step
    grid = [round(float(t), 6) for t in np.arange(lo, hi + step / 2, step)]
    f1 = [precision_recall(scores, match, t)["f1"] for t in grid]
    best = max(f1)
    first = f1.index(best)
    last = first
    while last + 1 < len(f1) and f1[last + 1] == best:
        last += 1
    mid = grid[(first + last) // 2] if (last - first) % 2 == 0 else round((grid[(first + last) // 2] + grid[(first + last) // 2 + 1]) / 2, 6)
    out = precision_recall(scores, match, mid)
    out["plateau"] = [round(grid[first], 4), round(grid[last], 4)]
    return out


# --------------------------------------------------------------------------- the embedding cache
def _cache_meta(clip: ClipModel, cfg: FilterConfig) -> CacheMeta:
    weights = {k: v for k, v in clip.weights.items() if k != "path"}  # where the file lies is not what it is
    spec = FeatureSpec(backbone=clip.arch, weights=weights, preprocessing=clip.preprocessing,
                       token_sets=(TokenSet("image", 1, clip.embed_dim),), dtype="float32")
    return CacheMeta(spec=spec, num_shards=cfg.num_shards, extra={"model_key": clip.key})


def image_embeddings(clip: ClipModel, records: list[ManifestRecord], cfg: FilterConfig) -> tuple[FeatureCache, dict]:
    """The finished embedding cache holding every readable image of ``records``, and what this run computed.

    Embeddings are computed once per image file (by content) and CLIP model: another threshold reuses
    them all; a changed manifest computes only its new and changed images (:func:`pipeline.encode.fill_cache`)."""
    cache_dir = Path(cfg.embeddings_dir) / clip.key
    meta = _cache_meta(clip, cfg)
    writer = CacheWriter(cache_dir, meta)
    cache_dir.mkdir(parents=True, exist_ok=True)
    writer.remove_foreign_files()
    fill = fill_cache(writer, records, cfg.manifest, list(range(cfg.num_shards)),
                      transform=clip.preprocess, encode=lambda images: [clip.encode_images(images).numpy()[:, None]],
                      batch_size=cfg.batch_size, workers=cfg.workers, max_pixels=cfg.max_pixels, desc="clip images")
    if fill.computed:
        log.info("filter: embedded %d images in %.1f s -> %s", fill.computed, fill.seconds, cache_dir)
    meta = writer.finalize()
    if meta is None:  # pragma: no cover - every shard was just written
        raise UserError(f"{cache_dir}: embedding cache incomplete; rerun `pipeline filter` (it resumes)")
    stats = {"dir": str(cache_dir), "model_key": clip.key, "computed": fill.computed, "rejected": fill.rejected,
             "reused": len(records) - fill.computed - fill.rejected}
    return FeatureCache(cache_dir), stats


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


def run(cfg: FilterConfig) -> dict:
    start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    clip = load_clip(cfg.clip_model, cfg.clip_pretrained, device)  # fails at once if the weights cannot be had
    records = read_manifest(cfg.manifest)
    labels = read_labels(cfg.labels) if cfg.labels else None
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    cache, emb_stats = image_embeddings(clip, records, cfg)
    unreadable = {r["id"]: r for r in cache.rejects()}
    usable = [r for r in records if r.image_id not in unreadable]
    image_emb = {}
    for ids, batch in cache.iter_batches([r.image_id for r in usable], 1024):
        for i, v in zip(ids, batch["image"][:, 0]):
            image_emb[i] = v
    cache.close()

    pairs = [(rec, j, cap) for rec in usable for j, cap in enumerate(rec.captions)]
    texts = [cap for _, _, cap in pairs]
    text_emb = np.zeros((0, 1), np.float32)
    if pairs:
        chunks = []
        with progress_bar(total=len(texts), unit="caption", desc="clip captions") as bar:
            for i in range(0, len(texts), 1024):
                chunks.append(clip.encode_texts(texts[i:i + 1024]).numpy())
                bar.update(len(texts[i:i + 1024]))
        text_emb = np.concatenate(chunks)
        img = np.stack([image_emb[rec.image_id] for rec, _, _ in pairs]).astype(np.float32)
        scores = (img * text_emb).sum(1)
    else:
        scores = np.zeros(0, np.float32)
    kept, threshold = select(scores, cfg.clip_threshold if cfg.keep_fraction is None else None, cfg.keep_fraction)

    # -- outputs -------------------------------------------------------------------------------
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
            rejects.append({"id": rec.image_id, "file": str(resolve_image_path(rec, cfg.manifest)),
                            "reason": REASON_NO_CAPTION})
            continue
        path = resolve_image_path(rec, cfg.manifest)
        rel = path if path.is_absolute() else Path(os.path.relpath(path.resolve(), out_dir.resolve()))
        extra = dict(rec.extra)
        extra["clip_filter"] = {"caption_indices": [pairs[k][1] for k in ks],
                                "scores": [round(float(scores[k]), 4) for k in ks]}
        out_records.append(ManifestRecord(image_id=rec.image_id, path=str(rel), captions=[pairs[k][2] for k in ks],
                                          split=rec.split, source=rec.source, extra=extra))
    for k, (rec, j, cap) in enumerate(pairs):
        if not kept[k]:
            rejects.append({"id": rec.image_id, "caption_index": j, "caption": cap, "score": round(float(scores[k]), 6),
                            "reason": REASON_BELOW})
    write_manifest(out_dir / "manifest.jsonl", out_records)
    _write_jsonl(out_dir / "scores.jsonl", (
        {"image_id": rec.image_id, "caption_index": j, "caption": cap, "score": round(float(scores[k]), 6),
         "kept": bool(kept[k]), "split": rec.split, "source": rec.source}
        for k, (rec, j, cap) in enumerate(pairs)))
    _write_jsonl(out_dir / "rejects.jsonl", rejects)

    match = None
    if labels is not None:
        missing = [(rec.image_id, j) for rec, j, _ in pairs if (rec.image_id, j) not in labels]
        if missing:
            raise UserError(f"{cfg.labels}: no label for {len(missing)} pair(s), e.g. {missing[0]}")
        match = np.array([bool(labels[(rec.image_id, j)]["match"]) for rec, j, _ in pairs])
        kinds = np.array([str(labels[(rec.image_id, j)].get("kind", "match" if m else "no match"))
                          for (rec, j, _), m in zip(pairs, match)])
    summary = _retention(cfg, clip, records, usable, pairs, scores, kept, threshold, out_records, unreadable,
                         match, kinds if labels is not None else None, emb_stats)
    (out_dir / "retention.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    curve = _retention_curve(scores, pairs, match)
    _write_tsv(out_dir / "retention_curve.tsv", curve)
    _plot_histogram(out_dir / "histogram.png", scores, threshold, match, clip.arch)
    _plot_curve(out_dir / "retention_curve.png", curve, threshold)
    log.info("filter: kept %d of %d pairs (%.1f %%), %d of %d images, threshold %.4f%s in %.1f s -> %s",
             int(kept.sum()), len(pairs), 100 * summary["pairs"]["fraction"], len(out_records), len(records),
             threshold, (f"; precision {summary['labels']['at_threshold']['precision']:.3f}, recall "
                         f"{summary['labels']['at_threshold']['recall']:.3f}") if labels is not None else "",
             time.perf_counter() - start, out_dir)
    return summary


def _frac(a: int, b: int) -> float:
    return round(a / b, 4) if b else 0.0


def _retention(cfg, clip, records, usable, pairs, scores, kept, threshold, out_records, unreadable, match, kinds,
               emb_stats) -> dict:
    n_pairs, n_kept = len(pairs), int(kept.sum())
    summary: dict = {
        "mode": "keep_fraction" if cfg.keep_fraction is not None else "threshold",
        "threshold": round(threshold, 6) if not math.isnan(threshold) else None,
        "keep_fraction": cfg.keep_fraction,
        "clip_model": clip.arch, "clip_pretrained": cfg.clip_pretrained, "model_key": clip.key,
        "pairs": {"total": n_pairs, "kept": n_kept, "fraction": _frac(n_kept, n_pairs)},
        "images": {"total": len(records), "kept": len(out_records), "fraction": _frac(len(out_records), len(records)),
                   "unreadable": len(unreadable)},
    }
    for field, key in (("by_source", lambda r: r.source), ("by_split", lambda r: r.split)):
        groups: dict[str, dict] = {}
        kept_images = Counter(key(r) for r in out_records)
        totals = Counter(key(r) for r in records)
        for k, (rec, _, _) in enumerate(pairs):
            g = groups.setdefault(key(rec), {"pairs_total": 0, "pairs_kept": 0})
            g["pairs_total"] += 1
            g["pairs_kept"] += int(kept[k])
        for name in totals:
            g = groups.setdefault(name, {"pairs_total": 0, "pairs_kept": 0})
            g["fraction"] = _frac(g["pairs_kept"], g["pairs_total"])
            g["images_total"] = totals[name]
            g["images_kept"] = kept_images[name]
        summary[field] = dict(sorted(groups.items()))
    if n_pairs:
        summary["scores"] = {"min": round(float(scores.min()), 4), "mean": round(float(scores.mean()), 4),
                             "max": round(float(scores.max()), 4)}
    if match is not None and n_pairs:
        splits = np.array([rec.split for rec, _, _ in pairs])
        lab: dict = {"file": str(cfg.labels), "matching_pairs": int(match.sum()),
                     "at_threshold": precision_recall(scores, match, threshold)}
        lab["by_split"] = {s: precision_recall(scores[splits == s], match[splits == s], threshold)
                           for s in sorted(set(splits))}
        lab["kept_by_kind"] = {k: {"total": int((kinds == k).sum()), "kept": int(kept[kinds == k].sum()),
                                   "fraction": _frac(int(kept[kinds == k].sum()), int((kinds == k).sum()))}
                               for k in sorted(set(kinds))}
        lab["table"] = [precision_recall(scores, match, t) for t in TABLE_THRESHOLDS]
        if (splits == "val").any():
            best = best_f1_threshold(scores[splits == "val"], match[splits == "val"])
            lab["val_best_f1"] = best
            lab["suggested_threshold"] = best["threshold"]
        summary["labels"] = lab
    summary["embeddings"] = emb_stats
    summary["config"] = config_to_dict(cfg)
    return summary


def _retention_curve(scores: np.ndarray, pairs, match) -> list[dict]:
    """Pairs and images kept (and precision/recall when labelled) per threshold, on a 0.01 grid over the scores."""
    if scores.size == 0:
        return []
    lo = math.floor(float(scores.min()) * 100) / 100
    hi = math.ceil(float(scores.max()) * 100) / 100
    image_of = np.array([rec.image_id for rec, _, _ in pairs])
    # An image survives a threshold when its best caption does.
    best: dict[str, float] = {}
    for i, s in zip(image_of, scores):
        best[i] = max(best.get(i, -np.inf), float(s))
    best_scores = np.array(list(best.values()))
    rows = []
    for t in np.arange(lo, hi + 0.005, 0.01):
        t = round(float(t), 2)
        row = {"threshold": t, "pairs_kept": round(float((scores >= t).mean()), 4),
               "images_kept": round(float((best_scores >= t).mean()), 4)}
        if match is not None:
            pr = precision_recall(scores, match, t)
            row["precision"], row["recall"] = pr["precision"], pr["recall"]
        rows.append(row)
    return rows


def _write_jsonl(path: Path, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def _write_tsv(path: Path, rows: list[dict]) -> None:
    cols = list(rows[0]) if rows else ["threshold", "pairs_kept", "images_kept"]
    lines = ["\t".join(cols)] + ["\t".join(str(r[c]) for c in cols) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _plot_histogram(path: Path, scores: np.ndarray, threshold: float, match, arch: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    bins = np.linspace(float(scores.min()), float(scores.max()), 61) if scores.size else 10
    if match is not None and scores.size:
        ax.hist([scores[match], scores[~match]], bins=bins, stacked=True, label=["matching (label)", "not matching"],
                color=["#2a9d8f", "#e76f51"])
    else:
        ax.hist(scores, bins=bins, color="#457b9d", label="pairs")
    if not math.isnan(threshold):
        kept = float((scores >= threshold).mean()) if scores.size else 0.0
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f} (keeps {100 * kept:.1f} %)")
    ax.set_xlabel(f"image-caption cosine ({arch})")
    ax.set_ylabel("pairs")
    ax.set_title("CLIP scores of every (image, caption) pair")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_curve(path: Path, rows: list[dict], threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if rows:
        t = [r["threshold"] for r in rows]
        for key, label in (("pairs_kept", "pairs kept"), ("images_kept", "images kept"), ("precision", "precision"),
                           ("recall", "recall")):
            if key in rows[0]:
                ax.plot(t, [r[key] for r in rows], label=label)
    if not math.isnan(threshold):
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("threshold (cosine)")
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1.02)
    ax.set_title("Retention per threshold")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
