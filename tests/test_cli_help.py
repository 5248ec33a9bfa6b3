"""`pipeline <command> --help` at 80 columns: whole option names, each option's default from its config model.

Stage commands show their model's defaults (a params.yaml section, read when the command runs, may set
others: the --params help says so); `caption`'s decoding options are DecodingOptions' fields and default to
the --mode's values; `serve`'s options and create_app's defaults both come from ServeSettings.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pipeline.cli.commands import app, serve_command
from pipeline.config import SECTIONS
from tests.conftest import REPO

runner = CliRunner()
WIDTH = 80
STAGE_COMMANDS = {"prepare": "prepare", "extract": "extract", "vocab": "vocab", "train": "train",
                  "finetune": "finetune", "scst": "scst", "evaluate": "evaluate", "report": "report",
                  "clip-train": "clip_train", "filter": "filter", "mix": "mix"}


def help_text(*command: str) -> str:
    r = runner.invoke(app, [*command, "--help"], env={"COLUMNS": str(WIDTH), "TERMINAL_WIDTH": str(WIDTH)},
                      prog_name="pipeline")
    assert r.exit_code == 0, r.output
    return r.output


def entry(text: str, flag: str) -> str:
    """The help of one option: its line and the continuation lines under it, joined by spaces."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if re.match(rf"\s+(-\w, )?{re.escape(flag)}[\s/]", ln + " "))
    out = [lines[start]]
    for ln in lines[start + 1:]:
        if not ln.strip() or re.match(r"\s{1,4}-", ln):  # the next option (help lines are indented deeper)
            break
        out.append(ln)
    return " ".join(part.strip() for part in out)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_layout(text: str) -> None:
    assert "…" not in text  # nothing cut (entry() finds each whole name followed by a space or "/")
    assert max(len(ln) for ln in text.splitlines()) <= WIDTH


def test_extract_help_shows_whole_names_and_defaults():
    text = help_text("extract")
    check_layout(text)
    for name in ("--max-pixels", "--channels-last / --no-channels-last", "--batch-size", "--num-shards"):
        assert name in text, name
    assert entry(text, "--batch-size").endswith("[default: 32]")
    assert "[default: 40000000]" in entry(text, "--max-pixels")
    assert "[default: no-channels-last]" in entry(text, "--channels-last")
    assert "[default: tf_efficientnet_lite0]" in entry(text, "--backbone")
    assert "[extract] section" in entry(text, "--params")  # not eaten as markup


@pytest.mark.parametrize("command", list(STAGE_COMMANDS))
def test_every_stage_option_is_listed_with_its_default(command):
    model = SECTIONS[STAGE_COMMANDS[command]]
    text = help_text(command)
    check_layout(text)
    for name, field in model.model_fields.items():
        e = entry(text, flag(name))
        if field.get_default(call_default_factory=True) is not None:
            assert "[default: " in e, (name, e)


def test_caption_help_lists_the_decoding_options_from_the_model():
    from pipeline.inference.decoding import CAPTION_MODES, DecodingOptions

    text = help_text("caption")
    check_layout(text)
    for name, field in DecodingOptions.model_fields.items():
        if name == "description":
            assert "--description" not in text
            continue
        e = entry(text, flag(name))
        assert e.endswith("[default: (the --mode's)]"), e
        assert (field.description or "")[:20] in e
    assert "--method [greedy|beam|sample]" in text and "--no-repeat-ngram-size <int>" in text
    mode = entry(text, "--mode")
    assert mode.endswith("[default: consistent]") and all(m in mode for m in CAPTION_MODES)
    for name, default in (("--batch-size", "8"), ("--threads", "0"), ("--device", "cpu")):
        assert f"[default: {default}" in entry(text, name)


def test_serve_defaults_are_the_settings_and_create_apps():
    from pipeline.serve.app import create_app
    from pipeline.serve.settings import SERVE_DEFAULTS, ServeSettings

    text = help_text("serve")
    check_layout(text)
    options = inspect.signature(serve_command).parameters
    app_params = inspect.signature(create_app).parameters
    for name in ServeSettings.model_fields:
        default = getattr(SERVE_DEFAULTS, name)
        assert options[name].default.default == default, name
        assert f"[default: {default}]" in entry(text, flag(name)), name
        if name in SERVE_DEFAULTS.app_limits():
            assert app_params[name].default == default, name
    assert "[env var: PIPELINE_API_KEY]" in entry(text, "--api-key")


def test_serve_refuses_bad_settings_in_one_line():
    r = runner.invoke(app, ["serve", "--model", "nowhere", "--max-batch-size", "0"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "error: --max-batch-size: Input should be greater than or equal to 1 (got 0)" in r.stderr


def test_listing_the_commands_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from pipeline.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0 and ' caption ' in r.output, r.output; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
