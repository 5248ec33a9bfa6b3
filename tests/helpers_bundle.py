"""A tiny but complete model bundle for tests: real files, real backbone, random weights, seconds to build.

``build_tiny_bundle(folder)`` writes a bundle that captions image files end to end: timm's tiny
``test_efficientnet`` backbone at 64 px (random init, its state dict stored as the bundle's backbone,
a 2x2 grid of visual tokens), a word tokenizer built from a few captions, and a small randomly
initialised decoder (``show_attend_tell`` by default; its output bias keeps it from ending early, so every
caption is ``MAX_LENGTH`` real words; or ``transformer`` / ``gpt2``, whose cross-attention gives heatmaps too,
or ``perceiver_gpt2``, which has none: it attends to latents).

Use the session fixture :func:`tiny_bundle` (``from tests.helpers_bundle import tiny_bundle``) to build it once.
Also here: :func:`image_bytes` (a small encoded image) and :func:`serve_in_thread` (uvicorn on a free
127.0.0.1 port in a background thread, for tests that need a real socket).
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

BACKBONE = "test_efficientnet"
IMAGE_SIZE = 64
MAX_LENGTH = 6
CAPTIONS = [
    "a red circle on a plain background", "one blue square in the middle", "the green star is small",
    "two yellow triangles next to each other", "a purple circle above a red square", "three small blue stars",
]


def tiny_decoder(family: str, tokenizer, *, feature_dim: int, num_tokens: int, max_length: int = MAX_LENGTH,
                 seed: int = 0) -> torch.nn.Module:
    """A small randomly initialised decoder in eval mode: ``show_attend_tell`` (its output bias keeps it from
    ending early, so every caption is ``max_length`` real words), ``transformer``, ``gpt2`` or ``perceiver_gpt2``
    (their output layer has no bias: captions may end early)."""
    from pipeline.models.decoders import create_decoder

    tok = tokenizer
    torch.manual_seed(seed)
    common = dict(feature_dim=feature_dim, vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                  eos_id=tok.eos_id)
    if family == "show_attend_tell":
        decoder = create_decoder(family, **common, embed_dim=16, hidden_dim=16, attention_dim=8, visual_dim=8,
                                 dropout=0.0)
        with torch.no_grad():  # never emit a special token: captions are max_length real words
            for special in {tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id}:
                decoder.out.bias[special] = -30.0
    elif family == "transformer":  # captions may end early (its head has no bias)
        decoder = create_decoder(family, **common, d_model=16, num_layers=1, num_heads=2, dropout=0.0,
                                 max_length=max_length + 2, max_visual_tokens=num_tokens, tie_embeddings=False)
    elif family in ("gpt2", "perceiver_gpt2"):
        extra = {"num_latents": 4} if family == "perceiver_gpt2" else {}
        decoder = create_decoder(family, **common, n_layer=1, n_head=2, n_embd=16, n_positions=max_length + 2,
                                 dropout=0.0, max_visual_tokens=num_tokens, **extra)
    else:
        raise ValueError(f"no tiny recipe for decoder family {family!r}")
    return decoder.eval()


def build_tiny_bundle(directory: Path, family: str = "show_attend_tell", *, seed: int = 0) -> Path:
    from pipeline.inference.bundle import save_bundle
    from pipeline.models.backbones import create_backbone
    from pipeline.text.tokenizers import build_word_vocab

    bb = create_backbone(BACKBONE, image_size=IMAGE_SIZE, crop_pct=1.0)
    spec = bb.feature_spec(weights=bb.weights_info, dtype="float16")  # save_bundle adds the weights' sha256
    tok = build_word_vocab(CAPTIONS, min_freq=1, max_length=MAX_LENGTH)
    decoder = tiny_decoder(family, tok, feature_dim=spec.feature_dim, num_tokens=spec.num_tokens, seed=seed)
    save_bundle(Path(directory), decoder=decoder, tokenizer=tok, features=spec, backbone_state=bb.model.state_dict())
    return Path(directory)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("tiny-bundle") / "bundle")


@pytest.fixture(scope="session")
def tiny_transformer_bundle(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("tiny-transformer") / "bundle", family="transformer")


@pytest.fixture(scope="session")
def tiny_perceiver_bundle(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("tiny-perceiver") / "bundle", family="perceiver_gpt2")


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (48, 40), seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app, timeout: float = 20.0) -> Iterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 (free port) in a daemon thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
