"""Acceptance: a pretrained GPT-2 (a tiny local folder) -> train -> bundle -> caption / evaluate / serve / scst,
all from a working directory where that folder no longer exists.

The pretrained model is a GPT-2 of non-default size (1 layer, 2 heads, width 32, 40 positions) with GPT-2's
own 50257-token vocabulary, saved with ``save_pretrained``; the caption tokenizer is the one `pipeline vocab`
builds with kind ``gpt2``. The data is a tiny real pipeline (prepare -> extract with timm's tiny
``test_efficientnet`` at 64 px -> vocab) of 24 images (20 train, 2 val, 2 test): 50257-way logits make
every step cost a fraction of a second on a busy CPU. The best epoch is picked by validation loss (the
CIDEr of two validation images of a barely trained model is 0 every epoch, which would keep epoch 1).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.config import EvaluateConfig, ExtractConfig, PrepareConfig, ScstConfig, SyntheticSource, TrainConfig, VocabConfig
from pipeline.inference.bundle import Captioner
from pipeline.text.tokenizers import load_tokenizer
from stages import evaluate, extract, prepare, scst, train, vocab

BACKBONE = "test_efficientnet"
SIZES = {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 40}
# 100 captions in batches of 8, 6 epochs (~5 s): enough for beam search to prefer words to an immediate end
# (an undertrained GPT-2 predicts <|endoftext|>, its most frequent target, first: an empty caption).
EPOCHS = 6
FAMILY_OPTIONS = {"gpt2": {}, "perceiver_gpt2": {"num_latents": 4, "resampler_depth": 1}}


@dataclass
class Trained:
    family: str
    bundle: Path
    wpe: torch.Tensor  # the pretrained checkpoint's position table (read before the folder was deleted)


@dataclass
class Data:
    root: Path
    manifest: Path  # image paths relative to its folder
    features: Path
    tokenizer: Path


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Data:
    root = tmp_path_factory.mktemp("pretrained_gpt2")
    prepare.run(PrepareConfig(sources=[SyntheticSource(num_images=24, noisy_images=0, image_size=64)],
                              out_dir=root / "prepared", check_images="none"))
    manifest = root / "prepared" / "manifest.jsonl"
    splits = [json.loads(line)["split"] for line in manifest.read_text(encoding="utf-8").splitlines()]
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (20, 2, 2)
    extract.run(ExtractConfig(manifest=manifest, out_dir=root / "features", backbone=BACKBONE, image_size=64,
                              num_shards=1, batch_size=16, workers=0, device="cpu"))
    vocab.run(VocabConfig(manifest=manifest, out_dir=root / "tokenizers", kinds=["gpt2"]))
    return Data(root, manifest, root / "features", root / "tokenizers" / "gpt2")


def save_tiny_gpt2(folder: Path, vocab_size: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, **SIZES)).save_pretrained(folder)


@pytest.fixture(scope="module", params=list(FAMILY_OPTIONS))
def trained(request, data) -> Trained:
    """The bundle trained from the tiny pretrained folder, which is then deleted."""
    family = request.param
    vocab_size = load_tokenizer(data.tokenizer).vocab_size
    assert vocab_size == 50257  # GPT-2's own vocabulary: the pretrained model's must be the same
    pretrained = data.root / f"gpt2-tiny-{family}"
    save_tiny_gpt2(pretrained, vocab_size)
    out = data.root / "runs" / family
    summary = train.run(TrainConfig(
        manifest=data.manifest, features=data.features, tokenizer=data.tokenizer, out_dir=out, decoder=family,
        decoder_options={"pretrained_path": str(pretrained), **FAMILY_OPTIONS[family]}, epochs=EPOCHS, batch_size=8,
        lr=2e-2, warmup_steps=0, label_smoothing=0.0, val_max_images=2, max_caption_length=12, device="cpu",
        amp="none", patience=0, val_metric="loss"))
    assert summary["epochs_run"] == EPOCHS
    from safetensors.torch import load_file

    wpe = load_file(str(pretrained / "model.safetensors"))["transformer.wpe.weight"]
    shutil.rmtree(pretrained)
    assert not pretrained.exists()
    return Trained(family, out / "bundle", wpe)


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """An empty working directory: nothing the run used is reachable by a relative path."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def _image(data: Data, split: str = "test") -> Path:
    rows = [json.loads(line) for line in data.manifest.read_text(encoding="utf-8").splitlines()]
    row = next(r for r in rows if r["split"] == split)
    return (data.manifest.parent / row["path"]).resolve()


def test_the_bundle_records_the_checkpoint_sizes_and_no_path(trained, data):
    family, bundle = trained.family, trained.bundle
    config = json.loads((bundle / "config.json").read_text(encoding="utf-8"))
    options = config["decoder"]["options"]
    assert config["decoder"]["family"] == family
    assert {k: options[k] for k in SIZES} == SIZES
    assert options["pretrained_path"] is None
    assert all(options[k] == v for k, v in FAMILY_OPTIONS[family].items())
    assert config["tokenizer"]["kind"] == "gpt2"
    # What loading reads names no path (the training summary keeps the run's config, as provenance only).
    assert "gpt2-tiny" not in json.dumps({k: v for k, v in config.items() if k != "training"})
    assert config["training"]["config"]["decoder_options"]["pretrained_path"].endswith(f"gpt2-tiny-{family}")
    # The checkpoint's weights were the start: positions no caption reaches (captions are at most 26 tokens)
    # get no gradient and no weight decay, so they are still the pretrained model's, bit for bit.
    from safetensors.torch import load_file

    wpe = load_file(str(bundle / "model.safetensors"))["gpt2.transformer.wpe.weight"]
    assert wpe.shape == (40, 32)
    assert torch.equal(wpe[30:], trained.wpe[30:])
    assert not torch.equal(wpe[:5], trained.wpe[:5])  # and the used ones were trained


def test_captioner_captions_cached_features_and_image_files(trained, data, elsewhere):
    from cache import FeatureCache

    bundle = trained.bundle
    captioner = Captioner.load(bundle)
    assert captioner.tokenizer.vocab_size == 50257
    gpt2 = captioner.decoder.gpt2.config
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.n_positions) == (1, 2, 32, 40)
    cache = FeatureCache(data.features)
    ids = sorted(cache.keys())[:2]
    feats = torch.from_numpy(cache.get_batch(ids)["last"]).float()
    by_features = captioner.caption_features(feats, spec=cache.spec)
    by_images = captioner.caption_images([_image(data), _image(data, "train")])
    for caps in (by_features, by_images):
        assert len(caps) == 2
        assert all(c[0].tokens and c[0].text.strip() for c in caps), [c[0].text for c in caps]
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("source", ["cache", "images"])
def test_evaluate_on_the_test_split(trained, data, elsewhere, tmp_path, monkeypatch, source):
    bundle = trained.bundle
    # Java hidden: the pure-Python scorer fallback (METEOR's JVM alone takes seconds to start; the Java path
    # is tests/test_metrics.py's).
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd == "java" else real_which(cmd, *a, **k))
    out = tmp_path / "report"
    metrics = evaluate.run(EvaluateConfig(model=bundle, manifest=data.manifest,
                                          features=data.features if source == "cache" else None,
                                          out_dir=out, split="test", device="cpu", batch_size=4, gallery_size=0))
    for key in evaluate.METRIC_KEYS:
        assert key in metrics
    assert isinstance(metrics["BLEU-4"], float) and isinstance(metrics["CIDEr"], float)
    assert metrics["num_images"] == 2 and metrics["features"]["source"] == source
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert len(results) == 2 and all(isinstance(r["caption"], str) for r in results)
    assert (out / "metrics.json").is_file()


def test_serve_answers_a_caption_request(trained, data, elsewhere):
    from fastapi.testclient import TestClient

    from pipeline.serve.app import create_app

    bundle = trained.bundle
    png = _image(data).read_bytes()
    with TestClient(create_app(bundle, max_wait_ms=2.0)) as client:
        assert client.get("/health").json()["status"] == "ok"
        r = client.post("/caption", files={"image": ("a.png", png, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["caption"], str) and body["caption"].strip(), body
    assert body["mode"] == "consistent"


def test_caption_command(trained, data, elsewhere):
    from pipeline.cli import app

    bundle = trained.bundle
    image = _image(data)
    before = torch.get_num_threads()
    try:
        r = CliRunner().invoke(app, ["caption", str(image), "--model", str(bundle), "--threads", "1"])
    finally:
        torch.set_num_threads(before)
    assert r.exit_code == 0, r.output
    first, *alternatives = r.stdout.splitlines()
    assert first.startswith(f"{image}: ") and first.split(": ", 1)[1].strip(), r.output
    assert all(a.startswith("    ~ ") for a in alternatives), r.output


def test_scst_one_epoch_writes_a_bundle_that_loads(trained, data, elsewhere, tmp_path):
    family, bundle = trained.family, trained.bundle
    out = tmp_path / "scst"
    summary = scst.run(ScstConfig(bundle=bundle, manifest=data.manifest, features=data.features, out_dir=out,
                                  epochs=1, batch_size=4, max_train_images=4, val_max_images=2, num_samples=2,
                                  max_caption_length=12, max_length=8, device="cpu", lr=1e-3, warmup_steps=0,
                                  workers=1))
    assert summary["epochs_run"] == 1
    config = json.loads((out / "bundle" / "config.json").read_text(encoding="utf-8"))
    assert config["decoder"]["family"] == family
    assert {k: config["decoder"]["options"][k] for k in SIZES} == SIZES
    assert config["decoder"]["options"]["pretrained_path"] is None
    loaded = Captioner.load(out / "bundle")
    caps = loaded.caption_images([_image(data)])
    assert caps[0][0].tokens and caps[0][0].text.strip()
