"""Writing outputs atomically: a reader (or a crash) sees the old file or the new one, never half of one.

Every file a stage writes goes through here: text, JSON, JSON Lines, safetensors, and whole folders
(:func:`swap_folder`). (The ``cache`` package, storage only, has its own two-line equivalent.)
Files are byte-deterministic (the same content gives the same bytes: JSON keys and safetensors
metadata in a fixed order) and get the usual permissions (``0666`` less the umask, like any file a
user creates). :func:`output_lock` keeps two runs from writing one output folder at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

from pipeline.errors import UserError


def write_bytes(path: Path, data: bytes) -> None:
    """``data`` written to a temporary file beside ``path`` and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    """``text`` as UTF-8, atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = True,
               ensure_ascii: bool = True) -> None:
    """``obj`` as JSON (one trailing newline), atomically."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n")


def write_lines(path: Path, lines: Iterable[str]) -> int:
    """``lines`` (each with its newline) as UTF-8, atomically, written as they come: the file is never held in
    memory whole. Returns the number of lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        for line in lines:
            f.write(line)
            count += 1
    os.replace(tmp, path)
    return count


def write_jsonl(path: Path, rows: Iterable[Any], *, sort_keys: bool = False, ensure_ascii: bool = False) -> int:
    """One JSON value per line, atomically; returns the number of lines."""
    return write_lines(path, (json.dumps(r, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n" for r in rows))


def canonical_safetensors(data: bytes) -> bytes:
    """safetensors bytes with the header's keys sorted. The format's writer emits its metadata dict in hash
    order (two runs writing the same tensors and metadata gave two sha256s); readers do not care about the
    order, and the tensors' data and offsets are unchanged."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def write_safetensors(path: Path, tensors: Mapping[str, Any], metadata: Optional[dict[str, str]] = None) -> None:
    """torch ``tensors`` as a safetensors file in canonical form (:func:`canonical_safetensors`), atomically."""
    from safetensors.torch import save

    write_bytes(path, canonical_safetensors(save(dict(tensors), metadata=metadata)))


def set_default_mode(path: Path) -> None:
    """Give a file another library wrote (e.g. safetensors' ``save_model``, which creates ``0600`` files) the
    permissions a file created here gets."""
    os.chmod(path, 0o666 & ~_UMASK)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import (os.umask can only be read by setting it)


def swap_folder(new: Path, target: Path) -> None:
    """Replace the folder ``target`` by the finished folder ``new``; one of the two always exists whole."""
    new, target = Path(new), Path(target)
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


class OutputLockedError(UserError, RuntimeError):
    """Another run is writing the same output folder."""


def lock_path(folder: Path) -> Path:
    """The lock file of an output folder: ``.<name>.lock`` beside it, so it is never part of a DVC output.

    The folder is the one the path leads to: through a symbolic link (``--out-dir link`` to ``real``), or a
    ``..``, the lock is the real folder's, so two runs naming one folder two ways take one lock. A path
    without either keeps its spelling (a relative one stays relative)."""
    folder = Path(folder)
    real = folder.resolve()
    if folder.name in ("", "..") or real != folder.absolute():
        folder = real
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def output_lock(folder: Path, *, shared: bool = False) -> Iterator[Path]:
    """Hold an advisory lock (``flock``) on the output ``folder`` while the block runs; another holder: refused
    at once with :class:`OutputLockedError` naming its pid.

    ``shared`` holders (e.g. ``extract --shard-index``, one shard each) exclude only exclusive ones. The kernel
    drops the lock when its process ends, crashed or not; the last holder to leave removes the file.
    """
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holders = os.pread(fd, 256, 0).decode("ascii", "replace").split()
            os.close(fd)
            raise OutputLockedError(f"{folder}: another run (pid {', '.join(holders) or 'unknown'}) is writing it; "
                                    f"wait for it to end or stop it (lock file {path})") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # removed by a holder that left in the meantime: lock the new file
    try:
        if not shared:
            os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield path
    finally:
        with contextlib.suppress(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # succeeds for the last holder only
            path.unlink(missing_ok=True)
        os.close(fd)
