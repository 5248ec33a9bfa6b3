"""One features contract: every consumer refuses features that are not a bundle's in the same words.

A tiny real pipeline, built once: prepare (24 synthetic 64-px images) -> extract with timm's tiny
``test_efficientnet`` from a local ``--weights`` safetensors file (1 shard, 2x2 tokens of 256 channels)
-> word vocabulary -> a 1-epoch tiny transformer bundle. Variant caches are copies of the real cache
whose ``meta.json`` spec differs in one key (mean, std, input size, backbone, token set name, weights
sha256): the reader trusts meta.json for the spec, so no re-extraction is needed.

Consumers: ``stages.evaluate.run``, ``stages.scst.run``, ``Captioner.check_spec`` and
``Captioner.caption_features(..., spec=)``; each must raise :class:`FeatureMismatchError` naming
the differing key exactly as :func:`cache.format.spec_mismatches` words it, before writing anything.
Then ``train``'s side: an unknown token set, changed cached backbone weights, another working
directory with the original weights file gone, and a manifest the cache does not cover.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cache import FeatureCache
from cache.format import CacheFormatError, FeatureMismatchError, file_sha256
from pipeline.config import EvaluateConfig, ExtractConfig, PrepareConfig, ScstConfig, SyntheticSource, TrainConfig, VocabConfig
from pipeline.inference.bundle import Captioner
from stages import evaluate, extract, prepare, scst, train, vocab
from tests.conftest import TINY_BACKBONE, TINY_TRANSFORMER, TinyPipeline

SHA = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class World(TinyPipeline):
    """The session's tiny pipeline's layout, extracted from a local weights file instead of random init."""

    weights: Path = Path()  # the local weights file the cache was extracted with
    base_sha: str = ""  # sha256 the cache records for its backbone weights

    def train_cfg(self, out: Path, **kw) -> TrainConfig:
        base = dict(manifest=self.manifest, features=self.features, tokenizer=self.tokenizer(), out_dir=out,
                    decoder="transformer", decoder_options=TINY_TRANSFORMER, epochs=1, batch_size=32, lr=3e-3,
                    warmup_steps=0, val_max_images=2, max_caption_length=12, device="cpu", amp="none", patience=0)
        base.update(kw)
        return TrainConfig(**base)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine
    from safetensors.torch import save_file

    from pipeline.models.backbones import create_backbone

    root = tmp_path_factory.mktemp("feature_contract")
    prepare.run(PrepareConfig(sources=[SyntheticSource(num_images=24, noisy_images=0, image_size=64)],
                              out_dir=root / "prepared", check_images="none"))
    weights = root / "weights" / "efficientnet-local.safetensors"
    weights.parent.mkdir()
    bb = create_backbone(TINY_BACKBONE, init_seed=7)
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(weights))
    w = World(root, weights)
    meta = extract.run(ExtractConfig(manifest=w.manifest, out_dir=w.features, backbone=TINY_BACKBONE, weights=weights,
                                     image_size=64, num_shards=1, batch_size=32, workers=0, device="cpu"))
    assert meta is not None and meta.spec.weights["source"] == "file"
    w.base_sha = meta.spec.weights["sha256"]
    vocab.run(VocabConfig(manifest=w.manifest, out_dir=root / "tokenizers", kinds=["word"]))
    train.run(w.train_cfg(root / "base"))  # where TinyPipeline.bundle finds it: the contract's own 1-epoch run
    assert (w.bundle / "config.json").is_file()
    yield w
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- variant caches
def _edit_mean(spec):
    spec["preprocessing"]["mean"] = [0.5, 0.5, 0.5]


def _edit_std(spec):
    spec["preprocessing"]["std"] = [0.5, 0.5, 0.5]


def _edit_input_size(spec):
    spec["preprocessing"]["input_size"] = [3, 96, 96]


def _edit_backbone(spec):
    spec["backbone"] = "test_resnet"


def _edit_token_set(spec):
    spec["token_sets"][0]["name"] = "final"


def _edit_weights(spec):
    spec["weights"]["sha256"] = "f" * 64


# variant -> (edit of meta.json's spec, the one difference the consumers must name; {sha} is the cache's weights)
VARIANTS = {
    "mean": (_edit_mean, "preprocessing.mean: [0.5, 0.5, 0.5] vs [0.485, 0.456, 0.406]"),
    "std": (_edit_std, "preprocessing.std: [0.5, 0.5, 0.5] vs [0.229, 0.224, 0.225]"),
    "input_size": (_edit_input_size, "preprocessing.input_size: [3, 96, 96] vs [3, 64, 64]"),
    "backbone": (_edit_backbone, "backbone: 'test_resnet' vs 'test_efficientnet'"),
    "token_set": (_edit_token_set, "token set 'last': missing (have ['final'])"),
    "weights": (_edit_weights, "weights: sha256 ffffffffffff (file) vs {sha} (file)"),
}
CONSUMERS = ["evaluate", "scst", "check_spec", "caption_features"]


@pytest.fixture(scope="module")
def variants(world, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    out = {}
    for name, (edit, _) in VARIANTS.items():
        folder = root / name
        shutil.copytree(world.features, folder)
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        edit(meta["spec"])
        (folder / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        out[name] = folder
    return out


def _refusal(consumer: str, world: World, cache_dir: Path, out: Path) -> FeatureMismatchError:
    """What ``consumer`` raises for the cache ``cache_dir`` (it must raise FeatureMismatchError)."""
    with pytest.raises(FeatureMismatchError) as info:
        if consumer == "evaluate":
            evaluate.run(EvaluateConfig(model=world.bundle, features=cache_dir, manifest=world.manifest, out_dir=out,
                                        device="cpu", batch_size=4, gallery_size=0))
        elif consumer == "scst":
            scst.run(ScstConfig(bundle=world.bundle, manifest=world.manifest, features=cache_dir, out_dir=out,
                                epochs=1, batch_size=4, max_train_images=4, val_max_images=2, num_samples=2,
                                max_caption_length=12, device="cpu", warmup_steps=0, workers=1))
        else:
            captioner = Captioner.load(world.bundle)
            cache = FeatureCache(cache_dir)
            if consumer == "check_spec":
                captioner.check_spec(cache.spec, f"the cache {cache.directory}")
            else:
                ids = list(cache.keys())[:2]
                feats = torch.from_numpy(cache.get_batch(ids)[cache.spec.token_sets[0].name]).float()
                captioner.caption_features(feats, spec=cache.spec)
    assert type(info.value) is FeatureMismatchError
    return info.value


@pytest.mark.parametrize("consumer", CONSUMERS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_consumer_refuses_a_cache_that_differs_in_one_key_in_the_same_words(
        world, variants, tmp_path, variant, consumer):
    expected = VARIANTS[variant][1].format(sha=world.base_sha[:12])
    out = tmp_path / "out"
    error = _refusal(consumer, world, variants[variant], out)
    message = str(error)
    # Exactly that one difference, worded as spec_mismatches words it.
    assert f"(found vs expected): {expected}. " in message, message
    assert not out.exists(), f"{consumer} wrote {sorted(p.name for p in out.iterdir())} before refusing"

    # Identical to the Captioner's own refusal of that cache (same label: the whole message is the same);
    # caption_features labels its input "the features given", the rest of the message is the same.
    captioner = Captioner.load(world.bundle)
    cache = FeatureCache(variants[variant])
    with pytest.raises(FeatureMismatchError) as reference:
        captioner.check_spec(cache.spec, f"the cache {cache.directory}")
    if consumer == "caption_features":
        assert message.split(" do not fit ", 1)[1] == str(reference.value).split(" do not fit ", 1)[1]
        assert message.startswith("the features of the features given do not fit")
    else:
        assert message == str(reference.value)


def test_the_real_cache_fits_every_consumer_check(world):
    """The control: the cache the bundle was trained on passes the same checks."""
    captioner = Captioner.load(world.bundle)
    cache = FeatureCache(world.features)
    captioner.check_spec(cache.spec, "the cache")
    ids = list(cache.keys())[:2]
    caps = captioner.caption_features(torch.from_numpy(cache.get_batch(ids)["last"]).float(), spec=cache.spec)
    assert len(caps) == 2 and all(c and isinstance(c[0].text, str) for c in caps)
    assert captioner.features.weights["sha256"] == world.base_sha


# --------------------------------------------------------------------------- train's side of the contract
def test_train_refuses_a_token_set_the_cache_lacks(world, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(FeatureMismatchError) as info:
        train.run(world.train_cfg(out, token_sets=["stage9"]))
    message = str(info.value)
    assert "token set(s) ['stage9'] not among the features' token sets ['last']" in message, message
    assert not out.exists()


def test_train_refuses_changed_cached_backbone_weights(world, tmp_path):
    cache = tmp_path / "features"
    shutil.copytree(world.features, cache)
    weights = cache / "backbone.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of the last tensor
    weights.write_bytes(bytes(data))
    changed = file_sha256(weights)
    assert changed != world.base_sha

    out = tmp_path / "run"
    with pytest.raises(CacheFormatError) as info:
        train.run(world.train_cfg(out, features=cache))
    message = str(info.value)
    assert str(weights) in message, message
    hashes = re.findall(r"\b[0-9a-f]{64}\b", message)
    assert set(hashes) == {changed, world.base_sha}, message
    assert message.index(changed) < message.index(world.base_sha)  # "sha256 <now> now, <recorded> when ..."
    assert "pipeline extract" in message
    assert not out.exists()


def test_train_from_another_directory_after_the_extraction_weights_are_gone(world, tmp_path, monkeypatch):
    moved = world.weights.with_name("moved-away.safetensors")
    world.weights.rename(moved)  # the file `extract --weights` read no longer exists at its path
    assert not world.weights.exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = (tmp_path / "run").resolve()
    summary = train.run(world.train_cfg(out))
    assert summary["epochs_run"] == 1
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # nothing written relative to the working directory

    bundle = out / "bundle"
    config = json.loads((bundle / "config.json").read_text(encoding="utf-8"))
    recorded = config["features"]["weights"]["sha256"]
    assert SHA.match(recorded)
    assert file_sha256(bundle / "backbone.safetensors") == recorded == world.base_sha
    assert (bundle / "backbone.safetensors").read_bytes() == (world.features / "backbone.safetensors").read_bytes()
    assert config["features"]["weights"]["source"] == "file"
    assert str(world.weights) not in (bundle / "config.json").read_text()  # weights by content, never by path
    # The bundle captions an image with those weights, from here.
    image = sorted((world.root / "prepared").rglob("*.png"))[0]
    caps = Captioner.load(bundle).caption_images([image])
    assert isinstance(caps[0][0].text, str) and caps[0][0].tokens


def test_train_on_a_manifest_the_cache_does_not_cover(world, tmp_path):
    rows = [json.loads(line) for line in world.manifest.read_text(encoding="utf-8").splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    extra = []
    for k, r in enumerate(train_rows[:3]):
        e = dict(r, image_id=f"extra/{k:03d}")
        e["path"] = str((world.manifest.parent / r["path"]).resolve())
        extra.append(e)
    rows = [dict(r, path=str((world.manifest.parent / r["path"]).resolve())) for r in rows]
    manifest = tmp_path / "more.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows + extra), encoding="utf-8")

    out = tmp_path / "run"
    with pytest.raises(CacheFormatError) as info:
        train.run(world.train_cfg(out, manifest=manifest))
    assert not isinstance(info.value, KeyError)
    message = str(info.value)
    assert "3 image(s) are not in it" in message, message
    assert "extra/000" in message and "`pipeline extract`" in message
    assert str(manifest) in message
    assert not out.exists()
