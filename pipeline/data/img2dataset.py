"""img2dataset's ``webdataset`` output as a `prepare` source, its images read where they lie.

What `img2dataset --output_format webdataset` writes (its ``writer.py``, ``downloader.py`` and ``logger.py``),
per shard ``NNNNN``:

* ``NNNNN.tar``: for each sample downloaded and resized, ``<key>.jpg`` (or ``.png``/``.webp``: its
  ``--encode_format``), ``<key>.txt`` (the caption; empty when the input row had none) and ``<key>.json``
  (url, caption, key, status, error_message, width, height, original_width, original_height, exif and the
  ``--compute_hash`` digest, sha256 by default, of the bytes downloaded, before resizing). ``key`` is the
  shard id and the row's index in it, zero-padded (``000010005``: shard 1, row 5).
* ``NNNNN.parquet``: the same metadata for every input row, failed ones included, whose ``status`` is
  ``success``, ``failed_to_download`` or ``failed_to_resize`` with img2dataset's ``error_message``.
* ``NNNNN_stats.json``: count, successes, failed_to_download, failed_to_resize, ``status_dict`` (how many
  times each error message occurred) and timings.

A sample's image id is ``<source>/<shard>/<key>`` (``cc3m/00001/000010005``): it names its input shard, so
a cache can keep each input shard's images together (:data:`cache.format.SHARD_BY_INPUT_SHARD`).
Images are never unpacked: each record's ``path`` is its shard and ``member`` the image's name, byte offset
and size in it (:class:`pipeline.data.images.ShardMember`), so a stage reads one image with one seek.
Captions come from the ``.txt`` members. What is refused is a reject, never a crash:

* a failed row of the parquet: ``failed_to_download: <error_message>`` / ``failed_to_resize: ...``;
* a sample whose caption is empty or absent (the importers' caption rules apply, as for every source);
* a shard cut short (an interrupted run): the members whose bytes are cut are rejects, the shard gets a
  ``truncated shard`` reject and one warning line, and the members before the cut are imported.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tarfile
from collections import Counter
from pathlib import Path, PurePosixPath

from pipeline.data.importers import (
    MISSING_IMAGE,
    TRUNCATED_IMAGE,
    AnnotationFileError,
    ImportLimits,
    _check_args,
    _finish,
    _Item,
    _Job,
)
from pipeline.data.manifest import ManifestRecord, RejectsReport
from pipeline.progress import progress as progress_bar

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # img2dataset's --encode_format choices (jpg by default)
TRUNCATED_SHARD = "truncated shard"
UNREADABLE_SHARD = "unreadable shard"
UNREADABLE_METADATA = "unreadable shard metadata"
TAR_BLOCK = 512


def shard_files(spec: str | Path) -> tuple[Path, list[Path]]:
    """``(folder, the .tar shards)`` that ``spec`` names: img2dataset's output folder (every ``*.tar`` in it),
    one ``.tar`` file, or a brace pattern such as ``shards/{00000..00331}.tar``. The folder is the one that
    holds them all. Raises :class:`AnnotationFileError` naming what is missing."""
    text = str(spec)
    if "{" in text:
        from braceexpand import braceexpand

        shards = [Path(p).expanduser() for p in braceexpand(text)]
        missing = [p for p in shards if not p.is_file()]
        if missing:
            raise AnnotationFileError(text, f"{len(missing)} of the {len(shards)} shard(s) the pattern names are "
                                      f"not files (first: {missing[0]})")
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            shards = sorted(path.glob("*.tar"))
            if not shards:
                raise AnnotationFileError(path, "no .tar shard in this folder (`img2dataset --output_format "
                                          "webdataset` writes 00000.tar, 00001.tar, ...)")
        elif path.is_file():
            shards = [path]
        else:
            raise AnnotationFileError(path, "img2dataset output not found (give its output folder, a .tar shard, "
                                      "or a pattern such as shards/{00000..00009}.tar)")
    shards = [p.resolve() for p in shards]
    return Path(os.path.commonpath([p.parent for p in shards])), shards


def _sample_key(member_name: str) -> tuple[str, str]:
    """``(key, extension)`` of a member, as webdataset splits it: the extension follows the first dot of the
    file name (``000000012.jpg`` -> ``000000012``, ``jpg``)."""
    path = PurePosixPath(member_name)
    stem, _, ext = path.name.partition(".")
    key = stem if str(path.parent) == "." else f"{path.parent}/{stem}"
    return key, ext.lower()


class _ShardReader:
    """Reads the shards of one source into the import's items, counting img2dataset's statuses."""

    def __init__(self, job: _Job) -> None:
        self.job = job
        self.items: dict[str, _Item] = {}
        self.statuses: Counter = Counter()  # of the parquet rows
        self.expected = 0  # successes the stats files report
        self.truncated: list[str] = []
        self.urls: dict[str, str] = {}  # of the successful rows, by key (from the parquet)
        self.successes: list[str] = []  # keys of the current shard's successful rows (from the parquet)

    def read(self, shard: Path) -> None:
        self.successes = []
        self._read_metadata(shard)
        self._read_stats(shard)
        self._read_tar(shard)

    def _read_metadata(self, shard: Path) -> None:
        """Rejects for the rows img2dataset could not download or resize; the url of the others."""
        parquet = shard.with_suffix(".parquet")
        if not parquet.is_file():
            return
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(parquet)
        except Exception as e:  # a parquet file cut short or not parquet at all
            self.job.reject(f"{UNREADABLE_METADATA}: {type(e).__name__}: {e}", file=parquet)
            return
        columns = set(table.column_names)
        if not {"key", "status"} <= columns:
            self.job.reject(f"{UNREADABLE_METADATA}: no 'key' and 'status' columns (img2dataset writes both)",
                            file=parquet)
            return
        wanted = [c for c in ("key", "status", "error_message", "url") if c in columns]
        rows = table.select(wanted).to_pydict()
        errors = rows.get("error_message") or [None] * len(rows["key"])
        urls = rows.get("url") or [None] * len(rows["key"])
        for key, status, error, url in zip(rows["key"], rows["status"], errors, urls):
            self.statuses[status or "unknown"] += 1
            if status == "success":
                self.successes.append(str(key))
                if url:
                    self.urls[key] = url
                continue
            self.job.reject(f"{status or 'unknown status'}: {error or 'no error message'}", file=parquet,
                            id=self.job.image_id(_native_id(parquet, str(key))))

    def _read_stats(self, shard: Path) -> None:
        stats = shard.with_name(f"{shard.stem}_stats.json")
        try:
            self.expected += int(json.loads(stats.read_text(encoding="utf-8")).get("successes", 0))
        except (OSError, ValueError, AttributeError, TypeError):
            pass  # the stats file is a summary; the parquet and the tar are the data

    def _read_tar(self, shard: Path) -> None:
        size = shard.stat().st_size
        try:
            tar = tarfile.open(shard, "r:")
        except (tarfile.TarError, EOFError) as e:
            self.job.reject(f"{UNREADABLE_SHARD}: {e} (not a tar file?)", file=shard)
            log.warning("%s: not readable as a tar file (%s): skipped", shard, e)
            self._reject_missing(shard, {}, "; the shard is unreadable")
            return
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        cut = False
        with tar:
            end = 0
            while True:
                try:  # tarfile ends a listing quietly at a cut header but raises where a member's data is cut
                    info = tar.next()
                except (tarfile.TarError, EOFError):
                    cut = True
                    break
                if info is None:
                    break
                end = info.offset_data + info.size
                if info.isfile():
                    key, ext = _sample_key(info.name)
                    samples.setdefault(key, {})[ext] = info
        with open(shard, "rb") as f:
            tail = end + (-end % TAR_BLOCK)
            f.seek(tail)
            marker = f.read(2 * TAR_BLOCK)  # a complete tar ends with two zero blocks
            complete = not cut and len(marker) == 2 * TAR_BLOCK and not marker.strip(b"\0")
            for key, members in samples.items():
                self._add_sample(shard, f, size, key, members)
        self._reject_missing(shard, samples, "" if complete else "; the shard is cut short")
        if not complete:
            self.truncated.append(shard.name)
            self.job.reject(f"{TRUNCATED_SHARD}: it ends without tar's end-of-archive blocks; "
                            f"{len(samples)} sample(s) before the cut were read", file=shard)
            log.warning("%s: the shard is cut short (an interrupted img2dataset run?): the %d sample(s) before the "
                        "cut are read, the rest is missing; rerun img2dataset on the same output folder "
                        "(its incremental mode) to complete it", shard, len(samples))

    def _reject_missing(self, shard: Path, samples: dict, why: str) -> None:
        """A reject for each row the parquet lists as downloaded that the tar does not hold."""
        for key in self.successes:
            if key not in samples:
                self.job.reject(f"{MISSING_IMAGE}: img2dataset's metadata says success, the shard holds no member "
                                f"{key}.*{why}", file=shard, id=self.job.image_id(_native_id(shard, key)))

    def _add_sample(self, shard: Path, f, size: int, key: str, members: dict[str, tarfile.TarInfo]) -> None:
        job = self.job
        native_id = _native_id(shard, key)
        image_id = job.image_id(native_id)
        image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
        if image is None:
            job.reject(f"{MISSING_IMAGE}: no image member for key {key!r} (members: "
                       f"{', '.join(sorted(members))})", file=shard, id=image_id)
            return
        cut = [m for m in members.values() if m.offset_data + m.size > size]
        if cut:
            job.reject(f"{TRUNCATED_IMAGE}: the shard ends inside {', '.join(m.name for m in cut)}", file=shard,
                       id=image_id)
            return
        if image_id in self.items:
            job.reject(f"duplicate id: key {key!r} is also in {self.items[image_id].path}", file=shard, id=image_id)
            return
        item = _Item(native_id=native_id, path=str(shard), split=None, name=image.name, file=str(shard),
                     member={"name": image.name, "offset": image.offset_data, "size": image.size})
        url = self.urls.get(key)
        if url:
            item.extra["url"] = url
        text = members.get("txt")  # without one the sample has no caption: `_finish` rejects it
        if text is not None:
            f.seek(text.offset_data)
            job.add_caption(item, f.read(text.size).decode("utf-8", errors="surrogateescape"), detail=text.name)
        self.items[image_id] = item


def _native_id(shard: Path, key: str) -> str:
    """A sample's id within its source: ``<input shard>/<key>`` (e.g. ``00012/000120034``), so that its image id
    ``<source>/<input shard>/<key>`` says which input shard it is in (the cache can keep input shards together:
    :data:`cache.format.SHARD_BY_INPUT_SHARD`)."""
    return f"{shard.stem}/{key}"


def import_img2dataset(cfg, rejects: RejectsReport, *, check_images: str = "full", workers: int = 2,
                       limits: ImportLimits = ImportLimits()) -> list[ManifestRecord]:
    """The samples of img2dataset's ``webdataset`` output (``cfg.path``: folder, shard or brace pattern), one
    record per sample with a caption, its image addressed inside its shard; see the module's docstring."""
    _check_args(check_images, workers)
    root, shards = shard_files(cfg.path)
    job = _Job(cfg, Path(str(cfg.path)), root, limits)
    reader = _ShardReader(job)
    for shard in progress_bar(shards, total=len(shards), unit="shard", desc=f"read {cfg.name}",
                              disable=len(shards) < 20):
        reader.read(shard)
    found = len(reader.items)
    records = _finish(job, reader.items.values(), rejects, check_images, workers)
    statuses = ", ".join(f"{n:,} {s}" for s, n in sorted(reader.statuses.items(), key=lambda kv: -kv[1]))
    log.info("img2dataset %r: %d shard(s)%s; %s sample(s) in the tars%s, %s imported", cfg.name, len(shards),
             f" ({statuses} in the parquet metadata)" if statuses else "", f"{found:,}",
             f" of the {reader.expected:,} successes the stats report" if reader.expected else "",
             f"{len(records):,}")
    if reader.truncated:
        log.warning("img2dataset %r: %d truncated shard(s): %s", cfg.name, len(reader.truncated),
                    ", ".join(reader.truncated[:5]) + (" ..." if len(reader.truncated) > 5 else ""))
    return records


# --------------------------------------------------------------------------- writing the layout
PARQUET_COLUMNS = ("url", "caption", "key", "status", "error_message", "width", "height", "original_width",
                   "original_height", "sha256")


def sample_key(index: int, shard_id: int, samples_per_shard: int = 10_000, oom_shard_count: int = 5) -> str:
    """img2dataset's key of row ``index`` of shard ``shard_id`` (its ``compute_key``): the shard id, then the
    row zero-padded to the digits of ``samples_per_shard``, e.g. ``000010005`` (shard 1, row 5)."""
    oom_sample = max(1, math.ceil(math.log10(samples_per_shard)))
    return f"{(10 ** oom_sample) * shard_id + index:0{oom_sample + oom_shard_count}d}"


def write_shard(folder: Path, shard_id: int, rows: list[dict], *, encode_format: str = "jpg",
                samples_per_shard: int = 10_000, oom_shard_count: int = 5) -> Path:
    """Write one shard exactly as `img2dataset --output_format webdataset` lays it out: ``NNNNN.tar``
    (``<key>.<encode_format>``, ``<key>.txt``, ``<key>.json`` per successful row), ``NNNNN.parquet`` (every
    row's metadata, the failed ones too) and ``NNNNN_stats.json``. For tests, benchmarks and converting local
    photos (the data of real users comes from img2dataset itself).

    ``rows``: dicts with ``url``, ``caption`` (None: none), and either ``image`` (the encoded bytes, with
    ``width``/``height`` and optionally ``original_width``/``original_height``) or ``status``
    (``failed_to_download`` / ``failed_to_resize``) and ``error_message``. Returns the tar's path."""
    import hashlib
    import io
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{shard_id:0{oom_shard_count}d}"
    start = time.time()
    meta_rows, status_dict = [], Counter()
    with tarfile.open(folder / f"{name}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for index, row in enumerate(rows):
            key = sample_key(index, shard_id, samples_per_shard, oom_shard_count)
            image = row.get("image")
            meta = {"url": row["url"], "caption": row.get("caption"), "key": key,
                    "status": "success" if image is not None else row.get("status", "failed_to_download"),
                    "error_message": None if image is not None else row.get("error_message", "unknown error"),
                    "width": row.get("width") if image is not None else None,
                    "height": row.get("height") if image is not None else None,
                    "original_width": row.get("original_width", row.get("width")) if image is not None else None,
                    "original_height": row.get("original_height", row.get("height")) if image is not None else None,
                    "sha256": hashlib.sha256(image).hexdigest() if image is not None else None}
            status_dict[meta["status"] if image is not None else meta["error_message"]] += 1
            meta_rows.append(meta)
            if image is None:
                continue
            caption = row.get("caption")
            for ext, data in ((encode_format, image), ("txt", ("" if caption is None else str(caption)).encode()),
                              ("json", json.dumps(meta, indent=4).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(data), 0o444, int(start)
                tar.addfile(info, io.BytesIO(data))
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()),
                        ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32()),
                        ("height", pa.int32()), ("original_width", pa.int32()), ("original_height", pa.int32()),
                        ("sha256", pa.string())])
    columns = {c: [m[c] for m in meta_rows] for c in PARQUET_COLUMNS}
    pq.write_table(pa.Table.from_pydict(columns, schema), folder / f"{name}.parquet")
    end = time.time()
    statuses = Counter(m["status"] for m in meta_rows)
    (folder / f"{name}_stats.json").write_text(json.dumps({
        "count": len(meta_rows), "successes": statuses["success"],
        "failed_to_download": statuses["failed_to_download"], "failed_to_resize": statuses["failed_to_resize"],
        "duration": end - start, "start_time": start, "end_time": end, "status_dict": dict(status_dict),
    }, indent=4), encoding="utf-8")
    return folder / f"{name}.tar"
