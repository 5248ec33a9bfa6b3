"""Multi-scale CNN features: several token sets of different widths train, caption, evaluate and serve.

A small world built once: 12 random 64-px images, random-init ``resnet18`` and ``convnext_atto``
(timm, nothing downloaded) extracted at two stages (``--out-indices 2 --out-indices 3``: 64x128 + 16x256
and 16x160 + 4x320 tokens x channels), a word tokenizer. Each decoder family trains one epoch on both
token sets; its bundle captions the same from the cache and from the image files, and `evaluate` runs.
Unit tests pin the one-tensor layout (sets concatenated along the tokens, zero-padded to the widest),
the per-set projection, and that a single-set decoder is exactly what it was before (old bundles load).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache import FeatureCache
from pipeline.config import EvaluateConfig, ExtractConfig, TrainConfig, VocabConfig
from pipeline.data.features import (
    concat_token_maps,
    select_features,
    token_layout,
)
from pipeline.data.manifest import read_manifest
from pipeline.inference.bundle import Captioner
from pipeline.models.decoders import DECODERS, create_decoder
from pipeline.models.decoders.layers import VisualProjection
from tests.conftest import make_image_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

BACKBONES = {"resnet18": [("stage2", 64, 128), ("stage3", 16, 256)],  # strides 8 and 16 at 64 px
             "convnext_atto": [("stage2", 16, 160), ("stage3", 4, 320)]}  # strides 16 and 32
OPTIONS = {
    "show_tell": {"embed_dim": 16, "hidden_dim": 16},
    "show_attend_tell": {"embed_dim": 16, "hidden_dim": 16, "attention_dim": 8, "visual_dim": 16},
    "transformer": {"d_model": 16, "num_layers": 1, "num_heads": 2, "ff_dim": 32, "num_encoder_layers": 1},
    "gpt2": {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16},
    "perceiver_gpt2": {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16, "num_latents": 4,
                       "resampler_depth": 1},
}
# Where each family's visual projection lives, and its width with OPTIONS.
PROJECTION = {"show_tell": ("image_proj.0", 16), "show_attend_tell": ("visual_proj.0", 16),
              "transformer": ("visual.proj", 16), "gpt2": ("visual.proj", 16), "perceiver_gpt2": ("visual.proj", 16)}
IDS = dict(vocab_size=20, pad_id=0, bos_id=1, eos_id=2)


def no_java(monkeypatch) -> None:
    """Hide Java: the metrics' pure-Python fallback, seconds faster."""
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd == "java" else real_which(cmd, *a, **k))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from stages import extract, vocab

    root = tmp_path_factory.mktemp("multiscale")
    manifest = make_image_manifest(root / "data", 12)  # 4 train, 4 val, 4 test images
    vocab.run(VocabConfig(manifest=manifest, out_dir=root / "tokenizers", kinds=["word"], min_freq=1,
                          max_length=8))  # short captions: GPT-2 n_positions 16 holds bos + 8 + eos
    for backbone in BACKBONES:
        extract.run(ExtractConfig(manifest=manifest, out_dir=root / backbone, backbone=backbone, image_size=64,
                                  out_indices=[2, 3], num_shards=1, batch_size=16, workers=0, device="cpu"))
    return root, manifest


def train_cfg(world, backbone: str, family: str, out: Path, **kw) -> TrainConfig:
    root, manifest = world
    return TrainConfig(**{**dict(manifest=manifest, features=root / backbone, tokenizer=root / "tokenizers" / "word",
                                 out_dir=out, decoder=family, decoder_options=OPTIONS[family], epochs=1,
                                 batch_size=8, lr=3e-3, warmup_steps=0, max_caption_length=6, device="cpu",
                                 amp="none", patience=0), **kw})


# --------------------------------------------------------------------------- the one-tensor layout
def test_select_features_pads_narrower_sets_with_zeros_and_leaves_equal_widths_alone():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, 3, 4)).astype(np.float16)
    b = rng.standard_normal((2, 2, 6)).astype(np.float16)
    both = select_features({"a": a, "b": b}, ["a", "b"])
    assert both.shape == (2, 5, 6) and both.dtype == np.float16
    np.testing.assert_array_equal(both[:, :3, :4], a)
    np.testing.assert_array_equal(both[:, 3:], b)
    assert not both[:, :3, 4:].any()  # the padding is zeros
    np.testing.assert_array_equal(select_features({"a": a, "b": b}, ["b", "a"])[:, :2], b)  # the order asked for
    # Equal widths: plain concatenation, bytes unchanged; one set: the array itself (single-set runs unchanged).
    c = rng.standard_normal((2, 2, 4)).astype(np.float16)
    assert select_features({"a": a, "c": c}, None).tobytes() == np.concatenate([a, c], axis=1).tobytes()
    assert select_features({"a": a, "b": b}, ["a"]) is a
    # bfloat16 arrives as raw 16-bit words: zero words are 0.0 too.
    words = select_features({"a": a.view(np.uint16), "b": b.view(np.uint16)}, None)
    assert words.dtype == np.uint16 and not words[:, :3, 4:].any()
    # What Captioner.encode_pixels makes of a backbone's maps is the same tensor.
    torch.testing.assert_close(concat_token_maps([torch.from_numpy(a), torch.from_numpy(b)]), torch.from_numpy(both),
                               rtol=0, atol=0)


def test_visual_projection_projects_each_set_with_its_own_linear_and_embedding():
    torch.manual_seed(0)
    proj = VisualProjection([(3, 4), (2, 6)], 5)
    x = torch.randn(2, 5, 6)
    x[:, :3, 4:] = 0  # the padding of the narrower set
    y = proj(x)
    assert y.shape == (2, 5, 5)
    e = proj.set_embedding
    assert tuple(e.shape) == (2, 5) and tuple(proj.weight.shape) == (5, 4) and tuple(proj.extra[0].weight.shape) == (5, 6)
    torch.testing.assert_close(y[:, :3], x[:, :3, :4] @ proj.weight.T + proj.bias + e[0])
    torch.testing.assert_close(y[:, 3:], x[:, 3:] @ proj.extra[0].weight.T + proj.extra[0].bias + e[1])
    noisy = x.clone()
    noisy[:, :3, 4:] = 7.0
    torch.testing.assert_close(proj(noisy), y)  # a set reads its own channels only
    # Pooled (show_tell): each set's mean token after its projection, the sets averaged.
    torch.testing.assert_close(proj.pool(x), (y[:, :3].mean(1) + y[:, 3:].mean(1)) / 2)
    with pytest.raises(ValueError, match=r"features of shape \(2, 4, 6\).*expected \(batch, 5, 6\)"):
        proj(x[:, :4])
    # One set: exactly nn.Linear (nothing else, same init from the same seed).
    torch.manual_seed(0)
    single = VisualProjection([(3, 4)], 5)
    torch.manual_seed(0)
    linear = torch.nn.Linear(4, 5)
    assert single.extra is None and single.set_embedding is None
    assert {k: v.shape for k, v in single.state_dict().items()} == {k: v.shape for k, v in linear.state_dict().items()}
    assert all(torch.equal(single.state_dict()[k], v) for k, v in linear.state_dict().items())


def test_layout_errors_are_named():
    with pytest.raises(ValueError, match=r"feature_dim 128 disagrees with token_sets \[\(64, 128\), \(16, 256\)\]"):
        create_decoder("transformer", feature_dim=128, token_sets=[(64, 128), (16, 256)], **IDS, **OPTIONS["transformer"])
    with pytest.raises(ValueError, match="needs feature_dim or token_sets"):
        create_decoder("transformer", **IDS, **OPTIONS["transformer"])
    with pytest.raises(ValueError, match="80 visual tokens but max_visual_tokens is 64"):
        create_decoder("transformer", token_sets=[(64, 128), (16, 256)], **IDS,
                       **{**OPTIONS["transformer"], "max_visual_tokens": 64})


@pytest.mark.parametrize("family", list(DECODERS))
def test_a_single_set_decoder_has_todays_parameters(family):
    """Old bundles (one token set) load: the same state-dict keys, shapes and init as a decoder built from
    ``feature_dim`` alone; several sets add only their Linears and (spatial families) the set embedding."""
    prefix, width = PROJECTION[family]
    torch.manual_seed(0)
    legacy = create_decoder(family, feature_dim=24, **IDS, **OPTIONS[family]).state_dict()
    torch.manual_seed(0)
    single = create_decoder(family, token_sets=[(9, 24)], **IDS, **OPTIONS[family]).state_dict()
    assert list(single) == list(legacy)
    assert all(torch.equal(single[k], legacy[k]) for k in legacy)
    assert tuple(single[f"{prefix}.weight"].shape) == (width, 24) and tuple(single[f"{prefix}.bias"].shape) == (width,)
    assert not [k for k in single if "set_embedding" in k or ".extra." in k]

    multi = create_decoder(family, token_sets=[(9, 24), (4, 40), (1, 8)], **IDS, **OPTIONS[family]).state_dict()
    added = {k: tuple(v.shape) for k, v in multi.items() if k not in single}
    expected = {f"{prefix}.extra.0.weight": (width, 40), f"{prefix}.extra.0.bias": (width,),
                f"{prefix}.extra.1.weight": (width, 8), f"{prefix}.extra.1.bias": (width,)}
    if family != "show_tell":  # it pools the sets: nothing after it sees which token came from where
        expected[f"{prefix}.set_embedding"] = (3, width)
    assert added == expected
    assert {k: v.shape for k, v in multi.items() if k in single} == {k: v.shape for k, v in single.items()}


# --------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("family", list(DECODERS))
def test_family_trains_captions_and_evaluates_on_two_scales(world, tmp_path, monkeypatch, family, backbone):
    from stages import evaluate, train

    root, manifest = world
    sets = BACKBONES[backbone]
    cache = FeatureCache(root / backbone)
    assert [(t.name, t.tokens, t.channels) for t in cache.spec.token_sets] == sets

    train.run(train_cfg(world, backbone, family, tmp_path / "m"))  # token sets: the cache's default, all
    bundle = tmp_path / "m" / "bundle"
    config = json.loads((bundle / "config.json").read_text())
    assert [(t["name"], t["tokens"], t["channels"], t["index"]) for t in config["features"]["token_sets"]] == [
        (n, tokens, channels, index) for (n, tokens, channels), index in zip(sets, (2, 3))]

    captioner = Captioner.load(bundle)
    layout = tuple((tokens, channels) for _, tokens, channels in sets)
    assert captioner.decoder.token_sets == layout
    state = captioner.decoder.state_dict()
    prefix, width = PROJECTION[family]
    assert tuple(state[f"{prefix}.weight"].shape) == (width, sets[0][2])
    assert tuple(state[f"{prefix}.extra.0.weight"].shape) == (width, sets[1][2])
    assert (f"{prefix}.set_embedding" in state) == (family != "show_tell")

    # The same captions from the cache and from the image files (through the bundle's own backbone).
    test = [r for r in read_manifest(manifest) if r.split == "test"]
    ids, paths = [r.image_id for r in test], [manifest.parent / r.path for r in test]
    cached = torch.from_numpy(select_features(cache.get_batch(ids), None)).float()
    assert cached.shape == (len(ids), sum(t for _, t, _ in sets), max(c for *_, c in sets))
    from pipeline.data.images import load_rgb

    encoded = captioner.encode_images([load_rgb(p) for p in paths])
    torch.testing.assert_close(encoded, cached, rtol=2e-3, atol=2e-3)
    assert not encoded[:, : sets[0][1], sets[0][2]:].any()  # the narrower set's padding
    from_cache = captioner.caption_features(cached, spec=cache.spec)
    from_images = captioner.caption_images(paths)
    assert [c[0].tokens for c in from_images] == [c[0].tokens for c in from_cache]
    assert all(len(c[0].tokens) >= 1 for c in from_cache)
    beams = captioner.caption_features(cached, "consistent")  # beam search expands the one features tensor
    assert len(beams) == len(ids)

    no_java(monkeypatch)
    heatmaps = family == "show_attend_tell"
    metrics = evaluate.run(EvaluateConfig(manifest=manifest, features=root / backbone, model=bundle,
                                          out_dir=tmp_path / "report", device="cpu", batch_size=4,
                                          gallery_size=2 if heatmaps else 0))
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert sorted(r["image_id"] for r in results) == sorted(ids)
    greedy = {i: c[0].text for i, c in zip(ids, from_cache)}
    assert {r["image_id"]: r["caption"] for r in results} == greedy
    assert metrics["features"]["source"] == "cache" and isinstance(metrics["CIDEr"], float)
    if heatmaps:  # attention over both scales, drawn per scale
        assert list((tmp_path / "report" / "gallery" / "heatmaps").glob("*.png"))


def test_train_cli_token_sets_selects_one_scale(world, tmp_path):
    """`pipeline train --token-sets stage3`: the bundle records that set only, and its decoder is a plain
    single-set one (no per-set Linears, no set embedding: the parameters a one-set cache always gave)."""
    import yaml

    from pipeline.cli import app

    root, _ = world
    cfg = train_cfg(world, "resnet18", "transformer", tmp_path / "one")
    section = {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.model_dump().items()
               if k in cfg.model_fields_set}
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": section}), encoding="utf-8")
    result = CliRunner().invoke(app, ["train", "--params", str(params), "--token-sets", "stage3"])
    assert result.exit_code == 0, result.output + str(result.exception)
    config = json.loads((tmp_path / "one" / "bundle" / "config.json").read_text())
    assert [t["name"] for t in config["features"]["token_sets"]] == ["stage3"]
    decoder = Captioner.load(tmp_path / "one" / "bundle").decoder
    assert decoder.token_sets == ((16, 256),)
    keys = set(decoder.state_dict())
    assert keys == set(create_decoder("transformer", feature_dim=256, vocab_size=decoder.vocab_size, pad_id=0,
                                      bos_id=1, eos_id=2, **OPTIONS["transformer"]).state_dict())
    spec = FeatureCache(root / "resnet18").spec.select(["stage3"])
    assert (token_layout(spec.token_sets), spec.feature_dim) == (((16, 256),), 256)
