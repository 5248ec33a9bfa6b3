"""The prepare stage end to end on small inputs: manifest, splits, noisy variant, rejects, stats, CLI errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import Flickr8kSource, PrepareConfig, SyntheticSource, TableSource
from pipeline.data.manifest import (
    SPLITS,
    RejectsReport,
    read_manifest,
    resolve_image_path,
)
from stages.prepare import run

# 60 clean + 20 noisy images, val 0.15 / test 0.25: exact counts per split.
N_CLEAN, N_NOISY = 60, 20
VAL, TEST = 0.15, 0.25
CLEAN_SPLITS = {"test": 15, "train": 36, "val": 9}
NOISY_SPLITS = {"test": 5, "train": 12, "val": 3}


def synthetic_cfg(out_dir: Path, seed: int = 0) -> PrepareConfig:
    return PrepareConfig(
        sources=[SyntheticSource(num_images=N_CLEAN, noisy_images=N_NOISY, image_size=32)],
        out_dir=out_dir, seed=seed, val_fraction=VAL, test_fraction=TEST, workers=1,
    )


def png(path: Path, seed: int, size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, "PNG")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "out"
    stats = run(synthetic_cfg(out))
    return out, stats


# --------------------------------------------------------------------------- synthetic
def test_synthetic_manifest_rows_and_exact_splits(synthetic_run):
    out, _ = synthetic_run
    records = read_manifest(out / "manifest.jsonl")
    assert len(records) == N_CLEAN
    assert all(r.source == "synthetic" and len(r.captions) == 5 for r in records)
    assert dict(Counter(r.split for r in records)) == CLEAN_SPLITS
    ids = [r.image_id for r in records]
    assert len(set(ids)) == len(ids)  # one row per image: no image in two splits
    assert len({r.path for r in records}) == N_CLEAN
    assert ids == sorted(ids)
    for r in records:
        assert "needs_split" not in r.extra
        assert resolve_image_path(r, out / "manifest.jsonl").is_file()
    # Reading one split at a time partitions the manifest.
    by_split = {s: {r.image_id for r in read_manifest(out / "manifest.jsonl", split=s)} for s in SPLITS}
    assert sum(len(v) for v in by_split.values()) == N_CLEAN
    assert not (by_split["train"] & by_split["val"]) and not (by_split["train"] & by_split["test"])
    assert not (by_split["val"] & by_split["test"])


def test_noisy_manifest_paths_resolve_from_its_folder(synthetic_run):
    out, _ = synthetic_run
    noisy_manifest = out / "noisy" / "manifest.jsonl"
    noisy = read_manifest(noisy_manifest)
    assert len(noisy) == N_NOISY
    assert dict(Counter(r.split for r in noisy)) == NOISY_SPLITS
    for r in noisy:
        assert r.source == "synthetic-noisy" and r.image_id.startswith("synthetic-noisy/")
        p = resolve_image_path(r, noisy_manifest)
        assert p.is_file(), p
        assert p.resolve().parent == (out / "images").resolve()
        with Image.open(p) as img:
            assert img.size == (32, 32)
    # The noisy images are not in the clean manifest.
    clean_ids = {r.image_id for r in read_manifest(out / "manifest.jsonl")}
    assert not clean_ids & {r.image_id for r in noisy}


def test_noisy_labels_one_row_per_caption_and_not_in_manifests(synthetic_run):
    out, _ = synthetic_run
    noisy = read_manifest(out / "noisy" / "manifest.jsonl")
    labels = read_jsonl(out / "noisy" / "labels.jsonl")
    assert len(labels) == sum(len(r.captions) for r in noisy)
    assert {(row["image_id"], row["caption_index"]) for row in labels} == {
        (r.image_id, i) for r in noisy for i in range(len(r.captions))
    }
    assert all(isinstance(row["match"], bool) and row["kind"] for row in labels)
    assert {row["match"] for row in labels} == {True, False}
    # No label leaks into a manifest row (neither the noisy nor the clean one).
    for manifest in (out / "noisy" / "manifest.jsonl", out / "manifest.jsonl"):
        for row in read_jsonl(manifest):
            assert set(row) <= {"image_id", "path", "captions", "split", "source", "extra", "sha256"}
            assert not {"match", "labels", "caption_index"} & set(row.get("extra", {}))
            assert '"match"' not in json.dumps(row)


def test_stats_counts(synthetic_run):
    out, returned = synthetic_run
    stats = json.loads((out / "stats.json").read_text())
    assert stats == json.loads(json.dumps(returned))  # the file holds what run() returned
    assert stats["images"] == N_CLEAN
    assert stats["captions"] == 5 * N_CLEAN
    assert stats["by_split"] == CLEAN_SPLITS
    assert stats["by_source"] == {"synthetic": N_CLEAN}
    assert stats["noisy_images"] == N_NOISY
    assert stats["rejects"] == {"total": 0, "by_reason": {}}
    assert stats["config"]["val_fraction"] == VAL and stats["config"]["sources"][0]["num_images"] == N_CLEAN
    assert (out / "rejects.jsonl").read_text() == ""


def test_deterministic(synthetic_run, tmp_path):
    out, _ = synthetic_run
    again = tmp_path / "again"
    run(synthetic_cfg(again))
    for rel in ("manifest.jsonl", "noisy/manifest.jsonl", "noisy/labels.jsonl", "images/syn-000007.png",
                "images/noisy-000003.png"):
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    # Another seed gives another split of the same images.
    other = tmp_path / "other"
    run(synthetic_cfg(other, seed=1))
    a = {r.image_id: r.split for r in read_manifest(out / "manifest.jsonl")}
    b = {r.image_id: r.split for r in read_manifest(other / "manifest.jsonl")}
    assert a.keys() == b.keys() and a != b
    assert Counter(b.values()) == Counter(CLEAN_SPLITS)


def test_bad_fractions_are_refused(tmp_path, monkeypatch):
    from pydantic import ValidationError

    from pipeline.data.manifest import ManifestRecord
    from stages.prepare import assign_splits

    with pytest.raises(ValidationError):
        PrepareConfig(val_fraction=1.0)
    # Together they must leave a train split: refused by the config, before any work is done.
    with pytest.raises(ValidationError, match="below 1"):
        PrepareConfig(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="below 1"):
        assign_splits([ManifestRecord("a/1", "x.png", ["c"], "train", "a", {"needs_split": True})],
                      seed=0, val_fraction=0.6, test_fraction=0.5)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["prepare", "--val-fraction", "0.6", "--test-fraction", "0.5",
                                      "--out-dir", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "error: command line: " in result.output and "must be below 1" in result.output
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- real-format sources
def flickr8k_fixture(root: Path) -> Flickr8kSource:
    """6 images with 2 captions each (Kaggle captions.txt) and the three split lists."""
    names = [f"f{i}.png" for i in range(6)]
    for i, name in enumerate(names):
        png(root / "Images" / name, seed=100 + i)
    lines = ["image,caption"] + [f'{n},"a photo, number {i} of {n}"' for i, n in enumerate(names)] + \
            [f"{n},another caption for {n}" for n in names]
    (root / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    lists = root / "splits"
    lists.mkdir()
    (lists / "Flickr_8k.trainImages.txt").write_text("f0.png\nf1.png\nf2.png\nf3.png\n")
    (lists / "Flickr_8k.devImages.txt").write_text("f4.png\n")
    (lists / "Flickr_8k.testImages.txt").write_text("f5.png\n")
    return Flickr8kSource(captions=root / "captions.txt", images=root / "Images", split_lists=lists)


def table_fixture(root: Path, n: int = 10, name: str = "table") -> TableSource:
    rows = ["image,caption"]
    for i in range(n):
        png(root / "pics" / f"t{i:02d}.png", seed=200 + i)
        rows.append(f"pics/t{i:02d}.png,table image {i}")
    (root / "posts.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return TableSource(name=name, path=root / "posts.csv")


def test_merge_flickr8k_and_table(tmp_path):
    flickr = flickr8k_fixture(tmp_path / "flickr")
    table = table_fixture(tmp_path / "social")
    out = tmp_path / "out"
    cfg = PrepareConfig(sources=[flickr, table], out_dir=out, seed=3, val_fraction=0.2, test_fraction=0.2, workers=2)
    stats = run(cfg)
    records = read_manifest(out / "manifest.jsonl")
    assert len(records) == 16
    assert Counter(r.source for r in records) == {"flickr8k": 6, "table": 10}
    assert stats["by_source"] == {"flickr8k": 6, "table": 10}
    assert stats["captions"] == 6 * 2 + 10
    assert stats["rejects"]["total"] == 0

    # Flickr8k keeps its split lists.
    fl = {r.image_id: r for r in records if r.source == "flickr8k"}
    assert {k: r.split for k, r in fl.items()} == {
        "flickr8k/f0": "train", "flickr8k/f1": "train", "flickr8k/f2": "train", "flickr8k/f3": "train",
        "flickr8k/f4": "val", "flickr8k/f5": "test",
    }
    assert fl["flickr8k/f2"].captions == ["a photo, number 2 of f2.png", "another caption for f2.png"]
    # The table gets a seeded split with exact counts (of its own 10 images only).
    tb = [r for r in records if r.source == "table"]
    assert Counter(r.split for r in tb) == {"train": 6, "val": 2, "test": 2}
    assert all(r.image_id.startswith("table/pics/") for r in tb)
    for r in records:
        assert Path(r.path).is_absolute() and resolve_image_path(r, out / "manifest.jsonl").is_file()
        assert "needs_split" not in r.extra
    assert not (out / "noisy").exists()

    # Same inputs, same bytes.
    run(cfg.model_copy(update={"out_dir": tmp_path / "out2"}))
    assert (out / "manifest.jsonl").read_bytes() == (tmp_path / "out2" / "manifest.jsonl").read_bytes()


def test_merge_synthetic_and_table(tmp_path):
    table = table_fixture(tmp_path / "social", n=4)
    out = tmp_path / "out"
    stats = run(PrepareConfig(sources=[SyntheticSource(num_images=6, noisy_images=2, image_size=32), table],
                              out_dir=out, workers=1))
    records = read_manifest(out / "manifest.jsonl")
    assert Counter(r.source for r in records) == {"synthetic": 6, "table": 4}
    assert stats["noisy_images"] == 2
    for r in records:
        assert resolve_image_path(r, out / "manifest.jsonl").is_file()


def test_bad_image_and_empty_caption_are_rejected(tmp_path):
    root = tmp_path / "src"
    png(root / "ok1.png", 1)
    png(root / "ok2.png", 2)
    (root / "bad.png").write_text("not really a png\n")
    (root / "empty.png").write_bytes(b"")
    table = root / "rows.csv"
    table.write_text(
        "image,caption\n"           # line 1
        "ok1.png,first caption\n"   # line 2
        'ok1.png,"   "\n'           # line 3: empty caption (ok1 keeps its other caption)
        "bad.png,a bad image\n"     # line 4
        "ok2.png,\n"                # line 5: empty caption, ok2's only one
        "empty.png,an empty file\n"  # line 6
        "gone.png,a missing file\n",  # line 7
        encoding="utf-8",
    )
    out = tmp_path / "out"
    stats = run(PrepareConfig(sources=[TableSource(name="soc", path=table)], out_dir=out, workers=1))

    records = read_manifest(out / "manifest.jsonl")
    assert [(r.image_id, r.captions) for r in records] == [("soc/ok1.png", ["first caption"])]

    rejects = RejectsReport.read(out / "rejects.jsonl")
    reasons = Counter(r["reason"].split(":")[0] for r in rejects)
    assert reasons == {"empty caption": 2, "no valid captions": 1, "not an image": 1, "empty file": 1,
                       "missing image file": 1}
    by_reason = {}
    for r in rejects:
        by_reason.setdefault(r["reason"].split(":")[0], []).append(r)
    # Annotation problems point at the annotation file and line.
    empty = sorted(by_reason["empty caption"], key=lambda r: r["line"])
    assert [(r["file"], r["line"], r["id"]) for r in empty] == [(str(table), 3, "soc/ok1.png"), (str(table), 5, "soc/ok2.png")]
    (nocap,) = by_reason["no valid captions"]
    assert (nocap["file"], nocap["line"], nocap["id"]) == (str(table), 5, "soc/ok2.png")
    # Image problems point at the image file itself, with the record's id.
    (bad,) = by_reason["not an image"]
    assert Path(bad["file"]) == (root / "bad.png").resolve() and bad["id"] == "soc/bad.png"
    (emp,) = by_reason["empty file"]
    assert Path(emp["file"]) == (root / "empty.png").resolve() and emp["id"] == "soc/empty.png"
    (gone,) = by_reason["missing image file"]
    assert Path(gone["file"]) == (root / "gone.png").resolve() and gone["id"] == "soc/gone.png"
    for r in rejects:
        assert set(r) <= {"file", "line", "id", "reason"} and r["file"] and r["reason"]

    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["rejects"] == stats["rejects"] == {"total": 6, "by_reason": dict(sorted(reasons.items()))}
    assert on_disk["images"] == 1 and on_disk["captions"] == 1


def test_truncated_image_passes_header_check(tmp_path):
    import io

    root = tmp_path / "src"
    png(root / "ok.png", 1)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    (root / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "t.csv").write_text("image,caption\nok.png,fine\ncut.jpg,cut in half\n")
    src = TableSource(name="t", path=root / "t.csv")
    full = run(PrepareConfig(sources=[src], out_dir=tmp_path / "full", check_images="full", workers=1))
    assert full["images"] == 1 and full["rejects"]["by_reason"] == {"truncated image": 1}
    header = run(PrepareConfig(sources=[src], out_dir=tmp_path / "header", check_images="header", workers=1))
    assert header["images"] == 2 and header["rejects"]["total"] == 0


def test_duplicate_source_names_are_rejected(tmp_path):
    a = table_fixture(tmp_path / "a", n=3, name="dup")
    b = table_fixture(tmp_path / "b", n=2, name="dup")  # same relative names: same ids
    out = tmp_path / "out"
    stats = run(PrepareConfig(sources=[a, b], out_dir=out, workers=1))
    records = read_manifest(out / "manifest.jsonl")
    assert [r.image_id for r in records] == ["dup/pics/t00.png", "dup/pics/t01.png", "dup/pics/t02.png"]
    # The first source's images win; the second's are rejected, naming their own files.
    assert all(Path(r.path).is_relative_to((tmp_path / "a").resolve()) for r in records)
    rejects = RejectsReport.read(out / "rejects.jsonl")
    assert len(rejects) == 2
    for r in rejects:
        assert r["reason"].startswith("duplicate id")
        assert Path(r["file"]).is_relative_to((tmp_path / "b").resolve())
    assert {r["id"] for r in rejects} == {"dup/pics/t00.png", "dup/pics/t01.png"}
    assert stats["rejects"] == {"total": 2, "by_reason": {"duplicate id": 2}}
    assert stats["images"] == 3


# --------------------------------------------------------------------------- the CLI
@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: only the command line counts
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args), catch_exceptions=False)


def test_cli_malformed_annotation_file(tmp_path, cli):
    (tmp_path / "imgs").mkdir()
    ann = tmp_path / "captions_val2017.json"
    ann.write_text('{"images": [\n  {"id": 1, "file_name": "a.jpg"},\n  {"id": 2 "file_name": "b.jpg"}\n]}\n')
    sources = json.dumps([{"kind": "coco", "annotations": str(ann), "images": str(tmp_path / "imgs")}])
    out = tmp_path / "out"
    result = cli("prepare", "--sources", sources, "--out-dir", str(out))
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert f"error: {ann}:3:12: invalid JSON" in result.output, result.output
    assert not (out / "manifest.jsonl").exists()


def test_cli_table_missing_column(tmp_path, cli):
    table = tmp_path / "t.csv"
    table.write_text("\n\nimg,text\na.png,hello\n")
    sources = json.dumps([{"kind": "table", "path": str(table)}])
    result = cli("prepare", "--sources", sources, "--out-dir", str(tmp_path / "out"))
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"error: {table}:3: missing required column 'image'" in result.output, result.output


def test_cli_missing_annotation_file(tmp_path, cli):
    missing = tmp_path / "nope.txt"
    sources = json.dumps([{"kind": "flickr8k", "captions": str(missing), "images": str(tmp_path)}])
    result = cli("prepare", "--sources", sources, "--out-dir", str(tmp_path / "out"))
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"error: {missing}: annotation file not found" in result.output, result.output


def test_cli_prepare_runs(tmp_path, cli):
    table = table_fixture(tmp_path / "src", n=5)
    sources = json.dumps([{"kind": "table", "path": str(table.path)}])
    out = tmp_path / "out"
    result = cli("prepare", "--sources", sources, "--out-dir", str(out), "--val-fraction", "0.2",
                 "--test-fraction", "0.2", "--workers", "1")
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "stats.json").read_text())
    assert stats["by_split"] == {"test": 1, "train": 3, "val": 1}
