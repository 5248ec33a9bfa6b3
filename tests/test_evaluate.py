"""`pipeline evaluate` and `pipeline report` on a tiny hand-made cache and tiny random bundles.

Everything is built here in seconds: small PNGs, a word tokenizer, a 1-shard cache written with
CacheWriter, and bundles saved with save_bundle from randomly initialised decoders. Java is hidden
(the pure-Python scorer fallback is used): METEOR alone takes ~20 s to start, and the Java path
is covered by tests/test_metrics.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cache import CacheMeta, CacheWriter, FeatureMismatchError, FeatureSpec, TokenSet
from pipeline.config import (
    ConfigError,
    EvaluateConfig,
    ExtractConfig,
    ReportConfig,
    load_config,
)
from pipeline.inference.bundle import save_bundle
from pipeline.inference.decoding import beam_search, greedy
from pipeline.text.tokenizers import build_tokenizer
from tests.conftest import write_png
from tests.helpers_bundle import tiny_decoder

MAX_LEN = 8
TOKENS, CHANNELS = 4, 8  # a 2x2 feature grid
BACKBONE = "tiny_net"
PREPROCESSING = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0,
                 "crop_mode": "center", "interpolation": "bicubic"}
WEIGHTS = {"source": "random-init", "seed": 0, "sha256": "0" * 64}
COLOURS = ["red", "blue", "green", "yellow", "purple"]
SHAPES = ["circle", "square", "star", "triangle"]
TEST_IDS = [f"tiny/{i:03d}" for i in range(9)]


def _captions(i: int) -> list[str]:
    c, s = COLOURS[i % 5], SHAPES[i % 4]
    return [f"a {c} {s} on a plain background", f"one {c} {s} in the middle", f"the {s} is {c}"]


def _write_cache(directory: Path, ids: list[str], *, backbone: str = BACKBONE, tokens: int = TOKENS) -> Path:
    spec = FeatureSpec(backbone=backbone, weights=WEIGHTS, preprocessing=PREPROCESSING,
                       token_sets=(TokenSet("last", tokens, CHANNELS),), dtype="float16")
    writer = CacheWriter(directory, CacheMeta(spec=spec, num_shards=1))
    shard = writer.shard(0)
    digest = "1" * 64  # manifests written by hand here record no image sha256, so any digest serves
    shard.open({i: digest for i in ids})
    rng = np.random.default_rng(0)
    shard.put_batch([(i, shard.encode(digest, [rng.normal(size=(tokens, CHANNELS)).astype(np.float32)]))
                     for i in ids])
    shard.finish()
    assert writer.finalize() is not None
    return directory


def _spec() -> FeatureSpec:
    return FeatureSpec(backbone=BACKBONE, weights=WEIGHTS, preprocessing=PREPROCESSING,
                       token_sets=(TokenSet("last", TOKENS, CHANNELS),), dtype="float16")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    rows = []
    for k, image_id in enumerate(TEST_IDS + ["tiny/train-0", "tiny/train-1"]):
        path = f"img/{k:03d}.png"
        write_png(root / "data" / path, seed=k, size=(40, 56))
        split = "test" if image_id in TEST_IDS else "train"
        rows.append({"image_id": image_id, "path": path, "captions": _captions(k), "split": split, "source": "tiny"})
    manifest = root / "data" / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    all_ids = [r["image_id"] for r in rows]
    cache = _write_cache(root / "features", all_ids)
    tok = build_tokenizer("word", [c for r in rows for c in r["captions"]], min_freq=1, max_length=MAX_LEN)

    sat = tiny_decoder("show_attend_tell", tok, feature_dim=CHANNELS, num_tokens=TOKENS, max_length=MAX_LEN)
    transformer = tiny_decoder("transformer", tok, feature_dim=CHANNELS, num_tokens=TOKENS, max_length=MAX_LEN)
    models = root / "models"
    save_bundle(models / "sat" / "bundle", decoder=sat, tokenizer=tok, features=_spec())
    save_bundle(models / "sat_blind" / "bundle", decoder=sat, tokenizer=tok, features=_spec(), blind=True)
    save_bundle(models / "tf" / "bundle", decoder=transformer, tokenizer=tok, features=_spec())
    perceiver = tiny_decoder("perceiver_gpt2", tok, feature_dim=CHANNELS, num_tokens=TOKENS, max_length=MAX_LEN)
    save_bundle(models / "perceiver" / "bundle", decoder=perceiver, tokenizer=tok, features=_spec())
    return {"root": root, "manifest": manifest, "cache": cache, "tok": tok, "sat": sat, "transformer": transformer,
            "models": models}


@pytest.fixture(scope="module")
def runs(world):
    """Every evaluation the tests look at, run once, with Java hidden (scorer fallback)."""
    from stages.evaluate import run

    root = world["root"]
    common = {"manifest": world["manifest"], "features": world["cache"], "device": "cpu", "batch_size": 4}
    real_which = shutil.which
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd == "java" else real_which(cmd, *a, **k))
        out = {
            "sat": run(EvaluateConfig(**common, model=world["models"] / "sat" / "bundle",
                                      out_dir=root / "reports" / "sat", gallery_size=6)),
            "tf": run(EvaluateConfig(**common, model=world["models"] / "tf" / "bundle", out_dir=root / "reports" / "tf",
                                     gallery_size=3, decoding="beam", beam_size=3)),
            "blind": run(EvaluateConfig(**common, model=world["models"] / "sat_blind" / "bundle",
                                        out_dir=root / "reports" / "sat_blind", gallery_size=3)),
            "perceiver": run(EvaluateConfig(**common, model=world["models"] / "perceiver" / "bundle",
                                            out_dir=root / "no_heatmaps" / "perceiver", gallery_size=2)),  # not a report's row
        }
    return out


def _read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _cache_features(world, ids: list[str]) -> torch.Tensor:
    from cache import FeatureCache

    return torch.from_numpy(FeatureCache(world["cache"]).get_batch(ids)["last"]).float()


# --------------------------------------------------------------------------- evaluate
def test_metrics_json(world, runs):
    m = _read(world["root"] / "reports" / "sat" / "metrics.json")
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE_L", "CIDEr"):
        assert isinstance(m[k], float) and 0 <= m[k], k
    assert m["SPICE"] is None and "not requested" in m["unavailable"]["SPICE"]  # null with a reason, never 0
    assert m["METEOR"] is None and "java" in m["unavailable"]["METEOR"]
    assert m["tokenizer"] == "fallback"
    assert m["num_images"] == m["scored_images"] == len(TEST_IDS)
    assert m["decoding"] == {"name": "greedy", "method": "greedy", "max_length": MAX_LEN}
    assert m["model"] == "sat" and m["decoder"] == "show_attend_tell" and m["blind"] is False
    assert m["parameters"] == sum(p.numel() for p in world["sat"].parameters())
    assert m["captions"]["mean_words"] == MAX_LEN
    assert runs["sat"]["CIDEr"] == m["CIDEr"]


def test_results_are_the_models_greedy_captions_unchanged(world, runs):
    results = _read(world["root"] / "reports" / "sat" / "results.json")
    assert [r["image_id"] for r in results] == sorted(TEST_IDS)  # every test image once, sorted, no train image
    assert all(set(r) == {"image_id", "caption"} for r in results)
    hyps = greedy(world["sat"], _cache_features(world, sorted(TEST_IDS)), max_length=MAX_LEN)
    assert [r["caption"] for r in results] == [world["tok"].decode(h.tokens) for h in hyps]
    per_image = _read(world["root"] / "reports" / "sat" / "per_image.json")
    assert [p["image_id"] for p in per_image] == sorted(TEST_IDS)
    assert all(isinstance(p["CIDEr"], float) and p["references"] for p in per_image)
    assert np.mean([p["CIDEr"] for p in per_image]) == pytest.approx(_read(
        world["root"] / "reports" / "sat" / "metrics.json")["CIDEr"])


def test_headline_beam_search_is_recorded_and_used(world, runs):
    m = _read(world["root"] / "reports" / "tf" / "metrics.json")
    assert m["decoding"] == {"name": "beam", "method": "beam", "max_length": MAX_LEN, "beam_size": 3,
                             "length_penalty": 0.0}
    results = _read(world["root"] / "reports" / "tf" / "results.json")
    hyps = beam_search(world["transformer"], _cache_features(world, sorted(TEST_IDS)), beam_size=3,
                       max_length=MAX_LEN)
    assert [r["caption"] for r in results] == [world["tok"].decode(h[0].tokens) for h in hyps]
    page = (world["root"] / "reports" / "tf" / "gallery" / "index.html").read_text(encoding="utf-8")
    assert "headline: beam 3" in page and "beam 5" in page and "greedy" in page


def _references(page: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"#][^"]*)"', page)


def test_gallery_is_self_contained_with_heatmaps(world, runs):
    gallery = world["root"] / "reports" / "sat" / "gallery"
    page = (gallery / "index.html").read_text(encoding="utf-8")
    assert len(page) > 1000 and "<script" not in page and "http://" not in page and "https://" not in page
    refs = _references(page)
    assert refs
    for ref in refs:
        assert not ref.startswith("/") and (gallery / ref).is_file(), ref
    images = [r for r in refs if r.startswith("images/")]
    assert len(set(images)) == 6  # gallery_size images, each shown once (linked twice)
    assert page.count('<article class="card"') == 6
    for section in ("Best cases", "Worst cases", "Random cases"):
        assert section in page
    assert "greedy ★" in page and "beam 5" in page and "sampled: balanced_diverse" in page
    heatmaps = sorted((gallery / "heatmaps").glob("*.png"))
    assert len(heatmaps) == 6
    assert {f"heatmaps/{p.name}" for p in heatmaps} == {r for r in refs if r.startswith("heatmaps/")}
    for p in heatmaps:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
    # the worst-case section really holds the lowest per-image CIDEr
    per_image = {p["image_id"]: p["CIDEr"] for p in _read(gallery.parent / "per_image.json")}
    worst = min(per_image, key=lambda i: (per_image[i], i))
    assert page.index(worst) > page.index("Worst cases")


def test_heatmaps_for_a_transformer(world, runs):
    """The transformer's cross-attention gives heatmaps (one sheet per non-empty headline caption), named on the
    page; the headline captions are the beam search's without attention (test_headline_beam_search_...)."""
    gallery = world["root"] / "reports" / "tf" / "gallery"
    page = (gallery / "index.html").read_text(encoding="utf-8")
    assert page.count('<article class="card"') == 3
    results = {r["image_id"]: r["caption"] for r in _read(gallery.parent / "results.json")}
    shown = re.findall(r'<div class="id">([^<]+)</div>', page)
    with_words = [i for i in shown if results[i]]
    assert with_words  # the tiny random transformer says something for some of them
    heatmaps = sorted(gallery.glob("heatmaps/*.png"))
    assert len(heatmaps) == len(with_words) == page.count('class="heat"')
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in heatmaps)
    assert "cross-attention of the last decoder block, mean over its heads" in page and "2x2 grid" in page


def test_no_heatmaps_for_the_perceiver_and_the_page_says_why(world, runs):
    gallery = world["root"] / "no_heatmaps" / "perceiver" / "gallery"
    page = (gallery / "index.html").read_text(encoding="utf-8")
    assert page.count('<article class="card"') == 2
    assert not list(gallery.glob("heatmaps/*.png")) and "heatmaps/" not in page
    assert "No attention heatmaps for the perceiver_gpt2 decoder: the Perceiver attends to latents" in page


def test_blind_bundle_is_evaluated_on_zeroed_features(world, runs):
    m = _read(world["root"] / "reports" / "sat_blind" / "metrics.json")
    assert m["blind"] is True and m["features"]["zeroed"] is True
    captions = {r["caption"] for r in _read(world["root"] / "reports" / "sat_blind" / "results.json")}
    assert len(captions) == 1  # no image information left: one caption for every image
    page = (world["root"] / "reports" / "sat_blind" / "gallery" / "index.html").read_text(encoding="utf-8")
    assert "image-blind control" in page
    assert not list((world["root"] / "reports" / "sat_blind" / "gallery").glob("heatmaps/*.png"))


def test_features_that_do_not_fit_the_bundle_fail_clearly(world, tmp_path):
    from stages.evaluate import run

    other = _write_cache(tmp_path / "other", TEST_IDS, backbone="resnet50")
    cfg = EvaluateConfig(manifest=world["manifest"], features=other, model=world["models"] / "sat" / "bundle",
                         out_dir=tmp_path / "out", device="cpu")
    with pytest.raises(FeatureMismatchError, match="backbone: 'resnet50' vs 'tiny_net'"):
        run(cfg)
    bigger = _write_cache(tmp_path / "bigger", TEST_IDS, tokens=9)
    with pytest.raises(FeatureMismatchError, match="token set 'last': 9x8 from stage None vs 4x8 from stage None"):
        run(cfg.model_copy(update={"features": bigger}))
    assert not (tmp_path / "out").exists()


def test_cli_reports_a_mismatch_without_traceback(world, tmp_path, monkeypatch):
    from pipeline.cli import app

    monkeypatch.chdir(tmp_path)  # no params.yaml here
    other = _write_cache(tmp_path / "other", TEST_IDS, backbone="resnet50")
    result = CliRunner().invoke(app, ["evaluate", "--manifest", str(world["manifest"]), "--features", str(other),
                                      "--model", str(world["models"] / "sat" / "bundle"), "--device", "cpu"],
                                catch_exceptions=False)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error:" in result.output and "resnet50" in result.output


def test_config_validation():
    with pytest.raises(ConfigError, match="decoding 'fast'"):
        load_config("evaluate", None, {"decoding": "fast"})
    with pytest.raises(ConfigError, match="gallery_sample_mode 'consistent'"):
        load_config("evaluate", None, {"gallery_sample_mode": "consistent"})
    assert load_config("evaluate", None, {"decoding": "consistent"}).decoding == "consistent"


def test_outputs_equal_to_a_reference_score_bleu4_one(world, runs, tmp_path, monkeypatch):
    """Through the stage: references rewritten to hold the model's own captions -> BLEU-4 = 1."""
    from stages.evaluate import run

    results = {r["image_id"]: r["caption"] for r in _read(world["root"] / "reports" / "sat" / "results.json")}
    rows = []
    for line in world["manifest"].read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        row["path"] = str(world["manifest"].parent / row["path"])
        if row["image_id"] in results:
            row["captions"] = [results[row["image_id"]], "zebra xylophone quantum"]
        rows.append(row)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd == "java" else real_which(cmd, *a, **k))
    m = run(EvaluateConfig(manifest=manifest, features=world["cache"], model=world["models"] / "sat" / "bundle",
                           out_dir=tmp_path / "out", gallery_size=0, device="cpu"))
    assert m["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and m["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert m["ROUGE_L"] == pytest.approx(1.0)
    assert not (tmp_path / "out" / "gallery").exists()


def test_images_through_the_bundles_backbone_give_the_cached_captions(world, tmp_path, monkeypatch):
    """`--features none` encodes the images with the bundle's backbone (what a fine-tuned bundle needs):
    same captions as from a cache extracted with that backbone; a fine-tuned bundle refuses the cache."""
    from cache import FeatureCache
    from pipeline.models.backbones import create_backbone
    from stages import extract
    from stages.evaluate import run

    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda cmd, *a, **k: None if cmd == "java" else real_which(cmd, *a, **k))
    extract.run(ExtractConfig(manifest=world["manifest"], out_dir=tmp_path / "feat", backbone="test_efficientnet",
                              image_size=64, num_shards=1, batch_size=16, workers=0, weights=None, device="cpu"))
    spec = FeatureCache(tmp_path / "feat").spec
    tok = world["tok"]
    decoder = tiny_decoder("show_attend_tell", tok, feature_dim=spec.feature_dim, num_tokens=spec.num_tokens,
                           max_length=MAX_LEN, seed=1)
    state = create_backbone("test_efficientnet", image_size=64, crop_pct=1.0).model.state_dict()
    save_bundle(tmp_path / "m" / "bundle", decoder=decoder, tokenizer=tok, features=spec,
                backbone_file=FeatureCache(tmp_path / "feat").weights_file())
    common = {"manifest": world["manifest"], "model": tmp_path / "m" / "bundle", "device": "cpu", "batch_size": 4}
    from_cache = run(EvaluateConfig(**common, features=tmp_path / "feat", out_dir=tmp_path / "a", gallery_size=0))
    from_images = run(EvaluateConfig(**common, features=None, out_dir=tmp_path / "b", gallery_size=2))
    assert from_cache["features"]["source"] == "cache" and from_images["features"]["source"] == "images"
    assert _read(tmp_path / "a" / "results.json") == _read(tmp_path / "b" / "results.json")
    assert len(list((tmp_path / "b" / "gallery" / "heatmaps").glob("*.png"))) == 2  # a 2x2 grid at 64 px

    finetuned = dataclasses.replace(spec, source="finetuned", weights={"source": "finetuned"})
    save_bundle(tmp_path / "ft" / "bundle", decoder=decoder, tokenizer=tok, features=finetuned, backbone_state=state)
    with pytest.raises(FeatureMismatchError, match="source: 'cache' vs 'finetuned'.*fine-tuned.*--features none"):
        run(EvaluateConfig(**{**common, "model": tmp_path / "ft" / "bundle"}, features=tmp_path / "feat",
                           out_dir=tmp_path / "c"))


# --------------------------------------------------------------------------- report
def test_report_table_blind_row_and_curves(world, runs, monkeypatch):
    from pipeline.training.runs import write_curves
    from stages.report import BLIND_MARK, ReportError, read_live_metrics, run

    root = world["root"]
    monkeypatch.chdir(root)
    # What `train` leaves next to a bundle: a summary and the curves (dvclive's layout).
    (root / "models" / "sat" / "metrics.json").write_text(json.dumps(
        {"decoder": "show_attend_tell", "parameters": 1234567, "blind": False}))
    for name, blind in (("sat", False), ("sat_blind", True)):
        write_curves(root / "models" / name / "live", [
            {"epoch": epoch + 1, "train_loss": 3.0 - epoch, "val_loss": 3.2 - epoch * 0.8,
             "val_cider": 0.1 * epoch * (0.3 if blind else 1.0), "lr": 1e-3 / (epoch + 1)} for epoch in range(3)])
    series = read_live_metrics(root / "models" / "sat" / "live")
    assert series["val/cider"] == ([0, 1, 2], [0.0, 0.1, 0.2]) and {"train/loss", "val/loss", "lr"} <= set(series)

    cfg = ReportConfig(reports=["reports/*/metrics.json"], live=["models/*/live"], out=Path("reports/summary.md"))
    out = run(cfg)
    assert sorted(out["models"]) == ["sat", "sat_blind", "tf"]
    summary = (root / "reports" / "summary.md").read_text(encoding="utf-8")
    # greedy and beam results are never one table: one per decoding, each under a heading saying what it scored
    headings = [line for line in summary.splitlines() if line.startswith("### `")]  # not the curves' "### sat"
    assert len(headings) == 2 and "greedy decoding" in headings[0] and "beam 3" in headings[1], headings
    greedy_part, beam_part = summary.split(headings[1])
    table = [line for line in greedy_part.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 2  # header + sat and its blind control
    assert "BLEU-4" in table[0] and "ROUGE-L" in table[0] and "CIDEr" in table[0] and "#params" in table[0]
    blind_rows = [line for line in table if BLIND_MARK in line]
    assert len(blind_rows) == 1 and "sat_blind" in blind_rows[0] and table[-1] == blind_rows[0]
    assert [line for line in beam_part.splitlines() if line.startswith("| [tf](")]
    sat_row = next(line for line in table if line.startswith("| [sat]("))
    assert "train samples/s" not in summary  # timings are not content: the summary is the same on every run
    assert "](sat/gallery/index.html)" in sat_row
    for png in ("curves/sat.png", "curves/sat_blind.png", "curves/compare.png"):
        assert f"]({png})" in summary
        data = (root / "reports" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not (root / "reports" / "curves" / "tf.png").exists()  # no live folder for it
    with pytest.raises(ReportError, match=r"comparison 'cells'.*not comparable.*greedy.*beam 3"):
        run(cfg.model_copy(update={"comparisons": {"cells": {"a": "sat", "b": "tf"}}}))


def test_the_gallery_refuses_an_image_that_changed_after_prepare(tmp_path):
    """evaluate depends on the images through the manifest's sha256 of each (its DVC deps list the manifest):
    a gallery thumbnail is the recorded image or an error, never other pixels."""
    from pipeline.data.manifest import ManifestRecord
    from pipeline.evaluation.gallery import ChangedImageError, _recorded_image
    from tests.conftest import write_png

    write_png(tmp_path / "a.png", seed=1)
    digest = hashlib.sha256((tmp_path / "a.png").read_bytes()).hexdigest()
    record = ManifestRecord(image_id="a", path="a.png", captions=["x"], split="test", source="t", sha256=digest)
    assert _recorded_image(record, tmp_path / "manifest.jsonl").size == (56, 40)
    write_png(tmp_path / "a.png", seed=2)
    with pytest.raises(ChangedImageError, match=r"a.png: the image changed after `pipeline prepare`"):
        _recorded_image(record, tmp_path / "manifest.jsonl")
