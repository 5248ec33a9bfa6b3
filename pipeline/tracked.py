"""Outputs DVC tracks for a stage are written by that stage's command only.

A command run by hand whose outputs overlap an output that ``dvc.lock`` records for a DVC stage
(the same path, a file inside it, or a folder holding it) is refused with one line naming the
stage and the two ways out, unless it *is* that stage: ``dvc repro`` running it (DVC sets
``DVC_STAGE`` for the command) or the very command ``dvc.lock`` records, run from the project's
root (it computes what the stage computes). So the README's examples never replace the DAG's
results behind DVC's back, and `report` never reads a hand-run result as the stage's.

Reads ``dvc.lock`` only (already resolved: ``foreach`` expanded, parameters filled in); a
project that has not run a stage yet has nothing of it to protect.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from pipeline.errors import UserError

LOCK = "dvc.lock"


class TrackedOutputError(UserError, RuntimeError):
    """A command run by hand would replace an output DVC tracks for another command."""


@dataclass(frozen=True)
class TrackedOutput:
    stage: str  # DVC's name for it: train@show_tell
    cmd: str  # the stage's command, as dvc.lock records it
    path: Path  # absolute


def dvc_root(start: Path) -> Optional[Path]:
    """The DVC project holding ``start`` (the nearest folder above it with a ``.dvc`` folder), if any."""
    for folder in [start, *start.parents]:
        if (folder / ".dvc").is_dir():
            return folder
    return None


def tracked_outputs(root: Path) -> list[TrackedOutput]:
    """Every output ``root/dvc.lock`` records, with its stage and command."""
    import yaml

    lock = root / LOCK
    if not lock.is_file():
        return []
    try:
        data = yaml.load(lock.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return []  # DVC itself will say what is wrong with it
    found = []
    for stage, entry in ((data or {}).get("stages") or {}).items():
        cmd = entry.get("cmd", "")
        cmd = " && ".join(cmd) if isinstance(cmd, list) else str(cmd)
        for out in entry.get("outs") or []:
            found.append(TrackedOutput(stage, cmd, (root / out["path"]).resolve()))
    return found


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_outputs(outputs: Sequence[Path], argv: Sequence[str], cwd: Optional[Path] = None,
                  running_stage: Optional[str] = None) -> None:
    """Refuse (:class:`TrackedOutputError`) when ``outputs`` overlap what DVC tracks for a stage whose command
    is not ``argv`` (the command line after the program name) run from the project's root.

    ``running_stage``: the DVC stage running this command (default: ``$DVC_STAGE``, which `dvc repro` sets)."""
    cwd = (cwd or Path.cwd()).resolve()
    root = dvc_root(cwd)
    if root is None:
        return
    running_stage = running_stage if running_stage is not None else os.environ.get("DVC_STAGE")
    mine = [(cwd / p).resolve() for p in outputs]
    for tracked in tracked_outputs(root):
        if tracked.stage == running_stage:
            continue
        hit = next((p for p in mine if _overlap(p, tracked.path)), None)
        if hit is None:
            continue
        if cwd == root and shlex.split(tracked.cmd)[1:] == list(argv):
            continue  # the stage's own command, by hand: it writes what `dvc repro` would
        shown = os.path.relpath(hit, cwd)
        raise TrackedOutputError(
            f"{shown} holds {os.path.relpath(tracked.path, cwd)}, which DVC tracks for stage {tracked.stage!r} "
            f"(its command: `{tracked.cmd}`); this command would replace that stage's results: write elsewhere "
            f"(--out-dir, e.g. experiments/{Path(shown).name}), or change params.yaml and run "
            f"`dvc repro {tracked.stage}`")
