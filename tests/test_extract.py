"""`extract`: features into the sharded cache — resumable, reproducible, distributable."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cache import FeatureCache
from cache.writer import ShardWriter
from pipeline.config import ExtractConfig
from stages import extract
from tests.conftest import make_image_manifest, write_png
from tests.helpers_bundle import free_port

BACKBONE = "test_efficientnet"  # timm's tiny test model: random init, milliseconds per batch


def _cfg(manifest: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(manifest=manifest, out_dir=out, backbone=BACKBONE, image_size=64, num_shards=2,
                batch_size=4, workers=0, weights=None)
    base.update(kw)
    return ExtractConfig(**base)


def _shard_bytes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("shard-*.lmdb"))}


def _tree_bytes(directory: Path) -> dict[str, str]:
    """Every file of the output folder by name and sha256: what DVC's hash of the folder covers."""
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_extract_writes_every_good_image_and_reports_the_bad(image_manifest, tmp_path):
    meta = extract.run(_cfg(image_manifest, tmp_path / "feat"))
    assert meta is not None and meta.records == 24
    cache = FeatureCache(tmp_path / "feat")
    assert cache.meta.backbone == BACKBONE
    weights = cache.meta.weights
    assert (weights["source"], weights["seed"]) == ("random-init", 0)
    assert weights["sha256"] == hashlib.sha256((tmp_path / "feat" / "backbone.safetensors").read_bytes()).hexdigest()
    assert cache.weights_file() == tmp_path / "feat" / "backbone.safetensors"
    assert cache.meta.preprocessing["input_size"] == [3, 64, 64]
    (ts,) = cache.meta.token_sets
    assert ts.name == "last" and ts.tokens == 4  # 64 px / stride 32 = 2x2
    feats = cache.get_batch(["t/000", "t/023"])["last"]
    assert feats.shape == (2, ts.tokens, ts.channels) and feats.dtype == np.float16
    assert np.isfinite(feats).all() and not np.allclose(feats[0], feats[1])
    rejects = [json.loads(line) for line in (tmp_path / "feat" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"]) for r in rejects] == [("t/bad", "not an image")]
    assert "t/bad" not in cache


def test_features_match_a_direct_forward_pass(tmp_path):
    from PIL import Image

    from pipeline.models.backbones import create_backbone

    manifest = make_image_manifest(tmp_path / "data", 3)
    extract.run(_cfg(manifest, tmp_path / "feat", dtype="float32"))
    bb = create_backbone(BACKBONE, image_size=64, crop_pct=1.0)
    x = bb.eval_transform()(Image.open(tmp_path / "data" / "img" / "001.png").convert("RGB"))
    with torch.inference_mode():
        want = bb.tokens(x[None])[0][0].numpy()
    got = FeatureCache(tmp_path / "feat").get("t/001")["last"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rerun_is_byte_identical_and_a_noop(image_manifest, tmp_path):
    extract.run(_cfg(image_manifest, tmp_path / "a"))
    extract.run(_cfg(image_manifest, tmp_path / "b"))
    first = _shard_bytes(tmp_path / "a")
    assert first == _shard_bytes(tmp_path / "b")
    assert json.loads((tmp_path / "a/meta.json").read_text())["content_sha256"] == \
        json.loads((tmp_path / "b/meta.json").read_text())["content_sha256"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("shard-*.lmdb")}
    extract.run(_cfg(image_manifest, tmp_path / "a"))  # everything done: nothing rewritten
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("shard-*.lmdb")}


def test_resume_after_a_crash_finishes_without_duplicates_or_recomputation(image_manifest, tmp_path, monkeypatch):
    extract.run(_cfg(image_manifest, tmp_path / "clean"))

    calls = {"n": 0}
    real_put = ShardWriter.put_batch

    def crashing_put(self, items):
        calls["n"] += 1
        if calls["n"] == 4:  # shard 0 done in 3 batches of 4; die in shard 1's first batch
            raise RuntimeError("simulated crash")
        real_put(self, items)

    monkeypatch.setattr(ShardWriter, "put_batch", crashing_put)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract.run(_cfg(image_manifest, tmp_path / "resumed"))
    assert not (tmp_path / "resumed" / "meta.json").exists()
    monkeypatch.setattr(ShardWriter, "put_batch", real_put)

    encoded = {"n": 0}
    real_encode = ShardWriter.encode

    def counting_encode(self, digest, arrays):
        encoded["n"] += 1
        return real_encode(self, digest, arrays)

    monkeypatch.setattr(ShardWriter, "encode", counting_encode)
    meta = extract.run(_cfg(image_manifest, tmp_path / "resumed"))
    clean = FeatureCache(tmp_path / "clean")
    assert meta.records == clean.meta.records == 24
    assert meta.content_sha256 == clean.meta.content_sha256
    # only shard 1 was (re)encoded: shard 0 was finished before the crash
    assert encoded["n"] == json.loads((tmp_path / "clean/shard-00001-of-00002.json").read_text())["records"]
    rejects = (tmp_path / "resumed" / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == 1  # the bad image is reported once, not once per run
    assert _tree_bytes(tmp_path / "resumed") == _tree_bytes(tmp_path / "clean")  # meta.json included


@pytest.mark.integration
def test_sigkill_mid_shard_then_rerun_completes(tmp_path):
    manifest = make_image_manifest(tmp_path / "data", 60)
    args = [sys.executable, "-m", "pipeline.cli", "extract", "--manifest", str(manifest), "--backbone", BACKBONE,
            "--image-size", "64", "--num-shards", "1", "--batch-size", "2", "--workers", "0", "--weights", "none",
            "--params", str(tmp_path / "none.yaml")]
    (tmp_path / "none.yaml").write_text("{}\n")
    out = tmp_path / "feat"
    proc = subprocess.Popen(args + ["--out-dir", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = out / "shard-00000-of-00001.lmdb.partial"
    deadline = time.time() + 120
    while time.time() < deadline and not (partial.exists() and partial.stat().st_size > 40_000):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial.exists() and not (out / "meta.json").exists(), "the kill came too late to test a resume"
    subprocess.run(args + ["--out-dir", str(out)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run(args + ["--out-dir", str(tmp_path / "clean")], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed, clean = FeatureCache(out), FeatureCache(tmp_path / "clean")
    assert resumed.meta.records == 60
    assert sorted(resumed.keys()) == sorted(clean.keys())
    resumed.close(), clean.close()
    assert _tree_bytes(out) == _tree_bytes(tmp_path / "clean")  # the output's DVC hash is a clean run's


def test_changed_parameters_rebuild_the_cache(image_manifest, tmp_path):
    extract.run(_cfg(image_manifest, tmp_path / "feat"))
    meta = extract.run(_cfg(image_manifest, tmp_path / "feat", image_size=96, num_shards=3))
    assert meta.num_shards == 3 and meta.preprocessing["input_size"] == [3, 96, 96]
    assert sorted(p.name for p in (tmp_path / "feat").glob("*.lmdb")) == [
        f"shard-{i:05d}-of-00003.lmdb" for i in range(3)]
    assert FeatureCache(tmp_path / "feat").meta.token_sets[0].tokens == 9


def test_separate_machines_write_shards_and_the_last_one_writes_meta(image_manifest, tmp_path):
    out = tmp_path / "feat"
    assert extract.run(_cfg(image_manifest, out, shard_index=1)) is None
    assert not (out / "meta.json").exists()
    meta = extract.run(_cfg(image_manifest, out, shard_index=0))
    assert meta is not None and meta.records == 24
    extract.run(_cfg(image_manifest, tmp_path / "single"))
    assert _shard_bytes(out) == _shard_bytes(tmp_path / "single")


@pytest.mark.integration
def test_torchrun_two_processes_write_one_cache(image_manifest, tmp_path):
    (tmp_path / "p.yaml").write_text("{}\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "pipeline.cli", "extract", "--manifest", str(image_manifest), "--out-dir", str(tmp_path / "dist"),
           "--backbone", BACKBONE, "--image-size", "64", "--num-shards", "4", "--batch-size", "4",
           "--workers", "0", "--weights", "none", "--params", str(tmp_path / "p.yaml")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # only rank 0 logs; rank 1's shards (1 and 3) being in the cache is what shows it worked
    assert "2 shard(s) for rank 0/2" in res.stderr and "rank 1/2" not in res.stderr
    dist = FeatureCache(tmp_path / "dist")
    assert dist.meta.records == 24
    extract.run(_cfg(image_manifest, tmp_path / "single", num_shards=4))
    single = FeatureCache(tmp_path / "single")
    ids = sorted(single.keys())
    assert sorted(dist.keys()) == ids
    # torchrun sets OMP_NUM_THREADS=1, so float sums may round differently: compare values, not bytes
    np.testing.assert_allclose(dist.get_batch(ids)["last"].astype(np.float32),
                               single.get_batch(ids)["last"].astype(np.float32), rtol=2e-3, atol=2e-3)
    assert (tmp_path / "dist" / "rejects.jsonl").read_text().count("t/bad") == 1


def test_multi_scale_token_sets(image_manifest, tmp_path):
    meta = extract.run(_cfg(image_manifest, tmp_path / "feat", out_indices=[1, 2]))
    names = [(t.name, t.tokens, t.index) for t in meta.token_sets]
    assert names == [("stage1", 256, 1), ("stage2", 64, 2)]  # strides 4 and 8 at 64 px
    assert meta.spec.out_indices == [1, 2]
    batch = FeatureCache(tmp_path / "feat").get_batch(["t/001"])
    assert set(batch) == {"stage1", "stage2"}


def test_pooled_token_maps_hold_window_means_and_the_spec_records_the_pool(image_manifest, tmp_path):
    from cache.format import spec_mismatches
    from pipeline.models.backbones import create_backbone

    plain = extract.run(_cfg(image_manifest, tmp_path / "plain", image_size=56, out_indices=[2], dtype="float32"))
    pooled = extract.run(_cfg(image_manifest, tmp_path / "pooled", image_size=56, out_indices=[2], dtype="float32",
                              pool=2))
    (tokens, channels), = [t.shape for t in plain.token_sets]
    assert tokens == 49 and pooled.token_sets[0].shape == (16, channels)  # 7x7 -> 4x4
    assert pooled.feature_nbytes == 16 * channels * 4 and plain.feature_nbytes == 49 * channels * 4
    assert pooled.preprocessing["token_pool"] == 2 and "token_pool" not in plain.preprocessing
    grid = FeatureCache(tmp_path / "plain").get_batch(["t/001"])["stage2"][0].reshape(7, 7, channels)
    want = np.stack([np.stack([grid[r:r + 2, c:c + 2].mean(axis=(0, 1)) for c in range(0, 7, 2)])
                     for r in range(0, 7, 2)]).reshape(16, channels)  # the edge windows: the mean of what is there
    got = FeatureCache(tmp_path / "pooled").get_batch(["t/001"])["stage2"][0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # a model trained on pooled features rebuilds a backbone from their spec, and it pools alike
    assert spec_mismatches(plain.spec, pooled.spec) == ["preprocessing.token_pool: None vs 2", "token set 'stage2': "
                                                        f"49x{channels} from stage 2 vs 16x{channels} from stage 2"]
    rebuilt = create_backbone(BACKBONE, preprocessing=pooled.preprocessing, out_indices=[2])
    assert rebuilt.token_pool == 2
    assert spec_mismatches(rebuilt.feature_spec(weights=pooled.weights, dtype="float32"), pooled.spec) == []


def test_pooling_tokens_without_a_grid_is_refused_by_name():
    from pipeline.models.backbones import BackboneError, pool_map

    with pytest.raises(BackboneError, match=r"vit_x gives tokens without a spatial grid \(\(2, 50, 8\)\): --pool "
                                            "needs a convolutional map"):
        pool_map(torch.zeros(2, 50, 8), 2, "vit_x")


def test_local_weights_load_and_bad_weights_name_the_keys(image_manifest, tmp_path):
    import timm
    from safetensors.torch import save_file

    from pipeline.models.backbones import WeightsError

    torch.manual_seed(5)
    state = timm.create_model(BACKBONE).state_dict()
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    meta = extract.run(_cfg(image_manifest, tmp_path / "a", weights=tmp_path / "w.safetensors"))
    meta_pt = extract.run(_cfg(image_manifest, tmp_path / "b", weights=tmp_path / "w.pt"))
    assert meta.weights["source"] == "file" and len(meta.weights["sha256"]) == 64
    assert meta.content_sha256 == meta_pt.content_sha256  # same tensors, either file format
    broken = {k: v for k, v in state.items() if not k.startswith("conv_stem")}
    broken["extra.weight"] = torch.zeros(3)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(WeightsError, match=r"missing keys: conv_stem.weight.*unexpected keys: extra.weight"):
        extract.run(_cfg(image_manifest, tmp_path / "c", weights=tmp_path / "broken.safetensors"))


def _rewrite_manifest(manifest: Path, rows: list[dict]) -> None:
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_changed_images_are_re_extracted_and_removed_ones_dropped(tmp_path, caplog):
    """The stale-features scenario: same ids, other pixels (and new and removed ids) after a prepare change."""
    import logging

    manifest = make_image_manifest(tmp_path / "data", 12)
    out = tmp_path / "feat"
    extract.run(_cfg(manifest, out))
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for i in (2, 7):  # new pixels under an old id
        write_png(tmp_path / "data" / "img" / f"{i:03d}.png", seed=100 + i)
    rows = [r for r in rows if r["image_id"] != "t/011"]  # no longer in the manifest
    for i in (12, 13, 14):  # new images
        write_png(tmp_path / "data" / "img" / f"{i:03d}.png", seed=i)
        rows.append({"image_id": f"t/{i:03d}", "path": f"img/{i:03d}.png", "captions": ["new"], "split": "train",
                     "source": "t"})
    _rewrite_manifest(manifest, rows)
    encoded = []
    real_encode = ShardWriter.encode

    def counting_encode(self, digest, arrays):
        encoded.append(digest)
        return real_encode(self, digest, arrays)

    with caplog.at_level(logging.INFO), pytest.MonkeyPatch.context() as mp:
        mp.setattr(ShardWriter, "encode", counting_encode)
        meta = extract.run(_cfg(manifest, out))
    assert len(encoded) == 5  # exactly the 2 changed and the 3 new images
    assert "9 record(s) kept, 2 re-extracted (image changed), 1 dropped (no longer in the manifest), 5 computed" \
        in caplog.text
    assert meta.records == 14
    extract.run(_cfg(manifest, tmp_path / "fresh"))
    cache, fresh = FeatureCache(out), FeatureCache(tmp_path / "fresh")
    ids = sorted(r["image_id"] for r in rows)
    assert sorted(cache.keys()) == ids and "t/011" not in cache
    digests = {r["image_id"]: hashlib.sha256((tmp_path / "data" / r["path"]).read_bytes()).hexdigest() for r in rows}
    assert cache.digests(ids) == digests
    cache.close(), fresh.close()
    # byte for byte a fresh extraction's: the 5 records computed in batches of their own (4 + a padded 1) are the
    # bytes they get among the fresh run's batches, and meta.json says nothing about what this run did
    assert _tree_bytes(out) == _tree_bytes(tmp_path / "fresh")


def test_a_record_does_not_depend_on_which_batch_it_lands_in(tmp_path):
    """The backbone always runs on full batches (a short one padded): an image's bytes are the same in any
    company and at any position, at the batch size the cache records as part of its identity."""
    manifest = make_image_manifest(tmp_path / "data", 9)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    extract.run(_cfg(manifest, tmp_path / "all", batch_size=4, num_shards=1))
    for keep in ([8, 3], [3], [5, 3, 0, 1, 2]):  # image 3 last of 2, alone, and 2nd of a second batch
        _rewrite_manifest(manifest, [rows[i] for i in keep])
        extract.run(_cfg(manifest, tmp_path / f"some{len(keep)}", batch_size=4, num_shards=1))
        a, b = FeatureCache(tmp_path / "all"), FeatureCache(tmp_path / f"some{len(keep)}")
        assert a.get_batch(["t/003"])["last"].tobytes() == b.get_batch(["t/003"])["last"].tobytes(), keep
        a.close(), b.close()
    meta = json.loads((tmp_path / "all" / "meta.json").read_text())
    assert meta["computed_with"] == {"batch_size": 4, "device": "cpu", "amp": None, "channels_last": False}


def test_another_batch_size_is_another_cache(image_manifest, tmp_path, caplog):
    """The batch size is part of what the bytes depend on: a cache of another batch size is rebuilt, never
    extended with records computed another way."""
    out = tmp_path / "feat"
    extract.run(_cfg(image_manifest, out, batch_size=4))
    encoded = []
    real_encode = ShardWriter.encode
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ShardWriter, "encode", lambda self, d, a: encoded.append(d) or real_encode(self, d, a))
        meta = extract.run(_cfg(image_manifest, out, batch_size=3))
    assert len(encoded) == meta.records == 24 and meta.computed_with["batch_size"] == 3


def test_settings_that_change_no_byte_keep_the_cache_and_its_files(image_manifest, tmp_path):
    weights = tmp_path / "w.safetensors"
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    save_file(timm.create_model(BACKBONE).state_dict(), str(weights))
    out = tmp_path / "feat"
    extract.run(_cfg(image_manifest, out, weights=weights))
    files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.iterdir())}
    moved = tmp_path / "elsewhere" / "renamed.safetensors"
    moved.parent.mkdir()
    weights.rename(moved)
    extract.run(_cfg(image_manifest, out, weights=moved, workers=1, device="cpu"))
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.iterdir())} == files
    assert "renamed" not in (out / "meta.json").read_text() and "workers" not in (out / "meta.json").read_text()


def test_the_cache_refuses_weights_that_changed_after_extraction(image_manifest, tmp_path):
    from cache import CacheFormatError

    out = tmp_path / "feat"
    extract.run(_cfg(image_manifest, out))
    recorded = FeatureCache(out).meta.weights["sha256"]
    with open(out / "backbone.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    with pytest.raises(CacheFormatError, match=rf"backbone.safetensors: backbone weights changed since extraction "
                                               rf"\(sha256 [0-9a-f]{{64}} now, {recorded} when"):
        FeatureCache(out).weights_file()


def test_a_manifest_older_than_its_images_is_refused(image_manifest, tmp_path):
    from pipeline.data.cache_fill import StaleManifestError

    rows = [json.loads(line) for line in image_manifest.read_text().splitlines()]
    rows[0]["sha256"] = "0" * 64
    _rewrite_manifest(image_manifest, rows)
    with pytest.raises(StaleManifestError, match=r"1 image\(s\) differ from the sha256 the manifest records.*t/000"):
        extract.run(_cfg(image_manifest, tmp_path / "feat"))


# --------------------------------------------------------------------------- hostile settings
def test_bfloat16_features_are_the_float32_ones_rounded(tmp_path):
    manifest = make_image_manifest(tmp_path / "data", 5)
    extract.run(_cfg(manifest, tmp_path / "f32", dtype="float32"))
    meta = extract.run(_cfg(manifest, tmp_path / "bf16", dtype="bfloat16"))
    assert meta is not None and meta.dtype == "bfloat16" and meta.records == 5
    assert not list((tmp_path / "bf16").glob("*.partial"))
    ids = [f"t/{i:03d}" for i in range(5)]
    f32 = FeatureCache(tmp_path / "f32").get_batch(ids)["last"]
    bf16 = FeatureCache(tmp_path / "bf16").get_batch(ids)["last"]
    np.testing.assert_array_equal(bf16, torch.from_numpy(f32).bfloat16().float().numpy())
    assert json.loads((tmp_path / "bf16" / "meta.json").read_text())["spec"]["dtype"] == "bfloat16"


def test_a_fixed_size_vit_is_built_at_the_image_size(tmp_path):
    manifest = make_image_manifest(tmp_path / "data", 2)
    meta = extract.run(_cfg(manifest, tmp_path / "feat", backbone="vit_tiny_patch16_224", image_size=32))
    assert meta.preprocessing["input_size"] == [3, 32, 32]
    (ts,) = meta.token_sets
    assert (ts.tokens, ts.channels) == (2 * 2 + 1, 192)  # 32 px / patch 16, plus the class token
    assert FeatureCache(tmp_path / "feat").get("t/001")["last"].shape == (5, 192)


def test_an_input_size_the_backbone_cannot_take_is_refused_before_writing(tmp_path):
    from pipeline.models.backbones import BackboneError

    manifest = make_image_manifest(tmp_path / "data", 2)
    with pytest.raises(BackboneError, match=r"test_coatnet cannot encode 40x40 images \(.*\); its own input size "
                                            r"is 160 px: choose another --image-size"):
        extract.run(_cfg(manifest, tmp_path / "feat", backbone="test_coatnet", image_size=40))
    assert not (tmp_path / "feat").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no lock file left behind either


def test_channels_last_feature_maps_become_one_token_per_position():
    from pipeline.models.backbones import create_backbone

    bb = create_backbone("test_mambaout", image_size=64)  # forward_features returns (B, H, W, C)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        fmap = bb.model.forward_features(x)
        (tokens,) = bb.tokens(x)
    assert fmap.shape == (2, 2, 2, 64) and tokens.shape == (2, 4, 64)
    assert torch.equal(tokens[:, 1], fmap[:, 0, 1]) and torch.equal(tokens[:, 2], fmap[:, 1, 0])


def test_a_shard_index_outside_the_shards_is_a_config_error():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"shard_index 5 must be below num_shards 2 \(shards are numbered 0..1\)"):
        ExtractConfig(shard_index=5, num_shards=2)
    assert ExtractConfig(shard_index=1, num_shards=2).shard_index == 1
