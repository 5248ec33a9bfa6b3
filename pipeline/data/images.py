"""Robust image decoding shared by `prepare`, `extract`, fine-tuning and serving.

Every decoder here returns an 8-bit RGB :class:`PIL.Image.Image` upright per its
EXIF orientation, or raises :class:`ImageDecodeError` whose ``reason`` is one of
a few stable phrases (used as rejects-report reasons).
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cache.format import file_sha256
from pipeline.errors import UserError

# Images above this many pixels are refused as possible decompression bombs (~ 16k x 16k / 2).
DEFAULT_MAX_PIXELS = 128_000_000
# Up to this aspect ratio the eval transform gets an image as it is; beyond, see trim_for_eval.
TRIM_ASPECT_RATIO = 10.0
CONVERT_CHUNK_PIXELS = 1 << 20  # 16/32-bit images are rescaled to 8 bits this many pixels at a time


class ImageDecodeError(UserError, Exception):
    """An image that cannot be used. ``reason`` is a short stable phrase; ``detail`` says more."""

    def __init__(self, source: str, reason: str, detail: str = "") -> None:
        self.source = source
        self.reason = reason
        self.detail = detail
        self.digest: str | None = None  # sha256 of the file's bytes, when they could be read
        super().__init__(f"{source}: {reason}" + (f" ({detail})" if detail else ""))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit grayscale: rescale the real range to 0..255 rather than clipping, in float64
        # a chunk of rows at a time (a whole float64 copy of a large image would cost 8 bytes a pixel, twice).
        raw = np.asarray(img)
        lo, hi = float(raw.min()), float(raw.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        out = np.empty(raw.shape, dtype=np.uint8)
        rows = max(1, CONVERT_CHUNK_PIXELS // max(1, raw.shape[1]))
        for top in range(0, raw.shape[0], rows):
            out[top:top + rows] = ((raw[top:top + rows].astype(np.float64) - lo) * scale).round()
        return Image.fromarray(out, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite transparent pixels over white, the usual display convention.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _allow_pil_pixels(max_pixels: int) -> None:
    """Raise PIL's own decompression-bomb limit (a process-wide setting, ~89.5 M pixels by default) to
    ``max_pixels``, so that the caller's limit is the one that holds; it is never lowered (the checks
    below apply each caller's own limit)."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def _decode(fp, source: str, max_pixels: int, full: bool, formats=None,
            max_aspect_ratio: float | None = None) -> Image.Image:
    _allow_pil_pixels(max_pixels)
    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) between its limit and 2x; we refuse at max_pixels.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=formats)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(source, "image too large", f"{w}x{h} > {max_pixels} pixels")
            if w == 0 or h == 0:
                raise ImageDecodeError(source, "not an image", "zero-sized image")
            if max_aspect_ratio is not None and max(w, h) > max_aspect_ratio * min(w, h):
                raise ImageDecodeError(source, "extreme aspect ratio",
                                       f"{w}x{h} is over {max_aspect_ratio:g}:1")
            if not full:
                return img
            img.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(source, "image too large", str(e)) from None
    except UnidentifiedImageError:
        known = f"; accepted formats: {', '.join(formats)}" if formats else ""
        raise ImageDecodeError(source, "not an image", "unrecognised image format" + known) from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e)
        reason = "truncated image" if "truncated" in msg or "broken data stream" in msg else "corrupt image"
        raise ImageDecodeError(source, reason, msg) from None
    img = ImageOps.exif_transpose(img)
    return _to_rgb(img)


def load_rgb(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file fully into upright 8-bit RGB, or raise :class:`ImageDecodeError`."""
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(str(path), "missing image file")
    if path.stat().st_size == 0:
        raise ImageDecodeError(str(path), "empty file", "zero bytes")
    with open(path, "rb") as f:
        return _decode(f, str(path), max_pixels, full=True)


def decode_bytes(
    data: bytes, source: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS, formats: Sequence[str] | None = None,
    max_aspect_ratio: float | None = None,
) -> Image.Image:
    """Decode image bytes (an upload, an LMDB value) into upright 8-bit RGB.

    ``formats`` (PIL format names, e.g. ``("JPEG", "PNG")``) limits which decoders may be tried:
    anything else is "not an image" (a server keeps untrusted bytes away from rarely used plugins).
    ``max_aspect_ratio`` refuses (as "extreme aspect ratio", from the header) an image whose longer side
    is more than that many times its shorter one.
    """
    if not data:
        raise ImageDecodeError(source, "empty file", "zero bytes")
    return _decode(io.BytesIO(data), source, max_pixels, full=True, formats=list(formats) if formats else None,
                   max_aspect_ratio=max_aspect_ratio)


def trim_for_eval(img: Image.Image, preprocessing: Mapping[str, Any]) -> Image.Image:
    """``img`` as a backbone's eval transform (``preprocessing``: a feature spec's ``input_size``,
    ``crop_pct``, ``crop_mode``) can take it without materialising an unbounded number of pixels.

    The centre mode (timm's default) resizes the shorter side to ``input_size / crop_pct`` before it
    centre-crops, so a 16000x1 strip would become a 4,096,000x256 image on the way. Up to
    :data:`TRIM_ASPECT_RATIO`:1, and in the squash and border modes (they resize the longer side), the
    image is returned as it is: the transform gives exactly the tensors it always gave. Beyond, it is
    cut to the central region of that aspect ratio, which holds all the centre crop keeps plus a margin
    of at least one shorter side on each end (more than any resampling filter reaches), so the result
    differs from the untrimmed one by sub-pixel resampling only, and the resize makes at most
    ``scale^2 x TRIM_ASPECT_RATIO`` pixels. Call it between decoding and the transform.
    """
    if preprocessing.get("crop_mode") in ("squash", "border"):
        return img
    w, h = img.size
    short, long = min(w, h), max(w, h)
    if long <= TRIM_ASPECT_RATIO * short:
        return img
    size = preprocessing.get("input_size") or [3, 224, 224]
    crop_h, crop_w = int(size[-2]), int(size[-1])
    pct = float(preprocessing.get("crop_pct") or 1.0)
    # In the original's pixels the centre crop spans (its side along the long axis) x short / (the shorter
    # side's scaled size); the margin covers rounding and the filter's reach.
    scaled_short = math.floor((crop_h if w > h else crop_w) / pct)
    kept = math.ceil((crop_w if w > h else crop_h) * short / scaled_short)
    keep = min(long, max(round(TRIM_ASPECT_RATIO * short), kept + 2 * short))
    keep += (long - keep) % 2  # an even cut: the same centre to the pixel
    if keep >= long:  # e.g. an image trimmed already
        return img
    start = (long - keep) // 2
    return img.crop((start, 0, start + keep, h) if w > h else (0, start, w, start + keep))


def check_image(path: str | Path, mode: str = "full", max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Raise :class:`ImageDecodeError` if ``path`` is not a usable image.

    ``mode``: ``"full"`` decodes every pixel (catches truncation), ``"header"`` reads
    only the header (fast; catches missing, empty, non-image and oversized files),
    ``"none"`` checks only that the file exists and is not empty.
    """
    if mode not in ("full", "header", "none"):
        raise ValueError(f"check mode must be full, header or none, not {mode!r}")
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(str(path), "missing image file")
    if path.stat().st_size == 0:
        raise ImageDecodeError(str(path), "empty file", "zero bytes")
    if mode == "none":
        return
    with open(path, "rb") as f:
        _decode(f, str(path), max_pixels, full=(mode == "full"))


def image_sha256(path: str | Path) -> str:
    """The digest that identifies an image file's content: sha256 of its bytes (manifests record it, the
    feature cache keys its records by it)."""
    return file_sha256(Path(path))


def read_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, Image.Image]:
    """``(sha256 of the file's bytes, the decoded image)``, reading the file once.

    The digest is what identifies the pixels a feature was computed from (the feature cache keys
    its records by it); raises :class:`ImageDecodeError` (with ``digest`` set when the bytes were read)."""
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(str(path), "missing image file")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        return digest, decode_bytes(data, str(path), max_pixels)
    except ImageDecodeError as e:
        e.digest = digest
        raise
