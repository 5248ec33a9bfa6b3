"""Robust image decoding: every mode to upright 8-bit RGB, every bad file to a stable reason."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.data import images
from pipeline.data.images import (
    TRIM_ASPECT_RATIO,
    ImageDecodeError,
    check_image,
    decode_bytes,
    load_rgb,
    trim_for_eval,
)


# --------------------------------------------------------------------------- helpers
def _save(img: Image.Image, path: Path, fmt: str, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _noisy_jpeg_bytes(size=(64, 64)) -> bytes:
    """Noise defeats compression, so cutting the file in half lands inside the scan data."""
    arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return _bytes(Image.fromarray(arr), "JPEG", quality=95)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds no pixels: its header alone is a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _reason(excinfo) -> str:
    return excinfo.value.reason


def _assert_rgb(img: Image.Image) -> None:
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    assert np.asarray(img).dtype == np.uint8


# --------------------------------------------------------------------------- modes
def test_exif_orientation_is_applied(tmp_path):
    # 40 wide x 20 high, left half red, right half blue; Orientation=6 means "rotate 90 CW to view".
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    path = _save(Image.fromarray(arr), tmp_path / "rot.jpg", "JPEG", exif=exif.tobytes(), quality=95)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)
        assert raw.getexif().get(0x0112) == 6

    img = load_rgb(path)
    _assert_rgb(img)
    assert img.size == (20, 40)  # rotated: now portrait
    out = np.asarray(img).astype(int)
    # Rotating 90 degrees clockwise puts the (left) red half at the top, the blue half at the bottom.
    top, bottom = out[5, 10], out[35, 10]
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom

    # The same from bytes.
    assert decode_bytes(path.read_bytes()).size == (20, 40)


def test_grayscale_L(tmp_path):
    arr = np.tile(np.arange(0, 200, 10, dtype=np.uint8), (6, 1))  # 20x6
    path = _save(Image.fromarray(arr, mode="L"), tmp_path / "g.png", "PNG")
    img = load_rgb(path)
    _assert_rgb(img)
    out = np.asarray(img)
    assert out.shape == (6, 20, 3)
    assert (out[..., 0] == arr).all() and (out[..., 1] == arr).all() and (out[..., 2] == arr).all()


def test_LA_with_alpha_composites_over_white(tmp_path):
    la = Image.new("LA", (4, 2), (0, 255))  # opaque black
    la.putpixel((0, 0), (0, 0))  # fully transparent black -> white
    la.putpixel((1, 0), (100, 255))  # opaque gray stays gray
    path = _save(la, tmp_path / "la.png", "PNG")
    img = load_rgb(path)
    _assert_rgb(img)
    out = np.asarray(img)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (100, 100, 100)
    assert tuple(out[1, 3]) == (0, 0, 0)


def test_P_with_transparency(tmp_path):
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))  # index 0 black, index 1 red
    p.putpixel((1, 1), 1)
    p.info["transparency"] = 0  # index 0 is transparent
    path = _save(p, tmp_path / "p.png", "PNG", transparency=0)
    with Image.open(path) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    img = load_rgb(path)
    _assert_rgb(img)
    out = np.asarray(img)
    assert tuple(out[0, 0]) == (255, 255, 255)  # transparent -> white, not black
    assert tuple(out[1, 1]) == (255, 0, 0)


def test_P_without_transparency(tmp_path):
    p = Image.new("P", (3, 3), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    img = load_rgb(_save(p, tmp_path / "p.png", "PNG"))
    _assert_rgb(img)
    assert tuple(np.asarray(img)[2, 2]) == (10, 200, 30)


def test_RGBA_composite_over_white(tmp_path):
    rgba = Image.new("RGBA", (3, 2), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black: mid gray
    path = _save(rgba, tmp_path / "a.png", "PNG")
    img = load_rgb(path)
    _assert_rgb(img)
    out = np.asarray(img).astype(int)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert all(120 <= v <= 135 for v in out[0, 1]), out[0, 1]
    assert tuple(out[1, 2]) == (10, 20, 30)
    # From bytes too.
    assert tuple(np.asarray(decode_bytes(path.read_bytes()))[0, 0]) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in CMYK
    path = _save(cmyk, tmp_path / "c.jpg", "JPEG", quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    img = load_rgb(path)
    _assert_rgb(img)
    assert img.size == (16, 8)
    r, g, b = np.asarray(img).astype(int).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60, (r, g, b)


def test_16bit_grayscale_rescaled_with_real_range(tmp_path):
    arr = np.linspace(1000, 3000, 5 * 8).reshape(5, 8).astype(np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "g16.png", "PNG")
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I")  # 16-bit PNG
    img = load_rgb(path)
    _assert_rgb(img)
    out = np.asarray(img)[..., 0].astype(int)
    # The real range [1000, 3000] maps to [0, 255] (not clipped to 255, not divided by 257).
    assert out.min() == 0 and out.max() == 255
    expected = np.round((arr.astype(float) - 1000) * 255 / 2000).astype(int)
    assert np.abs(out - expected).max() <= 1
    assert (np.diff(out.ravel()) >= 0).all()  # order preserved


def test_16bit_constant_image_does_not_divide_by_zero(tmp_path):
    arr = np.full((4, 4), 1234, dtype=np.uint16)
    img = load_rgb(_save(Image.fromarray(arr), tmp_path / "flat16.png", "PNG"))
    _assert_rgb(img)
    assert img.size == (4, 4)


@pytest.mark.parametrize("mode,color", [("RGB", (1, 2, 3)), ("L", 7), ("1", 1), ("RGBA", (1, 2, 3, 255)), ("I", 5), ("F", 0.5)])
def test_always_rgb_from_any_mode(mode, color):
    img = Image.new(mode, (5, 3), color)
    fmt = "TIFF" if mode in ("I", "F") else "PNG"
    out = decode_bytes(_bytes(img, fmt))
    _assert_rgb(out)
    assert out.size == (5, 3)


# --------------------------------------------------------------------------- bad files
def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    for call in (lambda: load_rgb(path), lambda: check_image(path), lambda: check_image(path, mode="header"),
                 lambda: check_image(path, mode="none")):
        with pytest.raises(ImageDecodeError) as e:
            call()
        assert _reason(e) == "empty file"
    with pytest.raises(ImageDecodeError) as e:
        decode_bytes(b"")
    assert _reason(e) == "empty file"


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageDecodeError) as e:
        load_rgb(path)
    assert _reason(e) == "not an image"
    assert str(path) in str(e.value)
    with pytest.raises(ImageDecodeError) as e:
        check_image(path, mode="header")
    assert _reason(e) == "not an image"
    with pytest.raises(ImageDecodeError) as e:
        decode_bytes(b"hello world", source="upload")
    assert _reason(e) == "not an image" and str(e.value).startswith("upload: ")
    check_image(path, mode="none")  # only existence and size are checked


def test_truncated_jpeg(tmp_path):
    data = _noisy_jpeg_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError) as e:
        check_image(path, mode="full")
    assert _reason(e) == "truncated image"
    with pytest.raises(ImageDecodeError) as e:
        load_rgb(path)
    assert _reason(e) == "truncated image"
    with pytest.raises(ImageDecodeError) as e:
        decode_bytes(path.read_bytes())
    assert _reason(e) == "truncated image"
    check_image(path, mode="header")  # the header is intact
    check_image(path, mode="none")
    # The whole file is fine.
    whole = tmp_path / "whole.jpg"
    whole.write_bytes(data)
    check_image(whole, mode="full")
    assert load_rgb(whole).size == (64, 64)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    for mode in ("full", "header", "none"):
        with pytest.raises(ImageDecodeError) as e:
            check_image(path, mode=mode)
        assert _reason(e) == "missing image file"
    with pytest.raises(ImageDecodeError) as e:
        load_rgb(path)
    assert _reason(e) == "missing image file"
    # A directory is not an image file either.
    with pytest.raises(ImageDecodeError) as e:
        load_rgb(tmp_path)
    assert _reason(e) == "missing image file"


def test_image_too_large(tmp_path):
    path = _save(Image.new("RGB", (20, 20), (1, 2, 3)), tmp_path / "big.png", "PNG")
    for call in (lambda: load_rgb(path, max_pixels=100), lambda: check_image(path, mode="full", max_pixels=100),
                 lambda: check_image(path, mode="header", max_pixels=100),
                 lambda: decode_bytes(path.read_bytes(), max_pixels=100)):
        with pytest.raises(ImageDecodeError) as e:
            call()
        assert _reason(e) == "image too large"
        assert "20x20" in e.value.detail
    # Exactly at the limit is fine.
    assert load_rgb(path, max_pixels=400).size == (20, 20)
    check_image(path, max_pixels=400)


def test_a_file_over_max_file_bytes_is_refused_by_its_size_before_it_is_read(tmp_path, monkeypatch):
    path = tmp_path / "huge.jpg"
    with open(path, "wb") as f:
        f.truncate(3_000_000)  # sparse: nothing written
    reads = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: reads.append(a) or pytest.fail("opened"))
    calls = [lambda: images.read_image_file(path, max_file_bytes=2_000_000),
             lambda: load_rgb(path, max_file_bytes=2_000_000)]
    calls += [lambda m=m: check_image(path, mode=m, max_file_bytes=2_000_000) for m in ("full", "header", "none")]
    for call in calls:
        with pytest.raises(ImageDecodeError) as e:
            call()
        assert (_reason(e), e.value.detail) == ("file too large", "3,000,000 bytes > max_file_bytes 2,000,000")
        assert e.value.digest is None  # not read, so not hashed
    assert reads == []


def test_read_image_file_streams_the_digest_and_decodes_from_the_handle(tmp_path, monkeypatch):
    import hashlib

    path = _save(Image.new("RGB", (30, 20), (1, 2, 3)), tmp_path / "ok.png", "PNG")
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read whole"))
    digest, img = images.read_image_file(path)
    assert digest == hashlib.sha256(open(path, "rb").read()).hexdigest() and img.size == (30, 20)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageDecodeError) as e:
        images.read_image_file(bad)
    assert _reason(e) == "not an image" and e.value.digest == hashlib.sha256(b"not an image at all").hexdigest()


def test_pils_own_bomb_limit_is_never_the_one_quoted(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # as if a caller in this process had set it
    path = tmp_path / "big.png"
    path.write_bytes(_png_header(1500, 1000))  # over PIL's limit, under twice it: PIL only warns
    check_image(path, mode="header", max_pixels=2_000_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # (the call above raised it to its own limit)
    path.write_bytes(_png_header(3000, 1000))  # over twice PIL's: PIL raises; the message quotes ours
    with pytest.raises(ImageDecodeError) as e:
        check_image(path, mode="header", max_pixels=1_000_000)
    assert e.value.detail == "3,000,000 pixels > max_pixels 1,000,000", e.value.detail


def _gradient_jpeg(path: Path, width: int, height: int) -> Path:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 90, np.float32)], axis=2).astype(np.uint8)
    return _save(Image.fromarray(arr), path, "JPEG", quality=90)


def test_a_large_jpeg_is_decoded_at_reduced_size_and_a_smaller_one_exactly(tmp_path):
    big = _gradient_jpeg(tmp_path / "big.jpg", 4400, 4000)  # 17.6 M pixels: over DRAFT_ABOVE_PIXELS
    img = load_rgb(big)
    assert img.size == (2200, 2000)  # libjpeg's 1/2 scale
    with Image.open(big) as full:  # the same picture: the full decode, halved, to a few grey levels
        ref = np.asarray(full.convert("RGB").resize((2200, 2000), Image.BILINEAR), dtype=np.int16)
    assert np.abs(np.asarray(img, dtype=np.int16) - ref).mean() < 2.0
    small = _gradient_jpeg(tmp_path / "small.jpg", 4000, 3000)  # 12 M pixels: decoded as it is
    with Image.open(small) as full:
        assert np.array_equal(np.asarray(load_rgb(small)), np.asarray(full.convert("RGB")))
    strip = _gradient_jpeg(tmp_path / "strip.jpg", 18_000, 1000)  # halving would leave a side under 1024 px
    assert load_rgb(strip).size == (18_000, 1000)


def test_peak_memory_of_an_accepted_image_is_bounded(tmp_path):
    """The largest PNG the default limit accepts (40 M pixels, a few hundred KB on disk) costs 4 bytes a pixel
    decoded (PIL's RGB layout), once: no copy of the file's bytes, no second copy of the image."""
    import struct
    import subprocess
    import sys
    import zlib

    from pipeline.data.images import DEFAULT_MAX_PIXELS
    from tests.conftest import REPO

    side = int(DEFAULT_MAX_PIXELS ** 0.5)
    z = zlib.compressobj(1)
    row = b"\x00" + b"\x80" * (3 * side)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path = tmp_path / "at-the-limit.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    code = ("import sys\nfrom pipeline.data.images import read_image_file\n"
            "def hwm():\n    return int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) / 1024\n"
            "before = hwm()\n_, img = read_image_file(sys.argv[1])\nprint(img.size[0] * img.size[1], hwm() - before)\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, capture_output=True, text=True,
                         check=True, env={"PATH": "", "OMP_NUM_THREADS": "1"}).stdout.split()
    pixels, grew_mb = int(out[0]), float(out[1])
    assert pixels == side * side <= DEFAULT_MAX_PIXELS
    assert grew_mb < 4 * pixels / 2**20 + 40, grew_mb  # ~153 MB; a second copy would be ~300 MB


def test_check_image_rejects_unknown_mode(tmp_path):
    path = _save(Image.new("RGB", (2, 2)), tmp_path / "x.png", "PNG")
    with pytest.raises(ValueError):
        check_image(path, mode="fast")


def test_good_image_passes_all_modes(tmp_path):
    path = _save(Image.new("RGB", (9, 7), (5, 6, 7)), tmp_path / "ok.jpg", "JPEG")
    for mode in ("full", "header", "none"):
        assert check_image(path, mode=mode) is None
    img = load_rgb(path)
    _assert_rgb(img)
    assert img.size == (9, 7)


def test_max_pixels_above_pils_own_limit_is_the_limit_that_holds(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header(10_000, 9_500))  # 95 M pixels: over PIL's default ~89.5 M
    check_image(path, mode="header", max_pixels=100_000_000)  # the option's value wins, not PIL's
    assert Image.MAX_IMAGE_PIXELS >= 100_000_000
    with pytest.raises(ImageDecodeError) as e:
        check_image(path, mode="header", max_pixels=90_000_000)
    assert _reason(e) == "image too large" and "10000x9500" in e.value.detail


def test_a_decompression_bomb_is_refused_from_its_header(monkeypatch):
    loads = []  # images whose pixels were decoded: none may be, the header says enough
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    with pytest.raises(ImageDecodeError) as e:
        decode_bytes(_png_header(60_000, 60_000), max_pixels=40_000_000)
    assert _reason(e) == "image too large" and "max_pixels 40,000,000" in e.value.detail  # the caller's limit
    assert loads == []


def test_max_aspect_ratio_refuses_strips_from_the_header():
    for size in ((16_000, 1), (1, 16_000), (501, 5)):
        with pytest.raises(ImageDecodeError) as e:
            decode_bytes(_bytes(Image.new("RGB", size), "PNG"), max_aspect_ratio=100)
        assert _reason(e) == "extreme aspect ratio" and "100:1" in e.value.detail
    assert decode_bytes(_bytes(Image.new("RGB", (500, 5)), "PNG"), max_aspect_ratio=100).size == (500, 5)
    assert decode_bytes(_bytes(Image.new("RGB", (16_000, 1)), "PNG")).size == (16_000, 1)  # no limit by default


def test_16bit_rescaling_in_chunks_is_the_whole_image_formula(monkeypatch):
    arr = np.random.default_rng(0).integers(100, 60_000, (37, 23)).astype(np.uint16)
    monkeypatch.setattr(images, "CONVERT_CHUNK_PIXELS", 50)  # 2 rows at a time
    out = np.asarray(decode_bytes(_bytes(Image.fromarray(arr), "PNG")))[..., 0]
    whole = arr.astype(np.float64)
    want = ((whole - whole.min()) * (255.0 / (whole.max() - whole.min()))).round().astype(np.uint8)
    assert np.array_equal(out, want)


# --------------------------------------------------------------------------- trimming for the eval transform
PREPROCESSING = {"input_size": [3, 64, 64], "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bicubic",
                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _eval_transform(pre=PREPROCESSING):
    import timm.data

    return timm.data.create_transform(input_size=pre["input_size"], interpolation=pre["interpolation"],
                                      mean=pre["mean"], std=pre["std"], crop_pct=pre["crop_pct"],
                                      crop_mode=pre["crop_mode"], is_training=False)


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _smooth(w: int, h: int) -> Image.Image:
    x, y = np.linspace(0, 8, w)[None, :, None], np.linspace(0, 8, h)[:, None, None]
    return Image.fromarray(((np.sin(x + y + np.arange(3)) + 1) * 127.5).astype(np.uint8))


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 100), (100, 300), (1000, 100), (64, 64), (7, 5),
                                  (4000, 3000)])
def test_ordinary_images_give_exactly_the_transforms_tensors(size):
    img = _noise(*size)
    assert trim_for_eval(img, PREPROCESSING) is img  # up to 10:1 nothing is touched
    import torch

    tf = _eval_transform()
    assert torch.equal(tf(trim_for_eval(img, PREPROCESSING)), tf(img))


@pytest.mark.parametrize("size", [(2000, 30), (30, 2000), (1201, 11)])
def test_an_extreme_strip_is_trimmed_to_what_the_crop_keeps(size):
    img = _smooth(*size)
    trimmed = trim_for_eval(img, PREPROCESSING)
    short, long = min(size), max(size)
    assert max(trimmed.size) <= TRIM_ASPECT_RATIO * short + 1 and min(trimmed.size) == short
    assert (trimmed.size[0] > trimmed.size[1]) == (size[0] > size[1])
    assert trim_for_eval(trimmed, PREPROCESSING) is trimmed  # trimming twice is trimming once
    tf = _eval_transform()
    a, b = tf(img), tf(trimmed)
    assert a.shape == b.shape == (3, 64, 64)
    assert float((a - b).abs().max()) < 0.05  # sub-pixel resampling only (a few grey levels)
    x0 = (long - max(trimmed.size)) // 2  # the central part, to the pixel
    box = (x0, 0, x0 + trimmed.size[0], short) if size[0] > size[1] else (0, x0, short, x0 + trimmed.size[1])
    assert np.array_equal(np.asarray(trimmed), np.asarray(img.crop(box)))


def test_a_16000_pixel_strip_costs_nothing_once_trimmed(monkeypatch):
    """Trimmed, a strip costs the 224-px transform what an ordinary image does: its resize makes at most
    (TRIM_ASPECT_RATIO + 1) x 256 x 256 pixels. Untrimmed, the shorter side goes to 256 px and the 16000x1
    strip to 4,096,000 x 256: a billion pixels (~12 s and ~4 GB), refused below before they are allocated."""
    budget = int((TRIM_ASPECT_RATIO + 1) * 256 * 256)
    resized = []  # pixels of each resize's output
    real_resize = Image.Image.resize

    def counting_resize(self, size, *args, **kwargs):
        resized.append(size[0] * size[1])
        assert resized[-1] <= budget, f"a {self.size} image resized to {size}: {resized[-1]:,} pixels"
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", counting_resize)
    tf = _eval_transform({**PREPROCESSING, "input_size": [3, 224, 224]})
    for size in ((16_000, 1), (1, 16_000)):
        trimmed = trim_for_eval(_noise(*size), PREPROCESSING)
        x = tf(trimmed)
        assert max(trimmed.size) <= 11 and x.shape == (3, 224, 224)
    assert len(resized) == 2  # one resize per strip, each within the budget


@pytest.mark.parametrize("mode", ["squash", "border"])
def test_modes_that_resize_the_longer_side_are_left_alone(mode):
    img = _noise(2000, 10)
    assert trim_for_eval(img, {**PREPROCESSING, "crop_mode": mode}) is img
