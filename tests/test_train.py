"""`train`: every decoder family trains on a tiny real cache; resume is exact; DDP, bundle, CLI.

One module-scoped pipeline (prepare -> extract -> vocab) in a temporary folder: 80 synthetic
64-px images, timm's tiny random ``test_efficientnet`` backbone (2x2 tokens of 256 channels),
word / BPE / GPT-2 tokenizers. Decoders are a few tens of thousands of parameters, so a run of
3 epochs x 20 batches takes about a second on one CPU thread.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache import FeatureCache
from pipeline.cli import app
from pipeline.config import (
    TrainConfig,
)
from pipeline.data.features import CachedCaptionDataset
from pipeline.data.manifest import read_manifest
from pipeline.inference.bundle import BundleError, Captioner
from pipeline.text.tokenizers import load_tokenizer
from pipeline.training.interrupts import TrainingInterrupted
from pipeline.training.loop import Trainer, TrainingForward
from stages import train
from tests.conftest import TinyPipeline
from tests.helpers_training import assert_same_tensors, history, tensors, torchrun

BACKBONE = "test_efficientnet"

# Tiny sizes: every family under ~0.1M parameters (with the 68-word vocabulary).
OPTIONS = {
    "show_tell": {"embed_dim": 32, "hidden_dim": 32},
    "show_attend_tell": {"embed_dim": 32, "hidden_dim": 32, "attention_dim": 32, "visual_dim": 32},
    "transformer": {"d_model": 32, "num_layers": 1, "num_heads": 2, "ff_dim": 64},
    "gpt2": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32},
    "perceiver_gpt2": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 32, "num_latents": 4,
                       "resampler_depth": 1},
}
# GPT-2's own 50k vocabulary is slow with many epochs; the word and BPE vocabularies are not.
TOKENIZER = {"show_tell": "word", "show_attend_tell": "word", "transformer": "word", "gpt2": "word",
             "perceiver_gpt2": "bpe"}


class Pipe(TinyPipeline):
    """The session's tiny pipeline, with this module's run configs."""

    def cfg(self, out: Path, decoder: str, **kw) -> TrainConfig:
        base = dict(manifest=self.manifest, features=self.features, tokenizer=self.tokenizer(TOKENIZER[decoder]),
                    out_dir=out, decoder=decoder, decoder_options=OPTIONS[decoder], epochs=3, batch_size=16,
                    lr=3e-3, warmup_steps=0, val_max_images=4, max_caption_length=12, device="cpu", amp="none",
                    patience=0)
        base.update(kw)
        return TrainConfig(**base)

    def params_file(self, path: Path, train_section: dict, decoders: dict | None = None) -> Path:
        import yaml

        section = {"manifest": str(self.manifest), "features": str(self.features),
                   "tokenizer": str(self.tokenizer("word")), "batch_size": 16, "lr": 3e-3, "warmup_steps": 0,
                   "val_max_images": 4, "max_caption_length": 12, "device": "cpu", "patience": 0,
                   **train_section}
        data = {"train": section}
        if decoders is not None:
            data["decoders"] = decoders
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return path


@pytest.fixture(scope="module")
def pipe(tiny_pipeline, one_thread) -> Pipe:
    return Pipe(tiny_pipeline.root)


@pytest.fixture(scope="module")
def trained(pipe):
    """``trained(family)``: the output folder of one 3-epoch run of that family (run once per module)."""
    done: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in done:
            out = pipe.root / "runs" / family
            train.run(pipe.cfg(out, family))
            done[family] = out
        return done[family]

    return get


def curve_steps(out: Path, metric: str = "train/loss") -> list[int]:
    """The step column of a dvclive curve (``live/plots/metrics/<metric>.tsv``)."""
    lines = (out / "live" / "plots" / "metrics" / f"{metric}.tsv").read_text().splitlines()
    assert lines[0].split("\t")[0] == "step"
    return [int(line.split("\t")[0]) for line in lines[1:]]


# --------------------------------------------------------------------------- 1. every family trains
@pytest.mark.parametrize("family", list(OPTIONS))
def test_each_family_trains_and_writes_its_outputs(trained, family):
    out = trained(family)
    h = history(out)
    assert [e["epoch"] for e in h] == [1, 2, 3]
    assert h[-1]["train_loss"] < h[0]["train_loss"] - 0.1, [e["train_loss"] for e in h]
    assert h[-1]["val_loss"] < h[0]["val_loss"] - 0.1, [e["val_loss"] for e in h]
    assert all(math.isfinite(e["val_cider"]) and math.isfinite(e["val_bleu4"]) for e in h)

    bundle = out / "bundle"
    assert (bundle / "config.json").is_file() and (bundle / "model.safetensors").is_file()
    assert (bundle / "tokenizer" / "caption_tokenizer.json").is_file()
    assert {p.name for p in (out / "checkpoints" / "last").iterdir()} == {
        "model.safetensors", "tensors.safetensors", "state.json"}
    config = json.loads((bundle / "config.json").read_text())
    assert config["decoder"]["family"] == family
    assert {k: config["decoder"]["options"][k] for k in OPTIONS[family]} == OPTIONS[family]
    assert config["tokenizer"]["kind"] == TOKENIZER[family]
    assert config["training"]["embeddings"] is None  # random init (GloVe runs: tests/test_glove.py)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["decoder"] == family and metrics["epochs_run"] == 3 and metrics["steps"] == 60
    assert metrics["blind"] is False
    assert metrics["val_loss"] == min(e["val_loss"] for e in h if e["epoch"] == metrics["best_epoch"])
    # the curves, in dvclive's layout (step = epoch index); outputs hold content only: no throughput anywhere
    assert curve_steps(out, "val/cider") == [0, 1, 2] and curve_steps(out, "lr") == [0, 1, 2]
    regulariser = ["plots/metrics/train/regulariser.tsv"] if family == "show_attend_tell" else []  # in train/loss
    assert sorted(p.relative_to(out / "live").as_posix() for p in (out / "live").rglob("*.tsv")) == [
        "plots/metrics/lr.tsv", "plots/metrics/train/loss.tsv", *regulariser, "plots/metrics/val/bleu4.tsv",
        "plots/metrics/val/cider.tsv", "plots/metrics/val/loss.tsv"]
    assert "samples_per_s" not in json.dumps([h, metrics, config])


def test_gpt2_trains_with_the_real_gpt2_tokenizer(pipe, tmp_path, monkeypatch):
    # 50257-way logits cost ~0.4 s a batch on a busy CPU: 16 training images (80 captions, 5 batches), 1 epoch.
    rows = [json.loads(line) for line in pipe.manifest.read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"][:16] + [r for r in rows if r["split"] == "val"][:2]
    manifest = tmp_path / "small.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = []
    real = Trainer._forward

    def recording(self, batch):
        loss = real(self, batch)
        losses.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(Trainer, "_forward", recording)
    out = tmp_path / "gpt2-bpe50k"
    summary = train.run(pipe.cfg(out, "gpt2", manifest=manifest, tokenizer=pipe.tokenizer("gpt2"), epochs=1, lr=1e-2,
                                 val_max_images=2))
    vocab_size = load_tokenizer(pipe.tokenizer("gpt2")).vocab_size
    assert vocab_size == 50257
    assert len(losses) == 5 and summary["epochs_run"] == 1
    # An untrained model predicts about uniformly: ln(50257) = 10.8; five steps learn the frequent words.
    assert abs(losses[0] - math.log(vocab_size)) < 0.5 and losses[-1] < losses[0] - 1, losses
    (epoch,) = history(out)
    assert epoch["val_loss"] < math.log(vocab_size) - 1, epoch
    config = json.loads((out / "bundle" / "config.json").read_text())
    assert config["tokenizer"]["kind"] == "gpt2"
    assert Captioner.load(out / "bundle").tokenizer.vocab_size == 50257


# --------------------------------------------------------------------------- 2. exact resume
class SimulatedKill(Exception):
    pass


@pytest.mark.parametrize(
    "family,kill_after,every",
    [("show_attend_tell", 7, 3),  # killed mid-epoch 1; the last checkpoint (step 6) is one step behind
     ("transformer", 25, 5)],  # killed mid-epoch 2, right after a checkpoint (step 25)
)
def test_killed_and_resumed_training_ends_with_the_same_weights(pipe, tmp_path, monkeypatch, family, kill_after,
                                                                 every):
    straight = tmp_path / "straight"
    resumed = tmp_path / "resumed"
    train.run(pipe.cfg(straight, family, epochs=2, checkpoint_every=every))
    assert json.loads((straight / "bundle" / "config.json").read_text())["decoder"]["options"]["dropout"] > 0

    steps = {"n": 0}
    real_forward = Trainer._forward

    def dying_forward(self, batch):
        if steps["n"] == kill_after:  # after kill_after optimizer steps
            raise SimulatedKill(f"killed after {kill_after} steps")
        steps["n"] += 1
        return real_forward(self, batch)

    monkeypatch.setattr(Trainer, "_forward", dying_forward)
    with pytest.raises(SimulatedKill):
        train.run(pipe.cfg(resumed, family, epochs=2, checkpoint_every=every))
    saved = json.loads((resumed / "checkpoints" / "last" / "state.json").read_text())["state"]
    assert saved["global_step"] == kill_after // every * every
    assert saved["batch_in_epoch"] == saved["global_step"] % 20 and not saved["finished"]
    monkeypatch.setattr(Trainer, "_forward", real_forward)

    train.run(pipe.cfg(resumed, family, epochs=2, checkpoint_every=every))
    assert_same_tensors(straight / "checkpoints" / "last" / "model.safetensors",
                        resumed / "checkpoints" / "last" / "model.safetensors")
    assert_same_tensors(straight / "checkpoints" / "last" / "tensors.safetensors",  # optimizer moments + RNG
                        resumed / "checkpoints" / "last" / "tensors.safetensors")
    assert_same_tensors(straight / "bundle" / "model.safetensors", resumed / "bundle" / "model.safetensors")
    # Every per-epoch metric matches too, the train loss of the interrupted epoch included, and so does every
    # byte of the outputs.
    assert history(straight) == history(resumed)
    assert output_bytes(straight, elsewhere=True) == output_bytes(resumed, elsewhere=True)
    for metric in ("train/loss", "val/cider"):
        assert curve_steps(resumed, metric) == [0, 1]


def output_bytes(out: Path, elsewhere: bool = False) -> dict[str, bytes]:
    """Every file a run declares as its output (bundle, metrics.json, curves), by path: what DVC hashes.
    ``elsewhere``: for comparing runs into two folders, the bundle's record of its own ``out_dir`` left out."""
    files = [*(out / "bundle").rglob("*"), out / "metrics.json", *(out / "live").rglob("*")]
    found = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(files) if p.is_file()}
    if elsewhere:
        config = json.loads(found["bundle/config.json"])
        assert config["training"]["config"].pop("out_dir") == str(out)
        found["bundle/config.json"] = json.dumps(config).encode()
    return found


def test_a_finished_run_rewrites_every_output_byte_for_byte(trained, pipe, tmp_path, caplog):
    """`dvc repro -f` deletes a stage's outputs (all but the persisted checkpoints) and runs it again: a run that
    finds its finished checkpoint trains nothing and writes the same bytes."""
    out = tmp_path / "show_tell"
    shutil.copytree(trained("show_tell"), out)
    before = output_bytes(out)
    for gone in ("bundle", "live"):
        shutil.rmtree(out / gone)
    (out / "metrics.json").unlink()
    with caplog.at_level("INFO"):
        summary = train.run(pipe.cfg(out, "show_tell"))
    assert summary["epochs_run"] == 3 and summary["steps"] == 60
    assert output_bytes(out) == before
    assert any("already trained: 3 epoch(s); outputs rewritten" in r.getMessage() for r in caplog.records)
    assert all(os.stat(out / "bundle" / f).st_mode & 0o777 == 0o644 for f in ("model.safetensors", "config.json"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_saves_the_step_in_progress_and_the_rerun_ends_byte_identical(pipe, tmp_path, monkeypatch,
                                                                                   signum):
    """SIGINT/SIGTERM at step 13 (mid-epoch, 7 steps after the last periodic checkpoint): the step completes,
    a checkpoint of step 13 is saved, TrainingInterrupted carries exit code 128 + signum; the rerun resumes
    there and its outputs equal an uninterrupted run's."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train.run(pipe.cfg(straight, "transformer", epochs=2, checkpoint_every=6))
    steps = {"n": 0}
    real_forward = Trainer._forward

    def signalling_forward(self, batch):
        steps["n"] += 1
        if steps["n"] == 13:
            os.kill(os.getpid(), signum)  # handled in this (the main) thread: noted, the step goes on
        return real_forward(self, batch)

    monkeypatch.setattr(Trainer, "_forward", signalling_forward)
    with pytest.raises(TrainingInterrupted) as stop:
        train.run(pipe.cfg(stopped, "transformer", epochs=2, checkpoint_every=6))
    assert stop.value.exit_code == 128 + signum and stop.value.step == 13
    saved = json.loads((stopped / "checkpoints" / "last" / "state.json").read_text())["state"]
    assert saved["global_step"] == 13 and saved["batch_in_epoch"] == 13
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.setattr(Trainer, "_forward", real_forward)
    train.run(pipe.cfg(stopped, "transformer", epochs=2, checkpoint_every=6))
    assert output_bytes(stopped, elsewhere=True) == output_bytes(straight, elsewhere=True)


@pytest.mark.integration
def test_ctrl_c_in_pipeline_train_exits_130_with_its_step_saved(pipe, tmp_path):
    """The CLI: Ctrl-C once the loop runs is one `interrupted:` line naming the step and exit 130; the same
    command resumes from that step."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "pipeline.cli", "train", "--decoder", "transformer", "--manifest",
            str(pipe.manifest), "--features", str(pipe.features), "--tokenizer", str(pipe.tokenizer()),
            "--out-dir", str(out), "--decoder-options", json.dumps(OPTIONS["transformer"]), "--epochs", "200",
            "--batch-size", "16", "--val-max-images", "2", "--amp", "none", "--device", "cpu", "--threads", "1",
            "--patience", "0"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = ""
    while "pipeline.training.runs: epoch 1:" not in seen:  # the loop (and its handlers) are running
        line = proc.stderr.readline()
        assert line, f"pipeline train ended early:\n{seen[-3000:]}"
        seen += line
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, rest[-3000:]
    lines = [line for line in rest.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and "SIGINT at step" in lines[0] and "rerun the same command to resume" in lines[0], \
        rest[-3000:]
    assert "Traceback" not in rest
    step = int(lines[0].split("at step ")[1].split(":")[0])
    state = json.loads((out / "checkpoints" / "last" / "state.json").read_text())["state"]
    assert state["global_step"] == step >= 20  # at least the first epoch's 20 steps


def test_loading_a_bundles_backbone_leaves_the_rng_alone(trained):
    bundle = Captioner.load(trained("transformer") / "bundle")
    torch.manual_seed(123)
    want = torch.get_rng_state()
    assert bundle.backbone is not None  # built as a skeleton for the bundle's weights: no reseeding
    assert torch.equal(torch.get_rng_state(), want)


# --------------------------------------------------------------------------- 3. scheduled sampling
def test_scheduled_sampling_runs_on_show_tell_and_changes_training(pipe, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = TrainingForward._scheduled_sampling

    def counting(self, *args):
        calls["n"] += 1
        return real(self, *args)

    monkeypatch.setattr(TrainingForward, "_scheduled_sampling", counting)
    train.run(pipe.cfg(tmp_path / "none", "show_tell", epochs=1))
    assert calls["n"] == 0
    train.run(pipe.cfg(tmp_path / "ss", "show_tell", epochs=1, scheduled_sampling=0.5,
                       scheduled_sampling_ramp_epochs=1))
    assert calls["n"] == 20  # every training batch of the epoch (validation is teacher forced)
    (epoch,) = history(tmp_path / "ss")
    assert math.isfinite(epoch["train_loss"]) and math.isfinite(epoch["val_loss"])
    a = tensors(tmp_path / "none" / "checkpoints" / "last" / "model.safetensors")
    b = tensors(tmp_path / "ss" / "checkpoints" / "last" / "model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_scheduled_sampling_is_refused_for_the_transformer(pipe, tmp_path):
    from pipeline.errors import UserError

    with pytest.raises(UserError, match=r"scheduled_sampling is for the recurrent decoders .*'transformer'"):
        train.run(pipe.cfg(tmp_path / "t", "transformer", epochs=1, scheduled_sampling=0.25))
    assert not (tmp_path / "t" / "bundle").exists()
    params = pipe.params_file(tmp_path / "p.yaml", {"decoder": "transformer", "decoder_options": OPTIONS["transformer"],
                                                    "scheduled_sampling": 0.25, "out_dir": str(tmp_path / "cli")})
    result = CliRunner().invoke(app, ["train", "--params", str(params)])
    assert result.exit_code == 2 and "error: scheduled_sampling is for the recurrent decoders" in result.output


# --------------------------------------------------------------------------- 4. DDP
@pytest.mark.integration
def test_torchrun_two_processes_train_one_model(pipe, tmp_path, trained):
    out = tmp_path / "ddp"
    params = pipe.params_file(tmp_path / "p.yaml", {"decoder": "transformer", "decoder_options": OPTIONS["transformer"],
                                                    "epochs": 3, "out_dir": str(out)})
    res = torchrun("train", params, timeout=240)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "2 process(es)" in res.stderr
    # One writer: a single bundle, metrics and checkpoint, no leftovers of a second rank.
    assert sorted(p.name for p in out.iterdir()) == ["bundle", "checkpoints", "live", "metrics.json"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "fingerprint.json", "last"]
    metrics = json.loads((out / "metrics.json").read_text())
    # 320 captions, 160 per rank, per-rank batches of 16: 10 steps per epoch.
    assert metrics["epochs_run"] == 3 and metrics["steps"] == 30
    h = history(out)
    assert h[-1]["train_loss"] < h[0]["train_loss"] - 0.1 and h[-1]["val_loss"] < h[0]["val_loss"] - 0.1
    single = history(trained("transformer"))  # the same model on one process (batch 16, 20 steps an epoch)
    assert single[-1]["val_loss"] < single[0]["val_loss"] - 0.1
    # Half the optimizer steps of batch 32: it learns, just not as far (loose band, not equality).
    curves = {"ddp": [e["val_loss"] for e in h], "single": [e["val_loss"] for e in single]}
    assert single[-1]["val_loss"] - 0.1 < h[-1]["val_loss"] < h[0]["val_loss"] < math.log(68), curves
    ids = [r.image_id for r in read_manifest(pipe.manifest) if r.split == "val"][:2]
    feats = torch.from_numpy(FeatureCache(pipe.features).get_batch(ids)["last"]).float()
    captions = Captioner.load(out / "bundle").caption_features(feats)
    assert len(captions) == 2 and all(len(c) == 1 and c[0].text.strip() for c in captions)


# --------------------------------------------------------------------------- 5. the bundle
@pytest.fixture(scope="module")
def captioner(trained) -> Captioner:
    return Captioner.load(trained("transformer") / "bundle")


@pytest.fixture(scope="module")
def val_images(pipe):
    records = [r for r in read_manifest(pipe.manifest) if r.split == "val"][:4]
    return [(r.image_id, pipe.manifest.parent / r.path) for r in records]


def test_bundle_captions_cached_features(captioner, pipe, val_images):
    cache = FeatureCache(pipe.features)
    ids = [i for i, _ in val_images]
    feats = torch.from_numpy(cache.get_batch(ids)["last"])
    assert feats.dtype == torch.float16
    captions = captioner.caption_features(feats.float(), spec=cache.spec)
    assert len(captions) == len(ids)
    assert all(len(c) == 1 and c[0].text.strip() for c in captions), [c[0].text for c in captions]


def test_bundle_captions_images_exactly_like_their_cached_features(captioner, pipe, val_images):
    cache = FeatureCache(pipe.features)
    ids, paths = zip(*val_images)
    from_images = captioner.caption_images(list(paths))
    cached = torch.from_numpy(cache.get_batch(list(ids))["last"]).float()
    from_cache = captioner.caption_features(cached)
    assert [c[0].tokens for c in from_images] == [c[0].tokens for c in from_cache]
    assert [c[0].text for c in from_images] == [c[0].text for c in from_cache]
    # Its own backbone (backbone.safetensors) reproduces the cache, float16 rounding included.
    from pipeline.data.images import load_rgb

    encoded = captioner.encode_images([load_rgb(p) for p in paths])
    torch.testing.assert_close(encoded, cached, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("shape", [(1, 9, 256), (1, 4, 128), (2, 4, 255)])
def test_bundle_refuses_features_of_another_shape(captioner, shape):
    with pytest.raises(BundleError, match=r"test_efficientnet") as err:
        captioner.caption_features(torch.zeros(shape))
    assert "(batch, 4, 256)" in str(err.value) and str(tuple(shape)) in str(err.value)


def test_bundle_refuses_another_backbones_features(captioner):
    from dataclasses import replace

    from cache import FeatureMismatchError

    other = replace(captioner.features, backbone="resnet50")
    with pytest.raises(FeatureMismatchError, match=r"backbone: 'resnet50' vs 'test_efficientnet'"):
        captioner.caption_features(torch.zeros(1, 4, 256), spec=other)


def test_bundle_with_a_tampered_tokenizer_is_refused(trained, tmp_path):
    src = trained("transformer") / "bundle"
    edited_config = shutil.copytree(src, tmp_path / "fingerprint")
    config = json.loads((edited_config / "config.json").read_text())
    config["tokenizer"]["fingerprint"] = "0" * 64
    (edited_config / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="tokenizer files do not match"):
        Captioner.load(edited_config)

    edited_vocab = shutil.copytree(src, tmp_path / "vocab")
    body = json.loads((edited_vocab / "tokenizer" / "vocab.json").read_text())
    i, j = body["tokens"].index("red"), body["tokens"].index("blue")  # still a valid vocabulary, other ids
    body["tokens"][i], body["tokens"][j] = body["tokens"][j], body["tokens"][i]
    (edited_vocab / "tokenizer" / "vocab.json").write_text(json.dumps(body))
    with pytest.raises(BundleError, match="tokenizer files do not match"):
        Captioner.load(edited_vocab)


def test_bundle_and_checkpoints_hold_no_pickle(trained):
    out = trained("transformer")
    files = [p for d in ("bundle", "checkpoints") for p in (out / d).rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} <= {".json", ".safetensors", ".txt"}
    assert not [p for p in files if p.read_bytes()[:1] == b"\x80"]  # pickle protocol 2+ magic
    bundle = out / "bundle"
    assert sorted(p.name for p in bundle.iterdir()) == ["backbone.safetensors", "config.json", "model.safetensors",
                                                       "tokenizer"]


# --------------------------------------------------------------------------- 6. memory
def _peak_while_iterating(ds: CachedCaptionDataset, epochs: int = 2, batch_size: int = 16) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(epochs):
            for start in range(0, len(ds), batch_size):
                batch = ds.__getitems__(range(start, min(start + batch_size, len(ds))))
                del batch
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def _arrays_held(obj, seen=None) -> list[str]:
    """Names of numpy arrays / tensors reachable through ``obj``'s attributes and containers."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return [type(obj).__name__]
    found = []
    if isinstance(obj, dict):
        for v in obj.values():
            found += _arrays_held(v, seen)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            found += _arrays_held(v, seen)
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("cache", "pipeline"):
        for k, v in vars(obj).items():
            found += [f"{k}.{n}" for n in _arrays_held(v, seen)]
    return found


def test_training_memory_does_not_grow_with_the_cache(pipe):
    cache = FeatureCache(pipe.features)
    tok = load_tokenizer(pipe.tokenizer("word"))
    records = read_manifest(pipe.manifest)  # all 80 images, every split: a dataset is any (id, tokens) list
    small = CachedCaptionDataset(cache, train.caption_table(records[:40], tok), pad_id=tok.pad_id)
    large = CachedCaptionDataset(cache, train.caption_table(records, tok), pad_id=tok.pad_id)
    assert len(large) == 2 * len(small) == 400
    record_bytes = cache.meta.record_nbytes  # 4 tokens x 256 channels x float16 = 2 KiB
    batch_bytes = 16 * record_bytes
    peak_small, peak_large = _peak_while_iterating(small), _peak_while_iterating(large)
    print(f"tracemalloc peaks: {peak_small} B (40 images), {peak_large} B (80 images); one batch {batch_bytes} B")
    # Features are read per batch and dropped: the peak is about one batch, whatever the number of records.
    # Keeping features of the 40 extra images would add 40 x 2 KiB = 80 KiB.
    assert peak_large < 3 * batch_bytes, (peak_small, peak_large, batch_bytes)
    assert abs(peak_large - peak_small) < batch_bytes, (peak_small, peak_large, batch_bytes)
    # no feature arrays: only the captions' flat arrays (token ids, offsets, image ids and indices)
    assert sorted(_arrays_held(large)) == ["captions.image_ids.offsets.ndarray", "captions.image_ids.values.ndarray",
                                           "captions.image_of.ndarray", "captions.tokens.offsets.ndarray",
                                           "captions.tokens.values.ndarray"]


def test_two_open_caches_of_one_folder_both_read(pipe):
    # LMDB refuses a second open of a file in one process; a cache kept alive elsewhere (an exception's
    # traceback, a notebook variable) must not stop the next stage or a resumed run from reading it.
    a, b = FeatureCache(pipe.features), FeatureCache(pipe.features)
    ids = ["synthetic/000000", "synthetic/000001"]
    np.testing.assert_array_equal(a.get_batch(ids)["last"], b.get_batch(ids)["last"])
    a.close()
    assert b.get_batch(ids)["last"].shape == (2, 4, 256)
    b.close()


# --------------------------------------------------------------------------- 7. the image-blind control
def test_blind_control_trains_on_zeros_and_says_so(pipe, tmp_path, monkeypatch):
    cache = FeatureCache(pipe.features)
    tok = load_tokenizer(pipe.tokenizer("word"))
    samples = train.caption_table([r for r in read_manifest(pipe.manifest) if r.split == "train"][:4], tok)
    seeing = CachedCaptionDataset(cache, samples, pad_id=tok.pad_id).__getitems__(range(len(samples)))
    blind = CachedCaptionDataset(cache, samples, pad_id=tok.pad_id, zero_features=True).__getitems__(range(len(samples)))
    assert seeing.features.abs().max() > 0 and seeing.features.shape == blind.features.shape
    assert blind.features.dtype == seeing.features.dtype and not blind.features.any()
    assert torch.equal(blind.tokens, seeing.tokens)

    largest = []
    real = Trainer._forward

    def spy(self, batch):
        largest.append(float(batch.features.float().abs().max()))
        return real(self, batch)

    monkeypatch.setattr(Trainer, "_forward", spy)
    summary = train.run(pipe.cfg(tmp_path / "blind", "show_tell", epochs=1, blind=True))
    assert len(largest) == 20 and max(largest) == 0.0
    assert summary["blind"] is True
    config = json.loads((tmp_path / "blind" / "bundle" / "config.json").read_text())
    assert config["blind"] is True and config["training"]["config"]["blind"] is True
    assert json.loads((tmp_path / "blind" / "metrics.json").read_text())["blind"] is True


# --------------------------------------------------------------------------- 8. CLI and the decoders section
def test_cli_applies_the_family_section_and_command_line_options(pipe, tmp_path):
    out = tmp_path / "cli"
    params = pipe.params_file(
        tmp_path / "params.yaml", {"decoder": "transformer", "epochs": 3, "out_dir": str(out)},
        decoders={"show_tell": {"options": {"embed_dim": 24, "hidden_dim": 32, "dropout": 0.3},
                                "train": {"epochs": 1, "lr": 0.005}},
                  "transformer": {"options": {"d_model": 64}, "train": {"epochs": 2}}},
    )
    result = CliRunner().invoke(app, ["train", "--params", str(params), "--decoder", "show_tell",
                                      "--decoder-options", '{"hidden_dim": 40}'])
    assert result.exit_code == 0, result.output + str(result.exception)
    config = json.loads((out / "bundle" / "config.json").read_text())
    assert config["decoder"]["family"] == "show_tell"
    options = config["decoder"]["options"]
    assert (options["embed_dim"], options["hidden_dim"], options["dropout"]) == (24, 40, 0.3)
    assert config["training"]["config"]["lr"] == 0.005 and config["training"]["config"]["epochs"] == 1
    assert json.loads((out / "metrics.json").read_text())["epochs_run"] == 1


def _train_cli_errors(pipe, tmp_path, manifest) -> list[str]:
    """`pipeline train` of show_tell on ``manifest`` into tmp_path/x: its error lines (exit 2, no traceback)."""
    params = pipe.params_file(tmp_path / "params.yaml", {"decoder": "show_tell", "manifest": str(manifest),
                                                         "out_dir": str(tmp_path / "x")})
    result = CliRunner().invoke(app, ["train", "--params", str(params)], catch_exceptions=False)
    assert result.exit_code == 2 and "Traceback" not in result.output
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_cli_a_manifest_without_val_split_is_one_error_line(pipe, tmp_path):
    rows = [json.loads(line) for line in pipe.manifest.read_text().splitlines()]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({**r, "path": str(pipe.manifest.parent / r["path"]),
                                            "split": "train" if r["split"] == "val" else r["split"]}) + "\n"
                                for r in rows))
    train_images = sum(r["split"] in ("train", "val") for r in rows)
    assert _train_cli_errors(pipe, tmp_path, manifest) == [
        f"error: {manifest}: training needs train and val splits (found {train_images} train, 0 val images); give "
        "the sources a split or let `prepare` draw one (val_fraction)"]
    assert not (tmp_path / "x").exists()


def test_cli_manifest_images_missing_from_the_cache_is_one_error_line(pipe, tmp_path):
    rows = [json.loads(line) for line in pipe.manifest.read_text().splitlines()]
    rows = [{**r, "path": str(pipe.manifest.parent / r["path"])} for r in rows]
    rows.append({**rows[0], "image_id": "elsewhere/1"})
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _train_cli_errors(pipe, tmp_path, manifest) == [
        f"error: the feature cache {pipe.features} does not cover the manifest {manifest}: 1 image(s) are not in it "
        "(e.g. ['elsewhere/1']). Run `pipeline extract` on this manifest (it computes only the missing and changed "
        "images)"]
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_cli_refuses_an_unknown_family_in_the_decoders_section(pipe, tmp_path):
    params = pipe.params_file(tmp_path / "params.yaml", {"decoder": "show_tell", "out_dir": str(tmp_path / "x")},
                              decoders={"show_tel": {"options": {"hidden_dim": 32}}})
    result = CliRunner().invoke(app, ["train", "--params", str(params)])
    assert result.exit_code == 2
    assert "unknown decoder family 'show_tel'" in result.output and "did you mean 'show_tell'" in result.output
    assert not (tmp_path / "x").exists()


def test_cli_refuses_an_unknown_option_for_the_family(pipe, tmp_path):
    params = pipe.params_file(tmp_path / "params.yaml", {"decoder": "show_tell", "out_dir": str(tmp_path / "x")},
                              decoders={"show_tell": {"options": {"hiden_dim": 32}}})
    result = CliRunner().invoke(app, ["train", "--params", str(params)])
    assert result.exit_code == 2
    assert "unknown option 'hiden_dim' for decoder 'show_tell'" in result.output


def test_default_out_dir_follows_the_family_and_another_familys_bundle_is_kept(pipe, tmp_path, monkeypatch):
    """The README's `pipeline train --decoder show_attend_tell ...` in a repository must not overwrite
    models/transformer: the default out_dir is models/<decoder>, and an explicit out_dir holding another
    family's bundle is refused."""
    monkeypatch.chdir(tmp_path)
    params = pipe.params_file(tmp_path / "params.yaml", {"decoder": "transformer", "epochs": 1})
    result = CliRunner().invoke(app, ["train", "--params", str(params)])
    assert result.exit_code == 0, result.output + str(result.exception)
    transformer = tmp_path / "models" / "transformer" / "bundle" / "config.json"
    before = transformer.read_bytes()
    result = CliRunner().invoke(app, ["train", "--params", str(params), "--decoder", "show_tell",
                                      "--decoder-options", json.dumps(OPTIONS["show_tell"])])
    assert result.exit_code == 0, result.output + str(result.exception)
    assert json.loads((tmp_path / "models" / "show_tell" / "bundle" / "config.json").read_text()
                      )["decoder"]["family"] == "show_tell"
    assert transformer.read_bytes() == before
    result = CliRunner().invoke(app, ["train", "--params", str(params), "--decoder", "show_tell",
                                      "--decoder-options", json.dumps(OPTIONS["show_tell"]),
                                      "--out-dir", "models/transformer"])
    assert result.exit_code == 2
    assert "holds a trained 'transformer' model" in result.output and "--out-dir models/show_tell" in result.output
    assert transformer.read_bytes() == before


def test_amp_auto_is_bf16_only_where_the_cpu_has_bf16_units(monkeypatch):
    from pipeline.errors import ConfigError
    from pipeline.training import loop as training

    cpu = torch.device("cpu")
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)
    assert training.autocast_dtype("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)
    assert training.autocast_dtype("auto", cpu) is None
    assert training.autocast_dtype("bf16", cpu) is torch.bfloat16 and training.autocast_dtype("none", cpu) is None
    with pytest.raises(ConfigError, match="--amp fp16 needs a CUDA device"):
        training.autocast_dtype("fp16", cpu)
    assert TrainConfig().amp == "auto"
