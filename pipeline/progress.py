"""Progress bars for long work: live on a terminal, a line every 30 s in logs (DVC, CI)."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress(iterable=None, **kwargs) -> tqdm:
    """``tqdm`` with settings that keep non-interactive logs readable."""
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.2 if interactive else 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("disable", False)
    return tqdm(iterable, **kwargs)
