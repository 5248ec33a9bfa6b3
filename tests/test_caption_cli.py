"""`pipeline caption`: files, folders and globs; modes and explicit options; --json; one bad image among good ones."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.decoding import CAPTION_MODES
from pipeline.serve.engine import CaptionEngine
from tests.conftest import write_png
from tests.helpers_bundle import MAX_LENGTH, tiny_bundle  # noqa: F401

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
