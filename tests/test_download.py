"""`pipeline download` against a loopback HTTP server serving small archives in the upstream layouts.

No test reaches a real host: every URL goes through ``mirror`` to a server bound to 127.0.0.1 on a free
port, which supports Range / If-Range (or, when told, ignores them), can cut a transfer short, and
records each request's headers. Catalogue entries are the real ones with their sizes and digests
replaced by the fixtures' (so the real layouts and `prepare` sources are what is tested).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shlex
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import PrepareConfig
from pipeline.data import download as dl

runner = CliRunner()


# --------------------------------------------------------------------------- the loopback server
class _State:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.cut: dict[str, int] = {}  # file name -> bytes sent before the connection is dropped (once)
        self.ranges = True  # honour Range / If-Range

    def seen(self, name: str) -> list[dict[str, str]]:
        return [headers for path, headers in self.requests if path == name]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        state: _State = self.server.state
        name = self.path.lstrip("/")
        state.requests.append((name, dict(self.headers)))
        if name not in state.files:
            self.send_error(404)
            return
        body = state.files[name]
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        start = 0
        wanted = self.headers.get("Range")
        if wanted and state.ranges and self.headers.get("If-Range") in (None, etag):
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes" if state.ranges else "none")
        self.end_headers()
        cut = state.cut.pop(name, None)
        if cut is not None:
            self.wfile.write(body[start:start + cut])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.state = _State()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.state.url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    yield httpd.state
    httpd.shutdown()
    httpd.server_close()


# --------------------------------------------------------------------------- fixture archives
def jpeg(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def make_zip(members: dict[str, bytes | str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


COCO_IDS = {"train": [9, 25, 30], "val": [139, 285]}


def coco2017_archives() -> dict[str, bytes]:
    """annotations_trainval2017.zip (annotations/captions_*.json and an instances file), {train,val}2017.zip."""
    annotations = {}
    for split, ids in COCO_IDS.items():
        annotations[f"annotations/captions_{split}2017.json"] = json.dumps({
            "info": {}, "licenses": [],
            "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 32, "height": 24} for i in ids],
            "annotations": [{"id": 1000 * i + k, "image_id": i, "caption": f"photo {i} caption {k}"}
                            for i in ids for k in range(2)],
        })
    annotations["annotations/instances_val2017.json"] = "{}"
    out = {"annotations_trainval2017.zip": make_zip(annotations)}
    for split, ids in COCO_IDS.items():
        out[f"{split}2017.zip"] = make_zip({f"{split}2017/{i:012d}.jpg": jpeg(i) for i in ids})
    return out


FLICKR_SPLITS = {"train": ["101_a.jpg", "102_b.jpg", "103_c.jpg", "104_d.jpg"], "dev": ["105_e.jpg"],
                 "test": ["106_f.jpg"]}
FLICKR_NAMES = [n for names in FLICKR_SPLITS.values() for n in names]


def flickr8k_archives() -> dict[str, bytes]:
    """jbrownlee's Flickr8k_Dataset.zip (Flicker8k_Dataset/ + __MACOSX/) and Flickr8k_text.zip (flat)."""
    images = {f"Flicker8k_Dataset/{n}": jpeg(i) for i, n in enumerate(FLICKR_NAMES)}
    images.update({f"__MACOSX/Flicker8k_Dataset/._{n}": b"\0\5\26\7" for n in FLICKR_NAMES[:2]})
    tokens = "".join(f"{n}#{k}\ta dog number {i} runs , take {k} .\n" for i, n in enumerate(FLICKR_NAMES)
                     for k in range(3))
    text = {"Flickr8k.token.txt": tokens, "Flickr8k.lemma.token.txt": tokens, "readme.txt": "Flickr8k\n",
            "__MACOSX/._Flickr8k.token.txt": b"\0\5\26\7"}
    for split, names in FLICKR_SPLITS.items():
        text[f"Flickr_8k.{split}Images.txt"] = "".join(n + "\n" for n in names)
    return {"Flickr8k_Dataset.zip": make_zip(images), "Flickr8k_text.zip": make_zip(text)}


def karpathy_archive() -> dict[str, bytes]:
    """caption_datasets.zip: dataset_{coco,flickr8k,flickr30k}.json at its top."""
    split_of = {"train": "train", "dev": "val", "test": "test"}
    flickr = {"dataset": "flickr8k", "images": [
        {"filename": n, "imgid": i, "split": split_of[s], "sentids": [2 * i, 2 * i + 1],
         "sentences": [{"raw": f"A dog, number {i}, take {k}.", "tokens": ["a", "dog"], "imgid": i,
                        "sentid": 2 * i + k} for k in range(2)]}
        for i, (s, n) in enumerate((s, n) for s, names in FLICKR_SPLITS.items() for n in names)]}
    coco = {"dataset": "coco", "images": []}
    return {"caption_datasets.zip": make_zip({"dataset_flickr8k.json": json.dumps(flickr),
                                              "dataset_coco.json": json.dumps(coco),
                                              "dataset_flickr30k.json": json.dumps({"images": []})})}


def pinned(dataset: dl.Dataset, archives: dict[str, bytes], **changes) -> dl.Dataset:
    """The real entry, with each file's size and sha256 those of the fixture (``changes`` per file name)."""
    files = tuple(dataclasses.replace(f, **{"size": len(archives[f.name]),
                                            "sha256": hashlib.sha256(archives[f.name]).hexdigest(),
                                            **changes.get(f.name, {})})
                  for f in dataset.files)
    return dataclasses.replace(dataset, files=files)


def fetch_kwargs(server) -> dict:
    return {"mirror": server.url, "retry_wait": 0, "show_progress": False}


def prepare(sources: list[dict], out: Path) -> dict:
    from stages.prepare import run

    run(PrepareConfig.model_validate({"sources": sources, "out_dir": str(out), "workers": 1}))
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------- tests
def test_coco2017_is_fetched_verified_unpacked_and_its_sources_prepare(server, tmp_path):
    archives = coco2017_archives()
    server.files.update(archives)
    catalogue = {"coco2017": pinned(dl.CATALOGUE["coco2017"], archives)}
    root = tmp_path / "coco"

    result = dl.download("coco2017", root, catalogue=catalogue, **fetch_kwargs(server))

    assert result.fetched == ["annotations_trainval2017.zip", "val2017.zip", "train2017.zip"]
    assert (root / "annotations" / "captions_train2017.json").is_file()
    assert (root / "annotations" / "instances_val2017.json").is_file()  # the whole upstream layout
    assert sorted(p.name for p in (root / "val2017").iterdir()) == ["000000000139.jpg", "000000000285.jpg"]
    assert (root / "val2017" / "000000000139.jpg").read_bytes() == jpeg(139)
    archived = sorted(p.name for p in (root / "archives").iterdir())
    assert archived == sorted(f"{name}.done" for name in archives)  # archives deleted once unpacked
    done = json.loads((root / "archives" / "val2017.zip.done").read_text())
    assert done["sha256"] == hashlib.sha256(archives["val2017.zip"]).hexdigest() and done["sha256_checked"]
    assert result.sources == [
        {"kind": "coco", "name": "coco2017", "annotations": str(root / "annotations" / "captions_train2017.json"),
         "images": str(root / "train2017")},
        {"kind": "coco", "name": "coco2017", "annotations": str(root / "annotations" / "captions_val2017.json"),
         "images": str(root / "val2017")},
    ]

    rows = prepare(result.sources, tmp_path / "prepared")
    assert {r["image_id"]: r["split"] for r in rows} == {
        **{f"coco2017/{i}": "train" for i in COCO_IDS["train"]}, **{f"coco2017/{i}": "val" for i in COCO_IDS["val"]}}
    assert all(len(r["captions"]) == 2 for r in rows)

    before = len(server.requests)
    again = dl.download("coco2017", root, catalogue=catalogue, **fetch_kwargs(server))
    assert again.fetched == [] and len(again.skipped) == 3 and len(server.requests) == before
    assert again.sources == result.sources


def test_cli_prints_sources_that_pipeline_prepare_runs(server, tmp_path, monkeypatch):
    archives = {**flickr8k_archives(), **karpathy_archive()}
    server.files.update(archives)
    monkeypatch.setattr(dl, "CATALOGUE", {name: pinned(dl.CATALOGUE[name], archives)
                                          for name in ("flickr8k", "karpathy")})
    monkeypatch.chdir(tmp_path)  # no params.yaml here: prepare's defaults and the printed options only
    root = tmp_path / "flickr8k"

    r = runner.invoke(app, ["download", "flickr8k", "--to", str(root), "--mirror", server.url])
    assert r.exit_code == 0, r.output
    assert not (root / "__MACOSX").exists()  # macOS resource forks left out
    assert sorted(p.name for p in (root / "Flicker8k_Dataset").iterdir()) == sorted(FLICKR_NAMES)
    command = next(line for line in r.stdout.splitlines() if line.startswith("pipeline prepare --sources "))
    block = r.stdout[r.stdout.index("prepare:\n"):r.stdout.index("or on the command line")]
    args = shlex.split(command)[1:]
    sources = json.loads(args[2])
    assert yaml.safe_load(block) == {"prepare": {"sources": sources}}
    assert sources == [{"kind": "flickr8k", "name": "flickr8k", "captions": str(root / "Flickr8k.token.txt"),
                        "images": str(root / "Flicker8k_Dataset"), "split_lists": str(root)}]

    p = runner.invoke(app, [*args, "--out-dir", str(tmp_path / "prepared"), "--workers", "1"])
    assert p.exit_code == 0, p.output
    stats = json.loads((tmp_path / "prepared" / "stats.json").read_text())
    assert stats["images"] == 6 and stats["captions"] == 18
    assert stats["by_split"] == {"test": 1, "train": 4, "val": 1}

    # Karpathy's split files into the same folder: its source uses the Flickr8k images already there.
    r = runner.invoke(app, ["download", "karpathy", "--to", str(root), "--mirror", server.url])
    assert r.exit_code == 0, r.output
    command = next(line for line in r.stdout.splitlines() if line.startswith("pipeline prepare --sources "))
    args = shlex.split(command)[1:]
    assert json.loads(args[2]) == [{"kind": "karpathy", "name": "flickr8k_karpathy",
                                    "annotations": str(root / "dataset_flickr8k.json"),
                                    "images": str(root / "Flicker8k_Dataset")}]
    p = runner.invoke(app, [*args, "--out-dir", str(tmp_path / "karpathy"), "--workers", "1"])
    assert p.exit_code == 0, p.output
    assert json.loads((tmp_path / "karpathy" / "stats.json").read_text())["by_split"] == {
        "test": 1, "train": 4, "val": 1}

    # Alone, the split files have no images yet: the command says what to fetch.
    r = runner.invoke(app, ["download", "karpathy", "--to", str(tmp_path / "alone"), "--mirror", server.url])
    assert r.exit_code == 0, r.output
    assert "no `prepare` source yet" in r.stdout and "pipeline download coco2014 --to DIR" in r.stdout


def test_archives_already_at_hand_are_verified_and_unpacked_without_the_network(tmp_path):
    archives = coco2017_archives()
    have = tmp_path / "have"
    have.mkdir()
    for name, data in archives.items():
        (have / name).write_bytes(data)
    catalogue = {"coco2017": pinned(dl.CATALOGUE["coco2017"], archives)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there: any request would fail
    result = dl.download("coco2017", tmp_path / "coco", catalogue=catalogue, local=have,
                         mirror=f"http://127.0.0.1:{port}", retries=0, show_progress=False)
    assert sorted(result.fetched) == sorted(archives) and (tmp_path / "coco" / "val2017" / "000000000139.jpg").is_file()
    assert sorted(p.name for p in have.iterdir()) == sorted(archives)  # the user's archives are kept
    (have / "val2017.zip").write_bytes(archives["val2017.zip"][:-1] + b"x")  # a damaged copy is refused
    with pytest.raises(dl.ChecksumError, match=r"have/val2017\.zip: sha256 [0-9a-f]+, expected .*leave out --archives"):
        dl.download("coco2017", tmp_path / "other", catalogue=catalogue, local=have, only=["val2017.zip"],
                    mirror=f"http://127.0.0.1:{port}", retries=0, show_progress=False)


def test_interrupted_transfer_resumes_with_a_range_request(server, tmp_path):
    archives = coco2017_archives()
    server.files.update(archives)
    catalogue = {"coco2017": pinned(dl.CATALOGUE["coco2017"], archives)}
    name = "val2017.zip"
    cut = len(archives[name]) // 2
    server.cut[name] = cut
    root = tmp_path / "coco"

    # No retries left: the run ends with an error, keeps the partial file and unpacks nothing.
    with pytest.raises(dl.TransferInterruptedError) as e:
        dl.download("coco2017", root, only=[name], retries=0, catalogue=catalogue, **fetch_kwargs(server))
    part = root / "archives" / f"{name}.part"
    assert str(part) in str(e.value) and "rerun the same command to resume" in str(e.value)
    assert part.read_bytes() == archives[name][:cut]
    assert not (root / "val2017").exists()

    # The next run asks for the rest only, and ends with the right bytes.
    server.cut[name] = cut // 2  # dropped once more: retried within the run, again from where it stopped
    result = dl.download("coco2017", root, only=[name], keep_archives=True, catalogue=catalogue,
                         **fetch_kwargs(server))
    assert result.fetched == [name]
    ranges = [h.get("Range") for h in server.seen(name)]
    assert ranges == [None, f"bytes={cut}-", f"bytes={cut + cut // 2}-"]
    assert all(h.get("If-Range") for h in server.seen(name)[1:])  # a changed file would be restarted
    assert (root / "archives" / name).read_bytes() == archives[name]
    assert not part.exists() and (root / "val2017" / "000000000285.jpg").read_bytes() == jpeg(285)


def test_checksum_mismatch_is_an_error_and_the_file_is_never_unpacked(server, tmp_path, monkeypatch):
    archives = coco2017_archives()
    server.files.update(archives)
    name = "val2017.zip"
    wrong = hashlib.sha256(b"another file").hexdigest()
    actual = hashlib.sha256(archives[name]).hexdigest()
    monkeypatch.setattr(dl, "CATALOGUE", {
        "coco2017": pinned(dl.CATALOGUE["coco2017"], archives, **{name: {"sha256": wrong}})})
    root = tmp_path / "coco"

    r = runner.invoke(app, ["download", "coco2017", "--to", str(root), "--only", name, "--mirror", server.url])
    assert r.exit_code == 2
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and f"{server.url}{name}" in error
    assert f"sha256 {actual}, expected {wrong}" in error and "not unpacked" in error
    corrupt = root / "archives" / f"{name}.corrupt"
    assert corrupt.read_bytes() == archives[name]  # kept for inspection ...
    assert not (root / "val2017").exists() and not (root / "archives" / f"{name}.done").exists()  # ... never used
    assert not (root / "archives" / f"{name}.part").exists()

    # A rerun with the right digest downloads the file afresh (no Range on the set-aside file) and unpacks it.
    monkeypatch.setattr(dl, "CATALOGUE", {"coco2017": pinned(dl.CATALOGUE["coco2017"], archives)})
    r = runner.invoke(app, ["download", "coco2017", "--to", str(root), "--only", name, "--mirror", server.url])
    assert r.exit_code == 0, r.output
    assert server.seen(name)[-1].get("Range") is None
    assert (root / "val2017" / "000000000139.jpg").is_file()


def test_a_size_the_server_contradicts_is_refused_before_downloading(server, tmp_path):
    archives = coco2017_archives()
    server.files.update(archives)
    name = "val2017.zip"
    catalogue = {"coco2017": pinned(dl.CATALOGUE["coco2017"], archives, **{name: {"size": 123}})}
    with pytest.raises(dl.ChecksumError, match=rf"offers {len(archives[name])} bytes, the catalogue records 123"):
        dl.download("coco2017", tmp_path / "c", only=[name], catalogue=catalogue, **fetch_kwargs(server))
    assert not (tmp_path / "c" / "val2017").exists()


def test_server_without_range_support_restarts_cleanly(server, tmp_path):
    archives = flickr8k_archives()
    server.files.update(archives)
    server.ranges = False
    name = "Flickr8k_Dataset.zip"
    server.cut[name] = 700
    catalogue = {"flickr8k": pinned(dl.CATALOGUE["flickr8k"], archives)}
    root = tmp_path / "f"

    result = dl.download("flickr8k", root, only=[name], keep_archives=True, catalogue=catalogue,
                         **fetch_kwargs(server))

    assert result.fetched == [name]
    assert [h.get("Range") for h in server.seen(name)] == [None, "bytes=700-"]  # asked; got the whole file
    assert (root / "archives" / name).read_bytes() == archives[name]  # not 700 bytes spliced onto it
    assert sorted(p.name for p in (root / "Flicker8k_Dataset").iterdir()) == sorted(FLICKR_NAMES)


def test_a_file_changed_upstream_is_restarted_not_spliced(server, tmp_path):
    """No published digest: the server's ETag, sent back as If-Range, keeps a resumed file whole."""
    old, new = flickr8k_archives(), karpathy_archive()
    name = "Flickr8k_text.zip"
    server.files[name] = old[name]
    server.cut[name] = 300
    with pytest.raises(dl.TransferInterruptedError):
        dl.fetch(f"{server.url}{name}", tmp_path / name, retries=0, retry_wait=0, show_progress=False)
    server.files[name] = new["caption_datasets.zip"]  # replaced upstream meanwhile

    digest = dl.fetch(f"{server.url}{name}", tmp_path / name, retry_wait=0, show_progress=False)

    second = server.seen(name)[1]
    assert second["Range"] == "bytes=300-" and second["If-Range"]
    assert (tmp_path / name).read_bytes() == new["caption_datasets.zip"]
    assert digest == hashlib.sha256(new["caption_datasets.zip"]).hexdigest()


def test_unknown_names_suggest_the_closest():
    with pytest.raises(dl.UnknownDatasetError, match="did you mean 'coco2017'"):
        dl.get_dataset("coco-2017")
    r = runner.invoke(app, ["download", "flikr8k", "--to", "unused"])
    assert r.exit_code == 2 and "error: unknown dataset 'flikr8k'; did you mean 'flickr8k'?" in r.stderr
    assert not Path("unused").exists()
    with pytest.raises(dl.UnknownDatasetError, match="did you mean 'val2017.zip'"):
        dl.download("coco2017", "unused", only=["val2017"])
    r = runner.invoke(app, ["download", "--list"])
    assert r.exit_code == 0
    for name in dl.CATALOGUE:
        assert f"\n{name} " in "\n" + r.stdout
    assert "train2017.zip (sha256)" in r.stdout and "caption_datasets.zip (no published sha256)" in r.stdout


def test_unreachable_host_and_http_errors_name_the_url(server, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    with pytest.raises(dl.UnreachableError, match=rf"cannot reach 127\.0\.0\.1:{port} \(http://127\.0\.0\.1:{port}/"
                                                  r"val2017\.zip\).*use --mirror"):
        dl.download("coco2017", tmp_path / "a", only=["val2017.zip"], mirror=f"http://127.0.0.1:{port}",
                    retries=1, retry_wait=0, show_progress=False)
    with pytest.raises(dl.HTTPDownloadError, match=rf"{server.url}val2017\.zip: HTTP 404"):
        dl.download("coco2017", tmp_path / "b", only=["val2017.zip"], **fetch_kwargs(server))
    assert len(server.seen("val2017.zip")) == 1  # a 404 is not retried


def test_disk_full_and_unwritable_destination_are_user_errors(server, tmp_path, monkeypatch):
    archives = coco2017_archives()
    server.files.update(archives)
    catalogue = {"coco2017": pinned(dl.CATALOGUE["coco2017"], archives)}
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(dl.DestinationError, match=rf"{blocker}.*choose another --to"):
        dl.download("coco2017", blocker / "sub", catalogue=catalogue, **fetch_kwargs(server))
    with pytest.raises(dl.DestinationError, match="a file is in the way"):
        dl.download("coco2017", blocker, catalogue=catalogue, **fetch_kwargs(server))

    usage = dl.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda path: usage._replace(free=100))
    with pytest.raises(dl.DiskFullError, match=r"downloading .*val2017\.zip: needs .* has 100 B free; free some"):
        dl.download("coco2017", tmp_path / "c", only=["val2017.zip"], catalogue=catalogue, **fetch_kwargs(server))


def test_unsafe_incomplete_and_corrupt_archives_are_refused(server, tmp_path):
    dest = tmp_path / "d"
    dest.mkdir()
    slip = tmp_path / "slip.zip"
    slip.write_bytes(make_zip({"val2017/1.jpg": b"x", "val2017/../../escaped.txt": b"x"}))
    with pytest.raises(dl.ArchiveError, match="leads outside the destination"):
        dl.unpack(slip, dest, ("val2017",), show_progress=False)
    assert not (tmp_path / "escaped.txt").exists()

    lacking = tmp_path / "lacking.zip"
    lacking.write_bytes(make_zip({"train2017/1.jpg": b"x"}))
    with pytest.raises(dl.ArchiveError, match="holds no 'val2017', which `prepare` reads"):
        dl.unpack(lacking, dest, ("val2017",), show_progress=False)

    data = bytearray(make_zip({"val2017/1.jpg": b"A" * 4000}))
    data[data.index(b"A" * 100) + 50] = ord("B")  # stored, so the member's CRC-32 no longer matches
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(data))
    with pytest.raises(dl.ArchiveError, match="corrupt archive.*set aside as .*bad.zip.corrupt"):
        dl.unpack(bad, dest, ("val2017",), show_progress=False)
    assert (tmp_path / "bad.zip.corrupt").exists() and not bad.exists()


def test_tar_archives_unpack_with_their_wrapping_folder_stripped(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in {"pkg-1.0/data/a.txt": b"alpha", "pkg-1.0/data/sub/b.txt": b"beta",
                           "pkg-1.0/README": b"r"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    archive = tmp_path / "pkg.tar.gz"
    archive.write_bytes(buf.getvalue())
    assert dl.unpack(archive, tmp_path / "out", ("data",), show_progress=False) == 3
    assert (tmp_path / "out" / "data" / "sub" / "b.txt").read_bytes() == b"beta"
    assert (tmp_path / "out" / "README").read_bytes() == b"r"


def test_karpathy_coco_source_needs_both_coco2014_image_folders(tmp_path):
    (tmp_path / "dataset_coco.json").write_text("{}")
    (tmp_path / "val2014").mkdir()
    assert dl.CATALOGUE["karpathy"].sources(tmp_path) == []
    (tmp_path / "train2014").mkdir()
    assert dl.CATALOGUE["karpathy"].sources(tmp_path) == [
        {"kind": "karpathy", "name": "coco_karpathy", "annotations": str(tmp_path / "dataset_coco.json"),
         "images": str(tmp_path)}]
