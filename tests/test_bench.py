"""`bench`: every benchmark's --quick smoke run writes its JSON with positive ratios (no timing asserted)."""

from __future__ import annotations

import json
import math

import pytest

from bench import BENCHMARKS
from tests.conftest import torch_threads


def _positive_numbers(d: dict) -> bool:
    return bool(d) and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in d.values())


def _results(tmp_path, name: str, printed: str, file_name: str | None = None) -> dict:
    """The results file of a quick run of ``name`` in ``tmp_path``, checked for the envelope every benchmark
    writes (bench.common.BenchRun): which benchmark, its options, the machine, the load, the printed table."""
    data = json.loads((tmp_path / f"{file_name or name}.json").read_text())
    assert data["benchmark"] == name and data["quick"] is True
    assert data["config"]["quick"] is True and data["config"]["results_dir"] == str(tmp_path)
    assert data["machine"]["python"] and data["machine"]["cpu_count"] > 0
    assert isinstance(data["loadavg_before"], list) and isinstance(data["loadavg_after"], list)
    assert data["markdown"].strip() and data["markdown"] in printed  # the file holds the table that was printed
    return data


# Each benchmark `python -m bench` discovers, and the test of its quick mode.
QUICK_TESTS = {
    "beam_search": "test_python_m_bench_runs_a_benchmarks_quick_mode (and tests/test_bench_beam.py)",
    "cache_read": "test_cache_read_quick_writes_ratios",
    "extract": "test_extract_quick_writes_ratios",
    "serve": "test_serve_quick_writes_results",
    "train_step": "test_train_step_quick_writes_results",
    "train_throughput": "test_train_throughput_quick_writes_results",
}


def test_every_benchmark_has_a_quick_mode_test():
    assert set(BENCHMARKS) == set(QUICK_TESTS), "a benchmark without a test of its --quick run (add one here)"
    assert all(t.split()[0] in globals() for t in QUICK_TESTS.values())


def test_python_m_bench_runs_a_benchmarks_quick_mode(tmp_path, capsys):
    """The runner of `python -m bench --quick` on one benchmark: it passes --quick and --results-dir on, and
    hands back what the benchmark wrote."""
    from bench.__main__ import main
    from pipeline.models.decoders import DECODERS

    with torch_threads(1):  # tiny random decoders: seconds on one thread, even on a busy machine
        (returned,) = main(["--quick", "--only", "beam_search", "--results-dir", str(tmp_path)])
    data = _results(tmp_path, "beam_search", capsys.readouterr().out)
    assert returned == data
    assert [r["family"] for r in data["rows"]] == list(DECODERS)
    for row in data["rows"]:
        assert row["images"] == 12 and row["beam_size"] == 3 and row["ratio"] > 0
        assert row["identical_captions"] == row["images"]  # batched search gives the one-at-a-time captions


def test_extract_quick_writes_ratios(tmp_path, capsys):
    from bench import extract

    # timm's tiny test model and one torch thread keep this to seconds even on a busy machine; the default
    # backbone and threads are what `python -m bench.extract` measures.
    extract.main(["--quick", "--backbone", "test_efficientnet", "--threads", "1", "--results-dir", str(tmp_path),
                  "--work-dir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    data = _results(tmp_path, "extract", out)
    for size in (224, 160):
        for key in ("extract_vs_forward", "workers1_vs_workers0"):
            assert f"{key}_{size}" in data["ratios"]
    assert _positive_numbers(data["ratios"])
    for row in data["results"]:
        assert row["bare_forward_images_per_s"] > 0 and _positive_numbers(row["extract_images_per_s"])
        assert row["images"] == sum(row["batch_sizes"]) and row["fixed_cost_s"] > 0
    assert "| 224 px |" in out


def test_cache_read_quick_writes_ratios(tmp_path, capsys):
    from bench import cache_read

    cache_read.main(["--quick", "--results-dir", str(tmp_path), "--work-dir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    data = _results(tmp_path, "cache_read", out)
    for key in ("lmdb_vs_memmap", "lmdb_vs_npy_files", "dataloader_vs_lmdb"):
        assert key in data["ratios"]
    assert _positive_numbers(data["ratios"])
    assert _positive_numbers(data["warm_records_per_s"])
    assert "LMDB cache" in out


def test_train_throughput_quick_writes_results(tmp_path, capsys):
    from bench import train_throughput

    # timm's tiny ConvNeXt and one torch thread keep this to seconds on a busy machine; the default
    # (convnext_tiny at 224 px) is what `python -m bench.train_throughput` measures.
    train_throughput.main(["--quick", "--backbone", "test_convnext", "--threads", "1", "--results-dir", str(tmp_path),
                           "--work-dir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    data = _results(tmp_path, "train_throughput", out)
    assert "memory_child" not in data["config"]  # an internal option, not one of the run's
    variants = data["throughput"]["variants"]
    assert set(variants) == {"cache", "trainer", "e2e_frozen", "e2e_last_stage"}
    for v in variants.values():
        for amp in ("fp32", "bf16"):
            assert v[amp]["samples_per_s"] > 0 and v[amp]["seconds_per_step"]["total"] > 0
    assert set(data["ratios"]) == {f"cache_vs_{v}_{a}" for v in ("trainer", "e2e_frozen", "e2e_last_stage")
                                   for a in ("fp32", "bf16")}
    assert _positive_numbers(data["ratios"])
    ext = data["extraction"]
    assert ext["seconds"] > 0 and ext["images_per_s"] > 0 and ext["cache_bytes"] > 0
    assert [m["records"] for m in data["memory"]] == [32, 64]
    for m in data["memory"]:
        for key in ("ru_maxrss_bytes", "peak_rss_anon_bytes", "python_heap_samples_bytes", "cache_bytes",
                    "distinct_records_read"):
            assert m[key] > 0, key
    assert "feature cache vs end to end" in out and "peak memory" in out


def test_train_step_quick_writes_results(tmp_path, capsys):
    from bench import train_step

    # A generated tiny world (timm's tiny test backbone, a 32-wide transformer) and one torch thread: seconds;
    # `python -m bench.train_step` measures the params file's (or a recipe's) real sizes.
    train_step.main(["--quick", "--threads", "1", "--results-dir", str(tmp_path), "--work-dir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    data = _results(tmp_path, "train_step", out)
    assert set(data["ratios"]) == {"pipeline_vs_bare", "pipeline_vs_bare_with_epoch_and_checkpoint_costs",
                                   "pipeline_vs_bare_cpu"}
    assert _positive_numbers(data["ratios"]) and data["targets"] == {"pipeline_vs_bare": 0.95}
    m = data["measurement"]
    for side in ("pipeline", "bare"):
        assert len(m["rounds"][side]) == data["config"]["rounds"] == 2
        assert data["loops"][side]["samples_per_s"] > 0
    assert m["checkpoint_save_seconds"] > 0 and m["end_of_epoch_seconds"] > 0
    assert m["pipeline_mean_loss"] > 0 and m["bare_mean_loss"] > 0  # the training losses of the timed steps
    assert data["workload"]["source"].startswith("generated tiny world")
    assert "`pipeline train` vs a bare loop" in out


def test_serve_quick_writes_results(tmp_path, capsys):
    import torch

    from bench import serve

    threads = torch.get_num_threads()
    try:  # a real server subprocess on 127.0.0.1 and the tiny random bundle: seconds, not a measurement
        serve.main(["--quick", "--results-dir", str(tmp_path), "--work-dir", str(tmp_path / "work")])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    data = _results(tmp_path, "serve", out)
    assert set(data["ratios"]) == {"latency_p50_http_vs_in_process", "latency_p95_http_vs_in_process",
                                   "throughput_8_vs_1_clients"}
    assert _positive_numbers(data["ratios"])
    for run in data["throughput"]["one_client"] + data["throughput"]["many_clients"]:
        assert run["ok"] > 0 and run["transport_failure_count"] == 0
    mixed = data["mixed"]  # correctness, not speed: malformed input never gets a 5xx
    assert mixed["complete"] and mixed["five_xx"] == 0 and mixed["unexpected"] == 0 and mixed["healthy_after"]
    assert set(mixed["statuses"]) == {"valid", *serve.MALFORMED_KINDS}
    hostile = data["hostile"]  # rebinding requests refused, slow bodies cut, nothing else amiss
    assert set(hostile["statuses"]["rebinding"]) == {"421"}
    assert hostile["five_xx"] == 0 and hostile["unexpected"] == 0
    assert hostile["slow_unexpected"] == 0 and sum(hostile["slow_answers"].values()) >= hostile["slow_clients"] > 0
    assert "### Serving" in out


@pytest.mark.slow
def test_quality_quick_runs_the_recipe_through_every_stage(tmp_path, capsys):
    """The real-photo benchmark's chain on a tiny generated Flickr8k-layout folder (about a minute)."""
    from bench import quality

    data = quality.main(["--quick", "--speed", "--results-dir", str(tmp_path), "--work-dir", str(tmp_path / "work")])
    out = capsys.readouterr().out
    saved = _results(tmp_path, "quality", out, file_name="quality-flickr8k-cpu")
    assert saved == data and saved["recipe"] == "flickr8k-cpu"
    assert [(r["model"], r["split"], r["decoding"]["name"]) for r in data["rows"]] == [
        ("train", "test", "greedy"), ("train", "test", "beam"), ("scst", "test", "greedy"), ("scst", "test", "beam")]
    for row in data["rows"]:
        assert row["images"] == 8 and set(row["scores"]) == set(quality.METRICS)
        assert all(0 <= v <= 10 for v in row["scores"].values())
    # the beam setting is chosen on val (--quick tries one), for the last model, and used on test
    (choice,) = data["decoding_choice"]
    assert choice["model"] == "scst" and choice["split"] == "val" and choice["images"] == 8
    assert data["rows"][-1]["decoding"]["beam_size"] == choice["decoding"]["beam_size"] == quality.VAL_GRID[0][0]
    assert {"convert-weights", "prepare", "extract", "vocab", "train", "scst"} <= set(data["stage_seconds"])
    assert "evaluate scst val beam3" in data["stage_seconds"]
    assert {"pipeline_vs_bare"} <= set(data["speed"]["train_step"]["ratios"])
    assert {r["family"] for r in data["speed"]["beam_search"]} >= {"transformer", "show_attend_tell"}
    assert "| scst | beam 3 |" in out and "decoding tried on val" in out


def test_quality_needs_a_dataset_or_quick(tmp_path):
    from bench import quality

    with pytest.raises(SystemExit, match="give a Flickr8k-layout DATASET_DIR"):
        quality.main(["--results-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="no recipe 'nope'.*known: .*flickr8k-cpu"):
        quality.main(["--recipe", "nope", str(tmp_path)])


def test_scale_quick_runs_every_stage_on_img2dataset_shards_at_two_sizes(tmp_path, capsys):
    """bench.scale (not in `python -m bench`: a size takes minutes to an hour) on its two quick sizes: every
    stage ran as its `pipeline` command on shards it wrote, with a time, a peak RSS of its own process (not
    the benchmark's: a torch-holding parent would report over 500 MB for `vocab`) and bytes written."""
    from bench import scale

    scale.main(["--quick", "--results-dir", str(tmp_path), "--work-dir", str(tmp_path / "work")])
    data = _results(tmp_path, "scale", capsys.readouterr().out)
    assert [s["samples"] for s in data["sizes"]] == [300, 600]
    for size in data["sizes"]:
        n = size["samples"]
        assert size["data"]["rows"] == n and 0 < size["data"]["failed"] < n // 10
        assert size["imported"] == n - size["data"]["failed"]  # every downloaded sample has a caption
        assert list(size["stages"]) == list(scale.STAGES)
        for stage in size["stages"].values():
            assert stage["seconds"] > 0 and stage["bytes_per_sample"] > 0 and 20 < stage["peak_rss_mb"]
            assert 10 < stage["peak_anon_mb"] < stage["peak_rss_mb"]  # sampled while the stage ran
        assert size["stages"]["vocab"]["peak_rss_mb"] < 400
        assert 0 < size["dvc_status_s"]
    assert set(data["growth"]) == set(scale.STAGES) and _positive_numbers(
        {f"{k}.{m}": v for k, r in data["growth"].items() for m, v in r.items()})
    assert not (tmp_path / "work" / "n300").exists()  # each size's data removed unless --keep


def test_photo_recovery_quick_converts_photos_to_noisy_shards_and_runs_every_cell(tmp_path, capsys):
    """bench.photo_recovery on its toy Flickr8k-layout folder: the noisy half becomes img2dataset shards whose
    labels say which captions were replaced, and the four cells train on what the filter and mix made of them."""
    from bench import photo_recovery

    data = photo_recovery.main(["--quick", "--results-dir", str(tmp_path), "--work-dir", str(tmp_path / "work")])
    assert data == _results(tmp_path, "photo_recovery", capsys.readouterr().out)
    conv = data["conversion"]
    assert conv["photos"] == 16 and conv["samples"] == 16 * 5 and sum(conv["kinds"].values()) == conv["samples"]
    assert conv["kinds"]["mismatched"] > 0 and conv["kinds"]["social"] > 0 and conv["kinds"]["match"] > 0
    assert data["conversion"]["val"]["photos"] == 8  # the val photos, noisy too: the filter's val labels
    labels = [json.loads(line) for line in (tmp_path / "work" / "shards" / "labels.jsonl").read_text().splitlines()]
    assert [r["match"] for r in labels] == [r["kind"] == "match" for r in labels] and len(labels) == 80 + 40
    assert list(data["cells"]) == ["noisy", "filtered", "mixed", "clean"]
    cells = data["cells"]
    assert cells["clean"]["train_images"] == 16  # the clean half of the 32 training photos
    assert cells["noisy"]["train_images"] == cells["noisy"]["train_captions"] == 80  # all of the noisy half
    # the noisy cell trains on the shards' train split; the filtered one on fewer captions; mixed on both sides
    assert cells["filtered"]["train_captions"] < cells["noisy"]["train_captions"]
    assert cells["mixed"]["train_images"] == cells["filtered"]["train_images"] + cells["clean"]["train_images"]
    assert all(c["scores"]["CIDEr"] >= 0 for c in cells.values())
    assert 0 <= data["filter"]["at_threshold"]["precision"] <= 1
