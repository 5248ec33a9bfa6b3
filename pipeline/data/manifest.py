"""The manifest: the one contract between `prepare` and every later stage.

A manifest is a JSON Lines file, one image per line::

    {"image_id": "coco/139", "path": "/data/coco/val2017/000000000139.jpg",
     "captions": ["A woman stands in the dining area ..."], "split": "train",
     "source": "coco"}

``path`` is absolute, or relative to the directory holding the manifest. An image stored inside a tar
shard (img2dataset's `webdataset` output) has ``path`` the shard and ``member`` where in it the image's bytes
are: ``{"name": "000000012.jpg", "offset": 1536, "size": 23456}`` (read with one seek; see
:func:`resolve_image`).
``image_id`` is unique within a manifest. ``split`` is one of :data:`SPLITS`.
Extra keys a source carries (labels, native ids) live under ``extra``.

Rejected input is recorded, never dropped silently: see :class:`RejectsReport`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

from pipeline.data.images import ShardMember
from pipeline.errors import UserError
from pipeline.files import write_jsonl, write_lines

SPLITS = ("train", "val", "test")
MANIFEST_VERSION = 1


class ManifestError(UserError, ValueError):
    """A manifest file that cannot be read; the message names the file and line."""


@dataclass(slots=True)  # no __dict__ per record: millions of them are read at once
class ManifestRecord:
    image_id: str
    path: str
    captions: list[str]
    split: str
    source: str
    extra: dict = field(default_factory=dict)
    sha256: str | None = None  # of the image file, as `prepare` read it (what cached features are keyed by)
    member: dict | None = None  # the image inside the tar shard ``path``: {"name", "offset", "size"}
    # Of the decoded RGB pixels (see pipeline.data.importers.pixels_sha256), when an import decoded them: how
    # `prepare` finds one photo under two ids. Never written to a manifest.
    pixels_sha256: str | None = field(default=None, repr=False)

    def to_json(self) -> str:
        row = asdict(self)
        del row["pixels_sha256"]
        if not row["extra"]:
            del row["extra"]
        if row["sha256"] is None:
            del row["sha256"]
        if row["member"] is None:
            del row["member"]
        return json.dumps(row, ensure_ascii=False, sort_keys=False)

    @classmethod
    def from_dict(cls, row: dict) -> "ManifestRecord":
        missing = [k for k in ("image_id", "path", "captions", "split", "source") if k not in row]
        if missing:
            raise ValueError(f"missing keys {missing}")
        unknown = set(row) - {"image_id", "path", "captions", "split", "source", "extra", "sha256", "member"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        if row["split"] not in SPLITS:
            raise ValueError(f"split {row['split']!r} is not one of {SPLITS}")
        if not isinstance(row["captions"], list) or not all(isinstance(c, str) for c in row["captions"]):
            raise ValueError("captions must be a list of strings")
        return cls(
            image_id=str(row["image_id"]),
            path=sys.intern(str(row["path"])),  # one string for every image of a tar shard
            captions=list(row["captions"]),
            split=sys.intern(row["split"]),
            source=sys.intern(str(row["source"])),
            extra=dict(row.get("extra") or {}),
            sha256=None if row.get("sha256") is None else str(row["sha256"]),
            member=_member(row.get("member")),
        )


def _member(value) -> dict | None:
    """A manifest row's ``member`` checked: None, or ``{"name": str, "offset": int >= 0, "size": int > 0}``."""
    if value is None:
        return None
    ok = (isinstance(value, dict) and set(value) == {"name", "offset", "size"} and isinstance(value["name"], str)
          and all(isinstance(value[k], int) and not isinstance(value[k], bool) for k in ("offset", "size"))
          and value["offset"] >= 0 and value["size"] > 0)
    if not ok:
        raise ValueError("member must be {\"name\": str, \"offset\": int >= 0, \"size\": int > 0}")
    return dict(value)


def resolve_image_path(record: ManifestRecord, manifest_path: Path) -> Path:
    """The file of ``record`` (the image, or the tar shard holding it): absolute paths as they are, others
    relative to the manifest."""
    p = Path(record.path)
    return p if p.is_absolute() else Path(manifest_path).parent / p


def resolve_image(record: ManifestRecord, manifest_path: Path) -> Path | ShardMember:
    """Where ``record``'s image bytes are: its file, or its member of a tar shard. What every stage that
    reads images passes to :mod:`pipeline.data.images`."""
    path = resolve_image_path(record, manifest_path)
    if record.member is None:
        return path
    m = record.member
    return ShardMember(path, m["name"], m["offset"], m["size"])


def _same_image_key(record: ManifestRecord, manifest_path: Path) -> str:
    """What identifies ``record``'s image across manifests: its resolved file (``shard.tar:member``)."""
    path = resolve_image_path(record, manifest_path).resolve()
    return str(path) if record.member is None else f"{path}:{record.member['name']}"


def write_manifest(path: Path, records: Iterable[ManifestRecord]) -> int:
    """Write records as JSON Lines (atomically: a temp file renamed into place). Returns the count."""
    return write_lines(path, (rec.to_json() + "\n" for rec in records))


def iter_manifest(path: Path) -> Iterator[ManifestRecord]:
    """Stream a manifest; a malformed line raises :class:`ManifestError` naming file and line, and so does an
    image id listed twice (found when the stream ends: the check keeps 8 bytes an id, not the ids, so a
    manifest of millions of rows streams in the memory of one)."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: manifest not found (run `pipeline prepare` first?)")
    if path.is_dir():
        hint = f" (did you mean {path / 'manifest.jsonl'}?)" if (path / "manifest.jsonl").is_file() else ""
        raise ManifestError(f"{path}: is a folder, not a manifest file{hint}")
    hashes = array("Q")
    for _, rec in _manifest_rows(path):
        hashes.append(_id_hash(rec.image_id))
        yield rec
    _refuse_duplicate_ids(path, hashes)


def _manifest_rows(path: Path) -> Iterator[tuple[int, ManifestRecord]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, ManifestRecord.from_dict(json.loads(line))
            except (json.JSONDecodeError, ValueError, TypeError) as e:
                raise ManifestError(f"{path}:{lineno}: malformed manifest row: {e}") from None
            except RecursionError:
                raise ManifestError(f"{path}:{lineno}: malformed manifest row: JSON nested too deeply") from None


def _id_hash(image_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest(), "little")


def _refuse_duplicate_ids(path: Path, hashes: array) -> None:
    """Raise naming the first line whose image id an earlier line has (8-byte hashes find the candidates; the
    file is read again only when two hashes are equal, to compare the ids themselves)."""
    import numpy as np

    ordered = np.sort(np.frombuffer(hashes, dtype=np.uint64))
    repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if not repeated:
        return
    seen: set[str] = set()
    for lineno, rec in _manifest_rows(path):
        if _id_hash(rec.image_id) in repeated:
            if rec.image_id in seen:
                raise ManifestError(f"{path}:{lineno}: duplicate image_id {rec.image_id!r}")
            seen.add(rec.image_id)


def read_manifest(path: Path, split: str | None = None) -> list[ManifestRecord]:
    """All records of a manifest, optionally only those of one split."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    return [r for r in iter_manifest(path) if split is None or r.split == split]


@dataclass
class Reject:
    file: str
    reason: str
    line: int | None = None
    id: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


class RejectsReport:
    """Collects every input item a stage refused, with where it came from and why.

    Written as JSON Lines (``rejects.jsonl``); :meth:`summary` counts by reason.
    Reasons are short stable phrases (e.g. ``"missing image file"``) so they group well.
    """

    def __init__(self) -> None:
        self.items: list[Reject] = []

    def add(self, file: str | Path, reason: str, *, line: int | None = None, id: str | None = None) -> None:
        self.items.append(Reject(file=str(file), reason=reason, line=line, id=id))

    def extend(self, other: "RejectsReport") -> None:
        self.items.extend(other.items)

    def __len__(self) -> int:
        return len(self.items)

    def reasons(self) -> Counter:
        return Counter(r.reason.split(":")[0] for r in self.items)

    def summary(self) -> dict:
        return {"total": len(self.items), "by_reason": dict(sorted(self.reasons().items()))}

    def write(self, path: Path) -> None:
        write_jsonl(path, [r.to_dict() for r in self.items])

    @staticmethod
    def read(path: Path) -> list[dict]:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


def rebased(record: ManifestRecord, manifest_path: Path, new_folder: Path) -> ManifestRecord:
    """``record`` with its image path relative to ``new_folder`` (absolute paths kept), for a record read from
    ``manifest_path`` that moves into a manifest in (or used from) ``new_folder``."""
    if Path(record.path).is_absolute():
        return record
    path = os.path.relpath(resolve_image_path(record, manifest_path).resolve(), Path(new_folder).resolve())
    return dataclasses.replace(record, path=path)


def read_manifests(primary: Path, others: Iterable[Path] = ()) -> list[ManifestRecord]:
    """The records of ``primary`` followed by those of ``others``, every path relative to ``primary``'s folder.

    An id in two manifests must name the same image file (it is then listed once); an id naming two
    different files is a :class:`ManifestError` naming both manifests."""
    records = read_manifest(primary)
    others = list(others)
    if not others:
        return records
    seen = {r.image_id: (primary, _same_image_key(r, primary)) for r in records}
    for other in others:
        for rec in read_manifest(other):
            path = _same_image_key(rec, other)
            if rec.image_id in seen:
                first, first_path = seen[rec.image_id]
                if first_path != path:
                    raise ManifestError(f"{other}: image id {rec.image_id!r} is also in {first} for another file "
                                        f"({path} vs {first_path}); ids must be unique across the manifests")
                continue
            seen[rec.image_id] = (other, path)
            records.append(rebased(rec, other, Path(primary).parent))
    return records


def subset(records: list, n: Optional[int], seed: int) -> list:
    """A seeded subset of ``n`` records in their original order (all when ``n`` is None or too large)."""
    if n is None or n >= len(records):
        return list(records)
    import numpy as np
    keep = sorted(np.random.default_rng(seed).choice(len(records), n, replace=False).tolist())
    return [records[i] for i in keep]
