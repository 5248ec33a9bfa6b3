"""`clip-train` reruns like every training stage: an interrupt saves the step in progress and the rerun ends
with the bytes of an uninterrupted run; a finished run rewrites its outputs byte for byte."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from pipeline.config import ClipTrainConfig
from pipeline.data.manifest import write_manifest
from pipeline.training.interrupts import TrainingInterrupted

OUTPUTS = ("open_clip_model.safetensors", "open_clip_config.json", "train.json")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    from pipeline.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("clip_data")
    res = generate_synthetic(root, num_images=72, noisy_images=0, image_size=48, progress=False)
    for i, rec in enumerate(res.records):
        rec.split = "val" if i < 8 else "train"
    write_manifest(root / "manifest.jsonl", res.records)
    return root / "manifest.jsonl"


def _cfg(manifest: Path, out: Path) -> ClipTrainConfig:
    return ClipTrainConfig(manifest=manifest, out_dir=out, image_size=32, epochs=3, batch_size=16, lr=0.003,
                           warmup_steps=2, val_max_images=8, threads=1, device="cpu")


def _outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in OUTPUTS}


def _comparable(outputs: dict[str, bytes], out: Path) -> dict[str, bytes]:
    """The outputs of a run into ``out``, its record of ``out_dir`` left out (two runs write two folders)."""
    return {k: v.replace(str(out).encode(), b"OUT") for k, v in outputs.items()}


def test_an_interrupted_clip_training_resumes_to_the_same_bytes(manifest, tmp_path, monkeypatch):
    from stages import clip_train

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    clip_train.run(_cfg(manifest, straight))
    real_step, calls = clip_train._step, {"n": 0}

    def signalling_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # mid-epoch 2 (4 steps an epoch)
            os.kill(os.getpid(), signal.SIGTERM)  # noted by the loop's handler in this (the main) thread
        return real_step(*args, **kwargs)

    monkeypatch.setattr(clip_train, "_step", signalling_step)
    with pytest.raises(TrainingInterrupted) as stop:
        clip_train.run(_cfg(manifest, stopped))
    assert stop.value.exit_code == 143 and stop.value.step == 5
    assert not (stopped / "train.json").exists()
    monkeypatch.setattr(clip_train, "_step", real_step)
    calls["n"] = 0
    clip_train.run(_cfg(manifest, stopped))
    assert _comparable(_outputs(stopped), stopped) == _comparable(_outputs(straight), straight)


def test_a_finished_clip_training_rewrites_its_outputs_byte_for_byte(manifest, tmp_path, caplog):
    from stages import clip_train

    out = tmp_path / "clip"
    clip_train.run(_cfg(manifest, out))
    before = _outputs(out)
    for name in OUTPUTS:  # what `dvc repro -f` deletes (the checkpoints persist)
        (out / name).unlink()
    with caplog.at_level("INFO"):
        clip_train.run(_cfg(manifest, out))
    assert _outputs(out) == before
    assert any("already trained: 3 epoch(s); outputs rewritten" in r.getMessage() for r in caplog.records)
    shutil.rmtree(out / "checkpoints" / "last")  # no checkpoint: trained afresh, to the same bytes
    clip_train.run(_cfg(manifest, out))
    assert _outputs(out) == before
