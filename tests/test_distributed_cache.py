"""Extraction and CLIP scoring spread over processes and machines, on img2dataset shards.

A cache of images that lie in input shards is sharded by input shard (:data:`cache.format.SHARD_BY_INPUT_SHARD`):
every image of an input shard goes to one cache shard, so the rank that writes a cache shard reads whole input
shards, and what it writes depends on those input shards alone. Hence the cache written by 1, 2 or 4 ranks —
the 4 as two ``torchrun`` launchers meeting through a c10d rendezvous on 127.0.0.1, the way two machines
would — is the same, byte for byte; and a rank that was interrupted finds its finished shards current.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest

from cache.format import SHARD_BY_IMAGE, SHARD_BY_INPUT_SHARD, CacheMeta, shard_of
from pipeline.data.cache_fill import cache_sharding
from pipeline.data.manifest import ManifestRecord, read_manifest
from pipeline.data.views import view_key
from tests.conftest import REPO, TINY_BACKBONE, torch_threads
from tests.helpers_bundle import free_port
from tests.helpers_img2dataset import make_shards, prepare_shards

NUM_SHARDS = 4


def test_images_of_one_input_shard_share_a_cache_shard():
    by_input = SHARD_BY_INPUT_SHARD
    assert [shard_of(f"web/{n:05d}/{n:05d}0003", 4, by_input) for n in range(6)] == [0, 1, 2, 3, 0, 1]
    # every sample and augmented view of input shard 7 goes where the shard goes
    assert {shard_of(i, 4, by_input) for i in ("web/00007/000070001", "web/00007/000079999",
                                                view_key("web/00007/000070001", 2))} == {3}
    # an input shard named otherwise is placed by a hash of its name, the same for all its samples
    named = {shard_of(f"web/part-a/{k}", 16, by_input) for k in ("x1", "x2", "x3")}
    assert len(named) == 1
    assert shard_of("web/00007/000070001", 4) == shard_of("web/00007/000070001", 4, SHARD_BY_IMAGE)


def test_a_cache_is_sharded_by_input_shard_only_when_every_image_lies_in_one():
    def record(image_id, member):
        return ManifestRecord(image_id=image_id, path="x", split="train", captions=["a"], source="web", member=member)

    in_shard = record("web/00000/000000000", {"name": "000000000.jpg", "offset": 512, "size": 10})
    assert cache_sharding([in_shard]) == SHARD_BY_INPUT_SHARD
    assert cache_sharding([in_shard, record("photos/a.jpg", None)]) == SHARD_BY_IMAGE
    assert cache_sharding([]) == SHARD_BY_IMAGE


def test_meta_round_trips_its_sharding_and_a_cache_sharded_by_image_keeps_its_identity(tmp_path):
    from cache.format import FeatureSpec, TokenSet

    spec = FeatureSpec(backbone="b", weights={"sha256": "0"}, preprocessing={}, token_sets=(TokenSet("last", 4, 8),),
                       dtype="float16")
    by_image = CacheMeta(spec=spec, num_shards=2)
    assert "sharding" not in by_image.identity()  # the identity every cache written before had
    by_input = CacheMeta(spec=spec, num_shards=2, sharding=SHARD_BY_INPUT_SHARD)
    assert by_input.identity()["sharding"] == SHARD_BY_INPUT_SHARD
    by_input.write(tmp_path)
    assert CacheMeta.read(tmp_path).shard_of("web/00003/000030000") == 1
    data = json.loads((tmp_path / "meta.json").read_text())
    (tmp_path / "meta.json").write_text(json.dumps({**data, "sharding": "by the moon"}))
    with pytest.raises(ValueError, match="meta.json: unknown sharding 'by the moon'"):
        CacheMeta.read(tmp_path)


def _shard_keys(cache: Path) -> dict[str, set[str]]:
    """The image ids each cache shard file holds."""
    out = {}
    for path in sorted(cache.glob("shard-*.lmdb")):
        env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
        with env.begin() as txn:
            out[path.name] = {bytes(k).decode() for k in txn.cursor().iternext(keys=True, values=False)}
        env.close()
    return out


def test_extract_keeps_each_input_shard_in_one_cache_shard(tmp_path):
    from pipeline.config import ExtractConfig
    from stages import extract

    make_shards(tmp_path / "shards", shards=6, per_shard=4, failures=False)
    with torch_threads(1):
        prepare_shards(tmp_path / "shards", tmp_path / "prepared", check_images="none")
        meta = extract.run(ExtractConfig(manifest=tmp_path / "prepared" / "manifest.jsonl", out_dir=tmp_path / "f",
                                         backbone=TINY_BACKBONE, image_size=64, num_shards=NUM_SHARDS, batch_size=4,
                                         workers=0, device="cpu"))
    assert meta.sharding == SHARD_BY_INPUT_SHARD and meta.records == 24
    groups = {name: {i.split("/")[1] for i in ids} for name, ids in _shard_keys(tmp_path / "f").items()}
    # input shards n and n + 4 in cache shard n: whole input shards, each in exactly one cache shard
    assert groups == {"shard-00000-of-00004.lmdb": {"00000", "00004"}, "shard-00001-of-00004.lmdb": {"00001", "00005"},
                      "shard-00002-of-00004.lmdb": {"00002"}, "shard-00003-of-00004.lmdb": {"00003"}}


# --------------------------------------------------------------------------- several processes
def _env() -> dict:
    # one thread in every process, as torchrun gives each rank: a record's bytes are then the same in all
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _launch(launcher: list[str], command: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "pipeline.cli", *command],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(*procs: subprocess.Popen, timeout: int = 300) -> str:
    logs = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        logs.append(err)
    return "\n".join(logs)


def _standalone(nproc: int) -> list[str]:
    return ["--nproc_per_node", str(nproc), "--master_port", str(free_port())]


def _two_nodes(command: list[str], nproc_per_node: int = 2) -> str:
    """``command`` on two simulated machines of ``nproc_per_node`` processes each: two launchers that find each
    other through a c10d rendezvous on 127.0.0.1, as two nodes would through the first one's address."""
    rdzv = ["--nnodes", "2", "--nproc_per_node", str(nproc_per_node), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "two-nodes"]
    return _finish(_launch(rdzv, command), _launch(rdzv, command))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def shards_manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("web")
    make_shards(root / "shards", shards=6, per_shard=5)  # 3 images a shard, 2 failed downloads among the rows
    with torch_threads(1):
        prepare_shards(root / "shards", root / "prepared", check_images="none")
    return root / "prepared" / "manifest.jsonl"


@pytest.mark.integration
def test_the_cache_written_by_one_two_or_four_ranks_on_two_machines_is_byte_identical(shards_manifest, tmp_path):
    (tmp_path / "p.yaml").write_text("{}\n")

    def extract(out: Path, *more: str) -> list[str]:
        return ["extract", "--manifest", str(shards_manifest), "--out-dir", str(out), "--backbone", TINY_BACKBONE,
                "--image-size", "64", "--num-shards", str(NUM_SHARDS), "--batch-size", "2", "--workers", "0",
                "--weights", "none", "--device", "cpu", "--params", str(tmp_path / "p.yaml"), *more]

    one = _finish(_launch(_standalone(1), extract(tmp_path / "one")))
    assert "cache sharded by input shard: cache shard(s) 0, 1, 2, 3 read 6 whole input shard(s)" in one
    # an interrupted second machine: its shard 1 finished before the cut, shard 3 not begun
    _finish(_launch(_standalone(1), extract(tmp_path / "two", "--shard-index", "1")))
    finished = (tmp_path / "two" / "shard-00001-of-00004.lmdb").stat().st_mtime_ns
    two = _finish(_launch(_standalone(2), extract(tmp_path / "two")))
    assert "cache shard(s) 0, 2 read 3 whole input shard(s) (00000.tar, 00002.tar, 00004.tar)" in two
    assert (tmp_path / "two" / "shard-00001-of-00004.lmdb").stat().st_mtime_ns == finished  # not rewritten
    _two_nodes(extract(tmp_path / "four"))

    want = _files(tmp_path / "one")
    assert {n for n in want if n.endswith(".lmdb")} == {f"shard-0000{i}-of-00004.lmdb" for i in range(4)}
    assert json.loads(want["meta.json"])["records"] == 18
    assert _files(tmp_path / "two") == want
    assert _files(tmp_path / "four") == want


@pytest.mark.integration
def test_filter_spreads_the_image_embeddings_over_ranks_and_scores_once(shards_manifest, tmp_path):
    from pipeline.models import clip as clip_lib

    model, _, _ = clip_lib.create_untrained(clip_lib.TINY_ARCH, seed=3)
    clip_lib.save_checkpoint(model.eval(), clip_lib.TINY_ARCH, tmp_path / "clip")
    (tmp_path / "p.yaml").write_text("{}\n")

    def filter_(name: str, *more: str) -> list[str]:
        return ["filter", "--manifest", str(shards_manifest), "--out-dir", str(tmp_path / name), "--clip-model",
                clip_lib.TINY_ARCH, "--clip-pretrained", str(tmp_path / "clip" / clip_lib.CHECKPOINT_FILE),
                "--embeddings-dir", str(tmp_path / f"{name}-emb"), "--batch-size", "2", "--device", "cpu",
                "--keep-fraction", "0.5", "--num-shards", str(NUM_SHARDS), "--params", str(tmp_path / "p.yaml"), *more]

    _finish(_launch(_standalone(1), filter_("one")))
    # a separate machine computes one shard's embeddings and scores nothing
    log = _finish(_launch(_standalone(1), filter_("two", "--shard-index", "2")))
    assert "embeddings of shard 2 written" in log and "shard(s) [0, 1, 3] still to compute" in log
    assert not (tmp_path / "two" / "scores.jsonl").exists()
    log = _finish(_launch(_standalone(2), filter_("two")))
    assert "kept 9 of 18 pairs" in log

    for name in ("manifest.jsonl", "scores.jsonl", "rejects.jsonl", "retention.json"):
        one, two = (tmp_path / "one" / name).read_text(), (tmp_path / "two" / name).read_text()
        assert two == one.replace(f"{tmp_path}/one", f"{tmp_path}/two"), name  # the same but for the folders named
    [one_cache] = (tmp_path / "one-emb").iterdir()
    [two_cache] = (tmp_path / "two-emb").iterdir()
    assert _files(two_cache) == _files(one_cache) and len(read_manifest(tmp_path / "two" / "manifest.jsonl")) > 0
