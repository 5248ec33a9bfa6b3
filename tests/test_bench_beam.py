"""Smoke tests of the batched-vs-single beam search benchmark (no performance assertions)."""

import json

from bench import beam_search
from pipeline.models.decoders import DECODERS


def test_beam_search_quick_writes_results(tmp_path):
    beam_search.main(["--quick", "--threads", "1", "--results-dir", str(tmp_path)])  # 1 thread: seconds when busy
    data = json.loads((tmp_path / "beam_search.json").read_text())
    assert [r["family"] for r in data["rows"]] == list(DECODERS)
    for row in data["rows"]:
        assert row["images"] == 12 and row["ratio"] > 0 and row["beam_size"] == 3
        assert row["identical_captions"] == row["images"]  # batched search gives the one-at-a-time captions
        assert row["source"].startswith("random-init tiny decoder")


def test_beam_search_on_cached_images_labels_trained_and_random_decoders(tmp_path, tiny_pipeline):
    """The real workload's path: a given trained bundle for its family, a random-init decoder at real sizes
    for another, both over the cache's test images, each labelled as what it is."""
    beam_search.main([
        "--bundle", str(tiny_pipeline.bundle), "--features", str(tiny_pipeline.features),
        "--manifest", str(tiny_pipeline.manifest), "--families", "transformer", "show_tell", "--images", "4",
        "--batch-size", "3", "--beam-size", "2", "3", "--threads", "1", "--results-dir", str(tmp_path),
    ])
    rows = json.loads((tmp_path / "beam_search.json").read_text())["rows"]
    assert [(r["family"], r["beam_size"]) for r in rows] == [
        ("transformer", 2), ("transformer", 3), ("show_tell", 2), ("show_tell", 3)]
    assert all(r["images"] == 4 and r["identical_captions"] == 4 and r["batch_size"] == 3 for r in rows)
    assert rows[0]["source"].startswith(f"trained bundle {tiny_pipeline.bundle}, 4 cached test images")
    assert rows[2]["source"].startswith("random-init decoder at real sizes")
    assert "4 cached test images" in rows[2]["source"]
