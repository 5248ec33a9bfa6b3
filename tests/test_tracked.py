"""A command run by hand never silently replaces an output DVC tracks for another command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.tracked import TrackedOutputError, check_outputs

TRAIN_SAT = ("pipeline train --decoder show_attend_tell --tokenizer models/tokenizers/word --out-dir "
             "models/show_attend_tell --manifest data/prepared/manifest.jsonl")
EVALUATE = "pipeline evaluate --model models/transformer/bundle --out-dir reports/transformer"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A DVC project whose dvc.lock records a training and an evaluation stage."""
    (tmp_path / ".dvc").mkdir()
    lock = {"schema": "2.0", "stages": {
        "train@show_attend_tell": {"cmd": TRAIN_SAT, "outs": [
            {"path": "models/show_attend_tell/bundle", "md5": "x"},
            {"path": "models/show_attend_tell/metrics.json", "md5": "y"}]},
        "evaluate@transformer": {"cmd": EVALUATE, "outs": [{"path": "reports/transformer/metrics.json", "md5": "z"}]},
    }}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock), encoding="utf-8")
    return tmp_path


def test_another_command_over_a_tracked_output_is_refused(project):
    argv = ["train", "--decoder", "show_attend_tell", "--decoder-options", '{"cell": "gru"}']
    with pytest.raises(TrackedOutputError) as e:
        check_outputs([Path("models/show_attend_tell")], argv, cwd=project, running_stage="")
    message = str(e.value)
    assert "stage 'train@show_attend_tell'" in message and "--out-dir" in message
    assert "dvc repro train@show_attend_tell" in message and "models/show_attend_tell/bundle" in message
    # a folder inside an output, or a file holding... the same: evaluate's folder holds its tracked metrics
    with pytest.raises(TrackedOutputError, match="evaluate@transformer"):
        check_outputs([Path("reports/transformer")], ["evaluate", "--decoding", "beam"], cwd=project,
                      running_stage="")


def test_the_stages_own_command_and_dvc_itself_may_write_it(project):
    own = TRAIN_SAT.split()[1:]
    check_outputs([Path("models/show_attend_tell")], own, cwd=project, running_stage="")
    # the same command from another folder means other paths: refused
    (project / "sub").mkdir()
    with pytest.raises(TrackedOutputError):
        check_outputs([Path("../models/show_attend_tell")], own, cwd=project / "sub", running_stage="")
    # `dvc repro` running the stage (DVC_STAGE names it)
    check_outputs([Path("models/show_attend_tell")], ["whatever"], cwd=project,
                  running_stage="train@show_attend_tell")


def test_elsewhere_or_outside_a_dvc_project_nothing_is_checked(project, tmp_path_factory):
    check_outputs([Path("experiments/sat-gru")], ["train"], cwd=project, running_stage="")
    check_outputs([Path("models/show_attend_tell")], ["train"], cwd=tmp_path_factory.mktemp("plain"),
                  running_stage="")


@pytest.mark.integration
def test_the_cli_refuses_with_one_error_line_before_any_work(project):
    env = {k: v for k, v in os.environ.items() if k != "DVC_STAGE"}
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "--decoder", "show_attend_tell",
                          "--decoder-options", '{"cell": "gru"}'], cwd=project, capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "train@show_attend_tell" in errors[0] and "Traceback" not in res.stderr
    assert not (project / "models").exists()
