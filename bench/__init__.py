"""Benchmarks: `python -m bench` runs all of them; `python -m bench.<name>` runs one.

A benchmark is a module of this package with ``main(argv) -> dict`` and ``_parser()``
(an ``argparse`` parser built with :func:`bench.common.base_parser`, so it takes
``--quick``, ``--results-dir``, ``--work-dir`` and ``--seed``). Each prints a markdown
table (for the README) to stdout, progress to stderr, and writes
``bench/results/<name>.json`` (git-ignored) through :class:`bench.common.BenchRun`, which
puts the same envelope (benchmark, options, machine, load) around every benchmark's
results. ``--quick`` is a smoke run, not a measurement.
"""

from __future__ import annotations

import pkgutil
from pathlib import Path

_FIRST = ("extract", "cache_read")  # run first, in this order; any other benchmark module follows by name
# quality and photo_recovery need a dataset (`python -m bench.quality DIR`); scale takes minutes to an hour a
# size (`python -m bench.scale --samples 10000 100000`)
_NOT_BENCHMARKS = {"common", "__main__", "quality", "photo_recovery", "scale"}


def _discover() -> tuple[str, ...]:
    names = {m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])} - _NOT_BENCHMARKS
    names = {n for n in names if not n.startswith("_")}
    return tuple([n for n in _FIRST if n in names] + sorted(names - set(_FIRST)))


BENCHMARKS = _discover()
