"""CUDA paths: extraction with bf16 autocast + channels_last, training with bf16 / fp16 (GradScaler) /
torch.compile, captioning on the GPU. Skipped where no GPU is present (CI has none); run on a
GPU machine with ``pytest -m gpu``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cache import FeatureCache
from pipeline.config import ExtractConfig, PrepareConfig, SyntheticSource, TrainConfig, VocabConfig
from pipeline.inference.bundle import Captioner
from stages import extract, prepare, train, vocab

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu")
    prepare.run(PrepareConfig(sources=[SyntheticSource(num_images=120, noisy_images=0, image_size=64)],
                              out_dir=root / "prepared", check_images="none"))
    vocab.run(VocabConfig(manifest=root / "prepared/manifest.jsonl", out_dir=root / "tokenizers", kinds=["word"]))
    return root


def _extract(root: Path, out: str, **kw) -> FeatureCache:
    extract.run(ExtractConfig(manifest=root / "prepared/manifest.jsonl", out_dir=root / out,
                              backbone="test_efficientnet", image_size=64, num_shards=2, batch_size=32, workers=2,
                              **kw))
    return FeatureCache(root / out)


def test_cuda_extraction_matches_cpu(pipe):
    cpu = _extract(pipe, "feat_cpu", device="cpu")
    gpu = _extract(pipe, "feat_cuda", device="cuda")
    bf16 = _extract(pipe, "feat_bf16", device="cuda", amp=True, channels_last=True)
    ids = sorted(cpu.keys())
    assert sorted(gpu.keys()) == ids == sorted(bf16.keys())
    a, b, c = (x.get_batch(ids)["last"].astype(np.float32) for x in (cpu, gpu, bf16))
    np.testing.assert_allclose(b, a, rtol=1e-2, atol=1e-2)
    # bf16 keeps ~3 significant digits: close, not equal
    assert np.abs(c - a).mean() < 0.05 * np.abs(a).mean()


@pytest.mark.parametrize("amp,compile_", [("bf16", False), ("fp16", False), ("bf16", True)])
def test_cuda_training_learns(pipe, tmp_path, amp, compile_):
    feats = pipe / "feat_gpu_train"
    if not (feats / "meta.json").exists():
        _extract(pipe, "feat_gpu_train", device="cuda")
    cfg = TrainConfig(manifest=pipe / "prepared/manifest.jsonl", features=feats, tokenizer=pipe / "tokenizers/word",
                      out_dir=tmp_path / "m", decoder="transformer",
                      decoder_options={"d_model": 64, "num_layers": 2, "num_heads": 4}, epochs=4, batch_size=32,
                      lr=2e-3, warmup_steps=5, val_max_images=8, device="cuda", amp=amp, compile=compile_, patience=0)
    summary = train.run(cfg)
    # an untrained model's loss is about ln(vocabulary) = ln(68) = 4.2
    assert summary["epochs_run"] == 4 and summary["val_loss"] < 3.0
    captioner = Captioner.load(tmp_path / "m" / "bundle", device="cuda")
    features = torch.from_numpy(FeatureCache(feats).get_batch(["synthetic/000000"])["last"])
    (best,), = captioner.caption_features(features)
    assert best.text.strip()
