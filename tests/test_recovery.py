"""The noisy-caption recovery experiment as the DAG carries it: its cells' training data (`mix`
with and without the clean train split), the extraction of the noisy images into the one cache,
the report's side-by-side table, and which stages a `dvc exp run -S mix.ratio=... -S
filter.clip_threshold=...` reruns (read from DVC's own graph; nothing runs)."""

from __future__ import annotations

import json

import pytest

from pipeline.config import ConfigError, MixConfig, ReportConfig, load_config
from pipeline.data.manifest import ManifestError, ManifestRecord, read_manifest, read_manifests, write_manifest
from tests.conftest import REPO

CELLS = ("transformer_noisy", "transformer_filtered", "transformer_mixed")


def _rows(prefix: str, n: int, splits: list[str], captions: int) -> list[ManifestRecord]:
    return [ManifestRecord(image_id=f"{prefix}{i:03d}", path=f"img/{prefix.strip('/')}-{i:03d}.png",
                           captions=[f"caption {j} of {i}" for j in range(captions)], split=splits[i % len(splits)],
                           source=prefix.strip("/"), sha256=f"{i:064x}") for i in range(n)]


def test_a_noisy_only_cell_trains_on_the_filtered_side_alone_and_keeps_clean_val_test(tmp_path):
    from stages.mix import run as mix

    write_manifest(tmp_path / "clean/manifest.jsonl", _rows("c/", 10, ["train", "val", "test", "train", "train"], 3))
    write_manifest(tmp_path / "noisy/manifest.jsonl", _rows("n/", 6, ["train", "train", "val"], 2))
    stats = mix(MixConfig(clean=tmp_path / "clean/manifest.jsonl", filtered=tmp_path / "noisy/manifest.jsonl",
                          out_dir=tmp_path / "cell", clean_train=False))
    rows = read_manifest(tmp_path / "cell/manifest.jsonl")
    assert sorted(r.image_id for r in rows if r.split == "train") == ["n/000", "n/001", "n/003", "n/004"]
    assert sorted((r.split, r.image_id) for r in rows if r.split != "train") == [
        ("test", "c/002"), ("test", "c/007"), ("val", "c/001"), ("val", "c/006")]
    assert stats["train"]["clean"] == {"images": 0, "captions": 0, "available_images": 0, "available_captions": 0}
    # the image digests travel with the rows (train checks the cache against them) and paths still resolve
    assert all(r.sha256 for r in rows)
    assert (tmp_path / "cell" / rows[0].path).resolve() == (tmp_path / "noisy/img/n-000.png").resolve()


def test_ratio_without_the_clean_side_is_refused_and_a_params_ratio_gives_way(tmp_path):
    with pytest.raises(ValueError, match="clean_train is false: leave ratio unset"):
        MixConfig(ratio=0.25, clean_train=False)
    params = tmp_path / "params.yaml"
    params.write_text("mix:\n  ratio: 0.25\n")  # what `dvc exp run -S mix.ratio=0.25` leaves in params.yaml
    cfg = load_config("mix", params, {"clean_train": False})
    assert cfg.ratio is None and not cfg.clean_train
    with pytest.raises(ConfigError, match="leave ratio unset"):
        load_config("mix", params, {"clean_train": False, "ratio": 0.5})


def test_extra_manifests_join_one_record_list_with_paths_from_the_first(tmp_path):
    write_manifest(tmp_path / "a/manifest.jsonl", _rows("c/", 3, ["train"], 1))
    noisy = _rows("n/", 2, ["train"], 1)
    write_manifest(tmp_path / "a/noisy/manifest.jsonl", noisy)
    records = read_manifests(tmp_path / "a/manifest.jsonl", [tmp_path / "a/noisy/manifest.jsonl"])
    assert [r.image_id for r in records] == ["c/000", "c/001", "c/002", "n/000", "n/001"]
    assert records[3].path == "noisy/img/n-000.png"  # relative to the first manifest's folder
    # the same id for the same file is listed once; for another file it is an error naming both manifests
    write_manifest(tmp_path / "a/again.jsonl", _rows("c/", 1, ["train"], 1))
    assert len(read_manifests(tmp_path / "a/manifest.jsonl", [tmp_path / "a/again.jsonl"])) == 3
    write_manifest(tmp_path / "b/other.jsonl", _rows("c/", 1, ["train"], 1))
    with pytest.raises(ManifestError, match=r"other.jsonl: image id 'c/000' is also in .*manifest.jsonl for another"):
        read_manifests(tmp_path / "a/manifest.jsonl", [tmp_path / "b/other.jsonl"])


def test_report_puts_the_cells_side_by_side(tmp_path, monkeypatch):
    from stages.report import run

    monkeypatch.chdir(tmp_path)
    for k, name in enumerate(("transformer", *CELLS)):
        report = tmp_path / "reports" / name
        report.mkdir(parents=True)
        (report / "metrics.json").write_text(json.dumps({
            "model": name, "decoder": "transformer", "split": "test", "num_images": 5, "tokenizer": "ptb",
            "BLEU-1": 0.5 + k / 10, "BLEU-4": 0.1 * k, "METEOR": 0.2, "ROUGE_L": 0.4, "CIDEr": 0.3 * k}))
        model = tmp_path / "models" / name
        model.mkdir(parents=True)
        (model / "metrics.json").write_text(json.dumps({"parameters": 10, "train_images": 100 + k,
                                                        "train_captions": 500 + k}))
    cells = {"noisy, unfiltered": "transformer_noisy", "filtered": "transformer_filtered", "mixed": "transformer_mixed",
             "clean": "transformer"}
    run(ReportConfig(comparisons={"Noisy-caption recovery": cells}, live=[]))
    text = (tmp_path / "reports/summary.md").read_text()
    table = text.split("## Noisy-caption recovery", 1)[1].split("## Training curves", 1)[0]
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| Cell | Model | train images | train captions | BLEU-1 | BLEU-4 |")
    assert [line.split(" | ")[0] for line in lines[1:]] == ["| noisy, unfiltered", "| filtered", "| mixed", "| clean"]
    assert lines[1].split(" | ")[1:4] == ["transformer_noisy", "101", "501"] and "0.3000" in lines[1]
    assert "Every cell scored on the `test` split, 5 images" in table

    with pytest.raises(Exception, match=r"no evaluation report for model\(s\) \['nope'\]"):
        run(ReportConfig(comparisons={"T": {"x": "nope"}}, live=[]))


def test_the_dag_carries_the_experiment_and_a_new_ratio_or_threshold_reruns_only_its_chain():
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        graph = repo.index.graph
        by_name = {s.addressing: s for s in graph.nodes if s.path_in_repo == "dvc.yaml"}

        def downstream(*names: str) -> set[str]:
            out = set(names)
            for name in names:  # DVC's graph points from a stage to the stages it depends on
                out |= {s.addressing for s in nx.ancestors(graph, by_name[name])}
            return out

        for cell in CELLS:
            assert f"train@{cell}" in by_name and f"evaluate@{cell}" in by_name
        extract_deps = {d.def_path for d in by_name["extract"].deps}
        assert "data/prepared/noisy/manifest.jsonl" in extract_deps
        assert "--extra-manifests data/prepared/noisy/manifest.jsonl" in by_name["extract"].cmd
        assert downstream("mix") == {"mix", "train@transformer_mixed", "evaluate@transformer_mixed", "report"}
        assert downstream("filter") == {"filter", "mix", "recovery_data@filtered", "train@transformer_filtered",
                                        "train@transformer_mixed", "evaluate@transformer_filtered",
                                        "evaluate@transformer_mixed", "report"}
        # every cell is scored on the clean test split
        for cell in CELLS:
            assert "--manifest data/prepared/manifest.jsonl" in by_name[f"evaluate@{cell}"].cmd
    params = load_config("report", REPO / "params.yaml")
    assert set(params.comparisons["Noisy-caption recovery"].values()) == {*CELLS, "transformer"}
