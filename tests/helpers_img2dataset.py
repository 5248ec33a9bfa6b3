"""img2dataset-layout shards of small coloured JPEGs with captions, and `prepare` on them (for the tests)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import Img2DatasetSource, PrepareConfig
from pipeline.data.img2dataset import sample_key, write_shard

WORDS = ["dog", "cat", "red", "ball", "grass", "runs", "sits", "on", "the", "a", "blue", "car"]


def jpeg(seed: int, size=(48, 64)) -> bytes:
    """A small JPEG whose colour follows the seed (so captions can say something about it)."""
    rng = np.random.default_rng(seed)
    base = np.array([[220, 40, 40], [40, 200, 40], [40, 40, 220]][seed % 3], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-30, 30, (*size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def caption(seed: int, j: int) -> str:
    colour = ["red", "green", "blue"][seed % 3]
    rng = np.random.default_rng(seed * 31 + j)
    return f"a {colour} " + " ".join(rng.choice(WORDS, 4))


def make_shards(folder: Path, shards: int = 2, per_shard: int = 8, *, failures: bool = True) -> dict:
    """``shards`` img2dataset shards of ``per_shard`` rows each; with ``failures`` row 2 failed to download,
    row 3 failed to resize and row 5 has an empty caption. Returns what was written, by key."""
    written = {}
    for s in range(shards):
        rows = []
        for i in range(per_shard):
            seed = s * 100 + i
            url = f"https://example.com/{s}/{i}.jpg"
            if failures and i == 2:
                rows.append({"url": url, "caption": "lost", "status": "failed_to_download",
                             "error_message": "HTTP Error 404: Not Found"})
            elif failures and i == 3:
                rows.append({"url": url, "caption": "odd", "status": "failed_to_resize",
                             "error_message": "image decoding error"})
            else:
                text = "" if failures and i == 5 else caption(seed, 0)
                rows.append({"url": url, "caption": text, "image": jpeg(seed), "width": 64, "height": 48})
            written[sample_key(i, s)] = rows[-1]
        write_shard(folder, s, rows)
    return written


def prepare_shards(source_path, out: Path, **kw):
    from stages import prepare

    return prepare.run(PrepareConfig(sources=[Img2DatasetSource(path=str(source_path))], out_dir=out,
                                     val_fraction=0.25, test_fraction=0.25, **kw))
