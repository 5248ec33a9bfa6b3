"""`pipeline caption`: files, folders and globs; modes and explicit options; --json; one bad image among good ones.

Then the library the CLI calls, tested directly: :mod:`pipeline.inference.captioning` (input expansion, batching,
per-image errors, output), :mod:`pipeline.threads` and :mod:`pipeline.models.convert`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.inference.decoding import CAPTION_MODES
from pipeline.inference.engine import CaptionEngine
from tests.conftest import write_png
from tests.helpers_bundle import MAX_LENGTH, tiny_bundle, tiny_perceiver_bundle, tiny_transformer_bundle  # noqa: F401

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # the command sets it


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption-cli")
    for i in range(3):
        write_png(root / "imgs" / f"{i}.png", seed=i)
    write_png(root / "imgs" / "sub" / "deep.png", seed=7)
    (root / "imgs" / "bad.png").write_bytes(b"this is not an image")
    (root / "imgs" / "notes.txt").write_text("not an image suffix: skipped in folders")
    return root


def caption(*args: str):
    return runner.invoke(app, ["caption", *args, "--threads", "1"])


def test_folder_with_one_bad_image_captions_the_rest_and_fails(folder, tiny_bundle):
    r = caption(str(folder / "imgs"), "--model", str(tiny_bundle))
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stdout.splitlines() if not ln.startswith("    ~ ")]
    good = [str(folder / "imgs" / f) for f in ("0.png", "1.png", "2.png", "sub/deep.png")]
    assert [ln.split(": ", 1)[0] for ln in lines] == good
    assert all(len(ln.split(": ", 1)[1].split()) == MAX_LENGTH for ln in lines)
    assert f"error: {folder / 'imgs' / 'bad.png'}: not an image" in r.stderr
    assert "Traceback" not in r.output and "notes.txt" not in r.output
    assert "random weights" not in r.output


def test_json_output_matches_the_engine(folder, tiny_bundle):
    r = caption(str(folder / "imgs" / "bad.png"), str(folder / "imgs" / "0.png"), "--model", str(tiny_bundle),
                "--json", "--batch-size", "2")
    assert r.exit_code == 1
    rows = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert rows[0] == {"path": str(folder / "imgs" / "bad.png"),
                       "error": {"code": "not_an_image", "message": "not an image (unrecognised image format)"}}
    row = rows[1]
    assert set(row) == {"path", "caption", "score", "alternatives", "mode", "timings"}
    assert row["mode"] == "consistent" and set(row["timings"]) == {"decode_ms", "model_ms", "batch_size"}
    eng = CaptionEngine.load(tiny_bundle)
    from pipeline.data.images import load_rgb

    caps = eng.run([eng.prepare(load_rgb(folder / "imgs" / "0.png"))], eng.options("consistent")).captions[0]
    want = eng.result(caps, mode="consistent")
    assert row["caption"] == want["caption"] and row["alternatives"] == want["alternatives"]


def test_json_attention_of_a_transformer(folder, tiny_transformer_bundle):
    """--attention: the caption's per-word cross-attention weights (rows sum to 1 over the 2x2 grid), the same
    caption and alternatives as without it, and what the weights are."""
    args = [str(folder / "imgs" / "0.png"), str(folder / "imgs" / "1.png"), "--model", str(tiny_transformer_bundle),
            "--json"]
    plain = [json.loads(ln) for ln in caption(*args).stdout.splitlines()]
    r = caption(*args, "--attention")
    assert r.exit_code == 0, r.output
    rows = [json.loads(ln) for ln in r.stdout.splitlines()]
    for row, before in zip(rows, plain):
        assert (row["caption"], row["alternatives"]) == (before["caption"], before["alternatives"])
        att = row["attention"]
        if not row["caption"]:
            assert att is None and row["attention_unavailable"] == "the caption is empty"
            continue
        assert att["source"] == "cross-attention of the last decoder block, mean over its heads"
        assert att["token_sets"] == [{"name": "last", "tokens": 4, "class_tokens": 0, "grid": [2, 2]}]
        assert " ".join(w["word"] for w in att["words"]) == row["caption"]
        for w in att["words"]:
            assert len(w["weights"]) == 4 and sum(w["weights"]) == pytest.approx(1.0, abs=1e-3)
    assert any(row["attention"] for row in rows)


def test_json_attention_of_the_perceiver_says_why_there_is_none(folder, tiny_perceiver_bundle):
    r = caption(str(folder / "imgs" / "0.png"), "--model", str(tiny_perceiver_bundle), "--json", "--attention")
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)
    assert row["attention"] is None
    assert row["attention_unavailable"].startswith("the Perceiver attends to latents, not to the image")


def test_attention_needs_json(folder, tiny_transformer_bundle):
    r = caption(str(folder / "imgs" / "0.png"), "--model", str(tiny_transformer_bundle), "--attention")
    assert r.exit_code == 2 and "--attention needs --json" in r.stderr


@pytest.mark.parametrize("mode", list(CAPTION_MODES))
def test_glob_and_every_mode(folder, tiny_bundle, mode):
    r = caption(str(folder / "imgs" / "[01].png"), "--model", str(tiny_bundle), "--mode", mode, "--json",
                "--seed", "3")
    assert r.exit_code == 0, r.output
    rows = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [row["path"] for row in rows] == [str(folder / "imgs" / f"{i}.png") for i in range(2)]
    assert all(row["mode"] == mode and row["timings"]["batch_size"] == 2 for row in rows)
    if mode != "consistent":  # seeded: the same again
        again = caption(str(folder / "imgs" / "[01].png"), "--model", str(tiny_bundle), "--mode", mode, "--json",
                        "--seed", "3")
        assert [json.loads(ln)["caption"] for ln in again.stdout.splitlines()] == [row["caption"] for row in rows]


def test_explicit_decoding_options(folder, tiny_bundle):
    r = caption(str(folder / "imgs" / "0.png"), "--model", str(tiny_bundle), "--method", "beam", "--beam-size", "3",
                "--n-best", "3", "--max-length", "4", "--json")
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)
    assert row["mode"] == "custom" and len(row["caption"].split()) == 4 and len(row["alternatives"]) <= 2


@pytest.mark.parametrize("args,message", [
    (["--mode", "poetic"], "unknown caption mode 'poetic'; valid modes: consistent"),
    (["--top-p", "2"], "invalid decoding options: top_p"),
    (["--method", "nucleus"], "invalid decoding options: method"),
])
def test_bad_options_are_one_clear_error(folder, tiny_bundle, args, message):
    r = caption(str(folder / "imgs" / "0.png"), "--model", str(tiny_bundle), *args)
    assert r.exit_code == 2 and message in r.stderr and "Traceback" not in r.output


def test_missing_inputs_and_bundle(folder, tiny_bundle, tmp_path):
    r = caption(str(tmp_path / "nope.jpg"), str(tmp_path / "*.png"), str(folder / "imgs" / "1.png"),
                "--model", str(tiny_bundle))
    assert r.exit_code == 1
    assert f"{tmp_path / 'nope.jpg'}: missing image file" in r.stderr
    assert "no image file matches this pattern" in r.stderr
    assert r.stdout.startswith(str(folder / "imgs" / "1.png") + ": ")
    r = caption(str(folder / "imgs" / "1.png"), "--model", str(tmp_path))
    assert r.exit_code == 2 and "not a model bundle" in r.stderr


def test_bf16_and_channels_last(folder, tiny_bundle):
    r = caption(str(folder / "imgs" / "0.png"), "--model", str(tiny_bundle), "--amp", "--channels-last", "--json")
    assert r.exit_code == 0, r.output
    row = json.loads(r.stdout)
    assert len(row["caption"].split()) == MAX_LENGTH and row["score"] is not None


# --------------------------------------------------------------------------- the library, without the CLI
from pipeline.inference.captioning import (  # noqa: E402 - the library tests below
    CaptionError,
    CaptionResult,
    caption_options,
    caption_paths,
    expand_inputs,
)


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return CaptionEngine.load(tiny_bundle)


def test_expand_inputs(folder, tmp_path):
    imgs = folder / "imgs"
    hidden = tmp_path / "h"
    write_png(hidden / ".cache" / "x.png", seed=1)
    write_png(hidden / "y.png", seed=2)
    (tmp_path / "empty").mkdir()
    got = expand_inputs([str(imgs), str(imgs / "notes.txt"), str(imgs / "[12].png"), str(hidden),
                         str(tmp_path / "empty"), str(tmp_path / "nope.jpg"), str(tmp_path / "*.gif")])
    assert got == [
        *[(str(imgs / f), None) for f in ("0.png", "1.png", "2.png", "bad.png", "sub/deep.png")],  # sorted, recursive
        (str(imgs / "notes.txt"), None),  # named explicitly: taken whatever its suffix
        (str(imgs / "1.png"), None), (str(imgs / "2.png"), None),  # a glob
        (str(hidden / "y.png"), None),  # nothing under a hidden folder
        (str(tmp_path / "empty"), "no images in this folder"),
        (str(tmp_path / "nope.jpg"), "missing image file"),
        (str(tmp_path / "*.gif"), "no image file matches this pattern"),
    ]


def test_caption_options_label_and_overrides(engine):
    options, label = caption_options(engine, "consistent")
    assert label == "consistent" and options == engine.options("consistent")
    options, label = caption_options(engine, "consistent", beam_size=2, top_k=None)  # None: not given
    assert label == "custom" and options.beam_size == 2 and options.n_best == 2  # n_best follows a smaller beam
    options, label = caption_options(engine, "safe_diverse", temperature=0.3)
    assert label == "custom" and options.method == "sample" and options.temperature == 0.3
    with pytest.raises(ValueError, match="unknown caption mode 'poetic'; valid modes: consistent"):
        caption_options(engine, "poetic")
    with pytest.raises(ValueError, match="invalid decoding options: top_p"):
        caption_options(engine, "consistent", top_p=2.0)


def test_caption_paths_order_batches_and_errors(folder, engine):
    imgs = folder / "imgs"
    options, label = caption_options(engine, "consistent")
    items = list(caption_paths(engine, [str(imgs), "missing.png"], options, batch_size=3, mode=label))
    # results once their batch ran (3 images, then the last one); an error as soon as its input fails, so
    # missing.png's comes before the result of deep.png, still waiting for its batch then
    assert [(type(i).__name__, Path(i.path).name) for i in items] == [
        ("CaptionResult", "0.png"), ("CaptionResult", "1.png"), ("CaptionResult", "2.png"),
        ("CaptionError", "bad.png"), ("CaptionError", "missing.png"), ("CaptionResult", "deep.png")]
    bad, missing = [i for i in items if isinstance(i, CaptionError)]
    assert (bad.code, bad.message) == ("not_an_image", "not an image (unrecognised image format)")
    assert (missing.code, missing.message) == ("missing", "missing image file")
    results = [i for i in items if isinstance(i, CaptionResult)]
    assert [r.batch_size for r in results] == [3, 3, 3, 1]
    assert all(r.result["mode"] == "consistent" and len(r.caption.split()) == MAX_LENGTH for r in results)
    # the same captions as the engine gives for each image alone
    from pipeline.data.images import load_rgb

    want = engine.result(engine.run([engine.prepare(load_rgb(imgs / "0.png"))], options).captions[0], mode=label)
    assert results[0].result == want


def test_caption_paths_refuses_large_images_and_reports_model_failures(folder, engine, monkeypatch):
    imgs = folder / "imgs"
    options, _ = caption_options(engine, "consistent")
    (err,) = caption_paths(engine, [str(imgs / "0.png")], options, max_pixels=100)
    assert isinstance(err, CaptionError) and err.code == "image_too_large"

    def broken(*args, **kwargs):
        raise RuntimeError("out of cheese")

    monkeypatch.setattr(engine, "run", broken)
    items = list(caption_paths(engine, [str(imgs / "0.png"), str(imgs / "1.png")], options, batch_size=1))
    assert [(i.code, i.message) for i in items] == [("model_error", "captioning failed: out of cheese")] * 2
    with pytest.raises(ValueError, match="batch_size"):
        list(caption_paths(engine, [], options, batch_size=0))


def test_result_and_error_render_as_the_cli_prints_them():
    r = CaptionResult("a.png", {"caption": "a cat", "score": -1.5, "mode": "consistent", "alternatives": [
        {"caption": "a dog", "score": -2.25}, {"caption": "a café", "score": None}]}, 1.23456, 7.0, 2)
    assert r.text_lines() == ["a.png: a cat", "    ~ a dog  (-2.250)", "    ~ a café"]
    row = json.loads(r.json_line())
    assert list(row) == ["path", "caption", "score", "mode", "alternatives", "timings"]
    assert row["timings"] == {"decode_ms": 1.235, "model_ms": 7.0, "batch_size": 2}
    assert "café" in r.json_line()  # not escaped
    e = CaptionError("b.png", "unreadable", "permission denied")
    assert e.line() == "error: b.png: permission denied"
    assert json.loads(e.json_line()) == {"path": "b.png",
                                         "error": {"code": "unreadable", "message": "permission denied"}}


def test_threads_and_model_workers(monkeypatch):
    from pipeline import threads

    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    assert threads.set_threads(0) == 4 and torch.get_num_threads() == 4
    assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1
    assert threads.model_workers(3, 4) == 3  # given
    assert threads.model_workers(0, 4) == 2 and threads.model_workers(0, 16) == 1  # cores / threads, at least 1
    assert threads.model_workers(0, 1, device="cuda") == 1


def test_convert_weights_by_order_and_refusals(tmp_path):
    import timm
    from safetensors import safe_open

    from pipeline.models.backbones import WeightsError
    from pipeline.models.convert import convert_weights

    model = timm.create_model("test_efficientnet")
    renamed = {f"layer{i}": t.clone() for i, t in enumerate(model.state_dict().values())}  # same tensors, other names
    src = tmp_path / "other-layout.pt"
    torch.save(renamed, src)
    with pytest.raises(WeightsError, match="does not fit"):  # by name: nothing fits
        convert_weights(src, tmp_path / "no.safetensors", "test_efficientnet")
    assert not (tmp_path / "no.safetensors").exists()
    dest = tmp_path / "out" / "w.safetensors"
    assert convert_weights(src, dest, "test_efficientnet", by_order=True) == len(renamed)
    with safe_open(str(dest), "pt") as f:
        assert f.metadata() == {"backbone": "test_efficientnet", "source": "other-layout.pt"}
        assert list(f.keys()) == sorted(model.state_dict())
    with pytest.raises(WeightsError, match="unknown packaged weights 'nope'; known: efficientnet_lite0"):
        convert_weights("package:nope", dest, "test_efficientnet")
    # the command: a few lines around the function, the same messages
    r = runner.invoke(app, ["convert-weights", str(src), str(tmp_path / "cli.safetensors"), "--backbone",
                            "test_efficientnet", "--by-order"])
    want = f"wrote {tmp_path / 'cli.safetensors'} ({len(renamed)} tensors for test_efficientnet)"
    assert r.exit_code == 0 and r.stdout.strip() == want
    r = runner.invoke(app, ["convert-weights", "package:nope", str(dest), "--backbone", "test_efficientnet"])
    assert r.exit_code == 2 and "error: unknown packaged weights 'nope'" in r.stderr
