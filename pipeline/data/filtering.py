"""Caption filtering maths: which pairs a threshold (or a keep fraction) keeps, and how good that choice is.

Pure functions of score arrays (numpy), no I/O and no model: the `filter` stage computes the
scores, these choose and measure, :mod:`pipeline.evaluation.plots` draws.

* :func:`select` — the kept mask and the threshold: ``score >= threshold``, or the top
  ``keep_fraction`` of the pairs (ties at the cut kept);
* :func:`precision_recall`, :func:`best_f1_threshold` — precision/recall/F1 of the
  matching pairs among the kept ones, given ground-truth labels;
* :func:`retention_by`, :func:`label_report`, :func:`retention_curve` — the tables of
  ``retention.json`` and ``retention_curve.tsv``.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Optional, Sequence

import numpy as np

TABLE_THRESHOLDS = [round(0.05 * i, 2) for i in range(21)]  # 0.00 .. 1.00


def select(scores: np.ndarray, threshold: Optional[float] = None,
           keep_fraction: Optional[float] = None) -> tuple[np.ndarray, float]:
    """(kept mask, threshold used): ``score >= threshold``, or the top ``keep_fraction`` of the pairs.

    Give exactly one of the two. With ``keep_fraction`` the threshold is the score of the
    ``ceil(F * n)``-th best pair; pairs tied with it are kept too, so at least that many are
    kept (and always at least one). No pairs: nothing kept, threshold NaN.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if keep_fraction is not None:
        if threshold is not None:
            raise ValueError("give a threshold or a keep_fraction, not both")
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"keep_fraction must be in (0, 1], not {keep_fraction}")
        if scores.size == 0:
            return np.zeros(0, dtype=bool), float("nan")
        k = max(1, math.ceil(keep_fraction * scores.size - 1e-9))
        threshold = float(np.sort(scores)[::-1][k - 1])
    elif threshold is None:
        raise ValueError("give a threshold or a keep_fraction")
    return scores >= threshold, float(threshold)


def fraction(part: int, whole: int) -> float:
    """``part / whole`` rounded to 4 places; 0.0 for an empty whole."""
    return round(part / whole, 4) if whole else 0.0


def precision_recall(scores: np.ndarray, match: np.ndarray, threshold: float) -> dict:
    """Precision, recall and F1 of the matching pairs among those kept at ``threshold``.

    Nothing kept: precision 1.0 (vacuous); no matching pair: recall 1.0.
    """
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
    choice least tied to the few pairs that bound it. Adds ``plateau``: [first, last] of that run.
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
    centre = (first + last) // 2
    mid = grid[centre] if (last - first) % 2 == 0 else round((grid[centre] + grid[centre + 1]) / 2, 6)
    out = precision_recall(scores, match, mid)
    out["plateau"] = [round(grid[first], 4), round(grid[last], 4)]
    return out


def retention_by(pair_groups: Sequence[str], kept: np.ndarray, image_groups: Sequence[str],
                 kept_image_groups: Sequence[str]) -> dict[str, dict]:
    """Pairs and images kept per group (a source, a split), groups sorted by name.

    ``pair_groups``: the group of each scored pair (aligned with ``kept``); ``image_groups``: the
    group of every input image (unreadable ones too); ``kept_image_groups``: that of each image
    with a kept caption. Each group: pairs_total, pairs_kept, fraction (of pairs), images_total,
    images_kept.
    """
    groups: dict[str, dict] = {}
    kept_images = Counter(kept_image_groups)
    totals = Counter(image_groups)
    for name, k in zip(pair_groups, kept):
        g = groups.setdefault(name, {"pairs_total": 0, "pairs_kept": 0})
        g["pairs_total"] += 1
        g["pairs_kept"] += int(k)
    for name in totals:
        g = groups.setdefault(name, {"pairs_total": 0, "pairs_kept": 0})
        g["fraction"] = fraction(g["pairs_kept"], g["pairs_total"])
        g["images_total"] = totals[name]
        g["images_kept"] = kept_images[name]
    return dict(sorted(groups.items()))


def score_stats(scores: np.ndarray) -> dict:
    """min, mean and max of (non-empty) ``scores``, rounded to 4 places."""
    return {"min": round(float(scores.min()), 4), "mean": round(float(scores.mean()), 4),
            "max": round(float(scores.max()), 4)}


def label_report(scores: np.ndarray, kept: np.ndarray, threshold: float, match: np.ndarray, kinds: np.ndarray,
                 splits: np.ndarray) -> dict:
    """What the labels say about the selection (``kept``, at ``threshold``); non-empty arrays, one entry per pair.

    matching_pairs; at_threshold and by_split: :func:`precision_recall`; kept_by_kind: retention (of
    ``kept``, as :func:`select` chose it) per label kind; table: :func:`precision_recall` at each of
    :data:`TABLE_THRESHOLDS`; with a ``val``
    split, val_best_f1 (:func:`best_f1_threshold` on it) and suggested_threshold (its threshold).
    """
    lab: dict = {"matching_pairs": int(match.sum()), "at_threshold": precision_recall(scores, match, threshold)}
    lab["by_split"] = {s: precision_recall(scores[splits == s], match[splits == s], threshold)
                       for s in sorted(set(splits))}
    lab["kept_by_kind"] = {k: {"total": int((kinds == k).sum()), "kept": int(kept[kinds == k].sum()),
                               "fraction": fraction(int(kept[kinds == k].sum()), int((kinds == k).sum()))}
                           for k in sorted(set(kinds))}
    lab["table"] = [precision_recall(scores, match, t) for t in TABLE_THRESHOLDS]
    if (splits == "val").any():
        best = best_f1_threshold(scores[splits == "val"], match[splits == "val"])
        lab["val_best_f1"] = best
        lab["suggested_threshold"] = best["threshold"]
    return lab


def retention_curve(scores: np.ndarray, image_ids: Sequence[str], match: Optional[np.ndarray] = None) -> list[dict]:
    """Fraction of pairs and of images kept (and precision/recall when labelled) per threshold.

    Thresholds on a 0.01 grid spanning the scores; an image survives a threshold when its best
    caption does. ``image_ids``: the image of each pair.
    """
    if scores.size == 0:
        return []
    lo = math.floor(float(scores.min()) * 100) / 100
    hi = math.ceil(float(scores.max()) * 100) / 100
    best: dict[str, float] = {}
    for i, s in zip(image_ids, scores):
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
