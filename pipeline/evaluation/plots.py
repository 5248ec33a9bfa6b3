"""Small static plots (PNG files drawn by matplotlib's Agg backend: no display, no browser, nothing fetched).

* :func:`pyplot` — ``matplotlib.pyplot`` with the Agg backend selected (imported on first use);
* :func:`score_histogram` — a histogram of scores, stacked by label when labels are known, with
  a threshold marked;
* :func:`threshold_curves` — fractions (kept, precision, recall, ...) against a threshold.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def pyplot():
    """``matplotlib.pyplot``, on the Agg backend (files only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def score_histogram(path: Path, scores: np.ndarray, threshold: float, match: Optional[np.ndarray] = None, *,
                    xlabel: str = "score", title: str = "Scores", bins: int = 60) -> None:
    """``scores`` in ``bins`` bins, written to ``path`` (PNG).

    With ``match`` (a boolean per score) the bars stack matching over not-matching; a ``threshold``
    that is not NaN is a dashed line labelled with the fraction of scores at or above it.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    edges = np.linspace(float(scores.min()), float(scores.max()), bins + 1) if scores.size else 10
    if match is not None and scores.size:
        ax.hist([scores[match], scores[~match]], bins=edges, stacked=True, label=["matching (label)", "not matching"],
                color=["#2a9d8f", "#e76f51"])
    else:
        ax.hist(scores, bins=edges, color="#457b9d", label="pairs")
    if not math.isnan(threshold):
        kept = float((scores >= threshold).mean()) if scores.size else 0.0
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f} (keeps {100 * kept:.1f} %)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def threshold_curves(path: Path, rows: Sequence[dict], threshold: float,
                     series: Sequence[tuple[str, str]], *, xlabel: str = "threshold",
                     title: str = "Retention per threshold") -> None:
    """One line per ``(key, label)`` of ``series`` present in ``rows`` (dicts with a ``threshold``), on [0, 1].

    A ``threshold`` that is not NaN is marked by a dashed line. Written to ``path`` (PNG).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if rows:
        t = [r["threshold"] for r in rows]
        for key, label in series:
            if key in rows[0]:
                ax.plot(t, [r[key] for r in rows], label=label)
    if not math.isnan(threshold):
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
