"""Writing outputs atomically: a reader (or a crash) sees the old file or the new one, never half of one.

Every file a stage writes goes through here: text, JSON, JSON Lines, and whole folders
(:func:`swap_folder`). (The ``cache`` package, storage only, has its own two-line equivalent.)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable


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
