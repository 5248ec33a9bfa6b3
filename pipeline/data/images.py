"""Robust image decoding shared by `prepare`, `extract`, fine-tuning and serving.

Every decoder here returns an 8-bit RGB :class:`PIL.Image.Image` upright per its
EXIF orientation, or raises :class:`ImageDecodeError` whose ``reason`` is one of
a few stable phrases (used as rejects-report reasons).

What a file may cost is bounded before it is paid: a file over ``max_file_bytes`` is refused by its size,
before a byte is read; files are read through a handle (the header first: an image over ``max_pixels`` is
refused from it), never whole into memory; a JPEG over :data:`DRAFT_ABOVE_PIXELS` is decoded at reduced
size by libjpeg itself (:func:`draft_scale`). The messages quote the caller's limits, never PIL's own.

Peak memory per accepted image, measured (VmHWM growth of a process decoding one file): an RGB PNG at the
40 M-pixel limit 156 MB (PIL keeps RGB as 4 bytes a pixel), a greyscale one 194 MB (plus its RGB copy),
one with alpha 310 MB (RGBA, then the RGB it is composited into); a 36 M-pixel JPEG 36 MB (decoded at
half size), 141 MB if progressive (libjpeg holds every DCT coefficient).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cache.format import file_sha256
from pipeline.errors import UserError

# The defaults of every image limit (the stage configs, `pipeline caption` and `pipeline serve` read these),
# sized from what the datasets we import need, with room to spare:
# * files up to 50 MiB: COCO and Flickr photos are under 1 MB, a 24-megapixel camera JPEG about 10 MB
#   (a 40 MP PNG photo can be 50-80 MB: raise the limit for such files). Refused by their size, unread.
# * images up to 40 M pixels: COCO's largest are 640 x 640 (0.4 MP), Flickr's 500 x 500; phones and most
#   cameras write 12-24 MP. Refused from the header (a decompression bomb costs nothing).
DEFAULT_MAX_FILE_BYTES = 50 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000

# A JPEG over this many pixels is decoded at 1/2, 1/4 or 1/8 of its size (libjpeg scales the DCT: no
# full-size copy is ever made), the least reduction that brings it to this many pixels or fewer, never to a
# shorter side under DRAFT_MIN_SIDE: far more than any consumer here uses (backbones take <= 518 px), and a
# JPEG of ordinary proportions then costs at most ~64 MB decoded (PIL keeps RGB at 4 bytes a pixel). Smaller
# JPEGs, and every other format, decode exactly.
DRAFT_ABOVE_PIXELS = 16_000_000
DRAFT_MIN_SIDE = 1024
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
        # Composite transparent pixels over white, the usual display convention: pasted through its own
        # alpha, the same pixels as Image.alpha_composite over opaque white without its two RGBA copies.
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba)
        return out
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _allow_pil_pixels(max_pixels: int) -> None:
    """Raise PIL's own decompression-bomb limit (a process-wide setting, ~89.5 M pixels by default) to
    ``max_pixels``, so that the caller's limit is the one that holds; it is never lowered (the checks
    below apply each caller's own limit)."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def draft_scale(img: Image.Image) -> int:
    """The reduction (1, 2, 4 or 8) at which to decode ``img`` (opened, not loaded): 1 but for a JPEG over
    :data:`DRAFT_ABOVE_PIXELS`, which gets the least reduction that brings it to that many pixels or fewer
    while its shorter side stays at least :data:`DRAFT_MIN_SIDE`."""
    if img.format not in ("JPEG", "MPO"):  # MPO: a camera JPEG with more pictures after the first
        return 1
    w, h = img.size
    scale = 1
    while scale < 8 and w * h > DRAFT_ABOVE_PIXELS * scale * scale and min(w, h) // (2 * scale) >= DRAFT_MIN_SIDE:
        scale *= 2
    return scale


def _too_many_pixels(source: str, size: str, max_pixels: int) -> ImageDecodeError:
    """"image too large", quoting the caller's limit: ``size`` is e.g. ``11000x11000 = 121,000,000 pixels``."""
    return ImageDecodeError(source, "image too large", f"{size} > max_pixels {max_pixels:,}")


def _decode(fp, source: str, max_pixels: int, full: bool, formats=None,
            max_aspect_ratio: float | None = None) -> Image.Image:
    _allow_pil_pixels(max_pixels)
    try:
        with warnings.catch_warnings():
            # PIL warns between its own limit and 2x: the check below applies the caller's.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=formats)
            w, h = img.size
            if w * h > max_pixels:
                raise _too_many_pixels(source, f"{w}x{h} = {w * h:,} pixels", max_pixels)
            if w == 0 or h == 0:
                raise ImageDecodeError(source, "not an image", "zero-sized image")
            if max_aspect_ratio is not None and max(w, h) > max_aspect_ratio * min(w, h):
                raise ImageDecodeError(source, "extreme aspect ratio",
                                       f"{w}x{h} is over {max_aspect_ratio:g}:1")
            if not full:
                return img
            scale = draft_scale(img)
            if scale > 1:
                img.draft(None, (w // scale, h // scale))
            img.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:  # over twice PIL's limit, which is at least max_pixels
        pixels = re.search(r"\((\d+) pixels\)", str(e))  # PIL's words: "Image size (N pixels) exceeds ..."
        size = f"{int(pixels.group(1)):,} pixels" if pixels else f"over {2 * Image.MAX_IMAGE_PIXELS:,} pixels"
        raise _too_many_pixels(source, size, max_pixels) from None
    except UnidentifiedImageError:
        known = f"; accepted formats: {', '.join(formats)}" if formats else ""
        raise ImageDecodeError(source, "not an image", "unrecognised image format" + known) from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e)
        reason = "truncated image" if "truncated" in msg or "broken data stream" in msg else "corrupt image"
        raise ImageDecodeError(source, reason, msg) from None
    ImageOps.exif_transpose(img, in_place=True)  # in place: a returned copy would double the image's cost
    return _to_rgb(img)


@dataclass(frozen=True)
class ShardMember:
    """An image stored inside an uncompressed tar shard (img2dataset's `webdataset` output): the ``size``
    bytes from byte ``offset`` of the file ``path``, the tar member ``name``. Read with one seek and one
    read, never unpacked into a folder. Wherever an image file's path is accepted, so is a ShardMember;
    messages name it ``shard.tar:member``."""

    path: Path
    name: str
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{self.path}:{self.name}"


ImageLocation = Union[str, Path, ShardMember]  # where an image's bytes are: a file, or a member of a tar shard


def as_location(where: ImageLocation) -> Union[Path, ShardMember]:
    return where if isinstance(where, ShardMember) else Path(where)


def _open_image_file(where: ImageLocation, max_file_bytes: int) -> BinaryIO:
    """The image's bytes open for reading, once they are known to be non-empty and at most
    ``max_file_bytes`` (judged by the size, before anything is read); else :class:`ImageDecodeError`.
    A :class:`ShardMember` is read in one seek and one read (at most ``max_file_bytes``) from its shard."""
    where = as_location(where)
    if isinstance(where, ShardMember):
        return _read_member(where, max_file_bytes)
    if not where.is_file():
        raise ImageDecodeError(str(where), "missing image file")
    f = open(where, "rb")
    size = os.fstat(f.fileno()).st_size  # of the file opened: no swap between the check and the read
    if size == 0 or size > max_file_bytes:
        f.close()
        raise _bad_size(str(where), size, max_file_bytes)
    return f


def _bad_size(source: str, size: int, max_file_bytes: int) -> ImageDecodeError:
    if size == 0:
        return ImageDecodeError(source, "empty file", "zero bytes")
    return ImageDecodeError(source, "file too large", f"{size:,} bytes > max_file_bytes {max_file_bytes:,}")


def _read_member(member: ShardMember, max_file_bytes: int) -> io.BytesIO:
    if not member.path.is_file():
        raise ImageDecodeError(str(member), "missing image file", f"shard {member.path} not found")
    if member.size <= 0 or member.size > max_file_bytes:
        raise _bad_size(str(member), member.size, max_file_bytes)
    with open(member.path, "rb") as f:
        f.seek(member.offset)
        data = f.read(member.size)
    if len(data) != member.size:
        raise ImageDecodeError(str(member), "truncated image",
                               f"the shard ends {member.size - len(data):,} bytes into the member's {member.size:,}")
    return io.BytesIO(data)


def load_rgb(path: ImageLocation, max_pixels: int = DEFAULT_MAX_PIXELS,
             max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Image.Image:
    """Decode an image (a file, or a :class:`ShardMember`) fully into upright 8-bit RGB, or raise
    :class:`ImageDecodeError`."""
    with _open_image_file(path, max_file_bytes) as f:
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


def check_image(path: ImageLocation, mode: str = "full", max_pixels: int = DEFAULT_MAX_PIXELS,
                max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> None:
    """Raise :class:`ImageDecodeError` if ``path`` is not a usable image.

    ``mode``: ``"full"`` decodes every pixel (catches truncation), ``"header"`` reads
    only the header (fast; catches missing, empty, non-image and oversized files),
    ``"none"`` checks only that the file exists, is not empty and not over ``max_file_bytes``.
    """
    if mode not in ("full", "header", "none"):
        raise ValueError(f"check mode must be full, header or none, not {mode!r}")
    with _open_image_file(path, max_file_bytes) as f:
        if mode != "none":
            _decode(f, str(path), max_pixels, full=(mode == "full"))


def image_sha256(path: ImageLocation) -> str:
    """The digest that identifies an image file's content: sha256 of its bytes (manifests record it, the
    feature cache keys its records by it); of a :class:`ShardMember`, the member's bytes."""
    where = as_location(path)
    if isinstance(where, ShardMember):
        return hashlib.sha256(_read_member(where, where.size).getbuffer()).hexdigest()
    return file_sha256(where)


def read_image_file(path: ImageLocation, max_pixels: int = DEFAULT_MAX_PIXELS,
                    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> tuple[str, Image.Image]:
    """``(sha256 of the file's bytes, the decoded image)``, through one file handle: a file over
    ``max_file_bytes`` is refused by its size before it is read; the digest is streamed, and the image
    decoded from the handle (its header checked first), so no copy of the file's bytes is held.

    The digest is what identifies the pixels a feature was computed from (the feature cache keys
    its records by it); raises :class:`ImageDecodeError` (with ``digest`` set when the bytes were read)."""
    with _open_image_file(path, max_file_bytes) as f:
        h = hashlib.sha256()
        while block := f.read(1 << 22):
            h.update(block)
        digest = h.hexdigest()
        f.seek(0)
        try:
            return digest, _decode(f, str(path), max_pixels, full=True)
        except ImageDecodeError as e:
            e.digest = digest
            raise
