"""The LMDB feature cache: writer/reader round trip, metadata checks, the batch dataset."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cache import CacheFormatError, CacheMeta, CacheWriter, FeatureCache, TokenSet
from cache.format import FeatureMismatchError, FeatureSpec, shard_of
from pipeline.data.captions import CaptionTable
from pipeline.data.features import CachedCaptionDataset, caption_collate

SPEC = FeatureSpec(backbone="fake", weights={"source": "random-init", "sha256": "a" * 64},
                   preprocessing={"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5]},
                   token_sets=(TokenSet("last", 4, 6), TokenSet("stage2", 16, 6, 2)), dtype="float16")


def _meta(num_shards=3) -> CacheMeta:
    return CacheMeta(spec=SPEC, num_shards=num_shards)


def _digest(image_id: str) -> str:
    import hashlib

    return hashlib.sha256(image_id.encode()).hexdigest()


def _features(i: int):
    rng = np.random.default_rng(i)
    return [rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((16, 6)).astype(np.float32)]


def write_cache(directory: Path, ids: list[str], num_shards: int = 3, dtype: str = "float16") -> CacheMeta:
    writer = CacheWriter(directory, CacheMeta(spec=replace(SPEC, dtype=dtype), num_shards=num_shards))
    for s in range(num_shards):
        sw = writer.shard(s)
        mine = sorted(i for i in ids if shard_of(i, num_shards) == s)
        assert sw.open({i: _digest(i) for i in mine}).todo == mine
        sw.put_batch([(i, sw.encode(_digest(i), _features(int(i.split("/")[1])))) for i in mine])
        sw.finish()
    meta = writer.finalize()
    assert meta is not None
    return meta


def test_round_trip_values_shapes_and_dtype(tmp_path):
    ids = [f"x/{i}" for i in range(30)]
    meta = write_cache(tmp_path, ids)
    assert meta.records == 30 and len(meta.content_sha256) == 64
    cache = FeatureCache(tmp_path)
    assert len(cache) == 30 and "x/7" in cache and "x/99" not in cache
    batch = cache.get_batch(["x/3", "x/29", "x/0"])
    assert batch["last"].shape == (3, 4, 6) and batch["stage2"].shape == (3, 16, 6)
    assert batch["last"].dtype == np.float16
    for row, i in enumerate([3, 29, 0]):
        want = _features(i)
        np.testing.assert_array_equal(batch["last"][row], want[0].astype(np.float16))
        np.testing.assert_array_equal(batch["stage2"][row], want[1].astype(np.float16))
    assert sorted(cache.keys()) == sorted(ids)
    assert cache.digests(["x/3", "x/99"]) == {"x/3": _digest("x/3"), "x/99": None}


def test_missing_key_is_an_error_naming_the_id(tmp_path):
    write_cache(tmp_path, ["x/1", "x/2"])
    with pytest.raises(KeyError, match="x/5"):
        FeatureCache(tmp_path).get_batch(["x/1", "x/5"])


def test_reader_refuses_other_backbone_shapes_and_versions(tmp_path):
    from dataclasses import replace

    write_cache(tmp_path, ["x/1"])
    with pytest.raises(FeatureMismatchError, match="backbone: 'fake' vs 'resnet50'"):
        FeatureCache(tmp_path, expect=replace(SPEC, backbone="resnet50"))
    with pytest.raises(FeatureMismatchError, match=r"token set 'last': 4x6 from stage None vs 49x768"):
        FeatureCache(tmp_path, expect=replace(SPEC, token_sets=(TokenSet("last", 49, 768),)))
    other = replace(SPEC, preprocessing={"input_size": [3, 64, 64], "mean": [0.4, 0.5, 0.5]},
                    weights={"source": "file", "sha256": "b" * 64})
    with pytest.raises(FeatureMismatchError) as e:
        FeatureCache(tmp_path, expect=other)
    message = str(e.value)  # every difference named in one message
    assert "weights: sha256 aaaaaaaaaaaa (random-init) vs bbbbbbbbbbbb (file)" in message
    assert "preprocessing.input_size: [3, 32, 32] vs [3, 64, 64]" in message
    assert "preprocessing.mean: [0.5, 0.5, 0.5] vs [0.4, 0.5, 0.5]" in message
    FeatureCache(tmp_path, expect=SPEC)
    FeatureCache(tmp_path, expect=SPEC.select(["stage2"]))  # a model reading one of the sets fits too
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["version"] = 99
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CacheFormatError, match="version 99"):
        FeatureCache(tmp_path)


def test_incomplete_cache_is_refused(tmp_path):
    writer = CacheWriter(tmp_path, _meta(2))
    sw = writer.shard(0)
    sw.open({"x/1": _digest("x/1")})
    sw.put_batch([("x/1", sw.encode(_digest("x/1"), _features(1)))])
    sw.finish()
    assert writer.finalize() is None and writer.pending_shards() == [1]
    with pytest.raises(CacheFormatError, match="no meta.json"):
        FeatureCache(tmp_path)


def test_duplicate_key_is_refused(tmp_path):
    sw = CacheWriter(tmp_path, _meta(1)).shard(0)
    sw.open({"x/1": _digest("x/1")})
    value = sw.encode(_digest("x/1"), _features(1))
    sw.put_batch([("x/1", value)])
    with pytest.raises(CacheFormatError, match="duplicate key"):
        sw.put_batch([("x/1", value)])
    sw.close()


def test_writer_grows_the_map_when_full(tmp_path, monkeypatch):
    import cache.writer as w

    monkeypatch.setattr(w, "INITIAL_MAP_SIZE", 64 * 1024)
    ids = [f"x/{i}" for i in range(400)]  # ~100 KB of values: several doublings
    write_cache(tmp_path, ids, num_shards=1)
    assert len(FeatureCache(tmp_path)) == 400


def test_no_lock_files_in_the_cache(tmp_path):
    write_cache(tmp_path, ["x/1", "x/2"])
    FeatureCache(tmp_path).get_batch(["x/1"])
    assert not [p for p in tmp_path.iterdir() if "lock" in p.name or p.suffix == ".partial"]


def test_dataset_batches_through_a_dataloader(tmp_path):
    ids = [f"x/{i}" for i in range(10)]
    write_cache(tmp_path, ids)
    cache = FeatureCache(tmp_path)
    samples = [(f"x/{i}", [1] + [5] * (i % 4) + [2]) for i in range(10)]
    ds = CachedCaptionDataset(cache, CaptionTable.from_pairs(samples), pad_id=0, token_sets=["last"])
    loader = DataLoader(ds, batch_size=4, shuffle=False, collate_fn=caption_collate)
    batches = list(loader)
    assert [len(b) for b in batches] == [4, 4, 2]
    b = batches[0]
    assert b.features.shape == (4, 4, 6) and b.features.dtype == torch.float16
    assert b.lengths.tolist() == [2, 3, 4, 5]
    assert b.tokens[0].tolist() == [1, 2, 0, 0, 0]  # padded past the length
    np.testing.assert_array_equal(b.features[1].numpy(), _features(1)[0].astype(np.float16))
    # token sets with equal channels concatenate along the token axis
    both = CachedCaptionDataset(cache, CaptionTable.from_pairs(samples), pad_id=0, token_sets=["last", "stage2"])[0]
    assert both.features.shape == (1, 20, 6)
    blind = CachedCaptionDataset(cache, CaptionTable.from_pairs(samples), pad_id=0, token_sets=["last"], zero_features=True)[3]
    assert blind.features.abs().sum() == 0


def test_reader_survives_fork_via_lazy_open(tmp_path):
    write_cache(tmp_path, [f"x/{i}" for i in range(8)])
    cache = FeatureCache(tmp_path)
    cache.get_batch(["x/1"])  # opened in the parent
    samples = [(f"x/{i}", [1, 2]) for i in range(8)]
    ds = CachedCaptionDataset(cache, CaptionTable.from_pairs(samples), pad_id=0, token_sets=["last"])
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=caption_collate,
                        multiprocessing_context="fork")
    assert sum(len(b) for b in loader) == 8


def test_bfloat16_features_are_stored_as_words_and_read_back_exactly(tmp_path):
    """numpy has no bfloat16: the cache keeps torch's rounding of each value as its 16-bit word."""
    ids = [f"x/{i}" for i in range(6)]
    write_cache(tmp_path, ids, dtype="bfloat16")
    cache = FeatureCache(tmp_path)
    assert cache.meta.dtype == "bfloat16" and cache.meta.feature_nbytes == (4 + 16) * 6 * 2
    expected = torch.from_numpy(_features(3)[0]).bfloat16()
    widened = cache.get_batch(["x/3"])["last"][0]  # float32, exactly the bfloat16 values
    assert widened.dtype == np.float32
    np.testing.assert_array_equal(widened, expected.float().numpy())
    words = cache.get_batch(["x/3"], raw=True)["last"][0]
    assert words.dtype == np.uint16 and torch.equal(torch.from_numpy(words.copy()).view(torch.bfloat16), expected)
    # The training dataset hands the decoder bfloat16 tensors: the cache's own dtype.
    batch = CachedCaptionDataset(cache, CaptionTable.from_pairs([("x/3", [1, 2]), ("x/5", [1, 2])]), pad_id=0,
                                 token_sets=["stage2"]).__getitems__([0, 1])
    assert batch.features.dtype == torch.bfloat16
    assert torch.equal(batch.features[1], torch.from_numpy(_features(5)[1]).bfloat16())
