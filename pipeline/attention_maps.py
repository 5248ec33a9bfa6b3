"""Attention heatmaps over the image, shared by the HTML gallery (:mod:`pipeline.gallery`) and the
caption server (:mod:`pipeline.serve.engine`).

* :func:`backbone_view`: the image framed as the backbone's eval transform frames it (resize and
  centre crop, or squash), so a map lines up with what the model saw;
* :func:`attention_maps`: a caption's attention ``(T, N)`` (one row per generated word) -> ``(T, H, W)``
  maps in ``[0, 1]``. Each token set of the features (objects with ``.name`` and ``.tokens``,
  concatenated in that order) is reshaped to its ``sqrt(n) x sqrt(n)`` grid (a leading class token
  is dropped when ``n - 1`` is square), upsampled bilinearly to ``size`` and summed over the token
  sets; the maps of a caption share one scale (its largest value), so a diffuse map looks diffuse;
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
        side = math.isqrt(n)
        if side * side != n:
            side = math.isqrt(n - 1)
            if n > 1 and side * side == n - 1:
                part = part[:, 1:]  # a class token first (ViT-style)
            else:
                return None, f"token set {name!r} has {n} tokens: not a square grid"
        grid = part.reshape(T, 1, side, side)
        total += torch.nn.functional.interpolate(grid, size=size, mode="bilinear", align_corners=False)
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
