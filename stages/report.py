"""`report`: every evaluated model side by side, and their training curves.

Inputs: ``cfg.reports`` — `evaluate` output folders or their ``metrics.json`` (glob patterns
allowed); ``cfg.live`` — dvclive folders of `train` (``models/<name>/live``), whose
``plots/metrics/**/*.tsv`` files (``step<TAB>value`` per epoch; e.g. ``train/loss.tsv``,
``val/cider.tsv``, ``lr.tsv``) are plotted.

Outputs: ``cfg.out`` (``reports/summary.md``): a markdown table of BLEU-1..4, METEOR,
ROUGE-L, CIDEr (SPICE when any report has it) and parameters, image-blind control rows marked, one
table per group of comparable reports (same images and references, scorer and decoding); and the
curves as PNG files in ``<folder of cfg.out>/curves/`` (one per model plus ``compare.png``
overlaying the models), linked from the summary.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ReportConfig
from pipeline.errors import UserError
from pipeline.evaluation.metrics import METRICS
from pipeline.files import write_text
from pipeline.inference.options import decoding_label

log = logging.getLogger(__name__)

COLUMNS = METRICS  # every COCO caption metric, with its label
BLIND_MARK = "⚠ image-blind control"


class ReportError(UserError, ValueError):
    """Report inputs that cannot be used; the message says which and why."""


@dataclass
class Row:
    path: Path  # the report's metrics.json
    metrics: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)  # models/<name>/metrics.json, when found

    @property
    def name(self) -> str:
        return str(self.metrics.get("model") or self.path.parent.name)

    @property
    def blind(self) -> bool:
        return bool(self.metrics.get("blind") or self.train.get("blind"))

    @property
    def parameters(self) -> int | None:
        return self.metrics.get("parameters") or self.train.get("parameters")


# --------------------------------------------------------------------------- inputs
def _has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def find_reports(entries: list[str]) -> list[Path]:
    """The ``metrics.json`` files named by ``entries`` (folders, files or glob patterns), sorted, once each."""
    found: dict[Path, None] = {}
    for entry in entries:
        matches = sorted(glob.glob(entry, recursive=True)) if _has_magic(entry) else [entry]
        for m in matches:
            p = Path(m)
            if p.is_dir():
                p = p / "metrics.json"
            if not p.is_file():
                if _has_magic(entry):
                    continue
                raise ReportError(f"{m}: no evaluation report there (run `pipeline evaluate` first)")
            found[p.resolve()] = None
    return sorted(found, key=lambda p: str(p))


def find_live_dirs(patterns: list[str]) -> list[Path]:
    dirs: dict[Path, None] = {}
    for pattern in patterns:
        for m in sorted(glob.glob(pattern, recursive=True)) if _has_magic(pattern) else [pattern]:
            p = Path(m)
            if (p / "plots" / "metrics").is_dir():
                dirs[p] = None
            elif not _has_magic(pattern):
                log.warning("%s: no dvclive plots/metrics there; no curves for it", p)
    return list(dirs)


def read_live_metrics(live: Path) -> dict[str, tuple[list[int], list[float]]]:
    """``{"train/loss": (steps, values), "val/cider": ..., "lr": ...}`` from dvclive's TSV files."""
    root = Path(live) / "plots" / "metrics"
    series: dict[str, tuple[list[int], list[float]]] = {}
    for tsv in sorted(root.rglob("*.tsv")):
        name = tsv.relative_to(root).with_suffix("").as_posix()
        with open(tsv, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            header = next(reader, None)
            if not header or "step" not in header:
                continue
            step_col = header.index("step")
            value_cols = [i for i, h in enumerate(header) if h not in ("step", "timestamp")]
            if not value_cols:
                continue
            vcol = value_cols[-1]
            steps, values = [], []
            for row in reader:
                try:
                    steps.append(int(float(row[step_col])))
                    values.append(float(row[vcol]))
                except (IndexError, ValueError):
                    continue
        if steps:
            series[name] = (steps, values)
    return series


def _train_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The model's training summary (``models/<name>/metrics.json``) when it can be found."""
    candidates = []
    if metrics.get("bundle"):
        candidates.append(Path(metrics["bundle"]).parent / "metrics.json")
    if metrics.get("model"):
        candidates.append(Path("models") / str(metrics["model"]) / "metrics.json")
    for c in candidates:
        if c.is_file():
            try:
                data = json.loads(c.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                log.warning("%s: not valid JSON; ignored", c)
                continue
            if isinstance(data, dict) and "parameters" in data:
                return data
    return {}


def load_rows(paths: list[Path]) -> list[Row]:
    rows = []
    for p in paths:
        try:
            metrics = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ReportError(f"{p}:{e.lineno}: not valid JSON: {e.msg}") from None
        if not isinstance(metrics, dict) or "CIDEr" not in metrics:
            raise ReportError(f"{p}: not an evaluation report (no CIDEr); written by `pipeline evaluate`?")
        rows.append(Row(p, metrics, _train_summary(metrics)))
    # image-conditioned models by CIDEr, best first; the blind controls last
    rows.sort(key=lambda r: (r.blind, -(r.metrics.get("CIDEr") or 0.0), r.name))
    return rows


# --------------------------------------------------------------------------- curves
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _panels(series: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """Panels of a model's curves: losses together, then every other metric alone."""
    panels = []
    losses = [k for k in ("train/loss", "val/loss") if k in series]
    if losses:
        panels.append(("loss", losses))
    rest = [k for k in series if k not in losses]
    # validation metrics first, then other training metrics, then the rest (lr, throughput)
    for k in sorted(rest, key=lambda k: (not k.startswith("val/"), not k.startswith("train/"), k)):
        panels.append((k, [k]))
    return panels


def _style_axis(ax, title: str, values: list[float]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=11)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    # losses of different terms (e.g. show_attend_tell's attention regulariser) differ by orders of magnitude
    if "loss" in title and values and min(values) > 0 and max(values) / min(values) > 8:
        ax.set_yscale("log")


def plot_model_curves(path: Path, name: str, series: dict[str, Any], blind: bool) -> None:
    plt = _plt()
    panels = _panels(series)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows + 0.4), dpi=90, squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for k in keys:
            steps, values = series[k]
            ax.plot([s + 1 for s in steps], values, marker="o", markersize=3, label=k)
        _style_axis(ax, title, [v for k in keys for v in series[k][1]])
        if len(keys) > 1:
            ax.legend(fontsize=8)
        if title == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in list(axes.flat)[len(panels):]:
        ax.set_axis_off()
    fig.suptitle(f"{name}" + (" (image-blind control)" if blind else "") + ": training curves", fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)


def plot_comparison(path: Path, curves: dict[str, dict[str, Any]], blind: dict[str, bool]) -> Path | None:
    """Validation curves of every model on shared axes (blind controls dashed)."""
    keys = [k for k in ("val/cider", "val/bleu4", "val/loss", "train/loss") if any(k in s for s in curves.values())]
    if not keys:
        return None
    plt = _plt()
    names = sorted(curves)
    # one colour per model (tab20 has 20 distinct ones; beyond, the colour map is sampled evenly)
    cmap = plt.get_cmap("tab20" if len(names) <= 20 else "turbo")
    colours = {n: cmap(i if len(names) <= 20 else i / max(1, len(names) - 1)) for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys) + 2.6, 3.4), dpi=90, squeeze=False)
    for ax, k in zip(axes.flat, keys):
        for name in names:
            series = curves[name]
            if k in series:
                steps, values = series[k]
                ax.plot([s + 1 for s in steps], values, marker="o", markersize=3, color=colours[name],
                        linestyle="--" if blind.get(name) else "-", label=name + (" (blind)" if blind.get(name) else ""))
        _style_axis(ax, k, [v for series in curves.values() if k in series for v in series[k][1]])
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / (4.4 * len(keys) + 2.6), 1))
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)  # beside the plots, not on them
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- markdown
def _num(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}"


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(Path(target).resolve(), Path(start).resolve())).as_posix()


def _decoding(m: dict[str, Any]) -> str:
    d = m.get("decoding") or {}
    if not d:
        return "?"
    try:
        label = decoding_label(d)
    except (KeyError, TypeError):
        label = str(d.get("method", "?"))
    name = d.get("name")
    return label if name in (None, "greedy", "beam") else f"{name} ({label})"


def comparable(row: Row) -> tuple[str, ...]:
    """What two reports must share to be compared in one table: the images and references scored (their
    sha256, else split and count), the scorer's tokenizer, and the decoding."""
    m = row.metrics
    images = str(m.get("references_sha256") or f"{m.get('split')}:{m.get('num_images')}")
    return (str(m.get("split")), images, str(m.get("tokenizer")), _decoding(m))


def _group_title(row: Row) -> str:
    m = row.metrics
    refs = m.get("references_sha256")
    return (f"`{m.get('split')}` split, {m.get('num_images', '?')} images"
            + (f" (references sha256 {str(refs)[:12]}…)" if refs else "")
            + f", {_decoding(m)} decoding, `{m.get('tokenizer')}` scorer tokenizer")


def model_table(rows: list[Row], base: Path) -> list[str]:
    """One markdown table of comparable reports (:func:`comparable`), bold the best image-conditioned model."""
    metric_cols = [(k, lbl) for k, lbl in COLUMNS if k != "SPICE" or any(r.metrics.get("SPICE") is not None for r in rows)]
    blind_rows = [r for r in rows if r.blind]
    blind_cider = max((r.metrics.get("CIDEr") or 0.0 for r in blind_rows), default=None)
    best: dict[str, float] = {}
    for k, _ in metric_cols:
        vals = [r.metrics.get(k) for r in rows if not r.blind and r.metrics.get(k) is not None]
        if vals:
            best[k] = max(vals)

    header = ["Model", "Decoder", *[lbl for _, lbl in metric_cols]]
    if blind_rows:
        header.append("CIDEr − blind")
    header += ["#params"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for r in rows:
        m = r.metrics
        gallery = r.path.parent / "gallery" / "index.html"
        name = f"[{r.name}]({_rel(gallery, base)})" if gallery.is_file() else r.name
        if r.blind:
            name = f"{name} **{BLIND_MARK}**"
        cells = [name, str(m.get("decoder", "?"))]
        for k, _ in metric_cols:
            v = m.get(k)
            text = _num(v)
            if not r.blind and v is not None and k in best and v == best[k] and len(rows) - len(blind_rows) > 1:
                text = f"**{text}**"
            cells.append(text)
        if blind_rows:
            cells.append("—" if r.blind else f"{(m.get('CIDEr') or 0.0) - blind_cider:+.4f}")
        params = r.parameters
        cells.append(f"{params / 1e6:.2f}M" if params else "n/a")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def summary_markdown(rows: list[Row], out: Path, curve_files: dict[str, Path], compare: Path | None) -> str:
    base = out.parent
    groups: dict[tuple[str, ...], list[Row]] = {}
    for r in rows:
        groups.setdefault(comparable(r), []).append(r)
    text = ["# Caption models compared", ""]
    text.append(f"{len(rows)} evaluation report(s). Written by `pipeline report`. Reports are compared only where "
                "they scored the same images and references with the same scorer and decoding: one table each.")
    text.append("")
    for group in groups.values():
        if len(groups) > 1:
            text += [f"### {_group_title(group[0])}", ""]
        else:
            text += [f"Scored on the {_group_title(group[0])}.", ""]
        text += model_table(group, base)
        text.append("")
    text.append("Scores on pycocoevalcap's scale (CIDEr is CIDEr-D, 0–10). Bold: best image-conditioned model. "
                "Each model name links to its gallery (best, worst and random cases). `fallback` scorer tokenizer: "
                "the pure-Python PTB approximation used when Java is missing.")
    if any(r.blind for r in rows):
        text.append("")
        text.append(f"Rows marked **{BLIND_MARK}** come from a decoder trained and evaluated on zeroed visual "
                    "features: it can only learn the caption prior of the dataset. A model is using the image "
                    "only as far as it beats these rows; `CIDEr − blind` is its margin over the best blind row "
                    "of its table.")
    reasons: dict[str, set[str]] = {}
    for r in rows:
        for k, why in (r.metrics.get("unavailable") or {}).items():
            reasons.setdefault(k, set()).add(str(why))
    if reasons:
        text += ["", "Metrics not computed (n/a):", ""]
        for k, whys in sorted(reasons.items()):
            text.append(f"- {k}: " + "; ".join(sorted(whys)))
    text += ["", "## Training curves", ""]
    if not curve_files:
        text.append("No dvclive training logs found (`models/*/live`).")
    else:
        if compare is not None:
            text += [f"![validation curves of every model]({_rel(compare, base)})", ""]
        for name, png in sorted(curve_files.items()):
            text += [f"### {name}", "", f"[![{name} training curves]({_rel(png, base)})]({_rel(png, base)})", ""]
    return "\n".join(text).rstrip() + "\n"


COMPARISON_METRICS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE_L", "CIDEr")


def comparison_markdown(title: str, cells: dict[str, str], rows: list[Row]) -> str:
    """One table of ``cells`` (row label -> model name) side by side: what each trained on and its scores."""
    by_name = {r.name: r for r in rows}
    missing = [name for name in cells.values() if name not in by_name]
    if missing:
        raise ReportError(f"report comparison {title!r}: no evaluation report for model(s) {missing} "
                          f"(known: {', '.join(sorted(by_name))})")
    kinds = {comparable(by_name[name]): name for name in cells.values()}
    if len(kinds) > 1:
        raise ReportError(f"report comparison {title!r}: its models were not evaluated alike, so their scores are "
                          "not comparable: " + "; ".join(f"{name}: {_group_title(by_name[name])}"
                                                         for name in kinds.values())
                          + ". Evaluate them on the same split with the same decoding (their `evaluate` stages)")
    header = ["Cell", "Model", "train images", "train captions", *[dict(COLUMNS)[k] for k in COMPARISON_METRICS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for label, name in cells.items():
        r = by_name[name]
        counts = [str(r.train.get(k, "n/a")) for k in ("train_images", "train_captions")]
        lines.append("| " + " | ".join([label, name, *counts, *(_num(r.metrics.get(k)) for k in COMPARISON_METRICS)])
                     + " |")
    return "\n".join([f"## {title}", "", *lines, "",
                      f"Every cell scored on the {_group_title(by_name[next(iter(cells.values()))])}."]) + "\n"


# --------------------------------------------------------------------------- the stage
def run(cfg: ReportConfig) -> dict[str, Any]:
    paths = find_reports(cfg.reports)
    if not paths:
        raise ReportError(f"no evaluation reports found in {cfg.reports} (run `pipeline evaluate` first)")
    rows = load_rows(paths)
    out = Path(cfg.out)
    curves_dir = out.parent / "curves"
    blind = {r.name: r.blind for r in rows}
    curves: dict[str, dict[str, Any]] = {}
    curve_files: dict[str, Path] = {}
    for live in find_live_dirs(cfg.live):
        name = live.parent.name if live.name == "live" else live.name
        series = read_live_metrics(live)
        if not series:
            log.warning("%s: no metrics logged yet; no curves", live)
            continue
        if name not in blind:
            train = {}
            summary = live.parent / "metrics.json"
            if summary.is_file():
                try:
                    train = json.loads(summary.read_text(encoding="utf-8"))
                except json.JSONDecodeError:
                    pass
            blind[name] = bool(train.get("blind"))
        curves[name] = series
        png = curves_dir / f"{name}.png"
        plot_model_curves(png, name, series, blind.get(name, False))
        curve_files[name] = png
    compare = plot_comparison(curves_dir / "compare.png", curves, blind) if len(curves) > 1 else None
    out.parent.mkdir(parents=True, exist_ok=True)
    text = summary_markdown(rows, out, curve_files, compare)
    tables = [comparison_markdown(title, cells, rows) for title, cells in cfg.comparisons.items()]
    if tables:  # after the main table, before the curves
        main, curves_part = text.split("\n## Training curves\n", 1)
        text = main + "\n" + "\n".join(tables) + "\n## Training curves\n" + curves_part
    write_text(out, text)
    log.info("report: %d models, %d curve plots -> %s", len(rows), len(curve_files), out)
    return {"summary": str(out), "models": [r.name for r in rows], "curves": {k: str(v) for k, v in curve_files.items()}}
