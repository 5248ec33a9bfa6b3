"""Splits a user can trust: every source's `split` option, and one photo under several ids kept in one split."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import (
    CocoSource,
    Flickr30kSource,
    PrepareConfig,
    SyntheticSource,
    TableSource,
)
from pipeline.data.manifest import read_manifest
from stages.prepare import run


def photo(seed: int, size=(16, 12)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)


def save(arr: np.ndarray, path: Path, fmt: str = "PNG", **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, fmt, **options)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def coco_source(root: Path, n: int, name: str = "captions_val2017.json", split: str = "auto", seed0: int = 0,
                **kwargs) -> CocoSource:
    """A COCO captions file of ``n`` PNG images (photo(seed0 + i)), two captions each."""
    images, annotations = [], []
    for i in range(n):
        save(photo(seed0 + i), root / "val2017" / f"{i:012d}.png")
        images.append({"id": i, "file_name": f"{i:012d}.png"})
        annotations += [{"id": 2 * i, "image_id": i, "caption": f"photo {i}"},
                        {"id": 2 * i + 1, "image_id": i, "caption": f"another view of photo {i}"}]
    (root / name).write_text(json.dumps({"images": images, "annotations": annotations}))
    return CocoSource(annotations=root / name, images=root / "val2017", split=split, **kwargs)


def prepare(tmp_path: Path, *sources, **kwargs) -> tuple[dict, dict, dict]:
    """(stats, {image_id: split}, duplicates.json) of a prepare run."""
    out = tmp_path / "out"
    stats = run(PrepareConfig(sources=list(sources), out_dir=out, workers=2, **kwargs))
    splits = {r.image_id: r.split for r in read_manifest(out / "manifest.jsonl")}
    return stats, splits, json.loads((out / "duplicates.json").read_text())


# --------------------------------------------------------------------------- the split option
def test_coco_val_file_with_split_seeded_gets_all_three_splits(tmp_path, caplog):
    src = coco_source(tmp_path / "coco", 10)
    with caplog.at_level(logging.WARNING, logger="stages.prepare"):
        stats, splits, _ = prepare(tmp_path / "auto", src, val_fraction=0.2, test_fraction=0.2)
    assert set(splits.values()) == {"val"} and stats["by_split"] == {"val": 10}  # auto: from the file name
    assert "no image is in the train split" in caplog.text and "split: seeded" in caplog.text

    caplog.clear()
    seeded = src.model_copy(update={"split": "seeded"})
    with caplog.at_level(logging.WARNING, logger="stages.prepare"):
        stats, splits, _ = prepare(tmp_path / "seeded", seeded, val_fraction=0.2, test_fraction=0.2)
    assert stats["by_split"] == {"test": 2, "train": 6, "val": 2}
    assert len(splits) == 10 and "no image is in the train split" not in caplog.text
    # The seeded split is a function of the ids and the seed: the same run gives the same split.
    assert prepare(tmp_path / "again", seeded, val_fraction=0.2, test_fraction=0.2)[1] == splits


@pytest.mark.parametrize("split", ["train", "test"])
def test_forced_split_puts_every_image_there(tmp_path, split):
    stats, splits, _ = prepare(tmp_path, coco_source(tmp_path / "coco", 5, split=split),
                               SyntheticSource(num_images=4, noisy_images=2, image_size=32, split=split))
    assert stats["by_split"] == {split: 9} and set(splits.values()) == {split}
    noisy = read_manifest(tmp_path / "out" / "noisy" / "manifest.jsonl")
    assert {r.split for r in noisy} == {split}


def test_unknown_split_values_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    sources = json.dumps([{"kind": "coco", "annotations": "a.json", "images": ".", "split": "validation"}])
    result = runner.invoke(app, ["prepare", "--sources", sources, "--out-dir", "out"], catch_exceptions=False)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: command line: sources.0.coco.split: Input should be 'auto', 'train', 'val', 'test' or " \
           "'seeded' (got 'validation')" in result.output, result.output
    (tmp_path / "p.yaml").write_text("prepare:\n  sources:\n    - kind: table\n      path: t.csv\n"
                                     "      split_column: part\n      split: seeded\n")
    result = runner.invoke(app, ["prepare", "--params", "p.yaml"], catch_exceptions=False)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: p.yaml [prepare]:" in result.output
    assert "split_column and split 'seeded' both say where the images go" in result.output, result.output
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- one photo under several ids
def shared_photo_sources(root: Path) -> tuple[CocoSource, TableSource, Flickr30kSource]:
    """COCO (forced train) holds photos 0-3 as PNG. A social table (forced val) re-posts photo 1 as a BMP
    and photo 2 as a PNG of another compression level; Flickr30k (forced test) holds a byte-identical copy of
    photo 2's COCO file and a photo of its own."""
    coco = coco_source(root / "coco", 4, name="captions_train2017.json", split="train")
    social = root / "social"
    save(photo(1), social / "repost.bmp", "BMP")
    save(photo(2), social / "recompressed.png", compress_level=0)
    save(photo(50), social / "own.png")
    (social / "posts.csv").write_text("image,caption\nrepost.bmp,look at this\nrecompressed.png,again\n"
                                      "own.png,my own photo\n")
    flickr = root / "flickr"
    flickr.mkdir()
    (flickr / "copy.png").write_bytes((root / "coco" / "val2017" / f"{2:012d}.png").read_bytes())
    save(photo(60), flickr / "other.png")
    (flickr / "results.csv").write_text("image_name| comment_number| comment\ncopy.png| 0| a copy\n"
                                        "other.png| 0| something else\n")
    return (coco, TableSource(name="social", path=social / "posts.csv", split="val"),
            Flickr30kSource(captions=flickr / "results.csv", images=flickr, split="test"))


@pytest.mark.parametrize("check_images", ["full", "none"])
def test_one_photo_in_two_sources_ends_in_one_split_and_is_reported(tmp_path, caplog, check_images):
    sources = shared_photo_sources(tmp_path)
    coco_dir = tmp_path / "coco" / "val2017"
    # Same pixels, other bytes: only a comparison of decoded pixels finds these.
    assert sha256(tmp_path / "social" / "repost.bmp") != sha256(coco_dir / f"{1:012d}.png")
    assert sha256(tmp_path / "social" / "recompressed.png") != sha256(coco_dir / f"{2:012d}.png")
    with caplog.at_level(logging.INFO, logger="stages.prepare"):
        stats, splits, report = prepare(tmp_path, *sources, check_images=check_images)

    assert splits == {
        "coco/0": "train", "coco/1": "val", "coco/2": "test", "coco/3": "train",  # 1 and 2 moved out of train
        "social/repost.bmp": "val", "social/recompressed.png": "test", "social/own.png": "val",
        "flickr30k/copy": "test", "flickr30k/other": "test",
    }
    assert stats["duplicates"] == report["summary"] == {
        "key": "pixels", "groups": 2, "images": 5, "moved": 3, "across_sources": 2, "undecoded": 0}
    assert "test > val > train" in report["rule"]
    groups = [(g["split"], [(m["image_id"], m["source"], m["split_before"]) for m in g["images"]])
              for g in report["groups"]]
    assert groups == [
        ("val", [("coco/1", "coco", "train"), ("social/repost.bmp", "social", "val")]),
        ("test", [("coco/2", "coco", "train"), ("flickr30k/copy", "flickr30k", "test"),
                  ("social/recompressed.png", "social", "val")]),
    ]
    assert all(g["key"].startswith("pixels:") for g in report["groups"])
    assert "2 group(s) of one image under several ids (5 images, 2 groups across sources" in caplog.text
    assert "3 image(s) moved" in caplog.text
    # The manifest still records each file's own digest, and no pixel digest.
    rows = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert {r["image_id"]: r["sha256"] for r in rows}["social/repost.bmp"] == sha256(tmp_path / "social" / "repost.bmp")
    assert not any("pixels_sha256" in r for r in rows)


def test_duplicates_bytes_groups_identical_files_only(tmp_path):
    stats, splits, report = prepare(tmp_path, *shared_photo_sources(tmp_path), duplicates="bytes",
                                    check_images="header")
    assert [[m["image_id"] for m in g["images"]] for g in report["groups"]] == [["coco/2", "flickr30k/copy"]]
    assert report["groups"][0]["key"].startswith("bytes:")
    assert (splits["coco/2"], splits["coco/1"], splits["social/recompressed.png"]) == ("test", "train", "val")
    assert stats["duplicates"]["groups"] == 1 and stats["duplicates"]["moved"] == 1


def test_seeded_sources_sharing_photos_keep_each_pair_together(tmp_path):
    """30 photos in a COCO file and again, as BMPs, in a table; both seeded: no photo in two splits."""
    coco = coco_source(tmp_path / "coco", 30, name="captions.json", split="seeded")
    rows = ["image,caption"]
    for i in range(30):
        save(photo(i), tmp_path / "social" / f"p{i}.bmp", "BMP")
        rows.append(f"p{i}.bmp,post {i}")
    (tmp_path / "social" / "posts.csv").write_text("\n".join(rows) + "\n")
    table = TableSource(name="social", path=tmp_path / "social" / "posts.csv")
    stats, splits, report = prepare(tmp_path, coco, table, val_fraction=0.2, test_fraction=0.3)
    rank = {"train": 0, "val": 1, "test": 2}
    assert report["summary"]["groups"] == 30 and report["summary"]["across_sources"] == 30
    pairs = [[m["image_id"] for m in group["images"]] for group in report["groups"]]
    assert sorted(pairs) == sorted([f"coco/{i}", f"social/p{i}.bmp"] for i in range(30))
    for group, pair in zip(report["groups"], pairs):
        before = [m["split_before"] for m in group["images"]]
        assert group["split"] == max(before, key=rank.get)
        assert {splits[image_id] for image_id in pair} == {group["split"]}
    assert all(splits[f"coco/{i}"] == splits[f"social/p{i}.bmp"] for i in range(30))
    assert report["summary"]["moved"] > 0  # the seeded splits of the two copies disagreed somewhere
    assert sum(stats["by_split"].values()) == 60


def test_undecodable_images_are_compared_by_bytes(tmp_path):
    """A truncated file passes check_images header; its copy under another id is still found (by bytes)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(photo(7, size=(64, 64))).save(buf, "JPEG", quality=95)
    cut = buf.getvalue()[: len(buf.getvalue()) // 2]
    for folder, _split in (("a", "train"), ("b", "test")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "cut.jpg").write_bytes(cut)
        (tmp_path / folder / "t.csv").write_text("image,caption\ncut.jpg,half a photo\n")
    sources = [TableSource(name=f, path=tmp_path / f / "t.csv", split=s) for f, s in (("a", "train"), ("b", "test"))]
    _, splits, report = prepare(tmp_path, *sources, check_images="header")
    assert splits == {"a/cut.jpg": "test", "b/cut.jpg": "test"}
    assert report["summary"]["undecoded"] == 2 and report["groups"][0]["key"].startswith("bytes:")


# --------------------------------------------------------------------------- the default DAG's output
def test_synthetic_splits_are_unchanged(tmp_path):
    """The synthetic source (split auto = seeded) keeps the seeded split of its ids: nothing is a duplicate,
    nothing moves, and the manifest has today's keys. The ids below are what `prepare` gave before sources
    took a `split` option (seed 0, val/test 0.1 of 40 images)."""
    src = SyntheticSource(num_images=40, noisy_images=0, image_size=32)
    _, splits, report = prepare(tmp_path / "auto", src)
    assert report["summary"]["groups"] == 0 and report["groups"] == []
    assert sorted(i for i, s in splits.items() if s == "test") == [
        "synthetic/000004", "synthetic/000011", "synthetic/000024", "synthetic/000027"]
    assert sorted(i for i, s in splits.items() if s == "val") == [
        "synthetic/000002", "synthetic/000003", "synthetic/000023", "synthetic/000034"]
    rows = [json.loads(line) for line in (tmp_path / "auto" / "out" / "manifest.jsonl").read_text().splitlines()]
    assert all(set(r) == {"image_id", "path", "captions", "split", "source", "extra", "sha256"} for r in rows)
    prepare(tmp_path / "seeded", src.model_copy(update={"split": "seeded"}))
    assert (tmp_path / "auto" / "out" / "manifest.jsonl").read_bytes() == \
        (tmp_path / "seeded" / "out" / "manifest.jsonl").read_bytes()
    assert Counter(splits.values()) == {"train": 32, "val": 4, "test": 4}
