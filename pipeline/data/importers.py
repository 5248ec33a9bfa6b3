"""Importers: one per source annotation format, each producing manifest records.

:func:`import_source` dispatches on ``source_cfg.kind`` to :func:`import_coco`,
:func:`import_karpathy`, :func:`import_flickr8k`, :func:`import_flickr30k`,
:func:`import_table` or :func:`pipeline.data.img2dataset.import_img2dataset` (web shards). Every
importer returns :class:`ManifestRecord` objects sorted by ``image_id`` (``f"{cfg.name}/{native_id}"``),
with absolute image paths and captions in file order, stripped and whitespace-collapsed but otherwise untouched.

Bad input is never dropped silently and never crashes the import:

* A problem with one item (a row, an annotation, an image) is recorded in the
  :class:`RejectsReport` and the item is left out. Reasons are ``"phrase"`` or
  ``"phrase: detail"``; the phrase is one of :data:`REASONS` (image problems use
  :class:`~pipeline.data.images.ImageDecodeError`'s phrases).
* An annotation file that cannot be used as a whole (missing, empty, invalid JSON,
  missing top-level keys or header columns), or an images folder that does not exist,
  raises :class:`AnnotationFileError`, whose message starts ``file[:line[:col]]: problem``;
  the caller's report is then left untouched.

Image paths in annotation files stay inside the source's images folder: a path that leads
out of it (absolute, ``../../etc/passwd``, or a symbolic link inside the folder to a file outside it:
paths are resolved before they are checked) is rejected (:data:`OUTSIDE_IMAGES`) before
any file is opened, unless the source sets ``allow_outside_paths``. An image file over
``limits.max_file_bytes`` is rejected by its size before it is read (:data:`FILE_TOO_LARGE`).

Captions are text people wrote, and are kept only as such: a caption repeated for one image is kept once
(the repeats are rejected, :data:`DUPLICATE_CAPTION`); a caption holding a control character (NUL,
ESC, ...) is rejected (:data:`CONTROL_CHARACTER`), and so is one holding an invisible format character
(:data:`INVISIBLE_CHARACTER`: bidirectional overrides and isolates such as U+202E and U+2066-U+2069,
zero-width spaces such as U+200B; see :func:`invisible_character`) or longer than
``limits.max_caption_chars`` (:data:`CAPTION_TOO_LONG`). None is altered to pass.

Where rejects point: annotation problems name the annotation file with ``line``
(line-based formats) and/or ``id`` (the would-be ``image_id``, or ``images[i]`` /
``annotations[i]`` for a JSON entry without a usable id); image problems name the
image file itself with the record's ``id``.

Splits follow the source's ``split`` option: ``auto`` keeps the source's own split
(COCO: from the file name; Karpathy: each entry's; Flickr8k: the split lists; tables:
the split column) where it has one; ``train``, ``val`` or ``test`` puts every image
there; ``seeded`` ignores the source's own split. Images left without a split (``seeded``,
or ``auto`` on a source without one) get the placeholder ``split="train"`` and
``extra["needs_split"] = True``; the prepare stage assigns them a seeded split.

With ``check_images="full"`` each image is read and decoded once, and its record carries
``sha256`` (of the file's bytes) and ``pixels_sha256`` (of the decoded pixels, see
:func:`pixels_sha256`), so that `prepare` need not read it again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator, NamedTuple, Optional

from PIL import Image

from pipeline.config import DEFAULT_MAX_CAPTION_CHARS
from pipeline.data.images import (
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    ImageLocation,
    ShardMember,
    check_image,
    read_image_file,
)
from pipeline.data.manifest import SPLITS, ManifestRecord, RejectsReport
from pipeline.errors import UserError

__all__ = [
    "AnnotationFileError",
    "ImportLimits",
    "REASONS",
    "import_source",
    "import_coco",
    "import_karpathy",
    "import_flickr8k",
    "import_flickr30k",
    "import_table",
    "invisible_character",
    "pixels_sha256",
    "resolve_split",
]

# --------------------------------------------------------------------------- reasons
# Image problems (phrases of ImageDecodeError.reason, plus one for unreadable files).
MISSING_IMAGE = "missing image file"
EMPTY_FILE = "empty file"
TRUNCATED_IMAGE = "truncated image"
NOT_AN_IMAGE = "not an image"
CORRUPT_IMAGE = "corrupt image"
IMAGE_TOO_LARGE = "image too large"
FILE_TOO_LARGE = "file too large"
UNREADABLE_IMAGE = "unreadable image file"  # the OS refused to open it (permissions, I/O error)
# Annotation problems.
EMPTY_CAPTION = "empty caption"
DUPLICATE_CAPTION = "duplicate caption"
CONTROL_CHARACTER = "control character"
INVISIBLE_CHARACTER = "invisible character"
CAPTION_TOO_LONG = "caption too long"
DUPLICATE_ID = "duplicate id"
MALFORMED_ROW = "malformed row"
UNKNOWN_IMAGE_ID = "unknown image id"
NOT_IN_SPLIT_LIST = "not in any split list"
NO_VALID_CAPTIONS = "no valid captions"
OUTSIDE_IMAGES = "path outside the images folder"

REASONS = (
    MISSING_IMAGE, EMPTY_FILE, TRUNCATED_IMAGE, NOT_AN_IMAGE, CORRUPT_IMAGE, IMAGE_TOO_LARGE, FILE_TOO_LARGE,
    UNREADABLE_IMAGE, EMPTY_CAPTION, DUPLICATE_CAPTION, CONTROL_CHARACTER, INVISIBLE_CHARACTER, CAPTION_TOO_LONG,
    DUPLICATE_ID, MALFORMED_ROW, UNKNOWN_IMAGE_ID, NOT_IN_SPLIT_LIST, NO_VALID_CAPTIONS, OUTSIDE_IMAGES,
)

CHECK_MODES = ("full", "header", "none")

# Split names accepted in tables (and Karpathy's restval), mapped to SPLITS.
_SPLIT_ALIASES = {
    "train": "train", "training": "train", "restval": "train",
    "val": "val", "valid": "val", "validation": "val", "dev": "val",
    "test": "test", "testing": "test",
}
_KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}

_SURROGATE = re.compile("[\ud800-\udfff]")  # undecodable bytes (surrogateescape) or lone \u escapes
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # C0/C1 controls (tab and newlines are whitespace, collapsed first)
_NON_ASCII = re.compile("[^\x00-\x7f]")
# Format characters kept: the zero-width joiner and non-joiner are part of how emoji sequences and Persian
# or Indic words are written, and change no reading order.
_JOINERS = frozenset("\u200c\u200d")
PIXEL_HASH_CHUNK = 1 << 20  # pixels_sha256 hashes this many pixels at a time (not one copy of the whole image)


@dataclass(frozen=True)
class ImportLimits:
    """What an import accepts: prepare's ``max_file_bytes``, ``max_pixels`` and ``max_caption_chars`` (the
    defaults are theirs)."""

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS


class AnnotationFileError(UserError, ValueError):
    """An annotation file unusable as a whole. The message is ``file[:line[:col]]: problem``."""

    def __init__(self, file: str | Path, problem: str, line: int | None = None, col: int | None = None) -> None:
        self.file = str(file)
        self.problem = problem
        self.line = line
        self.col = col
        where = self.file + (f":{line}" if line is not None else "") + (f":{col}" if col is not None else "")
        super().__init__(f"{where}: {problem}")


# --------------------------------------------------------------------------- helpers
def _read_text(path: Path, what: str = "annotation file") -> str:
    """The file's text. Undecodable UTF-8 bytes survive as lone surrogates (rejected per item)."""
    path = Path(path)
    if not path.exists():
        raise AnnotationFileError(path, f"{what} not found")
    if not path.is_file():
        raise AnnotationFileError(path, f"{what} is not a file")
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = data.decode("utf-16", errors="surrogateescape")
    else:
        text = data.decode("utf-8-sig", errors="surrogateescape")
    if not text.strip():
        raise AnnotationFileError(path, "empty file")
    return text


def _load_json(path: Path):
    return _parse_json(_read_text(path), path)


def _parse_json(text: str, path: Path):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationFileError(path, f"invalid JSON: {e.msg}", line=e.lineno, col=e.colno) from None
    except RecursionError:
        raise AnnotationFileError(path, "invalid JSON: nested too deeply") from None


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its line ending); splits on \\n only, unlike str.splitlines."""
    for lineno, line in enumerate(text.split("\n"), start=1):
        yield lineno, line[:-1] if line.endswith("\r") else line


def _printable(text: str) -> str:
    """``text`` with lone surrogates (undecodable bytes) spelled ``\\udcff``, so it can be written as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8") if _SURROGATE.search(text) else text


def invisible_character(text: str) -> Optional[str]:
    """The first invisible format character in ``text`` (Unicode category Cf: bidirectional embeddings,
    overrides and isolates U+202A-U+202E and U+2066-U+2069, marks U+200E/U+200F, zero-width spaces U+200B
    and U+FEFF, the word joiner U+2060, tag characters, the soft hyphen), the joiners U+200C/U+200D aside;
    None when it holds none. Such characters reorder what a reader sees or hide differences between two
    captions that look the same."""
    if not _NON_ASCII.search(text):
        return None
    for ch in text:
        if ch > "\x7f" and ch not in _JOINERS and unicodedata.category(ch) == "Cf":
            return ch
    return None


def _clean_caption(raw, max_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> tuple[Optional[str], Optional[str]]:
    """(caption, None) or (None, reject reason)."""
    if raw is None:
        return None, EMPTY_CAPTION
    if not isinstance(raw, str):
        return None, f"{MALFORMED_ROW}: caption is not a string ({type(raw).__name__})"
    if _SURROGATE.search(raw):
        return None, f"{MALFORMED_ROW}: caption is not valid UTF-8"
    caption = " ".join(raw.split())
    if not caption:
        return None, EMPTY_CAPTION
    control = _CONTROL.search(caption)
    if control:
        return None, f"{CONTROL_CHARACTER}: caption contains U+{ord(control.group()):04X}"
    if len(caption) > max_chars:
        return None, f"{CAPTION_TOO_LONG}: {len(caption):,} characters > max_caption_chars {max_chars:,}"
    invisible = invisible_character(caption)
    if invisible is not None:
        name = unicodedata.name(invisible, "format character")
        return None, f"{INVISIBLE_CHARACTER}: caption contains U+{ord(invisible):04X} ({name})"
    return caption, None


def _images_root(folder: Path) -> str:
    """The images folder as an absolute path; an :class:`AnnotationFileError` when it is not a folder."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise AnnotationFileError(folder, "images folder not found" if not root.exists() else
                                  "images folder is a file, not a folder")
    return str(root)


def _join(root: str, *parts: str) -> str:
    return os.path.normpath(os.path.join(root, *parts))


def _outside(path: str, root: str) -> bool:
    """``path`` (absolute, normalised) does not lie inside the folder ``root``."""
    rel = os.path.relpath(path, root)
    return rel == os.pardir or rel.startswith(os.pardir + os.sep)


def _check_args(check_images: str, workers: int) -> None:
    if check_images not in CHECK_MODES:
        raise ValueError(f"check_images must be one of {CHECK_MODES}, not {check_images!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, not {workers!r}")


@dataclass
class _Item:
    """One image being assembled from annotation rows."""

    native_id: str
    path: str  # absolute: the image file, or the tar shard holding it (then ``member`` says where)
    split: Optional[str]  # one of SPLITS, or None: needs a seeded split
    line: Optional[int] = None  # first line mentioning it (line-based formats)
    name: str = ""  # the image path as written in the annotations (Flickr: detects id collisions)
    captions: list[str] = field(default_factory=list)
    rejected: int = 0  # captions rejected
    extra: dict = field(default_factory=dict)
    member: Optional[dict] = None  # {"name", "offset", "size"} of the image inside the tar shard ``path``
    file: Optional[str] = None  # where its captions were read, when not the job's annotation file (a shard)

    def location(self) -> ImageLocation:
        if self.member is None:
            return self.path
        return ShardMember(Path(self.path), self.member["name"], self.member["offset"], self.member["size"])


class _Job:
    """State shared by one import: config, limits, annotation file, images folder, a local rejects report."""

    def __init__(self, cfg, file: Path, images: Path, limits: ImportLimits) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.file = str(file)
        self.root = _images_root(images)
        self.allow_outside = bool(getattr(cfg, "allow_outside_paths", False))
        self.limits = limits
        self.rejects = RejectsReport()  # merged into the caller's only if the import succeeds

    def image_id(self, native_id: str) -> str:
        return f"{self.name}/{native_id}"

    def reject(self, reason: str, *, line: int | None = None, id: str | None = None, file=None) -> None:
        file = self.file if file is None else str(file)
        self.rejects.add(_printable(file), _printable(reason), line=line, id=None if id is None else _printable(id))

    def outside(self, item: _Item) -> Optional[str]:
        """Why ``item``'s image is refused for lying outside the images folder, or None (inside, or the source
        allows it). Its path is resolved first: a symbolic link in the folder to a file outside it leads out
        as surely as ``../`` does."""
        if self.allow_outside:
            return None
        hint = "(set allow_outside_paths: true on the source to accept it)"
        name = item.name or item.path
        if _outside(item.path, self.root):
            return f"{OUTSIDE_IMAGES}: {name} is not inside {self.root} {hint}"
        real = os.path.realpath(item.path)
        if _outside(real, self.root):
            return f"{OUTSIDE_IMAGES}: {name} is a link to {real}, which is not inside {self.root} {hint}"
        return None

    def add_caption(self, item: _Item, raw, *, line: int | None = None, detail: str = "") -> None:
        caption, reason = _clean_caption(raw, self.limits.max_caption_chars)
        if caption is not None and caption in item.captions:
            caption, reason = None, f"{DUPLICATE_CAPTION}: same text as caption {item.captions.index(caption) + 1}"
        if caption is None:
            item.rejected += 1
            if detail:
                reason = f"{reason}: {detail}" if ":" not in reason else f"{reason} ({detail})"
            self.reject(reason, line=line, id=self.image_id(item.native_id), file=item.file)
        else:
            item.captions.append(caption)


def pixels_sha256(img: Image.Image) -> str:
    """sha256 of a decoded image's size and 8-bit RGB pixels: one photo saved as two files (PNG and BMP,
    another PNG compression level) has one digest."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    h = hashlib.sha256(b"%dx%dx3:" % rgb.size)
    width, height = rgb.size
    rows = max(1, PIXEL_HASH_CHUNK // max(1, width))
    for top in range(0, height, rows):  # a band of rows at a time: the same bytes, in order, as tobytes()
        h.update(rgb.crop((0, top, width, min(height, top + rows))).tobytes())
    return h.hexdigest()


class _Checked(NamedTuple):
    problem: Optional[str]  # reject reason, or None: the image is usable
    sha256: Optional[str] = None  # of the file's bytes (full check only)
    pixels: Optional[str] = None  # pixels_sha256 of the decoded image (full check only)


def _check_one(path: ImageLocation, mode: str, limits: ImportLimits) -> _Checked:
    try:
        if mode == "full":  # the one read and decode also gives both digests
            digest, img = read_image_file(path, limits.max_pixels, limits.max_file_bytes)
            return _Checked(None, digest, pixels_sha256(img))
        check_image(path, mode=mode, max_pixels=limits.max_pixels, max_file_bytes=limits.max_file_bytes)
    except ImageDecodeError as e:
        return _Checked(e.reason + (f": {e.detail}" if e.detail else ""))
    except OSError as e:  # open() refused: permissions, I/O error
        return _Checked(f"{UNREADABLE_IMAGE}: {e.strerror or e}")
    except Exception as e:  # a decoder bug on a hostile file must not stop the import
        return _Checked(f"{CORRUPT_IMAGE}: {type(e).__name__}: {e}")
    return _Checked(None)


def _check_all(paths: list[ImageLocation], mode: str, workers: int, limits: ImportLimits) -> list[_Checked]:
    """The check of each path, in order; each unique path is checked once."""
    unique = list(dict.fromkeys(paths))
    if workers <= 1 or len(unique) <= 1:
        results = [_check_one(p, mode, limits) for p in unique]
    else:
        # Chunks keep the per-task overhead small next to a cheap (header/none) check.
        size = max(1, min(64, len(unique) // (workers * 8)))
        chunks = [unique[i : i + size] for i in range(0, len(unique), size)]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="check-image") as pool:
            results = [r for chunk in pool.map(lambda c: [_check_one(p, mode, limits) for p in c], chunks)
                       for r in chunk]
    by_path = dict(zip(unique, results))
    return [by_path[p] for p in paths]


def resolve_split(choice: str, own: Optional[str]) -> Optional[str]:
    """The split a source's ``split`` option (``choice``: auto, seeded, train, val, test) gives an image
    whose split in the source is ``own``; None: the image takes prepare's seeded split."""
    if choice == "auto":
        return own
    if choice == "seeded":
        return None
    if choice not in SPLITS:
        raise ValueError(f"split must be auto, seeded or one of {SPLITS}, not {choice!r}")
    return choice


def _finish(job: _Job, items: Iterable[_Item], rejects: RejectsReport, check_images: str, workers: int) -> list[ManifestRecord]:
    """Reject images without captions or with bad files; build sorted records (splits per the source's
    ``split`` option); merge rejects."""
    choice = getattr(job.cfg, "split", "auto")
    ready: list[_Item] = []
    for item in sorted(items, key=lambda it: job.image_id(it.native_id)):
        outside = job.outside(item)
        if outside is not None:
            job.reject(outside, line=item.line, id=job.image_id(item.native_id))
        elif not item.captions:
            detail = f"all {item.rejected} captions rejected" if item.rejected else "no captions"
            job.reject(f"{NO_VALID_CAPTIONS}: {detail}", line=item.line, id=job.image_id(item.native_id),
                       file=item.file)
        elif _SURROGATE.search(item.path) or _SURROGATE.search(item.native_id):
            job.reject(f"{MALFORMED_ROW}: image name is not valid UTF-8", line=item.line, id=job.image_id(item.native_id))
        elif _CONTROL.search(item.path):
            job.reject(f"{MALFORMED_ROW}: image name contains a control character", line=item.line,
                       id=job.image_id(item.native_id))
        else:
            ready.append(item)
    checks = _check_all([it.location() for it in ready], check_images, workers, job.limits)
    records = []
    for item, checked in zip(ready, checks):
        image_id = job.image_id(item.native_id)
        if checked.problem is not None:
            job.reject(checked.problem, id=image_id, file=str(item.location()))
            continue
        extra = {"native_id": item.native_id, **item.extra}
        split = resolve_split(choice, item.split)
        if split is None:
            split = "train"
            extra["needs_split"] = True
        assert split in SPLITS
        records.append(ManifestRecord(image_id=image_id, path=item.path, captions=item.captions,
                                      split=split, source=job.name, extra=extra, sha256=checked.sha256,
                                      pixels_sha256=checked.pixels, member=item.member))
    rejects.extend(job.rejects)
    return records


def _valid_id(value) -> bool:
    """An id usable as a key: an int (not a bool) or a non-blank string."""
    kind = type(value)
    if kind is int:
        return True
    if kind is str:
        return value.strip() != ""
    return isinstance(value, (int, str)) and not isinstance(value, bool) and str(value).strip() != ""


# --------------------------------------------------------------------------- COCO
def _split_from_name(filename: str) -> Optional[str]:
    """``captions_train2017.json`` -> train, ``captions_val2014.json`` -> val; else None (ambiguous too).

    The split of ``split: auto``: a val file puts every image in val (``split: seeded`` splits it)."""
    name = filename.lower()
    has_train, has_val, has_test = "train" in name, "val" in name, "test" in name
    if has_train and not has_val and not has_test:
        return "train"
    if has_val and not has_train and not has_test:
        return "val"
    if has_test and not has_train and not has_val:
        return "test"
    return None


def import_coco(cfg, rejects: RejectsReport, *, check_images: str = "full", workers: int = 2,
                limits: ImportLimits = ImportLimits()) -> list[ManifestRecord]:
    """COCO captions JSON: ``images`` [{id, file_name}], ``annotations`` [{image_id, id, caption}]."""
    _check_args(check_images, workers)
    path = Path(cfg.annotations)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise AnnotationFileError(path, f"expected a JSON object with 'images' and 'annotations', got a {type(data).__name__}")
    missing = [k for k in ("images", "annotations") if k not in data]
    if missing:
        karpathy = missing == ["annotations"] and "dataset" in data
        hint = " (this looks like a Karpathy split file: use kind 'karpathy')" if karpathy else ""
        raise AnnotationFileError(path, "missing top-level key " + ", ".join(repr(k) for k in missing) + hint)
    for key in ("images", "annotations"):
        if not isinstance(data[key], list):
            raise AnnotationFileError(path, f"top-level {key!r} must be a list, got a {type(data[key]).__name__}")

    job = _Job(cfg, path, cfg.images, limits)
    split = _split_from_name(path.name)  # the file's own; the source's `split` option applies in _finish
    items: dict[str, _Item] = {}
    for idx, entry in enumerate(data["images"]):
        if not isinstance(entry, dict):
            job.reject(f"{MALFORMED_ROW}: images[{idx}] is not an object", id=f"images[{idx}]")
            continue
        iid = entry.get("id")
        if not _valid_id(iid):
            job.reject(f"{MALFORMED_ROW}: images[{idx}] has no valid 'id'", id=f"images[{idx}]")
            continue
        key = str(iid).strip()
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not file_name.strip():
            job.reject(f"{MALFORMED_ROW}: image {key} has no 'file_name'", id=job.image_id(key))
            continue
        if key in items:
            job.reject(f"{DUPLICATE_ID}: image {key} listed again in 'images' (images[{idx}])", id=job.image_id(key))
            continue
        items[key] = _Item(native_id=key, path=_join(job.root, file_name.strip()), split=split,
                           name=file_name.strip())

    seen_annotations: set[str] = set()
    for idx, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            job.reject(f"{MALFORMED_ROW}: annotations[{idx}] is not an object", id=f"annotations[{idx}]")
            continue
        aid = ann.get("id")
        aid_ok = _valid_id(aid)
        label = f"annotation {aid}" if aid_ok else f"annotations[{idx}]"
        absent = [k for k in ("image_id", "caption") if k not in ann]
        if absent:
            known = "image_id" in ann and _valid_id(ann["image_id"])
            where = job.image_id(str(ann["image_id"])) if known else f"annotations[{idx}]"
            job.reject(f"{MALFORMED_ROW}: {label} is missing key " + ", ".join(repr(k) for k in absent), id=where)
            continue
        img = ann["image_id"]
        img_ok = _valid_id(img)
        item = items.get(str(img).strip()) if img_ok else None
        if item is None:
            where = job.image_id(str(img).strip()) if img_ok else f"annotations[{idx}]"
            job.reject(f"{UNKNOWN_IMAGE_ID}: {label} refers to image {img!r}", id=where)
            continue
        if aid_ok:
            akey = str(aid).strip()
            if akey in seen_annotations:
                item.rejected += 1
                job.reject(f"{DUPLICATE_ID}: annotation {aid} repeated (annotations[{idx}])", id=job.image_id(item.native_id))
                continue
            seen_annotations.add(akey)
        job.add_caption(item, ann["caption"], detail=label)
    return _finish(job, items.values(), rejects, check_images, workers)


# --------------------------------------------------------------------------- Karpathy
def import_karpathy(cfg, rejects: RejectsReport, *, check_images: str = "full", workers: int = 2,
                    limits: ImportLimits = ImportLimits()) -> list[ManifestRecord]:
    """Karpathy split JSON (``dataset_{coco,flickr8k,flickr30k}.json``); ``restval`` counts as train."""
    _check_args(check_images, workers)
    path = Path(cfg.annotations)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise AnnotationFileError(path, f"expected a JSON object with 'images', got a {type(data).__name__}")
    if "images" not in data:
        raise AnnotationFileError(path, "missing top-level key 'images'")
    if not isinstance(data["images"], list):
        raise AnnotationFileError(path, f"top-level 'images' must be a list, got a {type(data['images']).__name__}")
    if "annotations" in data and data["images"] and isinstance(data["images"][0], dict) and "sentences" not in data["images"][0]:
        raise AnnotationFileError(path, "images have no 'sentences' (this looks like a COCO captions file: use kind 'coco')")

    job = _Job(cfg, path, cfg.images, limits)
    items: dict[str, _Item] = {}
    for idx, entry in enumerate(data["images"]):
        if not isinstance(entry, dict):
            job.reject(f"{MALFORMED_ROW}: images[{idx}] is not an object", id=f"images[{idx}]")
            continue
        filename = entry.get("filename")
        if not isinstance(filename, str) or not filename.strip():
            job.reject(f"{MALFORMED_ROW}: images[{idx}] has no 'filename'", id=f"images[{idx}]")
            continue
        filename = filename.strip()
        cocoid = entry.get("cocoid")
        native = str(cocoid).strip() if _valid_id(cocoid) else PurePosixPath(filename).stem
        image_id = job.image_id(native)
        raw_split = entry.get("split")
        split = _KARPATHY_SPLITS.get(raw_split) if isinstance(raw_split, str) else None
        if split is None:
            job.reject(f"{MALFORMED_ROW}: unknown split {raw_split!r} (expected train, val, test or restval)", id=image_id)
            continue
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            job.reject(f"{MALFORMED_ROW}: 'sentences' is missing or not a list", id=image_id)
            continue
        if native in items:
            job.reject(f"{DUPLICATE_ID}: image {native} listed again (images[{idx}])", id=image_id)
            continue
        filepath = entry.get("filepath")
        parts = [filepath.strip()] if isinstance(filepath, str) and filepath.strip() else []
        item = _Item(native_id=native, path=_join(job.root, *parts, filename), split=split,
                     name="/".join([*parts, filename]))
        if raw_split == "restval":
            item.extra["karpathy_split"] = "restval"
        for sidx, sent in enumerate(sentences):
            sid = sent.get("sentid", sidx) if isinstance(sent, dict) else sidx
            if not isinstance(sent, dict) or "raw" not in sent:
                item.rejected += 1
                job.reject(f"{MALFORMED_ROW}: sentence {sid} has no 'raw'", id=image_id)
                continue
            job.add_caption(item, sent["raw"], detail=f"sentence {sid}")
        items[native] = item
    return _finish(job, items.values(), rejects, check_images, workers)


# --------------------------------------------------------------------------- Flickr
class _FlickrRows:
    """Collects (image name, comment number, caption) rows of the Flickr formats."""

    def __init__(self, job: _Job) -> None:
        self.job = job
        self.items: dict[str, _Item] = {}  # by native id (file name stem)
        self.numbers: dict[tuple[str, int], int] = {}  # (name, comment number) -> line

    def add(self, lineno: int, name: str, number: Optional[int], caption: str) -> None:
        job = self.job
        native = PurePosixPath(name).stem or name
        item = self.items.get(native)
        if item is not None and item.name != name:
            job.reject(f"{DUPLICATE_ID}: {name!r} has the same id as {item.name!r} (line {item.line})",
                       line=lineno, id=job.image_id(native))
            return
        if number is not None:
            first = self.numbers.get((name, number))
            if first is not None:
                if item is not None:
                    item.rejected += 1
                job.reject(f"{DUPLICATE_ID}: {name}#{number} already on line {first}", line=lineno, id=job.image_id(native))
                return
            self.numbers[(name, number)] = lineno
        if item is None:
            item = self.items[native] = _Item(native_id=native, path=_join(job.root, name), split=None,
                                              line=lineno, name=name)
        job.add_caption(item, caption, line=lineno)

    def malformed(self, lineno: int, detail: str, name: str = "") -> None:
        native = PurePosixPath(name).stem if name else ""
        self.job.reject(f"{MALFORMED_ROW}: {detail}", line=lineno, id=self.job.image_id(native) if native else None)


def _parse_number(rows: _FlickrRows, lineno: int, name: str, text: str) -> Optional[int]:
    try:
        return int(text.strip())
    except ValueError:
        rows.malformed(lineno, f"comment number {text.strip()!r} is not an integer", name)
        return None


def _parse_token_lines(text: str, rows: _FlickrRows) -> None:
    """``name.jpg#N<TAB>caption`` lines (Flickr8k.token.txt, Flickr30k results_20130124.token)."""
    for lineno, line in _lines(text):
        if not line.strip():
            continue
        left, tab, caption = line.partition("\t")
        if not tab:
            rows.malformed(lineno, "expected 'name.jpg#N<TAB>caption'")
            continue
        name, hash_, number = left.strip().rpartition("#")
        name = name.strip()
        if not hash_ or not name:
            rows.malformed(lineno, f"expected 'name.jpg#N' before the tab, got {left.strip()!r}")
            continue
        n = _parse_number(rows, lineno, name, number)
        if n is not None:
            rows.add(lineno, name, n, caption)


def _csv_rows(text: str, path: Path, **fmt) -> Iterator[tuple[int, list[str]]]:
    """(first line of the row, fields) of a CSV text, skipping blank lines."""
    reader = csv.reader(io.StringIO(text, newline=""), **fmt)
    end = 0
    while True:
        start = end + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise AnnotationFileError(path, f"unreadable CSV: {e}", line=reader.line_num or start) from None
        end = reader.line_num
        if not row or all(not c.strip() for c in row):
            continue
        yield start, row


def _header(line: str, sep: str) -> list[str]:
    return [c.strip().lower() for c in line.split(sep)]


def _first_line(text: str) -> tuple[int, str]:
    for lineno, line in _lines(text):
        if line.strip():
            return lineno, line
    return 1, ""


def import_flickr8k(cfg, rejects: RejectsReport, *, check_images: str = "full", workers: int = 2,
                    limits: ImportLimits = ImportLimits()) -> list[ManifestRecord]:
    """Flickr8k captions, Kaggle ``captions.txt`` (CSV ``image,caption``) or ``Flickr8k.token.txt``."""
    _check_args(check_images, workers)
    path = Path(cfg.captions)
    text = _read_text(path)
    job = _Job(cfg, path, cfg.images, limits)
    rows = _FlickrRows(job)
    first_no, first = _first_line(text)
    if _header(first, ",") == ["image", "caption"]:
        for lineno, row in _csv_rows(text, path):
            if lineno == first_no:
                continue  # the header
            if len(row) != 2:
                rows.malformed(lineno, f"expected 2 columns (image,caption), got {len(row)}", row[0].strip())
                continue
            name = row[0].strip()
            if not name:
                rows.malformed(lineno, "empty image name")
                continue
            rows.add(lineno, name, None, row[1])
    elif "\t" in first and "#" in first.split("\t", 1)[0]:
        _parse_token_lines(text, rows)
    else:
        raise AnnotationFileError(
            path,
            "not a Flickr8k captions file: expected a header 'image,caption' (Kaggle captions.txt) "
            f"or 'name.jpg#N<TAB>caption' lines (Flickr8k.token.txt), got {first[:80]!r}",
            line=first_no,
        )

    items = list(rows.items.values())
    if cfg.split_lists is not None:
        assigned = _read_flickr8k_split_lists(Path(cfg.split_lists), job)
        kept = []
        for item in items:
            split = assigned.get(item.name)
            if split is None:
                job.reject(NOT_IN_SPLIT_LIST, line=item.line, id=job.image_id(item.native_id))
                continue
            item.split = split
            kept.append(item)
        items = kept
    return _finish(job, items, rejects, check_images, workers)


FLICKR8K_SPLIT_FILES = (
    ("train", "Flickr_8k.trainImages.txt"),
    ("val", "Flickr_8k.devImages.txt"),
    ("test", "Flickr_8k.testImages.txt"),
)


def _read_flickr8k_split_lists(folder: Path, job: _Job) -> dict[str, str]:
    """Image file name -> split, from ``Flickr_8k.{train,dev,test}Images.txt`` (dev -> val).

    Files absent from the folder are skipped (their images then fall in no list); an
    image listed in two lists keeps its first and the repeat is rejected.
    """
    if not folder.is_dir():
        raise AnnotationFileError(folder, "split list folder not found")
    found = [(split, folder / fname) for split, fname in FLICKR8K_SPLIT_FILES if (folder / fname).is_file()]
    if not found:
        raise AnnotationFileError(folder, "no split lists found (expected " + ", ".join(f for _, f in FLICKR8K_SPLIT_FILES) + ")")
    assigned: dict[str, tuple[str, str, int]] = {}
    for split, list_path in found:
        for lineno, line in _lines(_read_text(list_path, "split list")):
            name = line.strip()
            if not name:
                continue
            if name in assigned:
                prev_split, prev_file, prev_line = assigned[name]
                job.reject(f"{DUPLICATE_ID}: {name} already listed in {Path(prev_file).name}:{prev_line} ({prev_split})",
                           line=lineno, id=job.image_id(PurePosixPath(name).stem), file=str(list_path))
                continue
            assigned[name] = (split, str(list_path), lineno)
    return {name: v[0] for name, v in assigned.items()}


def import_flickr30k(cfg, rejects: RejectsReport, *, check_images: str = "full", workers: int = 2,
                     limits: ImportLimits = ImportLimits()) -> list[ManifestRecord]:
    """Flickr30k ``results.csv`` (``image_name| comment_number| comment``); also reads the ``.token`` form.

    A ``|`` inside a caption is kept (the line is split on the first two only).
    """
    _check_args(check_images, workers)
    path = Path(cfg.captions)
    text = _read_text(path)
    job = _Job(cfg, path, cfg.images, limits)
    rows = _FlickrRows(job)
    first_no, first = _first_line(text)
    if _header(first, "|") == ["image_name", "comment_number", "comment"]:
        for lineno, line in _lines(text):
            if lineno <= first_no or not line.strip():
                continue
            parts = line.split("|", 2)
            if len(parts) != 3:
                rows.malformed(lineno, f"expected 3 '|'-separated columns, got {len(parts)}", parts[0].strip())
                continue
            name = parts[0].strip()
            if not name:
                rows.malformed(lineno, "empty image name")
                continue
            n = _parse_number(rows, lineno, name, parts[1])
            if n is not None:
                rows.add(lineno, name, n, parts[2])
    elif "\t" in first and "#" in first.split("\t", 1)[0]:
        _parse_token_lines(text, rows)
    else:
        raise AnnotationFileError(
            path,
            f"missing header 'image_name| comment_number| comment' (Flickr30k results.csv), got {first[:80]!r}",
            line=first_no,
        )
    return _finish(job, rows.items.values(), rejects, check_images, workers)


# --------------------------------------------------------------------------- generic tables
_TableRow = tuple[Optional[int], Optional[str], Optional[dict], str]


def _table_rows_csv(text: str, path: Path, cfg, delimiter: str) -> Iterator[_TableRow]:
    """(line, None, {column: value} or None, reject detail) per data row."""
    fmt = {"delimiter": delimiter}
    if delimiter == "\t":
        fmt["quoting"] = csv.QUOTE_NONE  # TSV has no quoting: a quote is part of the text
    rows = _csv_rows(text, path, **fmt)
    first = next(rows, None)
    if first is None:
        raise AnnotationFileError(path, "no header row")
    header_line, header = first
    header = [h.strip() for h in header]
    wanted = [cfg.image_column, cfg.caption_column] + ([cfg.split_column] if cfg.split_column else [])
    absent = [c for c in wanted if c not in header]
    if absent:
        raise AnnotationFileError(
            path, "missing required column " + ", ".join(repr(c) for c in absent) + f" (header: {', '.join(header)})",
            line=header_line,
        )
    for lineno, row in rows:
        if len(row) != len(header):
            yield lineno, None, None, f"expected {len(header)} columns, got {len(row)}"
            continue
        yield lineno, None, dict(zip(header, row)), ""


def _table_rows_jsonl(text: str, path: Path) -> Iterator[_TableRow]:
    """(line, None, object or None, reject detail) per JSON line; a JSON array: (None, "[i]", ...)."""
    if text.lstrip().startswith("["):  # a .json file holding one array of objects: rows named "[i]"
        data = _parse_json(text, path)
        for idx, obj in enumerate(data):
            if isinstance(obj, dict):
                yield None, f"[{idx}]", obj, ""
            else:
                yield None, f"[{idx}]", None, f"not a JSON object ({type(obj).__name__})"
        return
    parsed = 0
    first_error = None
    for lineno, line in _lines(text):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            first_error = first_error or (lineno, e)
            yield lineno, None, None, f"invalid JSON: {e.msg} (column {e.colno})"
            continue
        except RecursionError:  # e.g. '[' * 1200: a hostile line, not a crash
            yield lineno, None, None, "invalid JSON: nested too deeply"
            continue
        parsed += 1
        if not isinstance(obj, dict):
            yield lineno, None, None, f"not a JSON object ({type(obj).__name__})"
            continue
        yield lineno, None, obj, ""
    if parsed == 0 and first_error is not None:
        lineno, e = first_error
        raise AnnotationFileError(path, f"not JSON Lines: no line is valid JSON (first: {e.msg})", line=lineno, col=e.colno)


def import_table(cfg, rejects: RejectsReport, *, check_images: str = "full", workers: int = 2,
                 limits: ImportLimits = ImportLimits()) -> list[ManifestRecord]:
    """A CSV/TSV (header row) or JSON Lines table of image path + caption (+ optional split).

    Rows naming the same image file merge into one record, captions in row order.
    Image paths are relative to ``cfg.images`` (default: the table's folder) unless absolute, and must
    stay inside it unless ``cfg.allow_outside_paths``; the native id is that path relative to the root
    (or the absolute path outside it).
    """
    _check_args(check_images, workers)
    path = Path(cfg.path)
    ext = path.suffix.lower()
    if ext not in (".csv", ".tsv", ".jsonl", ".ndjson", ".json"):
        raise AnnotationFileError(path, f"unsupported table format {ext or '(no extension)'!r}: use .csv, .tsv, .jsonl or .json")
    text = _read_text(path, "table")
    job = _Job(cfg, path, cfg.images if cfg.images is not None else path.expanduser().resolve().parent, limits)
    root = job.root
    if ext in (".csv", ".tsv"):
        row_iter = _table_rows_csv(text, path, cfg, "\t" if ext == ".tsv" else ",")
    else:
        row_iter = _table_rows_jsonl(text, path)

    items: dict[str, _Item] = {}  # by absolute path
    wanted = [cfg.image_column, cfg.caption_column]
    complete_rows = 0
    first_object: Optional[tuple[Optional[int], Optional[str], dict]] = None
    for line, where, row, problem in row_iter:
        if row is None:
            job.reject(f"{MALFORMED_ROW}: {problem}", line=line, id=where)
            continue
        first_object = first_object or (line, where, row)
        absent = [k for k in wanted if k not in row]
        if absent:
            job.reject(f"{MALFORMED_ROW}: missing key " + ", ".join(repr(k) for k in absent), line=line, id=where)
            continue
        complete_rows += 1
        image = row[cfg.image_column]
        if not isinstance(image, str) or not image.strip():
            job.reject(f"{MALFORMED_ROW}: empty or non-string {cfg.image_column!r}", line=line, id=where)
            continue
        image = image.strip()
        abs_path = _join(root, image)
        native = abs_path if _outside(abs_path, root) else Path(os.path.relpath(abs_path, root)).as_posix()
        image_id = job.image_id(native)

        split = None
        raw_split = row.get(cfg.split_column) if cfg.split_column else None
        if raw_split is not None and not (isinstance(raw_split, str) and not raw_split.strip()):
            split = _SPLIT_ALIASES.get(raw_split.strip().lower()) if isinstance(raw_split, str) else None
            if split is None:
                job.reject(f"{MALFORMED_ROW}: unknown split {raw_split!r}", line=line, id=image_id)
                continue

        item = items.get(abs_path)
        if item is None:
            item = items[abs_path] = _Item(native_id=native, path=abs_path, split=split, line=line, name=image)
        elif split is not None:
            if item.split is None:
                item.split = split  # earlier rows left it blank
            elif item.split != split:
                item.rejected += 1
                job.reject(f"{MALFORMED_ROW}: split {raw_split!r} conflicts with {item.split!r} given earlier", line=line,
                           id=image_id)
                continue
        job.add_caption(item, row[cfg.caption_column], line=line)
    if complete_rows == 0 and first_object is not None:
        # Like a CSV header without the columns: most likely image_column/caption_column are wrong.
        line, where, row = first_object
        absent = [k for k in wanted if k not in row]
        raise AnnotationFileError(
            path, "no row has key " + ", ".join(repr(k) for k in absent)
            + f" (keys of the first {'row ' + where if where else 'row'}: {', '.join(map(str, row)) or 'none'})",
            line=line,
        )
    return _finish(job, items.values(), rejects, check_images, workers)


# --------------------------------------------------------------------------- dispatch
def _import_img2dataset(cfg, rejects: RejectsReport, **kwargs) -> list[ManifestRecord]:
    from pipeline.data.img2dataset import import_img2dataset  # it builds on this module's helpers

    return import_img2dataset(cfg, rejects, **kwargs)


IMPORTERS: dict[str, Callable[..., list[ManifestRecord]]] = {
    "coco": import_coco,
    "karpathy": import_karpathy,
    "flickr8k": import_flickr8k,
    "flickr30k": import_flickr30k,
    "table": import_table,
    "img2dataset": _import_img2dataset,
}


def import_source(source_cfg, rejects: RejectsReport, *, check_images: str = "full", workers: int = 2,
                  limits: ImportLimits = ImportLimits()) -> list[ManifestRecord]:
    """Import one configured source into manifest records (sorted by ``image_id``).

    Per-item problems go to ``rejects``; an unusable annotation file raises
    :class:`AnnotationFileError` (and adds nothing to ``rejects``).
    """
    kind = getattr(source_cfg, "kind", None)
    importer = IMPORTERS.get(kind)
    if importer is None:
        raise ValueError(f"no importer for source kind {kind!r} (importers: {', '.join(IMPORTERS)})")
    return importer(source_cfg, rejects, check_images=check_images, workers=workers, limits=limits)
