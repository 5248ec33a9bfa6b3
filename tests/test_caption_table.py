"""Training data that scales with the manifest, not with Python objects: the captions as flat arrays
(:class:`pipeline.data.captions.CaptionTable`), read a chunk of manifest rows at a time, and epochs shuffled a
few cache shards at a time (:func:`pipeline.training.loop.epoch_order`)."""

from __future__ import annotations

import gc
import json
import tracemalloc

import numpy as np
import pytest
import torch

from cache import FeatureCache
from pipeline.config import TrainConfig
from pipeline.data.captions import CaptionTable, CaptionTableBuilder
from pipeline.data.features import CachedCaptionDataset
from pipeline.data.manifest import read_manifest
from pipeline.distributed import DistContext
from pipeline.text.tokenizers import load_tokenizer
from pipeline.training.loop import epoch_order
from stages import train


def test_a_table_holds_each_caption_its_image_and_its_mirror():
    builder = CaptionTableBuilder(vocab_size=50, mirrored=True)
    builder.add("a/1", [[1, 5, 2], [1, 6, 7, 2]], [[1, 9, 2], [1, 6, 7, 2]])
    builder.add("b/é", [[1, 2]], [[1, 2]])
    table = builder.build()
    assert len(table) == 3 and table.num_images == 2
    assert table.caption_image_ids([0, 1, 2]) == ["a/1", "a/1", "b/é"]
    assert [r.tolist() for r in table.token_rows([2, 0, 1])] == [[1, 2], [1, 5, 2], [1, 6, 7, 2]]
    assert [r.tolist() for r in table.token_rows([0, 1], mirrored=[True, False])] == [[1, 9, 2], [1, 6, 7, 2]]
    assert table.tokens.values.dtype == np.uint16  # two bytes a token while the vocabulary fits
    # exactly its numbers: tokens, offsets, image of each caption, the ids' bytes and offsets
    assert table.nbytes == 2 * (9 + 9) + 8 * 4 * 2 + 4 * 3 + len("a/1b/é".encode()) + 8 * 3
    with pytest.raises(ValueError, match="give mirrored captions exactly when the builder keeps them"):
        builder.add("c/1", [[1, 2]])


def test_a_vocabulary_past_65536_words_is_kept_in_four_bytes_a_token():
    table = CaptionTable.from_pairs([("x/1", [1, 70_000, 2]), ("x/1", [1, 3, 2]), ("x/2", [1, 2])], vocab_size=70_001)
    assert table.tokens.values.dtype == np.int32 and table.tokens[0].tolist() == [1, 70_000, 2]
    assert table.num_images == 2 and table.image_of.tolist() == [0, 0, 1]  # consecutive pairs of one id: one image
    with pytest.raises(OverflowError):
        CaptionTable.from_pairs([("x/1", [70_000])], vocab_size=100)


def test_the_table_costs_bytes_per_caption_not_python_objects():
    """What the table keeps alive after it is built: its arrays, ~30 bytes a caption here, where the
    (image id, [token ids]) pairs it replaced kept ~300 (a tuple, a string, a list of ints each)."""
    rng = np.random.default_rng(0)
    pairs = [(f"web/{i // 5:08d}", [1, *rng.integers(4, 9000, 10).tolist(), 2]) for i in range(20_000)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        table = CaptionTable.from_pairs(pairs, vocab_size=9000)
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(table) == 20_000 and table.num_images == 4_000
    assert table.nbytes == 20_000 * (12 * 2 + 8 + 4) + 8 + 4_000 * (12 + 8) + 8
    assert kept < 1.2 * table.nbytes + 50_000, (kept, table.nbytes)


@pytest.fixture
def pipe(tiny_pipeline, one_thread):
    return tiny_pipeline


def _cfg(pipe, tmp_path, manifest=None) -> TrainConfig:
    return TrainConfig(manifest=manifest or pipe.manifest, features=pipe.features, tokenizer=pipe.tokenizer("word"),
                       out_dir=tmp_path / "m", device="cpu")


def test_the_manifest_read_a_chunk_at_a_time_gives_the_table_of_reading_it_whole(pipe, tmp_path, monkeypatch):
    cache, tok = FeatureCache(pipe.features), load_tokenizer(pipe.tokenizer("word"))
    records = read_manifest(pipe.manifest)
    whole = train.caption_table([r for r in records if r.split == "train"], tok)
    monkeypatch.setattr(train, "CHUNK", 7)
    data = train.training_data(_cfg(pipe, tmp_path), cache, tok)
    assert data.train_images == whole.num_images == sum(r.split == "train" for r in records)
    assert [r.image_id for r in data.val] == [r.image_id for r in records if r.split == "val"]
    for name in ("image_of",):
        np.testing.assert_array_equal(getattr(data.captions, name), getattr(whole, name))
    for name in ("tokens", "image_ids"):
        np.testing.assert_array_equal(getattr(data.captions, name).values, getattr(whole, name).values)
        np.testing.assert_array_equal(getattr(data.captions, name).offsets, getattr(whole, name).offsets)


def test_images_missing_from_the_cache_are_counted_over_every_chunk(pipe, tmp_path, monkeypatch):
    cache, tok = FeatureCache(pipe.features), load_tokenizer(pipe.tokenizer("word"))
    lines = pipe.manifest.read_text().splitlines()
    checked = [json.loads(line) for line in lines if json.loads(line)["split"] != "test"][:30]  # train and val
    ghosts = [json.dumps({**row, "image_id": f"ghost/{k}"}) for k, row in enumerate(checked)]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines + ghosts) + "\n")
    monkeypatch.setattr(train, "CHUNK", 7)
    with pytest.raises(ValueError, match=r"does not cover the manifest .*: 30 image\(s\) are not in it \(e\.g\. "
                                         r"\['ghost/0', 'ghost/1', 'ghost/2'\]\)"):
        train.training_data(_cfg(pipe, tmp_path, manifest), cache, tok)


def test_a_shard_window_keeps_each_stretch_of_batches_in_that_many_shards():
    n, num_shards, window = 6_000, 12, 3
    shards = np.random.default_rng(1).integers(0, num_shards, n).astype(np.int32)
    one = DistContext()
    order = epoch_order(n, 0, 4, one, shards=shards, window=window)
    assert sorted(order.tolist()) == list(range(n))  # every sample once
    seen = [set()]
    for s in shards[order]:  # the epoch goes through windows of 3 shards, one window after the other
        if len(seen[-1] | {s}) > window:
            seen.append(set())
        seen[-1].add(s)
    assert len(seen) == num_shards // window and all(len(w) == window for w in seen)
    assert set().union(*seen) == set(range(num_shards))
    assert np.array_equal(order, epoch_order(n, 0, 4, one, shards=shards, window=window))  # reproducible
    assert not np.array_equal(order, epoch_order(n, 0, 5, one, shards=shards, window=window))  # epoch by epoch
    # two ranks split it as DistributedSampler does: every sample once, and at a time both in the same window
    ranks = [epoch_order(n, 0, 4, DistContext(r, 2), shards=shards, window=window) for r in range(2)]
    assert sorted(np.concatenate(ranks).tolist()) == list(range(n))
    assert {int(shards[ranks[0][0]]), int(shards[ranks[1][0]])} <= seen[0]


def test_without_a_window_the_order_is_the_seeded_permutation_it_always_was():
    g = torch.Generator().manual_seed(3 * 1_000_003 + 2)
    assert epoch_order(1000, 3, 2, DistContext()).tolist() == torch.randperm(1000, generator=g).tolist()


def test_the_dataset_says_which_cache_shard_each_caption_reads(pipe):
    cache, tok = FeatureCache(pipe.features), load_tokenizer(pipe.tokenizer("word"))
    records = [r for r in read_manifest(pipe.manifest) if r.split == "train"]
    ds = CachedCaptionDataset(cache, train.caption_table(records, tok), pad_id=tok.pad_id)
    want = [cache.meta.shard_of(r.image_id) for r in records for _ in r.captions]
    assert ds.shard_of_samples().tolist() == want and set(want) == {0, 1}


def test_train_with_a_shard_window_trains(pipe, tmp_path):
    cfg = _cfg(pipe, tmp_path).model_copy(update={"epochs": 1, "batch_size": 16, "shuffle_shards": 1,
                                                  "decoder_options": {"d_model": 32, "num_layers": 1, "num_heads": 2},
                                                  "val_max_images": 8, "warmup_steps": 0})
    summary = train.run(cfg)
    train_records = [r for r in read_manifest(pipe.manifest) if r.split == "train"]
    assert summary["train_captions"] == sum(len(r.captions) for r in train_records)
    assert (tmp_path / "m" / "bundle" / "model.safetensors").is_file()
