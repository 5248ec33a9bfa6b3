"""torch.distributed as launched by ``torchrun``: rank, world size, device, barriers.

Nothing here schedules work: torchrun starts the processes and sets RANK,
WORLD_SIZE, LOCAL_RANK; each stage splits its work by rank.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.errors import ConfigError
from pipeline.files import output_lock
from pipeline.threads import set_threads


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.is_distributed and dist.is_initialized():
            dist.barrier()


def resolve_device(spec: str | torch.device, local_rank: int = 0) -> torch.device:
    """``auto`` -> the local rank's GPU when CUDA is available, else CPU; any other torch device string as is.

    Raises :class:`ConfigError` for a string torch does not know and for a device this machine lacks."""
    if isinstance(spec, torch.device):
        device = spec
    elif spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            device = torch.device(spec)
        except (RuntimeError, TypeError):
            raise ConfigError(f"--device {spec!r} is not a torch device: use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec!s} requested but CUDA is not available on this machine "
                              "(use --device cpu, or auto to take a GPU when there is one)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec!s}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {spec!s} requested but MPS is not available on this machine (use --device cpu)")
    return device


def init_distributed(device: torch.device | None = None) -> DistContext:
    """Join the process group torchrun set up (gloo on CPU, nccl on GPU); a no-op without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_nccl = device is not None and device.type == "cuda"
        if use_nccl:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    return ctx


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def run_distributed(body, cfg, device_spec: str, threads: int | None = None, *, lock: Path | None = None):
    """Run a stage's ``body(cfg, device, ctx)`` on this process's device inside the torchrun process group
    (a plain single process without torchrun), leaving the group afterwards; ``threads`` sets torch's CPU
    threads first (:func:`pipeline.threads.set_threads`). ``lock``: the output folder the main process holds
    :func:`pipeline.files.output_lock` on for the whole run (a second run on it is refused)."""
    set_threads(threads)
    device = resolve_device(device_spec, int(os.environ.get("LOCAL_RANK", "0")))
    ctx = init_distributed(device)
    try:
        # taken before the body's first barrier, so the other ranks wait for a run that is allowed to go on
        with output_lock(lock) if lock is not None and ctx.is_main else contextlib.nullcontext():
            return body(cfg, device, ctx)
    finally:
        cleanup_distributed()
