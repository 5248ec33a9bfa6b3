"""Captioning image files with a model bundle: what ``pipeline caption`` does, callable from Python.

* :func:`expand_inputs` files, folders (their images, recursively) and glob patterns -> ``(path, problem)``;
* :func:`caption_options` a caption mode plus explicit decoding options -> the options and the mode label;
* :func:`caption_paths` captions them in batches and yields, in output order, a :class:`CaptionResult` per
  captioned image and a :class:`CaptionError` per input that failed (missing, not an image, a failed model
  call), so one bad image never stops the others.

Each item renders itself as the CLI prints it: ``text_lines()`` / ``line()`` and ``json_line()``.
With ``attention=True`` (``pipeline caption --json --attention``) each result also carries ``attention``: the
best caption's per-word attention weights over the visual tokens, with the token sets' grids and what the
weights are (:meth:`CaptionEngine.attention_weights`), or null and ``attention_unavailable`` saying why (a
decoder without visual attention, e.g. ``perceiver_gpt2``: the Perceiver attends to latents, not to the image).

    engine = CaptionEngine.load("models/transformer/bundle")
    options, label = caption_options(engine, "consistent")
    for item in caption_paths(engine, ["photos/"], options, mode=label):
        print(item.json_line())
"""

from __future__ import annotations

import glob
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

from pipeline.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, load_rgb
from pipeline.inference.decoding import DecodingOptions
from pipeline.inference.engine import CUSTOM_MODE, DEFAULT_MODE, CaptionEngine
from pipeline.inference.options import DEFAULT_CAPTION_BATCH

__all__ = ["DEFAULT_BATCH_SIZE", "IMAGE_SUFFIXES", "CaptionError", "CaptionResult", "caption_options", "caption_paths",
           "expand_inputs"]

DEFAULT_BATCH_SIZE = DEFAULT_CAPTION_BATCH
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


def expand_inputs(args: Iterable[str]) -> list[tuple[str, Optional[str]]]:
    """Files, folders (their images, recursively, sorted) and glob patterns -> ``(path, problem)`` in order.

    A named file is taken whatever its suffix; in folders and globs only image suffixes count (and, in
    folders, nothing under a hidden name). A missing path, a glob matching nothing and a folder without
    images are a ``problem`` for that item.
    """
    out: list[tuple[str, Optional[str]]] = []
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            out += [(f, None) for f in found] or [(arg, "no images in this folder")]
        elif p.exists():
            out.append((arg, None))
        elif any(c in arg for c in "*?["):
            found = sorted(f for f in glob.glob(arg, recursive=True)
                           if Path(f).is_file() and Path(f).suffix.lower() in IMAGE_SUFFIXES)
            out += [(f, None) for f in found] or [(arg, "no image file matches this pattern")]
        else:
            out.append((arg, "missing image file"))
    return out


def caption_options(engine: CaptionEngine, mode: str = DEFAULT_MODE, **explicit: Any) -> tuple[DecodingOptions, str]:
    """Mode ``mode``'s serving options with the ``explicit`` ones (not None) replacing its values, and the
    label results carry: the mode, or ``custom`` when any explicit option is given. ``ValueError`` names an
    unknown mode (listing the valid ones) or the invalid options."""
    explicit = {k: v for k, v in explicit.items() if v is not None}
    return engine.explicit_options(mode, **explicit), (CUSTOM_MODE if explicit else mode)


@dataclass
class CaptionResult:
    """One captioned image: ``result`` is :meth:`CaptionEngine.result` (caption, score, alternatives, mode)."""

    path: str
    result: dict[str, Any]
    decode_ms: float  # reading and decoding the file
    model_ms: float  # the model call this image shared
    batch_size: int  # images in that call

    @property
    def caption(self) -> str:
        return self.result["caption"]

    @property
    def timings(self) -> dict[str, Any]:
        return {"decode_ms": round(self.decode_ms, 3), "model_ms": round(self.model_ms, 3),
                "batch_size": self.batch_size}

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, **self.result, "timings": self.timings}

    def json_line(self) -> str:
        return json.dumps(self.to_json(), ensure_ascii=False)

    def text_lines(self) -> list[str]:
        """``path: caption``, then ``    ~ alternative  (score)`` per alternative."""
        return [f"{self.path}: {self.caption}"] + [
            f"    ~ {alt['caption']}" + (f"  ({alt['score']:.3f})" if alt["score"] is not None else "")
            for alt in self.result["alternatives"]]


@dataclass
class CaptionError:
    """An input that got no caption; ``code`` is stable (missing, no_match, not_an_image, unreadable,
    model_error, ...), ``message`` is for a person."""

    path: str
    code: str
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "error": {"code": self.code, "message": self.message}}

    def json_line(self) -> str:
        return json.dumps(self.to_json())

    def line(self) -> str:
        return f"error: {self.path}: {self.message}"


def caption_paths(
    engine: CaptionEngine,
    inputs: Iterable[str],
    options: DecodingOptions,
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    mode: str = DEFAULT_MODE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    attention: bool = False,
) -> Iterator[Union[CaptionResult, CaptionError]]:
    """Caption ``inputs`` (see :func:`expand_inputs`) ``batch_size`` images per model call with ``options``.

    Yields in output order: an error as soon as its input fails (so it may come before the results of
    earlier images still waiting for their batch), the results of a batch once its model call is done.
    ``mode`` is the label each result carries (see :func:`caption_options`). Images over ``max_pixels``
    pixels are refused (decompression bombs). A failed model call is a ``model_error`` for each image of
    its batch; the other batches go on. ``attention``: each result carries the attention of its caption
    (see the module's docstring); the captions are the same either way.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pending: list[tuple[str, Any, float]] = []  # (path, image, decode_ms)

    def flush() -> Iterator[Union[CaptionResult, CaptionError]]:
        batch = pending[:]
        pending.clear()
        if not batch:
            return
        try:
            pixels = [engine.prepare(im) for _, im, _ in batch]
            run = engine.run(pixels, options, attention=attention)
        except Exception as e:  # noqa: BLE001 - reported per image; the other batches go on
            for path, _, _ in batch:
                yield CaptionError(path, "model_error", f"captioning failed: {e}")
            return
        for (path, _, decode_ms), caps in zip(batch, run.captions):
            result = engine.result(caps, mode=mode, attention_weights=attention)
            yield CaptionResult(path, result, decode_ms, run.model_ms, run.batch_size)

    for path, problem in expand_inputs(inputs):
        if problem:
            yield CaptionError(path, "missing" if problem.startswith("missing") else "no_match", problem)
            continue
        t = time.perf_counter()
        try:
            image = load_rgb(path, max_pixels=max_pixels)
        except ImageDecodeError as e:
            yield CaptionError(path, e.reason.replace(" ", "_"), e.reason + (f" ({e.detail})" if e.detail else ""))
            continue
        except OSError as e:
            yield CaptionError(path, "unreadable", str(e))
            continue
        pending.append((path, image, (time.perf_counter() - t) * 1000.0))
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()
