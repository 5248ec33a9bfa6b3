"""img2dataset's `webdataset` output as a `prepare` source: the layout these tests write is the one img2dataset
writes (checked below, field by field), images are read inside the shards (never unpacked), img2dataset's
failures and cut-short shards are rejects, and the whole path prepare -> extract -> vocab -> train ->
evaluate, and finetune -> evaluate of the fine-tuned bundle, runs on the shards."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.images import ShardMember, image_sha256, load_rgb
from pipeline.data.img2dataset import sample_key, shard_files
from pipeline.data.importers import AnnotationFileError
from pipeline.data.manifest import RejectsReport, read_manifest, resolve_image
from tests.conftest import TINY_BACKBONE, TINY_TRANSFORMER, torch_threads
from tests.helpers_img2dataset import make_shards, prepare_shards


def test_the_shards_written_have_img2datasets_file_names_members_and_fields(tmp_path):
    import pyarrow.parquet as pq

    make_shards(tmp_path, shards=1, per_shard=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json"]
    with tarfile.open(tmp_path / "00000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("000000001.json").read())
        text = tar.extractfile("000000001.txt").read().decode()
    # rows 2 and 3 failed: only the successes are in the tar, three members each
    assert names == [f"00000000{i}.{ext}" for i in (0, 1) for ext in ("jpg", "txt", "json")]
    assert set(meta) == {"url", "caption", "key", "status", "error_message", "width", "height", "original_width",
                         "original_height", "sha256"}
    assert (meta["key"], meta["status"], meta["error_message"], text) == ("000000001", "success", None, meta["caption"])
    table = pq.read_table(tmp_path / "00000.parquet").to_pydict()
    assert table["key"] == ["000000000", "000000001", "000000002", "000000003"]
    assert table["status"] == ["success", "success", "failed_to_download", "failed_to_resize"]
    assert table["error_message"][2:] == ["HTTP Error 404: Not Found", "image decoding error"]
    stats = json.loads((tmp_path / "00000_stats.json").read_text())
    assert {k: stats[k] for k in ("count", "successes", "failed_to_download", "failed_to_resize")} == {
        "count": 4, "successes": 2, "failed_to_download": 1, "failed_to_resize": 1}
    assert stats["status_dict"] == {"success": 2, "HTTP Error 404: Not Found": 1, "image decoding error": 1}
    assert sample_key(5, 1) == "000010005" and sample_key(7, 12, samples_per_shard=100) == "0001207"


def test_prepare_addresses_each_image_inside_its_shard_and_rejects_img2datasets_failures(tmp_path):
    written = make_shards(tmp_path / "shards")
    stats = prepare_shards(tmp_path / "shards", tmp_path / "prepared")
    records = read_manifest(tmp_path / "prepared" / "manifest.jsonl")
    # 8 rows a shard: 2 failed (download, resize), 1 empty caption -> 5 a shard
    assert stats["images"] == len(records) == 10
    assert not list((tmp_path / "prepared").rglob("*.jpg"))  # nothing unpacked
    for rec in records:
        source, shard, key = rec.image_id.split("/")  # the id names the input shard
        assert source == "web" and shard == key[:5]
        where = resolve_image(rec, tmp_path / "prepared" / "manifest.jsonl")
        assert isinstance(where, ShardMember) and where.path.name == f"{shard}.tar"
        assert rec.member["name"] == f"{key}.jpg"
        with open(where.path, "rb") as f:  # one seek, the exact bytes img2dataset stored
            f.seek(rec.member["offset"])
            assert f.read(rec.member["size"]) == written[key]["image"]
        assert rec.captions == [written[key]["caption"]] and rec.extra["url"] == written[key]["url"]
        assert rec.sha256 == image_sha256(where)
    assert load_rgb(resolve_image(records[0], tmp_path / "prepared" / "manifest.jsonl")).size == (64, 48)

    rejects = RejectsReport.read(tmp_path / "prepared" / "rejects.jsonl")
    by_id = {}
    for r in rejects:
        by_id.setdefault(r["id"], []).append(r)
    assert by_id["web/00000/000000002"] == [{"file": str((tmp_path / "shards/00000.parquet").resolve()),
                                       "reason": "failed_to_download: HTTP Error 404: Not Found",
                                       "id": "web/00000/000000002"}]
    assert by_id["web/00001/000010003"][0]["reason"] == "failed_to_resize: image decoding error"
    empty = [r["reason"] for r in by_id["web/00000/000000005"]]
    assert empty == ["empty caption: 000000005.txt", "no valid captions: all 1 captions rejected"]
    assert by_id["web/00000/000000005"][0]["file"] == str((tmp_path / "shards/00000.tar").resolve())
    assert stats["rejects"]["by_reason"] == {"empty caption": 2, "failed_to_download": 2, "failed_to_resize": 2,
                                             "no valid captions": 2}


def test_a_brace_pattern_names_the_same_shards_as_the_folder_and_a_missing_one_is_named(tmp_path):
    make_shards(tmp_path / "shards", shards=3, per_shard=4, failures=False)
    folder, from_folder = shard_files(tmp_path / "shards")
    _, from_pattern = shard_files(f"{tmp_path}/shards/{{00000..00002}}.tar")
    assert from_folder == from_pattern and [p.name for p in from_folder] == ["00000.tar", "00001.tar", "00002.tar"]
    assert folder == (tmp_path / "shards").resolve()
    assert [p.name for p in shard_files(f"{tmp_path}/shards/{{00000..00001}}.tar")[1]] == ["00000.tar", "00001.tar"]
    with pytest.raises(AnnotationFileError, match=r"2 of the 5 shard\(s\) the pattern names are not files "
                                                  r"\(first: .*00003\.tar\)"):
        shard_files(f"{tmp_path}/shards/{{00000..00004}}.tar")
    with pytest.raises(AnnotationFileError, match="no .tar shard in this folder"):
        shard_files(tmp_path)
    with pytest.raises(AnnotationFileError, match="img2dataset output not found"):
        shard_files(tmp_path / "nope")


def test_a_shard_cut_short_imports_what_precedes_the_cut_and_says_so(tmp_path, caplog):
    make_shards(tmp_path / "shards", shards=2, per_shard=6, failures=False)
    tar = tmp_path / "shards" / "00001.tar"
    with tarfile.open(tar) as t:
        third = t.getmember("000010002.jpg")
    data = tar.read_bytes()
    tar.write_bytes(data[: third.offset_data + third.size // 2])  # an interrupted write, inside row 2's image
    with caplog.at_level("WARNING"):
        stats = prepare_shards(tmp_path / "shards", tmp_path / "prepared")
    ids = [r.image_id for r in read_manifest(tmp_path / "prepared" / "manifest.jsonl")]
    assert ids == [f"web/00000/{sample_key(i, 0)}" for i in range(6)] + ["web/00001/000010000", "web/00001/000010001"]
    rejects = RejectsReport.read(tmp_path / "prepared" / "rejects.jsonl")
    reasons = {(r.get("id"), r["reason"].split(":")[0]) for r in rejects}
    # the image cut in two, the rows the parquet lists as downloaded but the tar no longer holds, the shard
    assert reasons == {("web/00001/000010002", "truncated image"), ("web/00001/000010003", "missing image file"),
                       ("web/00001/000010004", "missing image file"), ("web/00001/000010005", "missing image file"),
                       (None, "truncated shard")}
    assert stats["rejects"]["by_reason"] == {"missing image file": 3, "truncated image": 1, "truncated shard": 1}
    assert any("00001.tar: the shard is cut short" in m and "rerun img2dataset" in m for m in caplog.messages)

    # cut exactly between two samples: nothing is cut inside a member, but the missing end is still noticed
    with tarfile.open(tmp_path / "shards" / "00000.tar") as t:
        fourth = t.getmember("000000003.jpg")
    (tmp_path / "shards" / "00000.tar").write_bytes(
        (tmp_path / "shards" / "00000.tar").read_bytes()[: fourth.offset_data - 512])
    tar.write_bytes(b"not a tar at all" * 40)
    stats = prepare_shards(tmp_path / "shards", tmp_path / "prepared2")
    assert stats["images"] == 3
    assert stats["rejects"]["by_reason"] == {"missing image file": 3 + 6, "truncated shard": 1,
                                             "unreadable shard": 1}


def test_a_missing_img2dataset_folder_is_one_error_line(tmp_path):
    import subprocess
    import sys

    source = json.dumps([{"kind": "img2dataset", "path": str(tmp_path / "nowhere")}])
    cli = Path(sys.executable).parent / "pipeline"
    r = subprocess.run([str(cli), "prepare", "--sources", source, "--out-dir", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert f"error: {tmp_path / 'nowhere'}: img2dataset output not found" in r.stderr


def test_prepare_extract_vocab_train_evaluate_and_finetune_run_on_the_shards(tmp_path):
    from pipeline.config import EvaluateConfig, ExtractConfig, FinetuneConfig, TrainConfig, VocabConfig
    from stages import evaluate, extract, finetune, train, vocab

    make_shards(tmp_path / "shards", shards=3, per_shard=16)
    manifest = tmp_path / "prepared" / "manifest.jsonl"
    with torch_threads(1):
        prepare_shards(tmp_path / "shards", tmp_path / "prepared", check_images="header")
        ext = extract.run(ExtractConfig(manifest=manifest, out_dir=tmp_path / "features", backbone=TINY_BACKBONE,
                                        image_size=64, num_shards=2, batch_size=8, workers=0, device="cpu"))
        vocab.run(VocabConfig(manifest=manifest, out_dir=tmp_path / "tok", kinds=["word"], min_freq=1))
        train.run(TrainConfig(manifest=manifest, features=tmp_path / "features", tokenizer=tmp_path / "tok" / "word",
                              out_dir=tmp_path / "model", decoder="transformer", decoder_options=TINY_TRANSFORMER,
                              epochs=2, batch_size=8, lr=3e-3, warmup_steps=0, max_caption_length=12, device="cpu",
                              patience=0))
        report = evaluate.run(EvaluateConfig(manifest=manifest, features=tmp_path / "features", device="cpu",
                                             model=tmp_path / "model" / "bundle", out_dir=tmp_path / "report",
                                             gallery_size=3))
        finetune.run(FinetuneConfig(bundle=tmp_path / "model" / "bundle", manifest=manifest, out_dir=tmp_path / "ft",
                                    epochs=1, frozen_epochs=0, batch_size=8, max_caption_length=12, device="cpu",
                                    workers=1, lr=1e-3, backbone_lr=1e-4, warmup_steps=0))
        tuned = evaluate.run(EvaluateConfig(manifest=manifest, features=None, device="cpu",
                                            model=tmp_path / "ft" / "bundle", out_dir=tmp_path / "report_ft",
                                            gallery_size=0))
    records = read_manifest(manifest)
    assert len(records) == 3 * 13 and ext.records == len(records)
    n_test = sum(r.split == "test" for r in records)
    assert report["num_images"] == tuned["num_images"] == n_test > 0
    assert report["features"] != tuned["features"]
    assert all(0 <= m["CIDEr"] and 0 <= m["BLEU-4"] <= 1 for m in (report, tuned))
    # the gallery shows the shard's pixels: its thumbnails were decoded from inside the tars
    assert len(list((tmp_path / "report" / "gallery" / "images").iterdir())) == 3


def test_filter_scores_the_images_inside_the_shards_a_chunk_of_pairs_at_a_time(tmp_path, monkeypatch):
    import torch

    from pipeline.config import FilterConfig
    from pipeline.models import clip as clip_lib
    from stages import filter as filter_stage

    model, _, _ = clip_lib.create_untrained(clip_lib.TINY_ARCH, seed=3)
    clip_lib.save_checkpoint(model.eval(), clip_lib.TINY_ARCH, tmp_path / "clip")
    make_shards(tmp_path / "shards", shards=2, per_shard=8)
    prepare_shards(tmp_path / "shards", tmp_path / "prepared", check_images="none")
    manifest = tmp_path / "prepared" / "manifest.jsonl"
    monkeypatch.setattr(filter_stage, "SCORE_CHUNK", 3)  # pairs of one image fall in two chunks
    cfg = FilterConfig(manifest=manifest, out_dir=tmp_path / "filtered", clip_model=clip_lib.TINY_ARCH,
                       clip_pretrained=str(tmp_path / "clip" / clip_lib.CHECKPOINT_FILE), embeddings_dir=tmp_path / "emb",
                       batch_size=4, device="cpu", keep_fraction=0.5)
    with torch_threads(1):
        summary = filter_stage.run(cfg)
        clip = clip_lib.load_clip(clip_lib.TINY_ARCH, str(tmp_path / "clip" / clip_lib.CHECKPOINT_FILE), "cpu")
        records = read_manifest(manifest)
        pixels = torch.stack([clip.preprocess(load_rgb(resolve_image(r, manifest))) for r in records])
        want = (clip.encode_images(pixels) * clip.encode_texts([r.captions[0] for r in records])).sum(-1).numpy()
    scores = [json.loads(line) for line in (tmp_path / "filtered" / "scores.jsonl").read_text().splitlines()]
    assert [s["image_id"] for s in scores] == [r.image_id for r in records]
    np.testing.assert_allclose([s["score"] for s in scores], want, atol=2e-3)  # float16 embedding cache
    assert summary["pairs"]["kept"] == 5 and summary["pairs"]["total"] == 10
    kept = read_manifest(tmp_path / "filtered" / "manifest.jsonl")
    assert all(r.member is not None and load_rgb(resolve_image(r, tmp_path / "filtered" / "manifest.jsonl"))
               for r in kept)
