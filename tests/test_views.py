"""Augmented views in the feature cache (`extract --views K`) and training on them; weight averaging (`--ema`).

The session's tiny pipeline (80 synthetic 64-px images, timm's random ``test_efficientnet``) extracted once more
with two views per training image; decoders of a few tens of thousands of parameters train on it in seconds."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cache import FeatureCache
from pipeline.cli import app
from pipeline.config import ExtractConfig, ScstConfig
from pipeline.data.augment import Augmentation
from pipeline.data.features import CachedCaptionDataset, CachedImageDataset
from pipeline.data.manifest import read_manifest, resolve_image_path
from pipeline.data.views import CachedViews, ViewRenderer, ViewSchedule, ViewsError, parse_view_key, view_key, view_of_epoch
from pipeline.text.tokenizers import load_tokenizer
from pipeline.training.scst import ScstTrainer, mirrored_references
from stages import extract, scst, train
from stages.train import caption_table
from tests.conftest import TINY_BACKBONE, TINY_TRANSFORMER
from tests.helpers_training import assert_same_tensors, history, tensors

VIEWS = 2


def _extract_cfg(manifest: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(manifest=manifest, out_dir=out, backbone=TINY_BACKBONE, image_size=64, num_shards=2, batch_size=32,
                workers=0, device="cpu")  # the tiny pipeline's own settings
    return ExtractConfig(**{**base, **kw})


def _tree(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def views_cache(tiny_pipeline, one_thread, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("views") / "features"
    extract.run(_extract_cfg(tiny_pipeline.manifest, out, views=VIEWS))
    return out


@pytest.fixture(scope="module")
def records(tiny_pipeline):
    return read_manifest(tiny_pipeline.manifest)


def test_extract_stores_views_of_the_training_images_only(views_cache, records, tiny_pipeline):
    train_records = [r for r in records if r.split == "train"]
    assert 0 < len(train_records) < len(records)
    cache = FeatureCache(views_cache)
    assert cache.meta.views["count"] == VIEWS and cache.meta.views["splits"] == ["train"]
    assert cache.meta.views["augmentation"] == {"crop_scale": 0.85, "rotation": 8.0, "brightness": 0.2,
                                                "contrast": 0.2, "saturation": 0.2, "hue": 0.0, "hflip": "swap"}
    assert set(cache.keys()) == ({r.image_id for r in records}
                                 | {f"{r.image_id}#view{v}" for r in train_records for v in (1, 2)})
    assert cache.meta.records == len(records) + VIEWS * len(train_records)
    # each view is keyed by its image's digest (a changed image re-extracts its views too) and holds other values
    first = train_records[0]
    keys = [first.image_id, view_key(first.image_id, 1), view_key(first.image_id, 2)]
    assert set(cache.digests(keys).values()) == {first.sha256}
    plain, one, two = cache.get_batch(keys)["last"].astype(np.float32)
    assert not np.allclose(plain, one) and not np.allclose(one, two)
    # the plain records are byte for byte those of the same extraction without views
    ids = [r.image_id for r in records]
    np.testing.assert_array_equal(FeatureCache(tiny_pipeline.features).get_batch(ids, raw=True)["last"],
                                  cache.get_batch(ids, raw=True)["last"])
    assert "views" not in json.loads((tiny_pipeline.features / "meta.json").read_text())


def test_views_are_a_pure_function_of_seed_image_and_view(views_cache, tiny_pipeline, records, tmp_path):
    """An extraction that finds half the images done (as a resumed or updated one does) ends with the bytes of
    one clean run; another seed gives other views and the same plain records."""
    half = tmp_path / "half.jsonl"
    half.write_text("".join(replace(r, path=str(resolve_image_path(r, tiny_pipeline.manifest))).to_json() + "\n"
                            for r in records[: len(records) // 2]), encoding="utf-8")
    resumed = tmp_path / "resumed"
    extract.run(_extract_cfg(half, resumed, views=VIEWS))
    extract.run(_extract_cfg(tiny_pipeline.manifest, resumed, views=VIEWS))
    assert _tree(resumed) == _tree(views_cache)

    extract.run(_extract_cfg(tiny_pipeline.manifest, tmp_path / "seed1", views=VIEWS, seed=1))
    other = FeatureCache(tmp_path / "seed1")
    first = next(r.image_id for r in records if r.split == "train")
    cache = FeatureCache(views_cache)
    np.testing.assert_array_equal(other.get_batch([first])["last"], cache.get_batch([first])["last"])
    assert not np.array_equal(other.get_batch([view_key(first, 1)])["last"], cache.get_batch([view_key(first, 1)])["last"])


def test_a_view_is_mirrored_exactly_when_its_draws_say_so():
    """Left half black, right half white: with only the flip on, a view's left half is the bright one exactly when
    :meth:`CachedViews.flipped` says it is mirrored (what training swaps left and right for)."""
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:, 32:] = 255
    image = Image.fromarray(pixels)
    views = CachedViews(4, 0, Augmentation(crop_scale=1.0, rotation=0.0, brightness=0.0, contrast=0.0,
                                           saturation=0.0, hflip="swap"))
    render = ViewRenderer(views, {"input_size": (3, 32, 32), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)})
    flags = []
    for k in range(12):
        for v in range(1, 5):
            x = render(image, view_key(f"img/{k}", v))
            left_bright = bool(x[:, :, :16].mean() > x[:, :, 16:].mean())
            assert left_bright == views.flipped(f"img/{k}", v)
            flags.append(left_bright)
    assert 10 < sum(flags) < 38  # about half of the 48 views are mirrored
    assert render(image, "img/0") is None and not views.flipped("img/0", 0)  # the plain view: the eval transform
    off = CachedViews(4, 0, Augmentation(hflip="off"))
    assert not any(off.flipped(f"img/{k}", v) for k in range(12) for v in range(1, 5))


def test_view_keys_round_trip():
    assert view_key("coco/1", 0) == "coco/1" and view_key("coco/1", 3) == "coco/1#view3"
    assert parse_view_key("coco/1#view3") == ("coco/1", 3) and parse_view_key("coco/1") == ("coco/1", 0)
    assert parse_view_key("odd#view0") == ("odd#view0", 0) and parse_view_key("a#viewx") == ("a#viewx", 0)


def test_each_epoch_reads_another_view_until_every_view_was_read():
    ids = [f"img/{k}" for k in range(20)]
    for image_id in ids:
        for cycle in range(3):
            assert sorted(view_of_epoch(image_id, e, 3, 0) for e in range(4 * cycle, 4 * cycle + 4)) == [0, 1, 2, 3]
    orders = {tuple(view_of_epoch(i, e, 3, 0) for e in range(4)) for i in ids}
    assert len(orders) > 5  # an order per image, not one for all
    assert [view_of_epoch("img/0", e, 3, 0) for e in range(8)] == [view_of_epoch("img/0", e, 3, 0) for e in range(8)]
    assert all(view_of_epoch(i, e, 0, 0) == 0 for i in ids for e in range(5))  # --views 0: the plain records


def test_training_batches_read_the_epochs_view_with_its_mirrored_captions(views_cache, records, tiny_pipeline):
    cache, tokenizer = FeatureCache(views_cache), load_tokenizer(tiny_pipeline.tokenizer())
    train_records = [r for r in records if r.split == "train"]
    schedule = ViewSchedule.of_cache(cache, None, 0, {r.image_id: r.sha256 for r in train_records})
    captions = caption_table(train_records, tokenizer, mirrored=True)
    ds = CachedCaptionDataset(cache, captions, pad_id=tokenizer.pad_id, views=schedule)
    mirrored_and_changed = 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        batch = ds.__getitems__(list(range(len(captions))))
        for i in range(len(captions)):
            image_id, tokens, flipped = captions.caption_image_ids([i])[0], captions.tokens[i], captions.mirrored[i]
            key, mirrored = schedule.pick(image_id, epoch)
            np.testing.assert_array_equal(batch.features[i].float().numpy(),
                                          cache.get_batch([key])["last"][0].astype(np.float32))
            want = flipped if mirrored else tokens
            assert batch.tokens[i, : batch.lengths[i]].tolist() == want.tolist()
            mirrored_and_changed += mirrored and flipped.tolist() != tokens.tolist()
    assert mirrored_and_changed > 0  # the synthetic captions say "left of" / "right of"

    images = CachedImageDataset(cache, [r.image_id for r in train_records], views=schedule)
    images.set_epoch(1)
    fb = images.__getitems__([0, 1, 2])
    assert fb.flipped == [schedule.pick(r.image_id, 1)[1] for r in train_records[:3]]


def test_the_cache_must_hold_the_views_asked_for(views_cache, tiny_pipeline, records):
    cache = FeatureCache(views_cache)
    digests = {r.image_id: r.sha256 for r in records if r.split == "train"}
    with pytest.raises(ViewsError, match=r"3 augmented view\(s\) asked for, the cache holds 2; re-extract with "
                                         r"`pipeline extract --views 3`"):
        ViewSchedule.of_cache(cache, 3, 0, digests)
    assert ViewSchedule.of_cache(cache, 0, 0, digests) is None
    assert ViewSchedule.of_cache(FeatureCache(tiny_pipeline.features), None, 0, digests) is None
    other = dict(digests, **{"x/unknown": None})
    with pytest.raises(ViewsError, match=r"view 'x/unknown#view1' is not in the cache"):
        ViewSchedule.of_cache(cache, 1, 0, other)
    changed = dict(digests, **{next(iter(digests)): "0" * 64})
    with pytest.raises(ViewsError, match="computed from another version of the image"):
        ViewSchedule.of_cache(cache, 1, 0, changed)


def _train_cfg(tiny_pipeline, features: Path, out: Path, **kw):
    from pipeline.config import TrainConfig

    base = dict(manifest=tiny_pipeline.manifest, features=features, tokenizer=tiny_pipeline.tokenizer(), out_dir=out,
                decoder="transformer", decoder_options=TINY_TRANSFORMER, epochs=3, batch_size=16, lr=3e-3,
                warmup_steps=0, val_max_images=4, max_caption_length=12, device="cpu", amp="none", patience=0)
    return TrainConfig(**{**base, **kw})


def test_train_on_views_and_views_0_is_the_plain_run(views_cache, tiny_pipeline, tmp_path):
    plain = tmp_path / "plain"
    train.run(_train_cfg(tiny_pipeline, tiny_pipeline.features, plain))
    zero = tmp_path / "zero"
    train.run(_train_cfg(tiny_pipeline, views_cache, zero, views=0))
    assert_same_tensors(plain / "bundle" / "model.safetensors", zero / "bundle" / "model.safetensors")
    viewed = tmp_path / "viewed"
    summary = train.run(_train_cfg(tiny_pipeline, views_cache, viewed))
    assert summary["epochs_run"] == 3
    a, b = tensors(plain / "checkpoints" / "last" / "model.safetensors"), tensors(viewed / "checkpoints" / "last" /
                                                                                   "model.safetensors")
    assert any(not np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)  # other features, other weights
    assert json.loads((viewed / "bundle" / "config.json").read_text())["training"]["config"]["views"] is None


def test_train_cli_asking_for_more_views_than_the_cache_holds_is_one_error_line(views_cache, tiny_pipeline,
                                                                                tmp_path):
    result = CliRunner().invoke(app, ["train", "--manifest", str(tiny_pipeline.manifest), "--features",
                                      str(views_cache), "--tokenizer", str(tiny_pipeline.tokenizer()), "--out-dir",
                                      str(tmp_path / "out"), "--views", "5", "--device", "cpu"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {views_cache}: 5 augmented view(s) asked for, the cache holds 2; re-extract with `pipeline extract "
        f"--views 5` or ask for at most 2"]


def test_ema_is_validated_beside_the_raw_weights_and_is_what_the_bundle_keeps(tiny_pipeline, tmp_path):
    out = tmp_path / "ema"
    train.run(_train_cfg(tiny_pipeline, tiny_pipeline.features, out, ema=0.9))
    epochs = history(out)
    assert all({"val_cider", "val_raw_cider", "val_loss", "val_raw_loss"} <= set(h) for h in epochs)
    assert any(h["val_loss"] != h["val_raw_loss"] for h in epochs)
    last = tensors(out / "checkpoints" / "last" / "model.safetensors")
    assert last["ema.n_averaged"].item() == 60  # every step of 3 epochs x 20 batches
    best = json.loads((out / "metrics.json").read_text())["best_epoch"]
    assert best == 3 or pytest.skip("the best epoch is not the last: the bundle is an earlier average")
    bundle = tensors(out / "bundle" / "model.safetensors")
    for name, value in bundle.items():
        np.testing.assert_array_equal(value.numpy(), last[f"ema.module.{name}"].numpy())
    assert any(not np.array_equal(value.numpy(), last[f"raw.{name}"].numpy()) for name, value in bundle.items())
    assert json.loads((out / "bundle" / "config.json").read_text())["training"]["config"]["ema"] == 0.9


def test_an_interrupted_ema_run_resumes_to_the_same_bytes(tiny_pipeline, tmp_path, views_cache):
    """Killed after 25 steps (the last checkpoint at 20), resumed: the average resumes with the weights, so the
    outputs equal an uninterrupted run's (on the views cache: the views an epoch reads resume too)."""
    from pipeline.training.loop import Trainer

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.run(_train_cfg(tiny_pipeline, views_cache, straight, ema=0.9, checkpoint_every=10))

    class Killed(Exception):
        pass

    real, steps = Trainer._forward, {"n": 0}

    def dying(self, batch):
        if steps["n"] == 25:
            raise Killed
        steps["n"] += 1
        return real(self, batch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "_forward", dying)
        with pytest.raises(Killed):
            train.run(_train_cfg(tiny_pipeline, views_cache, resumed, ema=0.9, checkpoint_every=10))
    train.run(_train_cfg(tiny_pipeline, views_cache, resumed, ema=0.9, checkpoint_every=10))
    for name in ("checkpoints/last/model.safetensors", "bundle/model.safetensors"):
        assert_same_tensors(straight / name, resumed / name)
    assert history(straight) == history(resumed)


def test_scst_on_views_scores_mirrored_views_against_mirrored_references(views_cache, tiny_pipeline, records,
                                                                         tmp_path):
    train_records = [r for r in records if r.split == "train"]
    mirrored = mirrored_references(train_records)
    with_sides = next(r for r in train_records if any(" left" in c or " right" in c for c in r.captions))
    assert mirrored[with_sides.image_id] != [c.lower() for c in with_sides.captions]

    class Batch:
        image_ids = [with_sides.image_id, train_records[0].image_id]
        flipped = [True, False]

    trainer = ScstTrainer.__new__(ScstTrainer)  # only its reference lookup, no model
    trainer.mirrored = mirrored
    assert trainer.references(Batch()) == [mirrored[with_sides.image_id], train_records[0].image_id]

    summary = scst.run(ScstConfig(bundle=tiny_pipeline.bundle, manifest=tiny_pipeline.manifest, features=views_cache,
                                  out_dir=tmp_path / "scst", epochs=1, batch_size=16, num_samples=2, lr=1e-4,
                                  warmup_steps=0, val_max_images=4, device="cpu", amp="none", ema=0.5))
    assert summary["epochs_run"] == 1 and "val_raw_cider" in history(tmp_path / "scst")[0]
