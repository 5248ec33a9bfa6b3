"""Shared fixtures. Tests never read ../shared and never touch the network."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def write_png(path: Path, seed: int, size=(40, 56)) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


def make_image_manifest(root: Path, n: int, *, bad: bool = False) -> Path:
    """``n`` small random PNGs and a manifest naming them (plus one non-image file when ``bad``)."""
    rows = []
    for i in range(n):
        write_png(root / "img" / f"{i:03d}.png", seed=i)
        rows.append({"image_id": f"t/{i:03d}", "path": f"img/{i:03d}.png", "captions": [f"image {i}"],
                     "split": ["train", "val", "test"][i % 3], "source": "t"})
    if bad:
        (root / "img" / "bad.png").write_bytes(b"this is not an image")
        rows.append({"image_id": "t/bad", "path": "img/bad.png", "captions": ["x"], "split": "train", "source": "t"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return manifest


@pytest.fixture
def image_manifest(tmp_path: Path) -> Path:
    return make_image_manifest(tmp_path / "data", 24, bad=True)


def copy_repo(dest: Path) -> Path:
    """A copy of the working tree as a user's fresh clone would have it (tracked and untracked-but-not-ignored
    files), committed in a new git repository (dvclive reads HEAD)."""
    import shutil
    import subprocess

    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, check=True).stdout
    for rel in listing.decode().split("\0"):
        if rel and (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(git + ["init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with ``n`` torch CPU threads, then restore. Tiny tensors on a shared 2-core machine run several
    times faster on one thread than on two (measured 5-10x under load: OpenMP threads spin)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (restored afterwards)."""
    with torch_threads(1):
        yield


TINY_BACKBONE = "test_efficientnet"  # timm's tiny test model: random init, 2x2 tokens of 256 channels at 64 px
TINY_TRANSFORMER = {"d_model": 32, "num_layers": 1, "num_heads": 2, "ff_dim": 64}


@dataclass
class TinyPipeline:
    """prepare -> extract -> vocab on 80 synthetic 64-px images (built once per test session), and a small
    transformer trained on them (built on first use of :attr:`bundle`)."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "prepared" / "manifest.jsonl"

    @property
    def features(self) -> Path:
        return self.root / "features"

    def tokenizer(self, kind: str = "word") -> Path:
        return self.root / "tokenizers" / kind

    @property
    def bundle(self) -> Path:
        """A transformer bundle trained for 4 epochs on the pipeline's cache (trained once, on first use)."""
        out = self.root / "base"
        if not (out / "bundle" / "config.json").exists():
            from pipeline.config import TrainConfig
            from stages import train

            with torch_threads(1):
                train.run(TrainConfig(manifest=self.manifest, features=self.features, tokenizer=self.tokenizer(),
                                      out_dir=out, decoder="transformer", decoder_options=TINY_TRANSFORMER, epochs=4,
                                      batch_size=16, lr=3e-3, warmup_steps=0, val_max_images=8,
                                      max_caption_length=12, device="cpu", patience=0))
        return out / "bundle"


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> TinyPipeline:
    from pipeline.config import ExtractConfig, PrepareConfig, SyntheticSource, VocabConfig
    from stages import extract, prepare, vocab

    p = TinyPipeline(tmp_path_factory.mktemp("tiny_pipeline"))
    with torch_threads(1):
        prepare.run(PrepareConfig(sources=[SyntheticSource(num_images=80, noisy_images=0, image_size=64)],
                                  out_dir=p.root / "prepared", check_images="none"))
        extract.run(ExtractConfig(manifest=p.manifest, out_dir=p.features, backbone=TINY_BACKBONE, image_size=64,
                                  num_shards=2, batch_size=32, workers=0, device="cpu"))
        vocab.run(VocabConfig(manifest=p.manifest, out_dir=p.root / "tokenizers", kinds=["word", "bpe", "gpt2"],
                              bpe_vocab_size=300))
    return p
