"""A command writes its declared outputs and the paths the user named, nothing else: run inside a user's own
git repository that is no DVC project, training leaves no `.dvc/` there and stages nothing in its index."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import TINY_TRANSFORMER


def _git(repo, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=repo,
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.integration
def test_train_and_evaluate_in_a_users_git_repository_touch_only_their_outputs(tiny_pipeline, tmp_path):
    import json

    repo = tmp_path / "user-code"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "analysis.py").write_text("print('mine')\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "mine")
    work = repo / "experiments"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("DVC_STAGE", "DVC_ROOT")}
    common = ["--manifest", str(tiny_pipeline.manifest), "--features", str(tiny_pipeline.features),
              "--device", "cpu"]
    for argv in (["train", "--decoder", "transformer", "--decoder-options", json.dumps(TINY_TRANSFORMER),
                  "--tokenizer", str(tiny_pipeline.tokenizer()), "--out-dir", "run", "--epochs", "1",
                  "--val-max-images", "4", "--amp", "none", "--threads", "1", *common],
                 ["evaluate", "--model", "run/bundle", "--out-dir", "report", "--gallery-size", "2", *common]):
        res = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], cwd=work, env=env, capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    assert not (repo / ".dvc").exists() and not (repo / ".dvcignore").exists() and not (work / ".dvc").exists()
    assert _git(repo, "diff", "--cached", "--name-only") == ""  # nothing staged in the user's index
    changed = _git(repo, "status", "--porcelain", "--untracked-files=all").splitlines()
    paths = sorted(line[3:] for line in changed)
    assert paths and all(p.startswith(("experiments/run/", "experiments/report/")) for p in paths), paths
    declared = ("experiments/run/bundle/", "experiments/run/checkpoints/", "experiments/run/live/plots/metrics/",
                "experiments/run/metrics.json", "experiments/report/")
    assert all(p.startswith(declared) for p in paths), [p for p in paths if not p.startswith(declared)]
