"""A static, self-contained HTML gallery of captioned images, with per-word attention heatmaps.

``write_gallery(folder, cases, ...)`` writes::

    folder/index.html         inline CSS, no script, no remote asset: opens from disk
    folder/images/<name>.jpg  each shown image, thumbnailed (longest side <= thumbnail_size)
    folder/heatmaps/<name>.png  attention decoders: the image as the backbone saw it, then one
                              panel per generated word with its attention map overlaid

Every file the page shows is referenced by a relative path inside ``folder``.

Heatmaps (every decoder family with ``has_attention``: ``show_attend_tell``'s additive attention, the
last block's cross-attention of ``transformer`` and ``gpt2``; the page names which, and says why when a
family has none): a caption's attention ``(T, N)`` (one row per generated word) becomes one map per word
over the image as the backbone saw it, one colour scale per caption, drawn as one PNG sheet per
caption: :mod:`pipeline.inference.attention_maps` (shared with the caption server) does all of it; this
module only sizes the panels (:data:`HEATMAP_PANEL`) and links the sheets.
"""

from __future__ import annotations

import hashlib
import html
import io
import logging
import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.data.images import ImageDecodeError, read_image_file
from pipeline.data.manifest import ManifestRecord, resolve_image
from pipeline.errors import UserError
from pipeline.evaluation.metrics import METRIC_LABELS, METRICS, PER_IMAGE_METRICS
from pipeline.files import write_bytes, write_text
from pipeline.inference.attention_maps import (
    attention_maps,
    backbone_view,
    describe_grids,
    render_heatmap,
)

log = logging.getLogger(__name__)

HEATMAP_PANEL = 160  # pixels of the longest side of a heatmap panel

SECTIONS = {
    "best": ("Best cases", "highest per-image CIDEr"),
    "worst": ("Worst cases", "lowest per-image CIDEr"),
    "random": ("Random cases", "picked at random (seeded) among the others"),
}



@dataclass
class Case:
    section: str  # best / worst / random
    image_id: str
    record: ManifestRecord
    manifest: Path
    rows: list[dict[str, Any]]  # [{"label", "caption", "headline": bool}]
    scores: dict[str, float | None] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)  # the headline caption's tokens
    attention: torch.Tensor | None = None  # (len(tokens), N) for the headline caption


def safe_name(image_id: str) -> str:
    """A file name for ``image_id``: readable, filesystem-safe, unique (short hash of the id)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("._")[:60] or "image"
    return f"{stem}-{hashlib.sha1(image_id.encode('utf-8')).hexdigest()[:8]}"


def _word(tokenizer: Any, token_id: int) -> str:
    try:
        return tokenizer.id_to_token(int(token_id)).strip()
    except Exception:  # noqa: BLE001 - a label only
        return str(token_id)


# --------------------------------------------------------------------------- HTML
CSS = """
:root { --ink: #1d232b; --muted: #5b6672; --line: #d9dee4; --bg: #f4f6f8; --card: #fff; --accent: #2a6fdb;
        --good: #1d7a46; --bad: #b3261e; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: var(--ink); background: var(--bg); }
header { background: var(--card); border-bottom: 1px solid var(--line); padding: 18px 28px 12px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 28px 0 10px; }
h2 small { color: var(--muted); font-weight: normal; font-size: 13px; margin-left: 6px; }
.meta { color: var(--muted); margin: 0 0 10px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600;
         background: #fde7c8; color: #8a4b00; margin-left: 6px; vertical-align: 2px; }
table.metrics { border-collapse: collapse; margin: 6px 0 4px; }
table.metrics th, table.metrics td { border: 1px solid var(--line); padding: 3px 10px; text-align: center; }
table.metrics th { background: var(--bg); font-weight: 600; font-size: 12px; }
table.metrics td { font-variant-numeric: tabular-nums; }
td.na { color: var(--muted); }
nav a { color: var(--accent); margin-right: 14px; text-decoration: none; font-weight: 600; }
main { padding: 0 28px 28px; }
.note { color: var(--muted); font-size: 13px; margin: 4px 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 14px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; overflow: hidden;
        display: flex; flex-direction: column; }
.card .pic { background: #20252b; display: flex; justify-content: center; align-items: center; height: 200px; }
.card .pic img { display: block; height: 184px; width: auto; max-width: 100%; object-fit: contain; }
.card .pic .missing { color: #c9d1d9; padding: 12px; font-size: 13px; }
.card .body { padding: 10px 12px 12px; }
.id { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px; color: var(--muted);
      word-break: break-all; }
.scores { margin: 4px 0 8px; font-size: 13px; }
.scores b { font-variant-numeric: tabular-nums; }
.best .scores b.cider { color: var(--good); }
.worst .scores b.cider { color: var(--bad); }
.caps { margin: 0 0 8px; }
.cap { padding: 4px 0; }
.cap + .cap { border-top: 1px dashed var(--line); }
.cap .how { display: block; font-size: 11px; font-weight: 600; letter-spacing: .02em; text-transform: uppercase;
            color: var(--muted); }
.cap.headline .text { font-weight: 600; }
.empty { color: var(--muted); font-style: italic; font-weight: normal; }
details { font-size: 13px; }
summary { cursor: pointer; color: var(--muted); }
details ol { margin: 4px 0 0; padding-left: 20px; }
.heat { display: inline-block; margin-top: 8px; font-size: 13px; color: var(--accent); }
footer { color: var(--muted); font-size: 12px; padding: 0 28px 24px; }
"""


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _metrics_table(metrics: dict[str, Any]) -> str:
    head, cells = [], []
    unavailable = metrics.get("unavailable", {})
    for key, label in METRICS:
        head.append(f"<th>{label}</th>")
        v = metrics.get(key)
        if v is None:
            reason = html.escape(str(unavailable.get(key, "not computed")), quote=True)
            cells.append(f'<td class="na" title="{reason}">n/a</td>')
        else:
            cells.append(f"<td>{v:.4f}</td>")
    return f'<table class="metrics"><tr>{"".join(head)}</tr><tr>{"".join(cells)}</tr></table>'


def _card(case: Case, image_src: str | None, image_problem: str, heatmap_src: str | None) -> str:
    e = html.escape
    if image_src:
        pic = f'<a href="{e(image_src)}"><img src="{e(image_src)}" alt="{e(case.image_id)}"></a>'
    else:
        pic = f'<div class="missing">image not available: {e(image_problem)}</div>'
    score_bits = []
    for key in PER_IMAGE_METRICS:
        label = METRIC_LABELS[key]
        if key in case.scores:
            cls = ' class="cider"' if key == "CIDEr" else ""
            score_bits.append(f"{label} <b{cls}>{_fmt(case.scores[key])}</b>")
    rows = []
    for row in case.rows:
        text = row["caption"]
        shown = e(text) if text.strip() else '<span class="empty">(empty caption)</span>'
        cls = "cap headline" if row.get("headline") else "cap"
        tip = f' title="{e(row["title"], quote=True)}"' if row.get("title") else ""
        rows.append(f'<div class="{cls}"><span class="how"{tip}>{e(row["label"])}</span>'
                    f'<span class="text">{shown}</span></div>')
    refs = "".join(f"<li>{e(r)}</li>" for r in case.record.captions)
    heat = f'<a class="heat" href="{e(heatmap_src)}">attention per word &rarr;</a>' if heatmap_src else ""
    return (
        f'<article class="card" id="{e(safe_name(case.image_id))}"><div class="pic">{pic}</div><div class="body">'
        f'<div class="id">{e(case.image_id)}</div><div class="scores">{" &middot; ".join(score_bits)}</div>'
        f'<div class="caps">{"".join(rows)}</div>'
        f"<details open><summary>References ({len(case.record.captions)})</summary><ol>{refs}</ol></details>"
        f"{heat}</div></article>"
    )


class ChangedImageError(UserError, ValueError):
    """An image whose bytes differ from the sha256 its manifest records."""


def _recorded_image(record: ManifestRecord, manifest: Path):
    """The image of ``record``, refused unless its bytes are the ones the manifest records (sha256): the gallery
    shows the pixels the features were computed from, and the stage depends on the images through the
    manifest's digests alone (evaluate's DVC deps list the manifest, not the images folder)."""
    path = resolve_image(record, manifest)
    digest, img = read_image_file(path)
    if record.sha256 and digest != record.sha256:
        raise ChangedImageError(f"{path}: the image changed after `pipeline prepare` (sha256 {digest[:12]}… against "
                                f"the manifest's {record.sha256[:12]}…); rerun `pipeline prepare` (and the stages "
                                "after it) so that the manifest describes it")
    return img


def write_gallery(
    folder: Path, cases: Sequence[Case], *, title: str, metrics: dict[str, Any], captioner: Any,
    headline_label: str, thumbnail_size: int = 256, heatmap_note: str | None = None, sample_note: str = "",
) -> Path:
    """Write ``folder/index.html`` with its images (and heatmaps); returns the page's path. Every file is written
    through :mod:`pipeline.files` (whole, atomically)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    cards: dict[str, list[str]] = {s: [] for s in SECTIONS}
    with tempfile.TemporaryDirectory(prefix="gallery-") as scratch:
        heatmaps = _HeatmapSheets(folder, captioner, Path(scratch))
        for case in cases:
            card = _write_case(folder, case, thumbnail_size, heatmaps if heatmap_note is None else None)
            cards.setdefault(case.section, []).append(card)
    notes = _notes(metrics, captioner, headline_label, sample_note, heatmap_note, heatmaps)
    path = folder / "index.html"
    write_text(path, _page(title, metrics, notes, cards))
    return path


class _HeatmapSheets:
    """Draws the heatmap sheets of a gallery (``heatmaps/<name>.png``), counting them and why any could not be."""

    def __init__(self, folder: Path, captioner: Any, scratch: Path) -> None:
        self.folder, self.captioner, self.scratch = folder, captioner, scratch
        self.spec = captioner.features
        size = self.spec.preprocessing.get("input_size") or [3, 224, 224]
        scale = HEATMAP_PANEL / max(int(size[-2]), int(size[-1]))
        self.panel = (max(1, round(int(size[-2]) * scale)), max(1, round(int(size[-1]) * scale)))
        self.written = 0
        self.problems: set[str] = set()

    def write(self, case: Case, img: Any) -> str | None:
        """The sheet of ``case``'s headline caption over ``img``; its path in the gallery, None if not drawn."""
        maps, why = attention_maps(case.attention, self.spec.token_sets, self.panel)
        if maps is None:
            self.problems.add(why)
            return None
        name = safe_name(case.image_id)
        words = [_word(self.captioner.tokenizer, t) for t in case.tokens]
        caption = next((r["caption"] for r in case.rows if r.get("headline")), "")
        drawn = self.scratch / f"{name}.png"  # render_heatmap saves to a path: drawn aside, then written atomically
        render_heatmap(drawn, backbone_view(img, self.spec.preprocessing), maps, words, f"{case.image_id}: {caption}")
        write_bytes(self.folder / "heatmaps" / f"{name}.png", drawn.read_bytes())
        self.written += 1
        return f"heatmaps/{name}.png"


def _write_case(folder: Path, case: Case, thumbnail_size: int, heatmaps: _HeatmapSheets | None) -> str:
    """The case's thumbnail (``images/<name>.jpg``, longest side <= ``thumbnail_size``) and, with ``heatmaps``
    and the headline caption's attention, its heatmap sheet; returns its card."""
    from PIL import Image

    try:
        img = _recorded_image(case.record, case.manifest)
    except ImageDecodeError as err:
        log.warning("gallery: %s", err)
        return _card(case, None, f"{err.reason}", None)
    name = safe_name(case.image_id)
    thumb = img.copy()
    thumb.thumbnail((thumbnail_size, thumbnail_size), Image.BICUBIC)
    jpeg = io.BytesIO()
    thumb.save(jpeg, format="JPEG", quality=88)
    write_bytes(folder / "images" / f"{name}.jpg", jpeg.getvalue())
    heatmap_src = None
    if heatmaps is not None and case.attention is not None and case.tokens:
        heatmap_src = heatmaps.write(case, img)
    return _card(case, f"images/{name}.jpg", "", heatmap_src)


def _notes(metrics: dict[str, Any], captioner: Any, headline_label: str, sample_note: str, heatmap_note: str | None,
           heatmaps: _HeatmapSheets) -> list[str]:
    """The page's notes (HTML): what the numbers are, how the samples were drawn, what the heatmaps show."""
    e = html.escape
    notes = [
        (f"Headline numbers and per-image scores: <b>{e(headline_label)}</b> decoding (the ★ / bold caption, "
         f"scored exactly as emitted); scorer tokenizer <b>{e(str(metrics.get('tokenizer')))}</b>."),
        "Per-image CIDEr is CIDEr-D with document frequencies from the references of every evaluated image.",
    ]
    if sample_note:
        notes.append(e(sample_note[:1].upper() + sample_note[1:]) + ".")
    if heatmap_note:
        notes.append(e(heatmap_note[:1].upper() + heatmap_note[1:]) + ".")
    elif heatmaps.written:
        source = getattr(captioner.decoder, "attention_source", "") or "the decoder's visual attention"
        notes.append("Attention heatmaps: one panel per generated word of the headline caption, over the image as the "
                     "backbone saw it (resized, centre-cropped); one colour scale per caption (red: its most attended "
                     f"region). Maps: {e(source)}, over {e(describe_grids(captioner.features.token_sets))}.")
    if heatmaps.problems:
        notes.append("Heatmaps skipped: " + e("; ".join(sorted(heatmaps.problems))) + ".")
    return notes


def _page(title: str, metrics: dict[str, Any], notes: list[str], cards: dict[str, list[str]]) -> str:
    """The whole page: header (model, metrics table, notes, navigation), then a section of cards per case kind."""
    e = html.escape
    m = metrics
    blind = '<span class="badge">image-blind control: zeroed features</span>' if m.get("blind") else ""
    nav = " ".join(f'<a href="#{s}">{SECTIONS[s][0]} ({len(cards.get(s, []))})</a>' for s in SECTIONS if cards.get(s))
    sections_html = []
    for s, (heading, sub) in SECTIONS.items():
        if not cards.get(s):
            continue
        sections_html.append(f'<section id="{s}" class="{s}"><h2>{heading}<small>{sub}</small></h2>'
                             f'<div class="grid">{"".join(cards[s])}</div></section>')
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Caption gallery: {e(title)}</title>
<style>{CSS}</style>
</head>
<body>
<header>
<h1>Caption gallery: {e(title)}{blind}</h1>
<p class="meta">decoder <b>{e(str(m.get('decoder')))}</b> &middot; {m.get('parameters', 0):,} parameters &middot;
{e(str(m.get('caption_tokenizer')))} tokenizer &middot; split <b>{e(str(m.get('split')))}</b>, {m.get('num_images')} images
&middot; features {e(str(m.get('features', {}).get('backbone')))}</p>
{_metrics_table(m)}
{''.join(f'<p class="note">{n}</p>' for n in notes)}
<nav>{nav}</nav>
</header>
<main>
{''.join(sections_html)}
</main>
<footer>Written by <code>pipeline evaluate</code>. Static page: no scripts, every file next to it.</footer>
</body>
</html>
"""
