"""Robust image decoding shared by `prepare`, `extract`, fine-tuning and serving.

Every decoder here returns an 8-bit RGB :class:`PIL.Image.Image` upright per its
EXIF orientation, or raises :class:`ImageDecodeError` whose ``reason`` is one of
a few stable phrases (used as rejects-report reasons).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cache.format import file_sha256
from pipeline.errors import UserError

# Images above this many pixels are refused as possible decompression bombs (~ 16k x 16k / 2).
DEFAULT_MAX_PIXELS = 128_000_000


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
        # 16-bit / 32-bit grayscale: rescale the real range to 0..255 rather than clipping.
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr = ((arr - lo) * scale).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Composite transparent pixels over white, the usual display convention.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _decode(fp, source: str, max_pixels: int, full: bool, formats=None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL warns (not raises) between max_pixels and 2x; we refuse at max_pixels.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=formats)
            w, h = img.size
            if w * h > max_pixels:
                raise ImageDecodeError(source, "image too large", f"{w}x{h} > {max_pixels} pixels")
            if w == 0 or h == 0:
                raise ImageDecodeError(source, "not an image", "zero-sized image")
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
) -> Image.Image:
    """Decode image bytes (an upload, an LMDB value) into upright 8-bit RGB.

    ``formats`` (PIL format names, e.g. ``("JPEG", "PNG")``) limits which decoders may be tried:
    anything else is "not an image" (a server keeps untrusted bytes away from rarely used plugins).
    """
    if not data:
        raise ImageDecodeError(source, "empty file", "zero bytes")
    return _decode(io.BytesIO(data), source, max_pixels, full=True, formats=list(formats) if formats else None)


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
