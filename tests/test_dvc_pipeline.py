"""The DVC DAG end to end, in a temporary copy of the repository with tiny params.

The copy's own code runs (PYTHONPATH points at it), so editing a module in the copy is what a researcher
editing the code does: DVC sees the edit, and so does every fingerprint computed from the code."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, copy_repo

REAL_PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())

def _merged(base: dict, overrides: dict) -> dict:
    """params.yaml with the overrides laid over it, section by section (dvc.yaml interpolates the real keys)."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


# The real params.yaml, sized down: the default backbone with its real converted weights at 64 px, two
# decoder families, the default DAG's own tiny CLIP filtering (its threshold tuned for it), one epoch each.
TINY_PARAMS = _merged(REAL_PARAMS, {
    "prepare": {"sources": [{"kind": "synthetic", "num_images": 40, "noisy_images": 8, "image_size": 64}],
                "val_fraction": 0.2, "test_fraction": 0.2},
    "extract": {"image_size": 64, "num_shards": 2, "batch_size": 16, "workers": 0},
    "vocab": {"kinds": ["word"], "min_freq": 1},
    "train": {"epochs": 1, "batch_size": 16, "warmup_steps": 2, "amp": "none", "val_max_images": 8},
    "decoders": {"transformer": {"options": {"d_model": 32, "num_layers": 1, "num_heads": 2}},
                 "show_tell": {"options": {"embed_dim": 32, "hidden_dim": 32}, "train": {"epochs": 2}}},
    "clip_train": {"epochs": 1, "batch_size": 8, "val_max_images": 4},
    "filter": {"batch_size": 8},
})


def _env(repo: Path) -> dict[str, str]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(repo))  # the copy's code, not the installed one
    env.pop("DVC_STAGE", None)
    return env


def _dvc(cwd: Path, *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True,
                         env=_env(cwd), timeout=600)
    assert res.returncode == 0, f"dvc {' '.join(args)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("repo")
    copy_repo(dest)
    (dest / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    return dest


@pytest.mark.integration
def test_repro_builds_then_noop_then_reruns_only_what_changed(repo_copy):
    out = _dvc(repo_copy, "repro", "train@transformer")
    for stage in ("prepare", "extract", "vocab", "train@transformer"):
        assert f"Running stage '{stage}'" in out
    manifest = (repo_copy / "data/prepared/manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 40
    meta = json.loads((repo_copy / "data/features/meta.json").read_text())
    # the 40 images and the noisy variant's 8 (extracted too: the recovery experiment trains on them)
    assert meta["records"] == 48 and meta["spec"]["backbone"] == REAL_PARAMS["extract"]["backbone"]
    assert (repo_copy / "models/transformer/bundle/config.json").exists()
    assert json.loads((repo_copy / "models/transformer/metrics.json").read_text())["epochs_run"] == 1

    again = _dvc(repo_copy, "repro", "train@transformer")
    assert "Running stage" not in again

    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["extract"]["image_size"] = 96
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = _dvc(repo_copy, "repro", "train@transformer")
    assert "Running stage 'extract'" in changed and "Running stage 'train@transformer'" in changed
    assert "Running stage 'prepare'" not in changed and "Running stage 'vocab'" not in changed
    meta = json.loads((repo_copy / "data/features/meta.json").read_text())
    assert meta["spec"]["preprocessing"]["input_size"] == [3, 96, 96]


def _set_params(repo: Path, section: str, **values) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _lock_hash(repo: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


@pytest.mark.integration
def test_a_setting_that_changes_no_byte_reruns_extract_alone(repo_copy):
    _dvc(repo_copy, "repro", "train@transformer")
    before = _lock_hash(repo_copy, "extract", "data/features")
    _set_params(repo_copy, "extract", workers=1)
    status = _dvc(repo_copy, "status", "--with-deps", "train@transformer")
    assert "extract:" in status and "train@transformer:" not in status and "prepare:" not in status
    out = _dvc(repo_copy, "repro", "train@transformer")
    assert "Running stage 'extract'" in out and "Running stage 'train@transformer'" not in out
    assert _lock_hash(repo_copy, "extract", "data/features") == before
    _set_params(repo_copy, "extract", workers=0)
    _dvc(repo_copy, "repro", "train@transformer")


@pytest.mark.integration
def test_changed_images_under_old_ids_are_re_extracted(repo_copy):
    """The stale-features scenario: another seed renders other pixels under the same ids, and more images."""

    from cache import FeatureCache

    def digests() -> dict[str, str]:  # both manifests extract reads: the clean one and the noisy variant's
        return {r["image_id"]: r["sha256"] for name in ("manifest.jsonl", "noisy/manifest.jsonl")
                for r in map(json.loads, (repo_copy / "data/prepared" / name).read_text().splitlines())}

    _dvc(repo_copy, "repro", "extract")
    old = digests()
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["prepare"]["sources"][0].update(seed=1, num_images=46)
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _dvc(repo_copy, "repro", "extract")
    assert "Running stage 'prepare'" in out and "Running stage 'extract'" in out
    now = digests()
    assert len(now) == 46 + 8  # and the noisy variant's 8
    changed = sum(1 for k, v in now.items() if k in old and old[k] != v)
    new = sum(1 for k in now if k not in old)
    assert changed > 0 and new == 6
    meta = json.loads((repo_copy / "data/features/meta.json").read_text())
    assert meta["records"] == 46 + 8
    assert f"{changed} re-extracted (image changed)" in out and f"{changed + new} computed" in out
    # every cached record equals a fresh extraction of the current image, byte for byte, and so does the whole
    # folder (meta.json included): its DVC hash is a clean run's
    subprocess.run([sys.executable, "-m", "pipeline.cli", "extract", "--manifest", "data/prepared/manifest.jsonl",
                    "--extra-manifests", "data/prepared/noisy/manifest.jsonl", "--out-dir", str(repo_copy / "fresh")],
                   cwd=repo_copy, env=_env(repo_copy), check=True, capture_output=True)
    cache = FeatureCache(repo_copy / "data/features")
    assert cache.digests(list(now)) == now
    cache.close()
    assert _tree_bytes(repo_copy / "data/features") == _tree_bytes(repo_copy / "fresh")


def _tree_bytes(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _lock_outs(repo: Path, stage: str) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for o in lock["stages"][stage]["outs"]}


@pytest.mark.integration
def test_forced_reruns_leave_every_output_hash_unchanged(repo_copy):
    """`dvc repro -f` of a stage whose inputs did not change: the same bytes, so the same DVC hashes, and
    nothing downstream reruns. What a run reused or recomputed, and how long it took, is in its log only."""
    stages = ("backbone_weights", "extract", "clip_train", "filter")
    _dvc(repo_copy, "repro", *stages)
    for stage in stages:
        before = _lock_outs(repo_copy, stage)
        out = _dvc(repo_copy, "repro", "-f", "-s", stage)
        assert f"Running stage '{stage}'" in out
        assert _lock_outs(repo_copy, stage) == before, stage
    assert "Data and pipelines are up to date" in _dvc(repo_copy, "status", *stages)
    retention = json.loads((repo_copy / "data/filtered/retention.json").read_text())
    assert set(retention["embeddings"]) == {"dir", "model_key"}  # nothing about this run's reuse


@pytest.mark.integration
def test_a_code_edit_retrains_and_reverting_it_gives_the_original_bytes(repo_copy):
    """The reruns issue's scenario: a forced rerun of a finished training rewrites its outputs unchanged; an edit
    to the learning-rate schedule (pipeline/training/optim.py, not a file any list names) retrains and changes the
    weights; reverting it retrains to the first bytes. The stage's own command by hand does the same."""
    stage, bundle = "train@show_tell", repo_copy / "models/show_tell/bundle"
    _dvc(repo_copy, "repro", stage)
    original, outs = _tree_bytes(bundle), _lock_outs(repo_copy, stage)

    forced = _dvc(repo_copy, "repro", "-f", "-s", stage)
    assert "already trained: 2 epoch(s); outputs rewritten" in forced
    assert _tree_bytes(bundle) == original and _lock_outs(repo_copy, stage) == outs

    optim = repo_copy / "pipeline/training/optim.py"
    code = optim.read_text()
    edited = code.replace("return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress_))",
                          "return 0.5 * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress_)))")
    assert edited != code
    optim.write_text(edited)
    try:
        out = _dvc(repo_copy, "repro", stage)
        assert f"Running stage '{stage}'" in out and "code.pipeline/training/optim.py" in out and "starting afresh" in out
        assert _tree_bytes(bundle) != original
    finally:
        optim.write_text(code)
    out = _dvc(repo_copy, "repro", stage)
    assert f"Running stage '{stage}'" in out and "starting afresh" in out
    assert _tree_bytes(bundle) == original and _lock_outs(repo_copy, stage) == outs

    # by hand: the stage's own command (the one dvc.lock records), twice
    cmd = yaml.safe_load((repo_copy / "dvc.lock").read_text())["stages"][stage]["cmd"]
    for _ in range(2):
        res = subprocess.run([sys.executable, "-m", "pipeline.cli", *shlex.split(cmd)[1:]], cwd=repo_copy,
                             env=_env(repo_copy), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert "already trained" in res.stderr and _tree_bytes(bundle) == original
    assert "Data and pipelines are up to date" in _dvc(repo_copy, "status", stage)
