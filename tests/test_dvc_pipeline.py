"""The DVC DAG end to end, in a temporary copy of the repository with tiny params."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_repo

TINY_PARAMS = {
    "prepare": {"sources": [{"kind": "synthetic", "num_images": 40, "noisy_images": 8, "image_size": 64}],
                "out_dir": "data/prepared",  # dvc.yaml wires every later stage to it
                "val_fraction": 0.2, "test_fraction": 0.2},
    "extract": {"backbone": "test_efficientnet", "weights": None, "image_size": 64, "num_shards": 2,
                "batch_size": 16, "workers": 0},
    "vocab": {"kinds": ["word"], "min_freq": 1},
    "train": {"epochs": 1, "batch_size": 16, "warmup_steps": 2, "amp": "none", "val_max_images": 8},
    "decoders": {"transformer": {"options": {"d_model": 32, "num_layers": 1, "num_heads": 2}}},
    # dvc.yaml names these stages' paths from params (not run here)
    "finetune": {"bundle": "models/transformer/bundle", "out_dir": "models/transformer-finetuned"},
    "scst": {"bundle": "models/transformer/bundle", "out_dir": "models/transformer-scst"},
}


def _dvc(cwd: Path, *args: str) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, env=env,
                         timeout=600)
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
    assert meta["records"] == 48 and meta["spec"]["backbone"] == "test_efficientnet"
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
    _set_params(repo_copy, "extract", batch_size=5, workers=0)
    status = _dvc(repo_copy, "status", "--with-deps", "train@transformer")
    assert "extract:" in status and "train@transformer:" not in status and "prepare:" not in status
    out = _dvc(repo_copy, "repro", "train@transformer")
    assert "Running stage 'extract'" in out and "Running stage 'train@transformer'" not in out
    assert _lock_hash(repo_copy, "extract", "data/features") == before


@pytest.mark.integration
def test_changed_images_under_old_ids_are_re_extracted(repo_copy):
    """The stale-features scenario: another seed renders other pixels under the same ids, and more images."""
    import numpy as np

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
    assert meta["last_update"]["changed"] == changed and meta["last_update"]["computed"] == changed + new
    assert f"{changed} re-extracted (image changed)" in out and f"{changed + new} computed" in out
    # every cached record equals a fresh extraction of the current image
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-m", "pipeline.cli", "extract", "--out-dir", str(repo_copy / "fresh")],
                   cwd=repo_copy, env=env, check=True, capture_output=True)
    cache, fresh = FeatureCache(repo_copy / "data/features"), FeatureCache(repo_copy / "fresh")
    assert cache.digests(list(now)) == now
    rows = [json.loads(line) for line in (repo_copy / "data/prepared/manifest.jsonl").read_text().splitlines()]
    ids = [r["image_id"] for r in rows]  # the fresh extraction reads the clean manifest only
    np.testing.assert_allclose(cache.get_batch(ids)["last"].astype(np.float32),
                               fresh.get_batch(ids)["last"].astype(np.float32), rtol=2e-3, atol=1e-5)
