"""What a result depends on is derived from the code: the import closure behind a stage, the checkpoint
fingerprint built from it, and the one line that says what changed when a checkpoint is discarded."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.provenance import (
    EXEMPT,
    Project,
    code_closure,
    code_digests,
    discard_stale_checkpoints,
    fingerprint_changes,
    run_fingerprint,
)
from tests.conftest import REPO


def _tree(root: Path, files: dict[str, str]) -> Project:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return Project(root, packages=("pipeline", "stages"), exempt=())


FAKE = {
    "pipeline/__init__.py": '"""The library."""\n',
    "stages/__init__.py": "",
    "stages/s.py": """
        from pipeline import a

        def run():
            from pipeline.lazy import helper
            return a.f() + helper()

        def unused():
            from pipeline import never
    """,
    "pipeline/a.py": "import pipeline.b\n\ndef f():\n    return pipeline.b.g()\n",
    "pipeline/b.py": "def g():\n    return 1\n",
    "pipeline/lazy.py": "def helper():\n    return 2\n",
    "pipeline/never.py": "X = 1\n",
    "pipeline/data.json": "{}",
}


def test_the_closure_follows_what_the_entry_point_runs(tmp_path):
    project = _tree(tmp_path, FAKE)
    assert set(code_closure("stages.s:run", project)) == {"stages/s.py", "pipeline/a.py", "pipeline/b.py",
                                                           "pipeline/lazy.py"}
    # another function of the same module reaches what it imports
    assert "pipeline/never.py" in code_closure("stages.s:unused", project)


def test_a_module_added_tomorrow_is_covered_without_editing_a_list(tmp_path):
    project = _tree(tmp_path, FAKE)
    before = code_digests("stages.s:run", project)
    _tree(tmp_path, {"pipeline/new.py": "def h():\n    return 3\n",
                     "pipeline/b.py": "from pipeline.new import h\n\ndef g():\n    return h()\n"})
    after = code_digests("stages.s:run", Project(tmp_path, packages=("pipeline", "stages"), exempt=()))
    assert set(after) == set(before) | {"pipeline/new.py"}
    assert after["pipeline/b.py"] != before["pipeline/b.py"] and after["pipeline/a.py"] == before["pipeline/a.py"]


TRAINING_COMMANDS = {"train": "stages.train:run", "finetune": "stages.finetune:run", "scst": "stages.scst:run",
                     "clip-train": "stages.clip_train:run"}


@pytest.mark.parametrize("command", sorted(TRAINING_COMMANDS))
def test_each_training_stage_fingerprints_every_module_its_command_runs(command):
    """The fingerprint's code is the closure of the command's stage function, found through the CLI (not a
    table): the modules the reruns issue named are among them, each with its sha256."""
    from tests.test_dvc_deps import PROJECT, stage_code_roots

    roots = stage_code_roots(command, f"pipeline {command}")
    expected = set(PROJECT.closure(roots))
    fingerprint = run_fingerprint({}, {}, TRAINING_COMMANDS[command])
    assert set(fingerprint["code"]) == expected
    for path, digest in fingerprint["code"].items():
        assert len(digest) == 64, path
    assert {"pipeline/training/optim.py", "pipeline/config.py", "pipeline/files.py", "cache/format.py"} <= expected
    if command != "clip-train":
        assert {"pipeline/data/features.py", "pipeline/text/tokenizers.py", "pipeline/inference/decoding.py",
                "pipeline/evaluation/metrics.py", "pipeline/inference/bundle.py", "pipeline/training/loop.py",
                "pipeline/models/decoders/transformer.py"} <= expected
    assert {"python", "torch", "numpy"} <= set(fingerprint["environment"])


def test_the_static_closure_holds_every_module_a_training_run_imports(tiny_pipeline, tmp_path):
    """Checked against reality: every project module `pipeline train` loads (in a fresh process) beyond what
    the CLI module itself imports is in the closure, or a package __init__ with no code."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.argv = ["pipeline", "train", "--decoder", "show_tell", "--manifest", {str(tiny_pipeline.manifest)!r},
                    "--features", {str(tiny_pipeline.features)!r}, "--tokenizer", {str(tiny_pipeline.tokenizer())!r},
                    "--out-dir", {str(tmp_path / "run")!r}, "--epochs", "1", "--batch-size", "32",
                    "--val-max-images", "4", "--amp", "none", "--device", "cpu", "--threads", "1"]
        root = {str(REPO)!r}

        def project_modules():
            return {{m.__file__[len(root) + 1:] for m in list(sys.modules.values())
                    if getattr(m, "__file__", None) and m.__file__.startswith(root + "/")
                    and m.__file__[len(root) + 1:].split("/")[0] in ("pipeline", "stages", "cache")}}

        from pipeline.cli import main
        cli = project_modules()
        try:
            main()
        except SystemExit as e:
            assert not e.code, e.code
        print(json.dumps(sorted(project_modules() - cli)))
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    loaded = set(json.loads(res.stdout.strip().splitlines()[-1]))
    closure = set(code_closure("stages.train:run"))
    project = Project()
    inert = {f for f in loaded if f.endswith("__init__.py") and project.info(REPO / f).inert()}
    missed = loaded - closure - set(EXEMPT) - inert  # exempt: the CLI wrapper's own (e.g. pipeline.tracked)
    assert not missed, f"modules `pipeline train` ran that its fingerprint does not cover: {sorted(missed)}"
    assert "pipeline/training/optim.py" in loaded and "pipeline/training/optim.py" in closure


def test_changes_are_named_by_section_and_key():
    old = {"config": {"lr": 1e-3, "epochs": 4}, "inputs": {"manifest_sha256": "a"},
           "code": {"pipeline/training/optim.py": "x", "stages/train.py": "y"}, "environment": {"torch": "2.14.1"}}
    new = json.loads(json.dumps(old))
    new["config"]["lr"] = 2e-3
    new["code"]["pipeline/training/optim.py"] = "z"
    new["code"]["pipeline/new.py"] = "w"
    assert fingerprint_changes(old, new) == ["config.lr", "code.pipeline/new.py", "code.pipeline/training/optim.py"]
    assert fingerprint_changes(old, old) == []
    assert fingerprint_changes({"code_sha256": "old format"}, new) == ["the fingerprint's format"]


def test_stale_checkpoints_are_discarded_with_one_line_naming_what_changed(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    wanted = {"config": {"lr": 1.0}, "inputs": {}, "code": {"pipeline/training/optim.py": "a"}, "environment": {}}
    discard_stale_checkpoints(folder, wanted)
    (folder / "last").mkdir()
    discard_stale_checkpoints(folder, wanted)  # same fingerprint: kept
    assert (folder / "last").is_dir()
    changed = {**wanted, "code": {"pipeline/training/optim.py": "b"}}
    with caplog.at_level(logging.WARNING, logger="pipeline.provenance"):
        discard_stale_checkpoints(folder, changed)
    assert not (folder / "last").exists()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "code.pipeline/training/optim.py" in lines[0] and "starting afresh" in lines[0]
    assert json.loads((folder / "fingerprint.json").read_text()) == changed
