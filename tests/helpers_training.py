"""Reading a training run's outputs in tests: its checkpointed history and its safetensors files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def history(out: Path) -> list[dict]:
    """The per-epoch history of the run in ``out``, from its last checkpoint."""
    return json.loads((out / "checkpoints" / "last" / "state.json").read_text())["state"]["history"]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: Path, b: Path) -> None:
    """The two safetensors files hold the same names and bit-identical tensors."""
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} of {len(ta)} tensors differ, e.g. {different[:5]}"
