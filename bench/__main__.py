"""Run every benchmark in one go: ``python -m bench [--quick] [--results-dir DIR] [--only NAME ...]``.

Options other than these are not passed on; run ``python -m bench.<name> --help`` to tune one benchmark.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from bench import BENCHMARKS
from bench.common import RESULTS_DIR, log


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run of every benchmark (seconds, not a measurement)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS))
    args = p.parse_args(argv)
    out = []
    for name in args.only:
        log(f"=== bench.{name} ===")
        mod = importlib.import_module(f"bench.{name}")
        out.append(mod.main((["--quick"] if args.quick else []) + ["--results-dir", str(args.results_dir)]))
        sys.stdout.flush()
    return out


if __name__ == "__main__":
    main()
