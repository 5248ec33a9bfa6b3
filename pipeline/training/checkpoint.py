"""Resumable training state without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder holds ``model.safetensors`` (weights; tied tensors stored once),
``tensors.safetensors`` (optimizer moments, RNG states) and ``state.json`` (optimizer hyper-parameters, scheduler counters,
epoch/step, early-stopping bookkeeping, anything JSON). Written to a temporary
folder and renamed into place, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from pipeline.errors import UserError
from pipeline.files import set_default_mode, swap_folder, write_json

MODEL = "model.safetensors"
TENSORS = "tensors.safetensors"
STATE = "state.json"


class CheckpointError(UserError):
    """A checkpoint folder that cannot be resumed from (truncated, garbage, or written for another model)."""

    def __init__(self, directory: Path, problem: str) -> None:
        super().__init__(f"{directory}: damaged checkpoint ({problem}); delete that folder to start the run "
                         f"afresh (rm -r '{directory}')")


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        plain["state"][str(pid)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                plain["state"][str(pid)][name] = value
    return tensors, plain


def _join_optimizer(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict[int, dict] = {int(pid): dict(entries) for pid, entries in plain["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def set_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def save_checkpoint(
    directory: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    scaler: Any = None, state: dict[str, Any],
) -> None:
    """Write model + optimizer + scheduler + RNG + ``state`` (JSON) atomically to ``directory``."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / MODEL))
    tensors, opt_plain = _split_optimizer(optimizer.state_dict())
    tensors.update(rng_state())
    save_file(tensors, str(tmp / TENSORS))
    for name in (MODEL, TENSORS):
        set_default_mode(tmp / name)
    doc = {
        "optimizer": opt_plain,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "state": state,
    }
    write_json(tmp / STATE, doc, indent=1)
    swap_folder(tmp, directory)


def load_checkpoint(
    directory: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    scaler: Any = None, device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns its ``state`` dict.

    Raises :class:`CheckpointError` naming the folder when any part cannot be read or does not fit."""
    directory = Path(directory)
    try:
        tensors = load_file(str(directory / TENSORS), device="cpu")
        doc = json.loads((directory / STATE).read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or not isinstance(doc.get("state"), dict):
            raise ValueError(f"{STATE} is not a checkpoint's state")
        load_model(model, str(directory / MODEL), strict=True, device=str(device))
        optimizer.load_state_dict(_join_optimizer(tensors, doc["optimizer"]))
        if scheduler is not None and doc["scheduler"] is not None:
            scheduler.load_state_dict(doc["scheduler"])
        if scaler is not None and doc["scaler"] is not None:
            scaler.load_state_dict(doc["scaler"])
        set_rng_state(tensors)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise CheckpointError(directory, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    return doc["state"]


def checkpoint_exists(directory: Path) -> bool:
    return all((Path(directory) / f).is_file() for f in (MODEL, TENSORS, STATE))
