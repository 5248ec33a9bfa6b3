"""Shared helpers: command-line options, machine description, the results file of a run, markdown tables.

Every benchmark records its run through :class:`BenchRun` (started before the measurement, finished
after it) and writes ``<results-dir>/<name>.json`` with :meth:`BenchRun.publish`, so every results file
holds the same envelope around a benchmark's own results: ``benchmark``, ``quick``, ``config`` (the
command-line options), ``machine``, ``loadavg_before``, ``loadavg_after``, then the results, then
``markdown`` (the table printed for the README).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke run (seconds), not a measurement")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help=f"where {name}.json goes (default: bench/results)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="scratch folder for generated data (default: a temporary folder, removed afterwards)")
    p.add_argument("--seed", type=int, default=0)
    return p


def log(msg: str, *, load: bool = False) -> None:
    """Progress lines go to stderr; stdout holds only the markdown tables. ``load``: end the line with the
    1-minute load average (other processes' load is the noise in every number)."""
    print(f"{msg}  (load {loadavg()[:1]})" if load else msg, file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux/macOS
        return []


def machine_info() -> dict[str, Any]:
    import numpy as np

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "numpy": np.__version__,
    }
    for mod in ("torch", "timm", "lmdb", "PIL"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
        except ImportError:  # pragma: no cover
            pass
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["torch_interop_threads"] = torch.get_num_interop_threads()
    except ImportError:  # pragma: no cover
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def load_note(before: list[float], after: list[float], cpus: int | None) -> str:
    if not before:
        return ""
    return (f"Load average (1 min) {before[0]:.2f} before, {after[0]:.2f} after, on {cpus} CPU(s); "
            "other processes on the machine add noise to every number.")


def work_folder(work_dir: Path | None, prefix: str) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """The scratch folder of a run: ``work_dir`` (created), or a temporary one; the second item is the
    temporary directory to ``cleanup()`` when done (None for ``work_dir``)."""
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix=prefix)
        return Path(tmp.name), tmp
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    return Path(work_dir), None


def publish(results_dir: Path, name: str, data: dict[str, Any], markdown: str | None = None) -> dict[str, Any]:
    """Write ``data`` to ``<results_dir>/<name>.json``, print ``markdown`` (the README table) to stdout, and
    return ``data``. A benchmark calls it through :meth:`BenchRun.publish`, which adds the envelope."""
    path = write_results(results_dir, name, data)
    if markdown is not None:
        print(markdown, flush=True)
    log(f"[{name}] results written to {path}")
    return data


def jsonable(value: Any) -> Any:
    """``value`` with its paths as strings (in lists, tuples and dicts too): what ``json.dumps`` takes."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


ENVELOPE = ("benchmark", "quick", "config", "machine", "loadavg_before", "loadavg_after", "markdown")


@dataclass
class BenchRun:
    """One run of benchmark ``name`` with the options ``args``: created right before the measurement (it
    records the machine and the load average), :meth:`finish` right after it (the load average again),
    then :meth:`publish` with the results."""

    name: str
    args: argparse.Namespace
    machine: dict[str, Any] = field(default_factory=machine_info)
    loadavg_before: list[float] = field(default_factory=loadavg)
    loadavg_after: list[float] | None = None

    def finish(self) -> None:
        """The measurement is over: record the load average."""
        self.loadavg_after = loadavg()

    @contextlib.contextmanager
    def work_folder(self, prefix: str) -> Iterator[Path]:
        """The measurement's scratch folder (``--work-dir``, else a temporary one, removed afterwards); the
        run finishes when the block ends."""
        work, tmp = work_folder(self.args.work_dir, prefix)
        try:
            yield work
        finally:
            if tmp is not None:
                tmp.cleanup()
            self.finish()

    def load_note(self) -> str:
        """The load average before and after the measurement, and a word on what it means."""
        if self.loadavg_after is None:
            self.finish()
        return load_note(self.loadavg_before, self.loadavg_after, self.machine.get("cpus_usable"))

    def machine_note(self, torch_threads: bool = False) -> str:
        """``<processor>, <n> cores[, <t> torch threads]. <load note>``: the last line of a table's caption."""
        m = self.machine
        threads = f", {m.get('torch_threads')} torch threads" if torch_threads else ""
        return f"{m.get('processor')}, {m.get('cpus_usable')} cores{threads}. {self.load_note()}"

    def publish(self, results: dict[str, Any], markdown: str | None = None, *, file_name: str | None = None,
                leave_out: Sequence[str] = ()) -> dict[str, Any]:
        """Write the envelope around ``results`` to ``<results-dir>/<file_name or name>.json`` (the options in
        ``leave_out`` not recorded), print ``markdown``, and return what was written."""
        clash = set(results) & set(ENVELOPE)
        if clash:
            raise ValueError(f"bench.{self.name}: results may not use the envelope's keys {sorted(clash)}")
        if self.loadavg_after is None:
            self.finish()
        data: dict[str, Any] = {
            "benchmark": self.name,
            "quick": self.args.quick,
            "config": {k: jsonable(v) for k, v in vars(self.args).items() if k not in leave_out},
            "machine": self.machine,
            "loadavg_before": self.loadavg_before,
            "loadavg_after": self.loadavg_after,
            **results,
        }
        if markdown is not None:
            data["markdown"] = markdown
        return publish(self.args.results_dir, file_name or self.name, data, markdown)


def write_results(results_dir: Path, name: str, data: dict[str, Any]) -> Path:
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
