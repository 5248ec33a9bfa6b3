"""Sizing torch's CPU threads and the server's model workers (shared by `pipeline caption`, `pipeline serve`
and the serving benchmark).

On a busy machine, more intra-op threads than free cores make small models dramatically slower (threads
spin waiting for each other), so the defaults take half the usable cores per model call and as many
concurrent model calls as fit in the rest.
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["usable_cores", "set_threads", "model_workers"]


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(threads: Optional[int]) -> int:
    """torch's CPU threads, the one meaning of every ``threads`` option: N; 0 (or less): half the usable cores
    (at least 1); None: torch's own choice, left alone. Returns the number torch uses."""
    import torch

    if threads is None:
        return torch.get_num_threads()
    if threads <= 0:
        threads = max(1, usable_cores() // 2)
    torch.set_num_threads(threads)
    return threads


def model_workers(workers: int, threads: int, device: str = "cpu") -> int:
    """Model calls that may run at once: ``workers`` when positive, else 1 on an accelerator and the
    usable cores / ``threads`` (torch threads per call) on the CPU, at least 1."""
    if workers > 0:
        return workers
    return 1 if device != "cpu" else max(1, usable_cores() // max(1, threads))
