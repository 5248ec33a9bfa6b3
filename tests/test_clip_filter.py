"""CLIP filtering: selection maths, threshold config, checkpoints, offline failure, the embedding cache, output
formats, training, mixing."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ClipTrainConfig, FilterConfig, MixConfig, load_config
from pipeline.data.filtering import (
    TABLE_THRESHOLDS,
    best_f1_threshold,
    fraction,
    label_report,
    precision_recall,
    retention_by,
    retention_curve,
    select,
)
from pipeline.data.manifest import (
    ManifestRecord,
    read_manifest,
    resolve_image_path,
    write_manifest,
)
from pipeline.errors import ConfigError
from pipeline.models import clip as clip_lib
from pipeline.models.clip import ClipWeightsError, load_clip
from stages import filter as filter_stage

ARCH = clip_lib.TINY_ARCH


def pair_cosines(clip, images, texts) -> np.ndarray:
    """The cosine of each (image, text) pair, through the model's own preprocessing and encoders."""
    pixels = torch.stack([clip.preprocess(im) for im in images])
    return (clip.encode_images(pixels) * clip.encode_texts(texts)).sum(-1).numpy()


# --------------------------------------------------------------------------- selection semantics
def test_threshold_keeps_scores_at_or_above():
    scores = np.array([0.10, 0.27, 0.30, 0.2699, 0.9, -0.5])
    kept, t = select(scores, threshold=0.27)
    assert t == 0.27
    assert kept.tolist() == [False, True, True, False, True, False]
    assert select(scores, threshold=1.0)[0].sum() == 0
    assert select(scores, threshold=-1.0)[0].all()


def test_keep_fraction_keeps_the_top_fraction():
    scores = np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0])
    kept, t = select(scores, keep_fraction=0.3)
    assert t == pytest.approx(0.7)
    assert sorted(scores[kept].tolist()) == [0.7, 0.8, 0.9]
    assert select(scores, keep_fraction=1.0)[0].all()
    kept, _ = select(scores, keep_fraction=0.01)  # at least one pair
    assert kept.sum() == 1 and scores[kept][0] == 0.9
    kept, _ = select(scores, keep_fraction=0.25)  # ceil(2.5) = 3
    assert kept.sum() == 3
    # Ties at the cut are all kept: ceil(0.4 * 5) = 2 pairs asked for, three tied at 0.5.
    kept, t = select(np.array([0.2, 0.5, 0.5, 0.5, 0.1]), keep_fraction=0.4)
    assert t == 0.5 and kept.tolist() == [False, True, True, True, False]
    kept, t = select(np.array([]), keep_fraction=0.5)
    assert kept.size == 0 and np.isnan(t)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        select(scores, keep_fraction=0.0)
    with pytest.raises(ValueError, match="a threshold or a keep_fraction"):
        select(scores)
    with pytest.raises(ValueError, match="not both"):  # no silent winner
        select(scores, threshold=0.0, keep_fraction=0.4)


def test_precision_recall_on_known_scores():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1])
    match = np.array([True, True, False, True, True, False])
    pr = precision_recall(scores, match, 0.65)
    assert (pr["tp"], pr["fp"], pr["fn"]) == (2, 1, 2)
    assert pr["precision"] == pytest.approx(2 / 3, abs=1e-4) and pr["recall"] == 0.5
    assert pr["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5), abs=1e-4) and pr["kept"] == 3
    assert precision_recall(scores, match, 0.95)["precision"] == 1.0  # nothing kept: vacuous precision
    assert precision_recall(scores, np.zeros(6, bool), 0.65)["recall"] == 1.0  # nothing to find: vacuous recall


def test_best_f1_threshold_is_the_middle_of_the_best_plateau():
    # step 0.1: F1 0.8 at 0.1, 1.0 from 0.2 to 0.5 (both matches kept, the 0.1 pair not), 0.667 from 0.6.
    best = best_f1_threshold(np.array([0.9, 0.5, 0.1]), np.array([True, True, False]), step=0.1)
    assert best["plateau"] == [0.2, 0.5] and best["threshold"] == 0.35 and best["f1"] == 1.0
    # A single best point: all matches and one fewer miss at 0.2 (P 0.8, R 1).
    best = best_f1_threshold(np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1]),
                             np.array([True, True, False, True, True, False]), step=0.1)
    assert best["plateau"] == [0.2, 0.2] and best["threshold"] == 0.2
    assert (best["precision"], best["recall"], best["f1"]) == (0.8, 1.0, 0.8889)


def test_retention_by_group_counts_pairs_and_images():
    got = retention_by(["a", "a", "b"], np.array([True, False, True]), ["a", "b", "c"], ["a", "b"])
    assert got == {  # groups sorted; an image without a readable pair still counts as an image
        "a": {"pairs_total": 2, "pairs_kept": 1, "fraction": 0.5, "images_total": 1, "images_kept": 1},
        "b": {"pairs_total": 1, "pairs_kept": 1, "fraction": 1.0, "images_total": 1, "images_kept": 1},
        "c": {"pairs_total": 0, "pairs_kept": 0, "fraction": 0.0, "images_total": 1, "images_kept": 0},
    }
    assert list(got["a"]) == ["pairs_total", "pairs_kept", "fraction", "images_total", "images_kept"]
    assert fraction(1, 3) == 0.3333 and fraction(0, 0) == 0.0


def test_label_report_on_a_small_labelled_set():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.1])
    match = np.array([True, True, False, True, True, False])
    kinds = np.array(["matching", "hashtag", "mismatched", "matching", "hashtag", "unrelated"])
    splits = np.array(["val", "train", "val", "train", "val", "train"])
    kept, t = select(scores, threshold=0.65)
    lab = label_report(scores, kept, t, match, kinds, splits)
    assert list(lab) == ["matching_pairs", "at_threshold", "by_split", "kept_by_kind", "table", "val_best_f1",
                         "suggested_threshold"]
    assert lab["matching_pairs"] == 4 and lab["at_threshold"] == precision_recall(scores, match, 0.65)
    # val: 0.9 (match), 0.7 (no), 0.2 (match) -> kept 0.9, 0.7: tp 1, fp 1, fn 1.
    assert (lab["by_split"]["val"]["tp"], lab["by_split"]["val"]["fp"], lab["by_split"]["val"]["fn"]) == (1, 1, 1)
    assert (lab["by_split"]["train"]["tp"], lab["by_split"]["train"]["fn"]) == (1, 1)  # 0.8 kept, 0.6 not
    assert lab["kept_by_kind"] == {"hashtag": {"total": 2, "kept": 1, "fraction": 0.5},
                                   "matching": {"total": 2, "kept": 1, "fraction": 0.5},
                                   "mismatched": {"total": 1, "kept": 1, "fraction": 1.0},
                                   "unrelated": {"total": 1, "kept": 0, "fraction": 0.0}}
    assert [r["threshold"] for r in lab["table"]] == TABLE_THRESHOLDS and lab["table"][0]["kept"] == 6
    # val alone (0.9 match, 0.7 miss, 0.2 match): at 0.2 all three are kept (P 2/3, R 1, F1 0.8), the best;
    # above it the 0.2 match is lost (F1 0.5, then 0.667), and the grid starts at the lowest score.
    assert lab["val_best_f1"]["plateau"] == [0.2, 0.2] and lab["suggested_threshold"] == 0.2
    no_val = label_report(scores, kept, t, match, kinds, np.array(["train"] * 6))
    assert "suggested_threshold" not in no_val and "val_best_f1" not in no_val


def test_retention_curve_counts_images_by_their_best_caption():
    rows = retention_curve(np.array([0.5, 0.25, 0.0]), np.array(["x", "x", "y"]), np.array([True, False, False]))
    assert [r["threshold"] for r in rows] == [round(0.01 * i, 2) for i in range(51)]
    by_t = {r["threshold"]: r for r in rows}
    assert by_t[0.0] == {"threshold": 0.0, "pairs_kept": 1.0, "images_kept": 1.0, "precision": 0.3333, "recall": 1.0}
    assert by_t[0.25] == {"threshold": 0.25, "pairs_kept": 0.6667, "images_kept": 0.5, "precision": 0.5, "recall": 1.0}
    assert by_t[0.5] == {"threshold": 0.5, "pairs_kept": 0.3333, "images_kept": 0.5, "precision": 1.0, "recall": 1.0}
    assert list(retention_curve(np.array([0.5]), ["x"])[0]) == ["threshold", "pairs_kept", "images_kept"]
    assert retention_curve(np.array([]), []) == []


# --------------------------------------------------------------------------- the threshold's config
def _params(tmp_path: Path, filter_section: str) -> Path:
    path = tmp_path / f"params-{len(list(tmp_path.glob('params-*.yaml')))}.yaml"
    path.write_text("filter:\n" + "".join(f"  {line}\n" for line in filter_section.strip().splitlines()))
    return path


def test_threshold_and_keep_fraction_together_are_refused(tmp_path):
    params = _params(tmp_path, "clip_threshold: 0.565\nkeep_fraction: 0.5")
    with pytest.raises(ConfigError) as e:
        load_config("filter", params)
    msg = str(e.value)
    assert "[filter]" in msg and "clip_threshold (0.565)" in msg and "keep_fraction (0.5)" in msg
    with pytest.raises(ConfigError, match="command line: .*clip_threshold.*keep_fraction"):
        load_config("filter", _params(tmp_path, "clip_model: x"), {"clip_threshold": 0.3, "keep_fraction": 0.2})
    with pytest.raises(ValueError, match="clip_threshold .* keep_fraction"):
        FilterConfig(clip_threshold=0.3, keep_fraction=0.2)


def test_command_line_replaces_the_other_way_to_the_threshold(tmp_path):
    tuned = _params(tmp_path, "clip_model: synthetic-clip-tiny\nclip_threshold: 0.565\n"
                              "threshold_tuned_for: synthetic-clip-tiny")
    cfg = load_config("filter", tuned, {"keep_fraction": 0.2})  # the params file's threshold is not used
    assert (cfg.keep_fraction, cfg.clip_threshold, cfg.threshold, cfg.threshold_tuned_for) == (0.2, None, None, None)
    cfg = load_config("filter", _params(tmp_path, "keep_fraction: 0.5"), {"clip_threshold": 0.3})
    assert (cfg.keep_fraction, cfg.threshold) == (None, 0.3)
    cfg = load_config("filter", tuned)
    assert (cfg.threshold, cfg.threshold_model) == (0.565, "synthetic-clip-tiny") and cfg.threshold_warning() is None
    # The README's OpenAI example: its own threshold, so nothing is said about the tiny CLIP's.
    cfg = load_config("filter", tuned, {"clip_model": "ViT-B-32-quickgelu", "clip_threshold": 0.27})
    assert (cfg.threshold, cfg.threshold_tuned_for) == (0.27, None) and cfg.threshold_warning() is None
    assert FilterConfig().threshold == 0.27 and FilterConfig().threshold_warning() is None  # the default pair


def test_a_threshold_tuned_for_another_model_is_warned_about(tmp_path):
    tuned = _params(tmp_path, "clip_model: synthetic-clip-tiny\nclip_threshold: 0.565\n"
                              "threshold_tuned_for: synthetic-clip-tiny")
    msg = load_config("filter", tuned, {"clip_model": "ViT-B-32"}).threshold_warning()
    assert msg and "0.565" in msg and "'synthetic-clip-tiny'" in msg and "'ViT-B-32'" in msg and "keep_fraction" in msg
    # The default threshold is OpenAI's ViT-B/32's (quickgelu or not), not any model's.
    msg = FilterConfig(clip_model="synthetic-clip-tiny").threshold_warning()
    assert msg and "default threshold 0.27" in msg and "'ViT-B-32'" in msg
    assert FilterConfig(clip_model="ViT-B-32-quickgelu").threshold_warning() is None
    # A threshold of unknown provenance, or a keep_fraction, is not second-guessed.
    assert FilterConfig(clip_model="RN50", clip_threshold=0.2).threshold_warning() is None
    assert FilterConfig(clip_model="RN50", keep_fraction=0.2).threshold_warning() is None


# --------------------------------------------------------------------------- weights and checkpoints
@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory) -> tuple[Path, torch.nn.Module, object]:
    """An (untrained, seeded) synthetic-clip-tiny saved as a local open_clip checkpoint folder."""
    out = tmp_path_factory.mktemp("clip") / "tiny"
    model, _, eval_tf = clip_lib.create_untrained(ARCH, seed=3)
    with torch.no_grad():  # a non-default value that must survive the round trip
        model.logit_scale.fill_(2.5)
    model.eval()
    clip_lib.save_checkpoint(model, ARCH, out)
    return out, model, eval_tf


def _images(n: int, size: int = 48, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_saved_local_checkpoint_reproduces_the_same_scores(saved_tiny):
    folder, model, eval_tf = saved_tiny
    images = _images(4)
    texts = ["a red circle on the left", "love this! two blue squares #art 😍", "pizza night", "x"]
    import open_clip

    tok = open_clip.get_tokenizer(ARCH)
    with torch.inference_mode():
        want_img = model.encode_image(torch.stack([eval_tf(im) for im in images]), normalize=True)
        want_txt = model.encode_text(tok(texts), normalize=True)
    want = (want_img * want_txt).sum(-1).numpy()
    for pretrained in (folder / clip_lib.CHECKPOINT_FILE, folder):  # the file, or the local-dir folder
        clip = load_clip(ARCH, str(pretrained))
        got = pair_cosines(clip, images, texts)
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert clip.model.logit_scale.item() == pytest.approx(2.5)
        assert clip.key.startswith(f"{ARCH}-64px-")
    # The trimmed text encoder equals open_clip's own.
    clip = load_clip(ARCH, str(folder / clip_lib.CHECKPOINT_FILE))
    with torch.inference_mode():
        toks = clip.tokenizer(texts)
        torch.testing.assert_close(clip_lib.encode_text(clip.model, toks), clip.model.encode_text(toks, normalize=True))


def test_offline_named_tag_fails_fast_and_clearly(monkeypatch):
    """Fast: it fails before any network connection or DNS lookup (no retries, no timeouts to wait for) and
    before building the model (a ViT-B-32 is 150 M parameters)."""
    import socket

    import open_clip

    attempts = []

    def refuse(what):
        def call(*args, **kwargs):
            attempts.append(what)
            raise OSError(f"this test allows no {what}")
        return call

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("DNS lookup"))
    monkeypatch.setattr(open_clip, "create_model_and_transforms", refuse("model build"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClipWeightsError) as e:
        load_clip("ViT-B-32", "openai")
    assert attempts == []
    msg = str(e.value)
    assert "openai" in msg and "needs a download" in msg and "HF_HUB_OFFLINE" in msg and "--clip-pretrained PATH" in msg


def test_missing_or_unknown_weights_are_clear_errors(tmp_path):
    with pytest.raises(ClipWeightsError, match="no such file"):
        load_clip(ARCH, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ClipWeightsError, match="neither a local checkpoint file nor a named open_clip tag"):
        load_clip("ViT-B-32", "not-a-tag")
    with pytest.raises(ClipWeightsError, match="required"):
        load_clip(ARCH, None)
    with pytest.raises(ClipWeightsError, match="unknown open_clip architecture"):
        load_clip("no-such-arch", "openai")


def test_checkpoint_of_another_config_is_refused(saved_tiny, tmp_path):
    folder, _, _ = saved_tiny
    cfg = json.loads((folder / clip_lib.CONFIG_FILE).read_text())
    cfg["model_cfg"]["text_cfg"]["layers"] = 1
    other = tmp_path / "other"
    other.mkdir()
    (other / clip_lib.CONFIG_FILE).write_text(json.dumps(cfg))
    (other / clip_lib.CHECKPOINT_FILE).write_bytes((folder / clip_lib.CHECKPOINT_FILE).read_bytes())
    with pytest.raises(ClipWeightsError, match="another model config"):
        load_clip(ARCH, str(other / clip_lib.CHECKPOINT_FILE))


def test_filter_cli_offline_tag_is_a_one_line_error(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    (tmp_path / "params.yaml").write_text("filter: {}\n")
    res = CliRunner().invoke(app, ["filter", "--params", str(tmp_path / "params.yaml"), "--clip-model", "ViT-B-32",
                                   "--clip-pretrained", "openai", "--out-dir", str(tmp_path / "out")],
                             env={"HF_HUB_OFFLINE": "1"})
    assert res.exit_code == 2
    assert "needs a download" in res.output and "Traceback" not in res.output


# --------------------------------------------------------------------------- the filter stage
@pytest.fixture(scope="module")
def noisy_set(tmp_path_factory) -> tuple[Path, Path]:
    """A small synthetic noisy set as `prepare` writes it: manifest + labels."""
    from pipeline.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("noisy")
    res = generate_synthetic(root, num_images=0, noisy_images=24, image_size=64, progress=False)
    for i, rec in enumerate(res.noisy_records):
        rec.split = ["train", "val", "test"][i % 3]
    write_manifest(root / "manifest.jsonl", res.noisy_records)
    with open(root / "labels.jsonl", "w") as f:
        for row in res.noisy_labels:
            f.write(json.dumps(row) + "\n")
    return root / "manifest.jsonl", root / "labels.jsonl"


_ENCODE_IMAGES = clip_lib.ClipModel.encode_images


class _Killed(Exception):
    """Stands for the process being killed mid-run."""


class _Counting:
    """Wraps ClipModel.encode_images to count images encoded (and optionally crash after N batches)."""

    def __init__(self, monkeypatch, crash_after: int | None = None):
        self.images = 0
        self.batches = 0
        original = _ENCODE_IMAGES
        counter = self

        def encode_images(self_, pixels):
            if crash_after is not None and counter.batches >= crash_after:
                raise _Killed("killed")
            counter.images += len(pixels)
            counter.batches += 1
            return original(self_, pixels)

        monkeypatch.setattr(clip_lib.ClipModel, "encode_images", encode_images)


def _filter_cfg(tmp_path: Path, noisy_set, saved_tiny, **kw) -> FilterConfig:
    manifest, labels = noisy_set
    base = dict(manifest=manifest, labels=labels, out_dir=tmp_path / "filtered", clip_model=ARCH,
                clip_pretrained=str(saved_tiny[0] / clip_lib.CHECKPOINT_FILE), embeddings_dir=tmp_path / "emb",
                batch_size=8, device="cpu")
    base.update(kw)
    return FilterConfig(**base)


def test_filter_outputs_and_embeddings_once_per_image(tmp_path, noisy_set, saved_tiny, monkeypatch):
    manifest, _ = noisy_set
    records = read_manifest(manifest)
    n_images, n_pairs = len(records), sum(len(r.captions) for r in records)
    assert n_pairs > n_images
    counter = _Counting(monkeypatch)
    cfg = _filter_cfg(tmp_path, noisy_set, saved_tiny, keep_fraction=0.5)
    summary = filter_stage.run(cfg)
    assert counter.images == n_images  # once per image, not once per caption
    assert set(summary["embeddings"]) == {"dir", "model_key"}  # what a run reused is in its log, not its outputs

    out = cfg.out_dir
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == n_pairs
    threshold = summary["threshold"]
    assert all(s["kept"] == (s["score"] >= threshold - 1e-6) for s in scores)
    assert summary["pairs"]["kept"] == sum(s["kept"] for s in scores) >= n_pairs // 2
    kept_manifest = read_manifest(out / "manifest.jsonl")
    by_id = {r.image_id: r for r in records}
    for rec in kept_manifest:  # only kept captions, paths valid from the new folder
        want = [s["caption"] for s in scores if s["image_id"] == rec.image_id and s["kept"]]
        assert rec.captions == want and rec.split == by_id[rec.image_id].split
        assert resolve_image_path(rec, out / "manifest.jsonl").resolve() == \
            resolve_image_path(by_id[rec.image_id], manifest).resolve()
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    dropped = {r["id"] for r in rejects if r["reason"] == "no caption above threshold"}
    assert dropped == set(by_id) - {r.image_id for r in kept_manifest}
    assert sum(r["reason"] == "score below threshold" for r in rejects) == n_pairs - summary["pairs"]["kept"]
    retention = json.loads((out / "retention.json").read_text())
    assert retention["mode"] == "keep_fraction" and retention["by_source"]["synthetic-noisy"]["images_total"] == n_images
    lab = retention["labels"]
    assert {"precision", "recall", "f1"} <= set(lab["at_threshold"]) and len(lab["table"]) == 21
    assert lab["table"][0]["threshold"] == 0.0 and lab["table"][-1]["threshold"] == 1.0
    assert "suggested_threshold" in lab and set(lab["by_split"]) == {"train", "val", "test"}
    for name in ("histogram.png", "retention_curve.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    tsv = (out / "retention_curve.tsv").read_text().splitlines()
    assert tsv[0].split("\t") == ["threshold", "pairs_kept", "images_kept", "precision", "recall"]

    # A rerun with another threshold reuses every embedding and changes only the selection.
    counter.images = 0
    again = filter_stage.run(cfg.model_copy(update={"keep_fraction": None, "clip_threshold": threshold + 0.01}))
    assert counter.images == 0 and again["embeddings"] == summary["embeddings"]
    assert again["pairs"]["kept"] < summary["pairs"]["kept"]
    new_scores = [json.loads(line)["score"] for line in (out / "scores.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(new_scores, [s["score"] for s in scores], atol=1e-6)


def test_embedding_cache_resumes_after_a_kill_and_grows(tmp_path, noisy_set, saved_tiny, monkeypatch):
    manifest, labels = noisy_set
    records = read_manifest(manifest)
    part = tmp_path / "part.jsonl"  # the first 16 images, paths relative to the same folder
    write_manifest(part, [dataclasses.replace(r, path=str(resolve_image_path(r, manifest).resolve()))
                          for r in records[:16]])
    cfg = _filter_cfg(tmp_path, noisy_set, saved_tiny, manifest=part, clip_threshold=0.0)
    _Counting(monkeypatch, crash_after=1)
    with pytest.raises(_Killed):
        filter_stage.run(cfg)
    counter = _Counting(monkeypatch)
    filter_stage.run(cfg)
    assert counter.images == 16 - 8  # the committed first batch is not recomputed
    # More images later: only the new ones are embedded.
    counter = _Counting(monkeypatch)
    filter_stage.run(cfg.model_copy(update={"manifest": manifest}))
    assert counter.images == len(records) - 16


def test_filter_output_formats(tmp_path, noisy_set, saved_tiny):
    """The files' layout, key order and number formatting, as `mix`, DVC plots and readers rely on them."""
    cfg = _filter_cfg(tmp_path, noisy_set, saved_tiny, clip_threshold=0.0, threshold_tuned_for=ARCH)
    summary = filter_stage.run(cfg)
    out = cfg.out_dir
    text = (out / "retention.json").read_text(encoding="utf-8")
    retention = json.loads(text)
    assert retention == summary and text == json.dumps(summary, indent=2) + "\n"
    assert list(retention) == ["mode", "threshold", "keep_fraction", "clip_model", "clip_pretrained", "model_key",
                               "pairs", "images", "by_source", "by_split", "scores", "labels", "embeddings", "config"]
    assert (retention["mode"], retention["threshold"], retention["keep_fraction"]) == ("threshold", 0.0, None)
    assert list(retention["pairs"]) == ["total", "kept", "fraction"]
    assert list(retention["images"]) == ["total", "kept", "fraction", "unreadable"]
    assert list(retention["scores"]) == ["min", "mean", "max"]
    lab = retention["labels"]
    assert list(lab) == ["file", "matching_pairs", "at_threshold", "by_split", "kept_by_kind", "table", "val_best_f1",
                         "suggested_threshold"]
    assert list(lab["at_threshold"]) == ["threshold", "precision", "recall", "f1", "kept", "tp", "fp", "fn"]
    assert list(lab["val_best_f1"]) == [*lab["at_threshold"], "plateau"]
    assert lab["at_threshold"]["kept"] == retention["pairs"]["kept"]
    assert retention["config"]["clip_threshold"] == 0.0 and retention["config"]["threshold_tuned_for"] == ARCH

    lines = (out / "scores.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    for line in lines:
        row = json.loads(line)
        assert line == json.dumps(row, ensure_ascii=False) + "\n"
        assert list(row) == ["image_id", "caption_index", "caption", "score", "kept", "split", "source"]
        assert row["score"] == round(row["score"], 6) and row["kept"] == (row["score"] >= 0.0)
    assert len(lines) == retention["pairs"]["total"]
    for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        assert list(row) in (["id", "caption_index", "caption", "score", "reason"], ["id", "file", "reason"])
    for rec in read_manifest(out / "manifest.jsonl"):
        assert list(rec.extra["clip_filter"]) == ["caption_indices", "scores"]
        assert len(rec.extra["clip_filter"]["scores"]) == len(rec.captions)

    tsv = (out / "retention_curve.tsv").read_text(encoding="utf-8")
    assert tsv.endswith("\n") and not tsv.endswith("\n\n")
    rows = [line.split("\t") for line in tsv.splitlines()]
    assert rows[0] == ["threshold", "pairs_kept", "images_kept", "precision", "recall"]
    scores = np.array([json.loads(line)["score"] for line in lines])
    lo, hi = np.floor(scores.min() * 100) / 100, np.ceil(scores.max() * 100) / 100
    assert float(rows[1][0]) == pytest.approx(lo) and float(rows[-1][0]) == pytest.approx(hi, abs=0.011)
    assert all(len(r) == 5 and str(round(float(r[0]), 2)) == r[0] for r in rows[1:])
    from PIL import Image

    for name in ("histogram.png", "retention_curve.png"):
        with Image.open(out / name) as im:  # 7 x 4 inches at 110 dpi
            assert (im.format, im.size) == ("PNG", (770, 440))


def test_filter_warns_when_the_threshold_was_tuned_for_another_model(tmp_path, noisy_set, saved_tiny, caplog):
    cfg = _filter_cfg(tmp_path, noisy_set, saved_tiny, clip_threshold=0.27, threshold_tuned_for="ViT-B-32")
    with caplog.at_level(logging.WARNING, logger="stages.filter"):
        filter_stage.run(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "stages.filter"]
    assert len(warnings) == 1 and "tuned for CLIP model 'ViT-B-32', not 'synthetic-clip-tiny'" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stages.filter"):
        filter_stage.run(cfg.model_copy(update={"threshold_tuned_for": ARCH}))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "stages.filter"]


def test_filter_cli_refuses_threshold_and_keep_fraction_together(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    (tmp_path / "params.yaml").write_text("filter: {}\n")
    res = CliRunner().invoke(app, ["filter", "--params", str(tmp_path / "params.yaml"), "--clip-threshold", "0.3",
                                   "--keep-fraction", "0.5", "--out-dir", str(tmp_path / "out")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "clip_threshold (0.3)" in res.output and "keep_fraction (0.5)" in res.output
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- training
def test_trained_tiny_clip_separates_matching_from_other_captions(tmp_path):
    from pipeline.data.synthetic import generate_synthetic
    from stages.clip_train import run as train

    res = generate_synthetic(tmp_path / "data", num_images=400, noisy_images=60, image_size=64, progress=False)
    for i, rec in enumerate(res.records):
        rec.split = "val" if i < 40 else "train"
    write_manifest(tmp_path / "data/manifest.jsonl", res.records)
    write_manifest(tmp_path / "data/noisy.jsonl", res.noisy_records)
    out = tmp_path / "clip"
    summary = train(ClipTrainConfig(manifest=tmp_path / "data/manifest.jsonl", out_dir=out, image_size=48, epochs=20,
                                    batch_size=64, lr=0.003, warmup_steps=10, val_max_images=40, threads=1,
                                    device="cpu"))
    assert (out / clip_lib.CHECKPOINT_FILE).exists() and (out / "train.json").exists()
    assert summary["history"][-1]["loss"] < summary["history"][0]["loss"]
    # The saved checkpoint loads through the filter's loader (its 48 px input size honoured).
    clip = load_clip(ARCH, str(out / clip_lib.CHECKPOINT_FILE))
    assert clip.preprocessing["size"] == [48, 48]
    images, texts, match = [], [], []
    from pipeline.data.images import load_rgb

    for rec in res.noisy_records:
        im = load_rgb(tmp_path / "data" / rec.path)
        for cap in rec.captions:
            images.append(im)
            texts.append(cap)
    match = np.array([row["match"] for row in res.noisy_labels])
    kinds = np.array([row["kind"] for row in res.noisy_labels])
    scores = pair_cosines(clip, images, texts)
    pos, neg = scores[match], scores[~match]
    auc = (pos[:, None] > neg[None, :]).mean()  # P(a matching pair outscores a non-matching one)
    assert auc > 0.9, f"matching vs other captions AUC {auc:.3f}"
    # Both kinds of non-matching caption score lower: other scenes' descriptions, and unrelated posts.
    for kind in ("mismatched", "unrelated"):
        assert scores[kinds == kind].mean() < pos.mean() - 0.2, kind


# --------------------------------------------------------------------------- mixing
def _rows(prefix: str, n: int, splits, captions: int, source: str, folder: str = "img") -> list[ManifestRecord]:
    return [ManifestRecord(image_id=f"{prefix}{i:03d}", path=f"{folder}/{prefix.strip('/')}{i}.png",
                           captions=[f"c{k}" for k in range(captions)], split=splits[i % len(splits)], source=source)
            for i in range(n)]


def test_mix_ratio_splits_and_unique_ids(tmp_path):
    from stages.mix import run as mix

    clean = _rows("c/", 40, ["train", "train", "train", "val", "test"], 5, "clean")  # 24 train, 8 val, 8 test
    filtered = _rows("f/", 30, ["train", "val"], 2, "noisy") + _rows("c/", 2, ["train"], 2, "noisy", "other")
    write_manifest(tmp_path / "clean/manifest.jsonl", clean)
    write_manifest(tmp_path / "filtered/manifest.jsonl", filtered)
    base = dict(clean=tmp_path / "clean/manifest.jsonl", filtered=tmp_path / "filtered/manifest.jsonl",
                out_dir=tmp_path / "mixed")

    everything = mix(MixConfig(**base))
    rows = read_manifest(tmp_path / "mixed/manifest.jsonl")  # read_manifest refuses duplicate ids
    assert everything["train"]["clean"]["images"] == 24 and everything["train"]["filtered"]["images"] == 17
    assert everything["renamed_ids"] == 2 and any(r.image_id == "filtered/c/000" for r in rows)
    assert sorted(r.image_id for r in rows if r.split != "train") == sorted(r.image_id for r in clean if r.split != "train")
    assert all(r.extra["mix"] == "clean" for r in rows if r.split != "train")
    src = {r.image_id: r for r in clean}
    r0 = next(r for r in rows if r.image_id == "c/000")
    assert resolve_image_path(r0, tmp_path / "mixed/manifest.jsonl").resolve() == \
        resolve_image_path(src["c/000"], tmp_path / "clean/manifest.jsonl").resolve()

    # filtered:clean = 0.2 captions: 120 clean train captions -> 24 filtered captions (12 images of 2).
    some = mix(MixConfig(**base, ratio=0.2, unit="captions", seed=1))
    assert some["train"]["clean"]["captions"] == 120 and some["train"]["filtered"]["captions"] == 24
    assert some["ratio_achieved"] == 0.2
    # Not enough filtered data for 2:1 images: all 17 filtered, clean subsampled to 8 or 9 images.
    more = mix(MixConfig(**base, ratio=2.0, unit="images"))
    assert more["train"]["filtered"]["images"] == 17 and more["train"]["clean"]["images"] in (8, 9)
    assert more["by_split"]["val"] == 8 and more["by_split"]["test"] == 8
    control = mix(MixConfig(**base, ratio=0))
    assert control["train"]["filtered"]["images"] == 0 and control["train"]["clean"]["images"] == 24


# --------------------------------------------------------------------------- slow: DVC and the quality bar
@pytest.mark.slow
def test_dvc_clip_train_filter_mix_and_a_new_threshold_reuses_embeddings(tmp_path):
    import yaml

    from tests.conftest import copy_repo
    from tests.test_dvc_pipeline import _dvc

    copy_repo(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["prepare"]["sources"] = [{"kind": "synthetic", "num_images": 120, "noisy_images": 30, "image_size": 64}]
    params["clip_train"].update(epochs=2, image_size=32, batch_size=32, val_max_images=8)
    params["filter"].update(keep_fraction=0.5, clip_threshold=None)  # one way to the threshold, not both
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _dvc(tmp_path, "repro", "mix")
    for stage in ("prepare", "clip_train", "filter", "mix"):
        assert f"Running stage '{stage}'" in out
    retention = json.loads((tmp_path / "data/filtered/retention.json").read_text())
    assert "30 computed" in out and retention["mode"] == "keep_fraction"
    assert len(read_manifest(tmp_path / "data/mixed/manifest.jsonl")) > 120

    params["filter"].update(keep_fraction=None, clip_threshold=retention["threshold"] + 0.05)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again = _dvc(tmp_path, "repro", "mix")
    assert "Running stage 'filter'" in again and "Running stage 'mix'" in again
    assert "Running stage 'clip_train'" not in again and "Running stage 'prepare'" not in again
    retention2 = json.loads((tmp_path / "data/filtered/retention.json").read_text())
    assert retention2["embeddings"] == retention["embeddings"] and "0 computed, 0 rejected, 30 reused" in again
    assert retention2["pairs"]["kept"] < retention["pairs"]["kept"]


@pytest.mark.slow
def test_default_tiny_clip_meets_the_quality_bar(tmp_path, monkeypatch):
    """The default params end to end: precision >= 0.95 and recall >= 0.90 for matching noisy captions."""
    from pipeline.config import load_config
    from stages.clip_train import run as clip_train
    from stages.prepare import run as prepare
    from tests.conftest import REPO

    params = REPO / "params.yaml"
    monkeypatch.chdir(tmp_path)
    prepare(load_config("prepare", params))
    clip_train(load_config("clip_train", params))
    summary = filter_stage.run(load_config("filter", params))
    at = summary["labels"]["at_threshold"]
    assert at["precision"] >= 0.95 and at["recall"] >= 0.90, at
