"""Shared fixtures. Tests never read ../shared and never touch the network."""

from __future__ import annotations

import json
import os
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
