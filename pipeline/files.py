"""Writing outputs atomically: a reader (or a crash) sees the old file or the new one, never half of one.

Every file a stage writes goes through here: text, JSON, JSON Lines, and whole folders
(:func:`swap_folder`). (The ``cache`` package, storage only, has its own two-line equivalent.)
:func:`output_lock` keeps two runs from writing one output folder at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

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


def write_jsonl(path: Path, rows: Iterable[Any], *, sort_keys: bool = False, ensure_ascii: bool = False) -> int:
    """One JSON value per line, atomically; returns the number of lines."""
    lines = [json.dumps(r, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n" for r in rows]
    write_text(path, "".join(lines))
    return len(lines)


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
    """The lock file of an output folder: ``.<name>.lock`` beside it, so it is never part of a DVC output."""
    folder = Path(folder)
    if folder.name in ("", ".."):  # "." or "..": name the folder itself
        folder = folder.resolve()
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
