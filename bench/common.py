"""Shared helpers: command-line options, machine description, JSON results, markdown tables."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
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


def log(msg: str) -> None:
    """Progress lines go to stderr; stdout holds only the markdown tables."""
    print(msg, file=sys.stderr, flush=True)


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
    return ``data``."""
    path = write_results(results_dir, name, data)
    if markdown is not None:
        print(markdown)
    log(f"[{name}] results written to {path}")
    return data


def write_results(results_dir: Path, name: str, data: dict[str, Any]) -> Path:
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
