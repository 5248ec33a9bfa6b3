"""`pipeline download`: fetch a public captioning dataset and unpack it into the layout `prepare` reads.

For users who are online. Nothing in the default DAG or the tests reaches these hosts (the tests serve
their own archives from a loopback server through ``mirror`` and their own catalogue entries).

:data:`CATALOGUE` names each dataset's files (URL, and size and sha256 where a record of them is
published, else ``None``) and the paths each archive unpacks that the dataset's ``prepare`` sources
read. :func:`download` fetches the files a folder does not hold yet and returns those sources. Under
``--to DIR``::

    DIR/archives/FILE.part        a transfer in progress: a rerun resumes it (HTTP ``Range: bytes=N-``)
    DIR/archives/FILE.part.json   the server's validator (ETag / Last-Modified), sent as ``If-Range`` so
                                  a file changed upstream is restarted rather than spliced
    DIR/archives/FILE             complete and verified; deleted once unpacked unless ``keep_archives``
    DIR/archives/FILE.corrupt     complete, but its size or sha256 (or the archive itself) is wrong: kept
                                  for inspection, never unpacked; a rerun downloads the file afresh
    DIR/archives/FILE.done        unpacked (url, size, sha256): a rerun skips the file
    DIR/...                       the dataset's own folders (``train2017/``, ``annotations/``, ...)

Verification: the size the catalogue records (else the server's ``Content-Length``), then the sha256
where one is recorded; a file without a published digest is still checked by its archive's own
CRC-32s while it is unpacked, and its computed sha256 is written to ``FILE.done``. A transfer cut short
is retried (resuming) ``retries`` times, then is an error that keeps ``FILE.part`` for the next run.
Every failure a user can meet (unknown name, unreachable host, HTTP error, checksum mismatch, disk
full, unwritable folder) is a :class:`DownloadError` naming the file or URL and what to do.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import http.client
import json
import logging
import os
import shlex
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from cache.format import file_sha256
from pipeline.data.importers import FLICKR8K_SPLIT_FILES
from pipeline.errors import UserError
from pipeline.files import output_lock, write_json
from pipeline.progress import progress

log = logging.getLogger(__name__)

USER_AGENT = "captioning-pipeline-download/1"
CHUNK = 1 << 20
ARCHIVES = "archives"  # the sub-folder of DIR that holds archives, partial transfers and markers


# --------------------------------------------------------------------------- errors
class DownloadError(UserError, RuntimeError):
    """A download that cannot go on; the message names the file or URL and what to do."""


class UnknownDatasetError(DownloadError, ValueError):
    """A dataset (or file of one) that the catalogue does not hold."""


class UnreachableError(DownloadError):
    """No connection to the host (DNS, refused, timed out)."""


class HTTPDownloadError(DownloadError):
    """The server answered with an HTTP error."""


class TransferInterruptedError(DownloadError):
    """The connection kept dropping; the partial file is kept for the next run."""


class ChecksumError(DownloadError):
    """A complete file whose size or sha256 is not the recorded one (set aside, never unpacked)."""


class ArchiveError(DownloadError):
    """An archive that is corrupt, holds an unsafe path, or lacks a path the dataset's sources read."""


class DiskFullError(DownloadError):
    """Not enough free space for a transfer or an unpack."""


class DestinationError(DownloadError):
    """The destination folder cannot be created or written."""


class ArchivesAtHandError(DownloadError):
    """``--archives DIR`` names a folder that does not hold the archives."""


# --------------------------------------------------------------------------- catalogue
@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset: where it is, what it must be, and what it unpacks that `prepare` reads."""

    url: str
    provides: tuple[str, ...]  # paths relative to DIR (files or folders) that unpacking must create
    size: int | None = None  # bytes, where a record is published; else the server's Content-Length
    sha256: str | None = None  # where published; else None (the archive's CRC-32s still apply)

    @property
    def name(self) -> str:
        return PurePosixPath(urlsplit(self.url).path).name


@dataclass(frozen=True)
class Dataset:
    name: str
    description: str
    homepage: str  # where its terms of use are
    files: tuple[RemoteFile, ...]
    sources: Callable[[Path], list[dict]]  # the `prepare` sources a folder holding it supports
    checksums: str  # where sizes and digests come from, or why there are none
    hint: str = ""  # what to do when `sources` finds nothing (e.g. images still to fetch)

    @property
    def size(self) -> int | None:
        sizes = [f.size for f in self.files]
        return None if None in sizes else sum(sizes)


FLICKR8K_IMAGES = "Flicker8k_Dataset"  # upstream's spelling
FLICKR8K_TOKENS = "Flickr8k.token.txt"
_TFDS = ("sizes and sha256 as recorded by TensorFlow Datasets (tensorflow_datasets/url_checksums/coco.txt); "
         "COCO itself publishes none")
_COCO = "http://images.cocodataset.org"


def _coco_sources(year: int) -> Callable[[Path], list[dict]]:
    def sources(root: Path) -> list[dict]:
        out = []
        for split in ("train", "val"):
            annotations, images = root / "annotations" / f"captions_{split}{year}.json", root / f"{split}{year}"
            if annotations.is_file() and images.is_dir():
                out.append({"kind": "coco", "name": f"coco{year}", "annotations": str(annotations),
                            "images": str(images)})
        return out

    return sources


def _karpathy_sources(root: Path) -> list[dict]:
    out = []
    if (root / "dataset_coco.json").is_file() and all((root / d).is_dir() for d in ("train2014", "val2014")):
        out.append({"kind": "karpathy", "name": "coco_karpathy", "annotations": str(root / "dataset_coco.json"),
                    "images": str(root)})
    if (root / "dataset_flickr8k.json").is_file() and (root / FLICKR8K_IMAGES).is_dir():
        out.append({"kind": "karpathy", "name": "flickr8k_karpathy",
                    "annotations": str(root / "dataset_flickr8k.json"), "images": str(root / FLICKR8K_IMAGES)})
    return out


def _flickr8k_sources(root: Path) -> list[dict]:
    captions, images = root / FLICKR8K_TOKENS, root / FLICKR8K_IMAGES
    if not (captions.is_file() and images.is_dir()):
        return []
    source = {"kind": "flickr8k", "name": "flickr8k", "captions": str(captions), "images": str(images)}
    if any((root / name).is_file() for _, name in FLICKR8K_SPLIT_FILES):
        source["split_lists"] = str(root)
    return [source]


CATALOGUE: dict[str, Dataset] = {
    "coco2014": Dataset(
        name="coco2014",
        description="COCO 2014 train/val images (83k/41k) and captions; Karpathy's splits use these images",
        homepage="https://cocodataset.org/#termsofuse",
        files=(
            RemoteFile(f"{_COCO}/annotations/annotations_trainval2014.zip",
                       ("annotations/captions_train2014.json", "annotations/captions_val2014.json"),
                       252872794, "031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009"),
            RemoteFile(f"{_COCO}/zips/val2014.zip", ("val2014",),
                       6645013297, "fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0"),
            RemoteFile(f"{_COCO}/zips/train2014.zip", ("train2014",),
                       13510573713, "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775"),
        ),
        sources=_coco_sources(2014),
        checksums=_TFDS,
    ),
    "coco2017": Dataset(
        name="coco2017",
        description="COCO 2017 train/val images (118k/5k) and captions",
        homepage="https://cocodataset.org/#termsofuse",
        files=(
            RemoteFile(f"{_COCO}/annotations/annotations_trainval2017.zip",
                       ("annotations/captions_train2017.json", "annotations/captions_val2017.json"),
                       252907541, "113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268"),
            RemoteFile(f"{_COCO}/zips/val2017.zip", ("val2017",),
                       815585330, "4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05"),
            RemoteFile(f"{_COCO}/zips/train2017.zip", ("train2017",),
                       19336861798, "69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929"),
        ),
        sources=_coco_sources(2017),
        checksums=_TFDS,
    ),
    "karpathy": Dataset(
        name="karpathy",
        description="Karpathy & Fei-Fei's split files (dataset_{coco,flickr8k,flickr30k}.json); download into "
                    "the folder of the coco2014 or flickr8k images",
        homepage="https://cs.stanford.edu/people/karpathy/deepimagesent/",
        files=(
            RemoteFile("https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
                       ("dataset_coco.json", "dataset_flickr8k.json")),
        ),
        sources=_karpathy_sources,
        checksums="none published: size from the server, integrity from the zip's CRC-32s",
        hint="the split files need their images in the same folder: `pipeline download coco2014 --to DIR` or "
             "`pipeline download flickr8k --to DIR` with the same DIR, then rerun this command for the sources "
             "(nothing is fetched twice)",
    ),
    "flickr8k": Dataset(
        name="flickr8k",
        description="Flickr8k images (8k), Flickr8k.token.txt captions and the standard train/dev/test lists",
        homepage="https://hockenmaier.cs.illinois.edu/8k-pictures.html",
        files=(
            RemoteFile("https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip",
                       (FLICKR8K_TOKENS, *(name for _, name in FLICKR8K_SPLIT_FILES))),
            RemoteFile("https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip",
                       (FLICKR8K_IMAGES,)),
        ),
        sources=_flickr8k_sources,
        checksums="none published (a copy on GitHub releases): size from the server, integrity from the zip's "
                  "CRC-32s",
    ),
}


def get_dataset(name: str, catalogue: Mapping[str, Dataset] | None = None) -> Dataset:
    """The catalogue's entry ``name``; unknown: :class:`UnknownDatasetError` with the closest names."""
    catalogue = CATALOGUE if catalogue is None else catalogue
    if name in catalogue:
        return catalogue[name]
    close = difflib.get_close_matches(name, list(catalogue), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UnknownDatasetError(f"unknown dataset {name!r}; {hint}known: {', '.join(catalogue)} "
                              "(`pipeline download --list`)")


def _select(dataset: Dataset, only: Sequence[str] | None) -> list[RemoteFile]:
    if not only:
        return list(dataset.files)
    by_name = {f.name: f for f in dataset.files}
    for name in only:
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UnknownDatasetError(f"{dataset.name} has no file {name!r}; {hint}its files: {', '.join(by_name)}")
    return [f for f in dataset.files if f.name in set(only)]


# --------------------------------------------------------------------------- transfer
def human_size(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


class _Retry(Exception):
    """A failure worth another attempt; ``final`` is the error to raise when none are left."""

    def __init__(self, final: DownloadError) -> None:
        super().__init__(str(final))
        self.final = final


class _Digest:
    """sha256 of the bytes of a partial file so far, carried across attempts in one process."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.hash, self.count = hashlib.sha256(), 0

    def catch_up(self, part: Path, offset: int, show_progress: bool) -> None:
        """Hash the ``offset`` bytes already in ``part`` (once per process, when resuming a previous run)."""
        if self.count == offset:
            return
        self.reset()
        with open(part, "rb") as f, progress(total=offset, unit="B", unit_scale=True, unit_divisor=1024,
                                             desc=f"hashing {part.name}", disable=not show_progress) as bar:
            while self.count < offset and (block := f.read(min(CHUNK, offset - self.count))):
                self.update(block)
                bar.update(len(block))

    def update(self, block: bytes) -> None:
        self.hash.update(block)
        self.count += len(block)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of ``Content-Range: bytes 100-199/200`` (or ``bytes */200``)."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    first = span.split("-", 1)[0]
    return (int(first) if first.isdigit() else None), (int(total) if total.isdigit() else None)


def _validator(headers) -> str | None:
    """What to send as ``If-Range``: a strong ETag, else Last-Modified."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


def _check_free(folder: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DiskFullError(f"{what}: needs {human_size(need)}, {folder} has {human_size(free)} free; free some "
                            "space (or choose another --to) and rerun (finished work is kept)")


def _write(out, block: bytes, part: Path) -> None:
    try:
        out.write(block)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"{part}: disk full ({e.strerror}); free some space and rerun: the partial "
                                "download is kept and resumes") from None
        raise


def _attempt(url: str, part: Path, size: int | None, digest: _Digest, timeout: float,
             show_progress: bool) -> int:
    """One request, appending to ``part``; returns the file's full size. Raises :class:`_Retry` on a
    transient failure (the bytes received so far stay in ``part``)."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:  # longer than the file can be: not a prefix of it
        offset = 0
    if size is not None and offset == size:
        return size
    response = _request(url, part, offset, digest, timeout)
    if response is None:  # the server has nothing after the partial file's last byte: it is whole
        return offset
    with response:
        offset, total, mode = _resume_point(response, url, part, offset, digest)
        if size is not None and total is not None and total != size:
            raise ChecksumError(f"{url}: the server offers {total} bytes, the catalogue records {size} for "
                                f"{part.name[:-5]}: a different file (check --mirror); nothing was downloaded")
        expected = size if size is not None else total
        if expected is not None:
            _check_free(part.parent, expected - offset, f"downloading {url}")
        if mode == "ab":
            digest.catch_up(part, offset, show_progress)
        offset = _receive(response, url, part, mode, offset, expected, digest, show_progress)
    if expected is not None and offset < expected:
        raise _Retry(TransferInterruptedError(
            f"{url}: connection closed after {offset} of {expected} bytes; the partial file {part} is kept: "
            "rerun the same command to resume"))
    return offset


def _request_headers(url: str, part: Path, offset: int) -> dict[str, str]:
    """No compression; from byte ``offset`` on (``Range``), if the file is still the one ``part`` began with
    (``If-Range``: the validator recorded beside it, for this URL)."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        try:
            recorded = json.loads(_sibling(part, ".json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            recorded = {}
        if recorded.get("url") == url and recorded.get("validator"):
            headers["If-Range"] = recorded["validator"]
    return headers


def _request(url: str, part: Path, offset: int, digest: _Digest, timeout: float):
    """The response to a GET of ``url`` from byte ``offset``; None when the server has nothing after it (416, and
    its size is ``offset``). A partial file longer than the server's is removed (:class:`_Retry`); HTTP errors
    are :class:`HTTPDownloadError` (server failures: :class:`_Retry`); no connection: :class:`_Retry`."""
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=_request_headers(url, part, offset)),
                                      timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:  # nothing after our last byte
            total = _content_range(e.headers.get("Content-Range"))[1]
            if total == offset:
                return None
            part.unlink()  # longer than the server's file: start again
            digest.reset()
            raise _Retry(HTTPDownloadError(f"{url}: the partial file {part} does not fit the server's file")) \
                from None
        transient = e.code >= 500 or e.code in (408, 429)
        problem = HTTPDownloadError(f"{url}: HTTP {e.code} {e.reason}; " + (
            "the server is failing: rerun later (or use --mirror)" if transient else
            "check the URL (or --mirror); the catalogue may be out of date"))
        if transient:
            raise _Retry(problem) from None
        raise problem from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise _Retry(UnreachableError(
            f"cannot reach {urlsplit(url).netloc} ({url}): {reason}; check the connection (behind a proxy: set "
            "https_proxy / http_proxy) or use --mirror")) from None


def _resume_point(response, url: str, part: Path, offset: int, digest: _Digest) -> tuple[int, int | None, str]:
    """Where the response's bytes go: ``(offset, the file's total size or None, file mode)``. 206: appended at
    ``offset`` (a server resuming elsewhere: :class:`_Retry`, from scratch); 200: the whole file, written from
    byte 0, its validator recorded beside ``part`` for the next resume."""
    if response.status == 206:
        first, total = _content_range(response.headers.get("Content-Range"))
        if first != offset:
            part.unlink(missing_ok=True)
            digest.reset()
            raise _Retry(TransferInterruptedError(f"{url}: the server resumed at byte {first}, not {offset}"))
        return offset, total, "ab"
    # 200: the whole file (no Range support, or the file changed since the partial one began)
    if offset:
        log.warning("%s: the server sent the whole file (no resume support, or the file changed "
                    "upstream): starting again", url)
    digest.reset()
    length = response.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    write_json(_sibling(part, ".json"), {"url": url, "validator": _validator(response.headers)})
    return 0, total, "wb"


def _receive(response, url: str, part: Path, mode: str, offset: int, expected: int | None, digest: _Digest,
             show_progress: bool) -> int:
    """The body written to ``part`` (``mode`` ``ab``: after its ``offset`` bytes, ``wb``: over it) and hashed as
    it arrives; returns the offset reached. A connection lost midway: :class:`_Retry`, what arrived kept."""
    with open(part, mode) as out, progress(total=expected, initial=offset, unit="B", unit_scale=True,
                                           unit_divisor=1024, desc=part.name[:-5],
                                           disable=not show_progress) as bar:
        while True:
            try:
                block = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as e:
                raise _Retry(TransferInterruptedError(
                    f"{url}: connection lost after {offset} of {expected or '?'} bytes ({e or type(e).__name__}); "
                    f"the partial file {part} is kept: rerun the same command to resume")) from None
            if not block:
                return offset
            _write(out, block, part)
            digest.update(block)
            offset += len(block)
            bar.update(len(block))


def _set_aside(path: Path) -> Path:
    corrupt = _sibling(path.with_name(path.name.removesuffix(".part")), ".corrupt")
    os.replace(path, corrupt)
    _sibling(path, ".json").unlink(missing_ok=True)
    return corrupt


def _mismatch(size: int | None, sha256: str | None, actual_size: int, actual_sha256: str) -> str | None:
    """How a file differs from its recorded size and sha256 (None: it does not, or nothing is recorded)."""
    if size is not None and actual_size != size:
        return f"size {actual_size} bytes, expected {size}"
    if sha256 is not None and actual_sha256 != sha256.lower():
        return f"sha256 {actual_sha256}, expected {sha256.lower()}"
    return None


def _verify(path: Path, url: str, size: int | None, sha256: str | None, actual_size: int,
            actual_sha256: str) -> None:
    """Raise :class:`ChecksumError` (after setting the file aside as ``.corrupt``) unless it is the recorded one."""
    if problem := _mismatch(size, sha256, actual_size, actual_sha256):
        corrupt = _set_aside(path)
        raise ChecksumError(f"{url}: the downloaded file has {problem}; it is set aside as {corrupt} and not "
                            "unpacked; rerun to download it again (if it fails again, the server or --mirror "
                            "serves a different file)")


def fetch(url: str, path: Path, *, size: int | None = None, sha256: str | None = None, retries: int = 3,
          retry_wait: float = 2.0, timeout: float = 60.0, show_progress: bool = True) -> str:
    """Download ``url`` to ``path`` through ``path.part`` (resumed where a previous run stopped), verify it
    and rename it into place; returns its sha256. A ``path`` already there is verified, not fetched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():  # complete from an earlier run (kept, or its unpacking failed)
        actual = file_sha256(path)
        _verify(path, url, size, sha256, path.stat().st_size, actual)
        return actual
    part = _sibling(path, ".part")
    digest = _Digest()
    failures = 0
    while True:
        try:
            total = _attempt(url, part, size, digest, timeout, show_progress)
            break
        except _Retry as e:
            failures += 1
            if failures > retries:
                raise e.final from None
            wait = retry_wait * 2 ** (failures - 1)
            log.warning("%s; retrying in %.0f s (%d of %d)", str(e).split("; ")[0], wait, failures, retries)
            time.sleep(wait)
    digest.catch_up(part, total, show_progress)  # a part that was already whole when this run began
    _verify(part, url, size, sha256, part.stat().st_size, digest.hash.hexdigest())
    os.replace(part, path)
    _sibling(part, ".json").unlink(missing_ok=True)
    return digest.hash.hexdigest()


# --------------------------------------------------------------------------- unpacking
def _is_junk(parts: Sequence[str]) -> bool:
    """macOS resource forks that zips made on a Mac carry (``__MACOSX/``, ``._name``)."""
    return parts[0] == "__MACOSX" or parts[-1].startswith("._") or parts[-1] == ".DS_Store"


def _parts(name: str) -> list[str]:
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _archive_root(names: Sequence[str], provides: Sequence[str], archive: Path) -> str:
    """The folder inside the archive (``""``: its top) that holds every path of ``provides``."""
    common: set[str] | None = None
    for wanted in provides:
        target = wanted.split("/")
        found = set()
        for name in names:
            parts = _parts(name)
            if not parts or _is_junk(parts):
                continue
            for i in range(len(parts) - len(target) + 1):
                if parts[i:i + len(target)] == target:
                    found.add("/".join(parts[:i]))
        if not found:
            raise ArchiveError(f"{archive}: holds no {wanted!r}, which `prepare` reads; the upstream layout may "
                               "have changed: please report it (the archive is kept)")
        common = found if common is None else common & found
    if not common:
        raise ArchiveError(f"{archive}: {', '.join(provides)} are not in one folder of the archive; please report it")
    return min(common, key=lambda p: (p.count("/"), p))


def _plan(names: Sequence[str], root: str, dest: Path, archive: Path) -> list[tuple[str, Path]]:
    """(member, target) for each member under ``root``, with ``root`` stripped; unsafe paths are refused."""
    plan = []
    for name in names:
        parts = _parts(name)
        if not parts or _is_junk(parts):
            continue
        if name.startswith("/") or ".." in parts or ":" in parts[0]:
            raise ArchiveError(f"{archive}: member {name!r} leads outside the destination; refusing to unpack it")
        if root:
            top = root.split("/")
            if parts[:len(top)] != top:
                continue
            parts = parts[len(top):]
        if parts:
            plan.append((name, dest.joinpath(*parts)))
    return plan


def _copy(src, target: Path, bar) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        while block := src.read(CHUNK):
            _write(out, block, target)
            bar.update(len(block))


def unpack(archive: Path, dest: Path, provides: Sequence[str], *, show_progress: bool = True) -> int:
    """Unpack a zip or tar ``archive`` into ``dest`` so that ``dest/p`` exists for each ``p`` of ``provides``
    (a folder wrapping them inside the archive is stripped); returns the number of files written.

    Zip members are checked against their CRC-32 as they are read. A corrupt archive is set aside as
    ``.corrupt`` (:class:`ArchiveError`); members that would land outside ``dest`` are refused."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                infos = {i.filename: i for i in zf.infolist() if not i.is_dir()}
                plan = _plan(list(infos), _archive_root(list(infos), provides, archive), dest, archive)
                total = sum(infos[name].file_size for name, _ in plan)
                _check_free(dest, total, f"unpacking {archive}")
                with progress(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                              desc=f"unpacking {archive.name}", disable=not show_progress) as bar:
                    for name, target in plan:
                        with zf.open(infos[name]) as src:
                            _copy(src, target, bar)
            return len(plan)
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = {m.name: m.size for m in tf.getmembers() if m.isfile()}
            plan = dict(_plan(list(members), _archive_root(list(members), provides, archive), dest, archive))
            total = sum(members[name] for name in plan)
            _check_free(dest, total, f"unpacking {archive}")
            with tarfile.open(archive, mode="r|*") as tf, \
                    progress(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=f"unpacking {archive.name}", disable=not show_progress) as bar:
                for member in tf:  # streamed in order: no backward seeks in a compressed tar
                    if member.isfile() and member.name in plan:
                        _copy(tf.extractfile(member), plan[member.name], bar)
            return len(plan)
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError) as e:
        corrupt = _set_aside(archive)
        raise ArchiveError(f"{archive}: corrupt archive ({e}); set aside as {corrupt}, nothing from it is used; "
                           "rerun to download it again") from None
    corrupt = _set_aside(archive)
    raise ArchiveError(f"{archive}: neither a zip nor a tar archive; set aside as {corrupt}; rerun to download it "
                       "again (check --mirror)")


# --------------------------------------------------------------------------- the whole dataset
@dataclass
class DownloadResult:
    dataset: Dataset
    root: Path
    sources: list[dict]  # `prepare` sources for what the folder now holds
    fetched: list[str] = field(default_factory=list)  # file names downloaded and unpacked by this run
    skipped: list[str] = field(default_factory=list)  # already unpacked by an earlier run


def _ensure_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / ARCHIVES).mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=root / ARCHIVES):
            pass
    except FileExistsError:
        raise DestinationError(f"{root}: a file is in the way of the destination folder; choose another --to") \
            from None
    except OSError as e:
        raise DestinationError(f"{e.filename or root}: cannot write there ({e.strerror}); choose another --to or "
                               "fix its permissions") from None


def _unpacked(marker: Path, file: RemoteFile, root: Path) -> bool:
    """Whether an earlier run unpacked this file (and its paths are still there)."""
    try:
        done = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if file.sha256 is not None and done.get("sha256") != file.sha256.lower():
        return False
    return all((root / p).exists() for p in file.provides)


def _check_at_hand(local: Path, files: Sequence[RemoteFile]) -> None:
    """``--archives DIR`` means the archives are at hand: a missing folder, or one without some of the files, is
    an :class:`ArchivesAtHandError` naming the folder and the file names looked for (never a download attempt)."""
    if not local.is_dir():
        raise ArchivesAtHandError(f"--archives {local}: no such folder; put the archives there "
                               f"({', '.join(f.name for f in files)}), or leave out --archives to download them")
    missing = [f.name for f in files if not (local / f.name).is_file()]
    if missing:
        present = sorted(p.name for p in local.iterdir() if p.is_file())[:8]
        raise ArchivesAtHandError(f"--archives {local}: {', '.join(missing)} not found there (it holds "
                               f"{', '.join(present) if present else 'no files'}); put them there under these "
                               "names, or leave out --archives to download them")


def mirror_url(file: RemoteFile, mirror: str | None) -> str:
    """The file's URL, or its name under ``mirror`` (a base URL serving the same file names)."""
    return f"{mirror.rstrip('/')}/{file.name}" if mirror else file.url


def download(name: str, to: Path, *, only: Sequence[str] | None = None, mirror: str | None = None,
             local: Path | None = None, keep_archives: bool = False, retries: int = 3, retry_wait: float = 2.0,
             timeout: float = 60.0, show_progress: bool = True,
             catalogue: Mapping[str, Dataset] | None = None) -> DownloadResult:
    """Fetch, verify and unpack dataset ``name`` (or just the files named in ``only``) into ``to``.

    Files an earlier run unpacked are skipped; a transfer an earlier run left behind is resumed. ``local``: a
    folder of archives obtained some other way (offline machines): a file found there under its upstream
    name is verified and unpacked in place of a download, and never deleted. Returns the `prepare` sources
    the folder now supports (:attr:`DownloadResult.sources`)."""
    dataset = get_dataset(name, catalogue)
    files = _select(dataset, only)
    if local is not None:
        _check_at_hand(Path(local), files)
    root = Path(to)
    _ensure_writable(root)
    archives = root / ARCHIVES
    result = DownloadResult(dataset=dataset, root=root, sources=[])
    with output_lock(root):
        for file in files:
            marker = archives / f"{file.name}.done"
            if _unpacked(marker, file, root):
                log.info("%s: already unpacked in %s", file.name, root)
                result.skipped.append(file.name)
                continue
            url = mirror_url(file, mirror)
            given = local is not None and (Path(local) / file.name).is_file()
            if given:  # the user's own copy: checked, never moved or deleted
                path = Path(local) / file.name
                sha256 = file_sha256(path)
                if problem := _mismatch(file.size, file.sha256, path.stat().st_size, sha256):
                    raise ChecksumError(f"{path}: {problem} (the file {url} serves); replace it, or leave out "
                                        "--archives to download it")
                log.info("%s: %s (at hand) -> %s", dataset.name, path, root)
            else:
                path = archives / file.name
                log.info("%s: %s (%s) -> %s", dataset.name, url,
                         human_size(file.size) if file.size is not None else "size from the server", root)
                sha256 = fetch(url, path, size=file.size, sha256=file.sha256, retries=retries,
                               retry_wait=retry_wait, timeout=timeout, show_progress=show_progress)
            size = path.stat().st_size
            count = unpack(path, root, file.provides, show_progress=show_progress)
            write_json(marker, {"url": url, "size": size, "sha256": sha256, "files": count,
                                "sha256_checked": file.sha256 is not None})
            if not (keep_archives or given):
                path.unlink()
            result.fetched.append(file.name)
    result.sources = dataset.sources(root)
    return result


# --------------------------------------------------------------------------- what the CLI prints
def format_catalogue(catalogue: Mapping[str, Dataset] | None = None) -> str:
    catalogue = CATALOGUE if catalogue is None else catalogue
    lines = []
    for dataset in catalogue.values():
        lines.append(f"{dataset.name:10s} {human_size(dataset.size):>10s}  {dataset.description}")
        for file in dataset.files:
            check = "sha256" if file.sha256 else "no published sha256"
            lines.append(f"{'':10s} {human_size(file.size):>10s}    {file.name} ({check})")
        lines.append(f"{'':10s} {'':10s}    terms: {dataset.homepage}; checksums: {dataset.checksums}")
    lines.append("\n`pipeline download NAME --to DIR` fetches (resumable), verifies and unpacks one, then prints its "
                 "`prepare` sources; --only FILE fetches some of its files.")
    return "\n".join(lines)


def format_sources(sources: list[dict]) -> str:
    """The sources as a params.yaml block and as a `pipeline prepare` command line, to paste."""
    import yaml

    block = yaml.safe_dump({"prepare": {"sources": sources}}, sort_keys=False, allow_unicode=True, width=120)
    command = "pipeline prepare --sources " + shlex.quote(json.dumps(sources))
    return f"`prepare` sources, for params.yaml:\n\n{block}\nor on the command line:\n\n{command}\n"
