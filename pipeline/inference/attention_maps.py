"""Attention heatmaps over the image, shared by the HTML gallery (:mod:`pipeline.evaluation.gallery`) and the
caption server (:mod:`pipeline.inference.engine`).

* :func:`backbone_view`: the image framed as the backbone's eval transform frames it (resize and
  centre crop, or squash), so a map lines up with what the model saw;
* :func:`attention_maps`: a caption's attention ``(T, N)`` (one row per generated word) -> ``(T, H, W)``
  maps in ``[0, 1]``. Each token set of the features (objects with ``.name`` and ``.tokens``,
  concatenated in that order) is reshaped to its ``sqrt(n) x sqrt(n)`` grid (a leading class token
  is dropped when ``n - 1`` is square), upsampled bilinearly to ``size`` and summed over the token
  sets (so with several sets — multi-scale features — a map is the attention each image region gets
  from all scales together; :func:`describe_grids` says so in words); the maps of a caption share one
  scale (its largest value), so a diffuse map looks diffuse;
* :func:`token_set_grid` / :func:`attention_weights_json`: the grid of each token set, and a caption's
  raw weights per word as JSON (what ``pipeline caption --json --attention`` prints);
* :func:`colorize` / :func:`overlay`: maps -> RGB with matplotlib's :data:`COLORMAP`, blended half
  and half with the image (the one colouring both the gallery and the server use);
* :func:`render_heatmap`: one PNG sheet, the image then a panel per word (matplotlib's Agg backend,
  no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

COLORMAP = "jet"  # a matplotlib colormap name: red is the most attended region


def backbone_view(img, preprocessing: dict[str, Any]):
    """The image as the backbone's eval transform frames it: resized (shorter side to
    ``size / crop_pct``) and centre-cropped to ``input_size``; ``crop_mode: squash`` resizes to it."""
    from PIL import Image

    size = preprocessing.get("input_size") or [3, 224, 224]
    h, w = int(size[-2]), int(size[-1])
    if preprocessing.get("crop_mode") == "squash":
        return img.resize((w, h), Image.BICUBIC)
    pct = float(preprocessing.get("crop_pct") or 1.0)
    scale = math.floor(min(h, w) / pct)
    iw, ih = img.size
    r = scale / min(iw, ih)
    img = img.resize((max(w, round(iw * r)), max(h, round(ih * r))), Image.BICUBIC)
    iw, ih = img.size
    left, top = (iw - w) // 2, (ih - h) // 2
    return img.crop((left, top, left + w, top + h))


def token_set_grid(tokens: int) -> tuple[int, int] | None:
    """``(class_tokens, side)`` of a token set of ``tokens`` tokens: a ``side x side`` grid, after one leading
    class token when ``tokens - 1`` is square (ViT-style); None when it is no square grid."""
    side = math.isqrt(tokens)
    if side * side == tokens:
        return 0, side
    side = math.isqrt(tokens - 1)
    if tokens > 1 and side * side == tokens - 1:
        return 1, side
    return None


def describe_grids(token_sets: Sequence[Any]) -> str:
    """What a map shows, in words: ``a 7x7 grid`` or ``2 token sets (stage3 14x14, last 7x7), each upsampled
    to the image and summed``. ``token_sets``: objects with ``.name`` and ``.tokens``."""
    def grid(t: Any) -> str:
        g = token_set_grid(t.tokens)
        if g is None:
            return f"{t.tokens} tokens (no square grid)"
        return f"{g[1]}x{g[1]}" + (" after a class token" if g[0] else "")

    if len(token_sets) == 1:
        return f"a {grid(token_sets[0])} grid of visual tokens"
    sets = ", ".join(f"{t.name} {grid(t)}" for t in token_sets)
    return f"{len(token_sets)} token sets ({sets}), each upsampled to the image and summed"


def attention_weights_json(attention: torch.Tensor, words: Sequence[str], token_sets: Sequence[Any],
                           digits: int = 4) -> dict[str, Any]:
    """A caption's attention ``(T, N)`` as JSON: the token sets (name, tokens, class tokens, grid side, in the
    order of the N weights) and per word its N weights (rounded to ``digits``), a set's grid row-major."""
    att = attention.float().cpu()
    sets = []
    for t in token_sets:
        g = token_set_grid(t.tokens)
        sets.append({"name": t.name, "tokens": int(t.tokens), "class_tokens": g[0] if g else None,
                     "grid": [g[1], g[1]] if g else None})
    return {"token_sets": sets, "words": [{"word": w, "weights": [round(float(x), digits) for x in row]}
                                          for w, row in zip(words, att.tolist())]}


def attention_maps(attention: torch.Tensor, token_sets: Sequence[Any],
                   size: tuple[int, int]) -> tuple[np.ndarray | None, str]:
    """``(T, H, W)`` maps from ``(T, N)`` attention, all scaled by the caption's largest value (one colour
    scale per caption), or ``(None, why)``. ``token_sets``: objects with ``.name`` and ``.tokens``."""
    att = attention.float()
    T, N = att.shape
    expected = sum(t.tokens for t in token_sets)
    if N != expected:
        return None, f"attention over {N} tokens, the features have {expected}"
    total = torch.zeros(T, 1, *size)
    offset = 0
    for t in token_sets:
        name, n = t.name, t.tokens
        part = att[:, offset : offset + n]
        offset += n
        grid = token_set_grid(n)
        if grid is None:
            return None, f"token set {name!r} has {n} tokens: not a square grid"
        skip, side = grid
        part = part[:, skip:]  # a class token first (ViT-style)
        cells = part.reshape(T, 1, side, side)
        total += torch.nn.functional.interpolate(cells, size=size, mode="bilinear", align_corners=False)
    maps = total[:, 0].numpy()
    peak = float(maps.max()) if maps.size else 0.0
    return (maps / peak if peak > 0 else np.zeros_like(maps)), ""


def colorize(maps: np.ndarray) -> np.ndarray:
    """``(..., H, W)`` values in [0, 1] -> ``(..., H, W, 3)`` float32 RGB in [0, 1] with :data:`COLORMAP`."""
    import matplotlib

    return matplotlib.colormaps[COLORMAP](np.clip(maps, 0.0, 1.0))[..., :3].astype(np.float32)


def overlay(base: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """The image ``base`` (``(H, W, 3)`` float in [0, 1]) blended half and half with the colours of
    ``maps`` (``(H, W)`` or ``(T, H, W)``): float32 RGB in [0, 1], one image per map."""
    return 0.5 * base.astype(np.float32) + 0.5 * colorize(maps)


def render_heatmap(path: Path, image, maps: np.ndarray, words: Sequence[str], title: str) -> None:
    """One PNG sheet (small multiples): the image, then a panel per word with its map overlaid.

    The panels are composed into one array (:func:`overlay`, on one scale per caption) drawn by
    matplotlib's Agg backend with the words as labels: one image draw per sheet keeps a gallery of
    a few dozen captions quick."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from PIL import Image

    panel = int(maps.shape[-1])
    base = np.asarray(image.convert("RGB").resize((panel, int(maps.shape[-2])), Image.BICUBIC), dtype=np.float32) / 255
    ph = base.shape[0]
    panels = overlay(base, maps)
    n = len(words) + 1
    cols = min(6, n)
    rows = math.ceil(n / cols)
    pad, label, top = 8, 22, 26
    width = pad + cols * (panel + pad)
    height = top + rows * (label + ph + pad)
    sheet = np.ones((height, width, 3), dtype=np.float32)
    spots = []
    for k in range(n):
        r, c = divmod(k, cols)
        x, y = pad + c * (panel + pad), top + r * (label + ph + pad) + label
        sheet[y : y + ph, x : x + panel] = base if k == 0 else panels[k - 1]
        spots.append((x + panel / 2, y - 4))
    dpi = 100
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(sheet, interpolation="nearest", extent=(0, width, height, 0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    for k, (x, y) in enumerate(spots):
        text = "input" if k == 0 else (words[k - 1] or "␣")
        ax.text(x, y, text.replace("$", r"\$"), ha="center", va="bottom", fontsize=11 if k else 9,
                color="#555" if k == 0 else "black", clip_on=False)
    ax.text(pad, 6, title.replace("$", r"\$"), ha="left", va="top", fontsize=9, color="#333")
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    # 256 colours are plenty for a heatmap sheet and make the file several times smaller than RGBA
    Image.fromarray(rgb).quantize(256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
