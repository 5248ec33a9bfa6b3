"""Smoke test of the batched-vs-single beam search benchmark (no performance assertions)."""

import json

from bench import beam_search
from pipeline.models.decoders import DECODERS


def test_beam_search_quick_writes_results(tmp_path):
    beam_search.main(["--quick", "--results-dir", str(tmp_path)])
    data = json.loads((tmp_path / "beam_search.json").read_text())
    assert [r["family"] for r in data["rows"]] == list(DECODERS)
    for row in data["rows"]:
        assert row["images"] == 12 and row["ratio"] > 0
        assert row["identical_captions"] == row["images"]  # batched search gives the one-at-a-time captions
