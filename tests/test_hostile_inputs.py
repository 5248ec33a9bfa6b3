"""The hostile-input corpus: every user mistake and damaged artifact we know of, run through the real
command in a subprocess.

Each :class:`Case` builds its bad input at test time (no binary fixtures) and states the outcome: the
exit code, the words of the one ``error:`` line (or the reject reason), and -- where the command also
had good input -- that the good input was still processed. Every case also asserts that stderr has
no Python traceback: a traceback means a bug in the project, never a message for the user.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from tests.conftest import TINY_TRANSFORMER, TinyPipeline

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    """``argv(world, tmp)`` builds the bad input under ``tmp`` and returns the ``pipeline`` arguments."""

    id: str
    argv: Callable[[TinyPipeline, Path], list[str]]
    says: tuple[str, ...]  # fragments of the last stderr line (the error line) or of the reject reason
    code: int = 2
    then: Optional[Callable[[TinyPipeline, Path], None]] = None  # checks on what the good input produced
    skip: Optional[str] = None  # a reason this machine cannot run the case


def run_pipeline(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------- inputs
def _train_args(w: TinyPipeline, out: Path, *extra: str) -> list[str]:
    return ["train", "--manifest", str(w.manifest), "--features", str(w.features), "--tokenizer",
            str(w.tokenizer()), "--out-dir", str(out), "--decoder", "transformer", "--decoder-options",
            json.dumps(TINY_TRANSFORMER), "--epochs", "1",
            "--batch-size", "32", "--val-max-images", "4", "--max-caption-length", "8", *extra]


def _damaged_checkpoint(w: TinyPipeline, tmp: Path) -> list[str]:
    """A finished one-epoch run whose resumable checkpoint is then truncated; the same command resumes."""
    args = _train_args(w, tmp / "run", "--device", "cpu", "--checkpoint-every", "1")
    done = run_pipeline(args, tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    weights = tmp / "run" / "checkpoints" / "last" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return args


def _garbage_gpt2(w: TinyPipeline, tmp: Path) -> list[str]:
    folder = tmp / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257}))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    args = _train_args(w, tmp / "run", "--device", "cpu")
    args[args.index("transformer")] = "gpt2"
    args[args.index("--tokenizer") + 1] = str(w.tokenizer("gpt2"))
    args[args.index("--decoder-options") + 1] = json.dumps({"pretrained_path": str(folder)})
    return args


def _garbage_clip(w: TinyPipeline, tmp: Path) -> list[str]:
    weights = tmp / "clip.safetensors"
    weights.write_bytes(b"\x00" * 64)
    return ["filter", "--manifest", str(w.manifest), "--out-dir", str(tmp / "filtered"), "--clip-model",
            "synthetic-clip-tiny", "--clip-pretrained", str(weights), "--device", "cpu"]


def _bad_yaml(w: TinyPipeline, tmp: Path) -> list[str]:
    (tmp / "bad.yaml").write_text("vocab:\n  min_freq: [1, 2\n")
    return ["vocab", "--params", str(tmp / "bad.yaml"), "--manifest", str(w.manifest)]


def _damaged_bundle(w: TinyPipeline, tmp: Path) -> Path:
    """A copy of the session's trained bundle with its decoder weights cut to 100 bytes."""
    bundle = tmp / "bundle"
    shutil.copytree(w.bundle, bundle)
    weights = bundle / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return bundle


def _caption_damaged(w: TinyPipeline, tmp: Path) -> list[str]:
    image = next((w.manifest.parent / "images").glob("*.png"))
    return ["caption", str(image), "--model", str(_damaged_bundle(w, tmp))]


def _evaluate_damaged(w: TinyPipeline, tmp: Path) -> list[str]:
    return ["evaluate", "--model", str(_damaged_bundle(w, tmp)), "--manifest", str(w.manifest), "--features",
            str(w.features), "--out-dir", str(tmp / "report"), "--device", "cpu"]


def _finetune_damaged(w: TinyPipeline, tmp: Path) -> list[str]:
    return ["finetune", "--bundle", str(_damaged_bundle(w, tmp)), "--manifest", str(w.manifest), "--out-dir",
            str(tmp / "ft"), "--device", "cpu"]


def _scst_damaged(w: TinyPipeline, tmp: Path) -> list[str]:
    return ["scst", "--bundle", str(_damaged_bundle(w, tmp)), "--manifest", str(w.manifest), "--features",
            str(w.features), "--out-dir", str(tmp / "scst"), "--device", "cpu"]


CASES = [
    Case("device-bogus", lambda w, t: _train_args(w, t / "run", "--device", "bogus"),
         ("--device 'bogus' is not a torch device", "cpu, cuda")),
    Case("device-cuda-missing", lambda w, t: _train_args(w, t / "run", "--device", "cuda"),
         ("--device cuda", "CUDA is not available"),
         skip="this machine has CUDA" if torch.cuda.is_available() else None),
    Case("train-resume-damaged-checkpoint", _damaged_checkpoint,
         ("checkpoints/last: damaged checkpoint", "delete that folder")),
    Case("gpt2-pretrained-garbage", _garbage_gpt2, ("cannot load the pretrained GPT-2", "gpt2'", "save_pretrained")),
    Case("clip-pretrained-garbage", _garbage_clip, ("clip.safetensors: cannot load as synthetic-clip-tiny weights",)),
    Case("params-not-yaml", _bad_yaml, ("bad.yaml:", "not valid YAML")),
    Case("params-missing", lambda w, t: ["vocab", "--params", str(t / "nope.yaml")], ("nope.yaml: params file not found",)),
    *(Case(f"{command}-damaged-bundle", build, ("bundle/model.safetensors: cannot read the decoder weights",
                                                   "the bundle is damaged"))
      for command, build in (("caption", _caption_damaged), ("evaluate", _evaluate_damaged),
                             ("finetune", _finetune_damaged), ("scst", _scst_damaged))),
    Case("manifest-missing", lambda w, t: ["vocab", "--manifest", str(t / "nope.jsonl")],
         ("nope.jsonl: manifest not found", "pipeline prepare")),
    Case("manifest-is-a-folder", lambda w, t: ["vocab", "--manifest", str(t)],
         ("is a folder, not a manifest file",)),
    Case("params-is-a-folder", lambda w, t: ["vocab", "--params", str(t), "--manifest", str(w.manifest)],
         ("Is a directory", "a file was expected here, not a folder")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_ends_in_one_error_line(case: Case, tiny_pipeline: TinyPipeline, tmp_path: Path):
    if case.skip:
        pytest.skip(case.skip)
    proc = run_pipeline(case.argv(tiny_pipeline, tmp_path), tmp_path)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == case.code, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    if case.code == 2:
        assert last.startswith("error: "), last
    for fragment in case.says:
        assert fragment in last, f"{fragment!r} not in {last!r}"
    if case.then is not None:
        case.then(tiny_pipeline, tmp_path)


# --------------------------------------------------------------------------- the boundary itself
def test_a_bug_keeps_its_traceback_and_says_it_is_one(monkeypatch, capsys):
    from pipeline.cli import commands as cli

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "app", broken)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "Traceback" in err and "ZeroDivisionError" in err
    assert err.strip().splitlines()[-1] == f"error: {cli.BUG_REPORT}"


@pytest.mark.parametrize("exc, words", [
    (FileNotFoundError(2, "No such file or directory", "data/x.jsonl"), "data/x.jsonl: No such file or directory"),
    (IsADirectoryError(21, "Is a directory", "models"), "models: Is a directory; a file was expected here"),
    (OSError(98, "Address already in use"), "Address already in use; another process listens there"),
    (MemoryError(), "out of memory: lower --batch-size"),
])
def test_user_caused_failures_are_named(exc, words):
    from pipeline.errors import describe_failure

    assert words in describe_failure(exc)


def test_failures_the_user_did_not_cause_are_bugs():
    from pipeline.errors import describe_failure

    for exc in (ZeroDivisionError(), KeyError("x"), AttributeError("y"), OSError(5, "I/O error"), RecursionError()):
        assert describe_failure(exc) is None
