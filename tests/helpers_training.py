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


def trainable_names(model) -> list[str]:
    """The parameters of ``model`` that train (``requires_grad``)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def scst_step_reward(decoder, features, image_ids, reward, tokenizer, *, num_samples: int, max_length: int,
                     seed: int = 0) -> float:
    """Mean CIDEr-D reward of ``num_samples`` captions sampled per image (a fixed generator): a Monte-Carlo
    estimate of the policy's expected reward, to compare a decoder before and after SCST."""
    import torch

    from pipeline.evaluation.metrics import fallback_tokenize
    from pipeline.inference.decoding import sample

    hyps = sample(decoder, features, num_samples=num_samples, max_length=max_length,
                  generator=torch.Generator().manual_seed(seed))
    texts = [fallback_tokenize(tokenizer.decode(h.tokens)) for per in hyps for h in per]
    return float(reward.score(texts, [i for i in image_ids for _ in range(num_samples)]).mean())


def torchrun(command: str, params, *, nproc: int = 2, timeout: int = 300):
    """``pipeline COMMAND --params PARAMS`` under ``torchrun`` with ``nproc`` CPU processes (gloo), one thread each;
    returns the finished process (its stderr holds the log)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.helpers_bundle import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "pipeline.cli", command, "--params", str(params)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
