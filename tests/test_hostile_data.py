"""Untrusted data through the CLI, each case a `pipeline` subprocess: every user mistake is one `error:` line
(exit 2, no traceback) or a reject with its reason, the good rows are still processed, nothing is left
half-written, and what a hostile file costs is bounded (the peak RSS of the subprocess, from the kernel).
(tests/test_hostile_inputs.py holds the corpus of options, models and damaged artifacts.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.data.manifest import RejectsReport, read_manifest
from pipeline.files import lock_path, output_lock
from tests.conftest import REPO, make_image_manifest, write_png

EXTRACT = ["--backbone", "test_efficientnet", "--image-size", "64", "--num-shards", "2", "--workers", "0",
           "--device", "cpu"]


@dataclass
class Result:
    exit_code: int
    output: str  # stdout and stderr
    peak_mb: float = 0.0  # the subprocess's peak resident memory (the kernel's ru_maxrss)


# The kernel's peak RSS of a process counts the memory of the process it was forked from until its exec (Python's
# subprocess forks with vfork, sharing the parent's memory): a child of this test process would report the test
# process's own peak, gigabytes late in the suite. A small fresh interpreter starts the command instead and
# reports its child's peak, which then starts from that interpreter's few megabytes.
_MEASURED = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(proc.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.fixture
def cli(tmp_path):
    """``cli(*args)``: ``pipeline ARGS`` as a user runs it (a subprocess, through the CLI's error boundary) in an
    empty folder (no params.yaml: options only)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def run(*args) -> Result:
        with tempfile.TemporaryDirectory() as scratch:
            out, peak = Path(scratch) / "output", Path(scratch) / "peak_kb"
            with out.open("wb") as sink:
                proc = subprocess.run([sys.executable, "-c", _MEASURED, str(peak), sys.executable, "-m", "pipeline.cli",
                                       *map(str, args)], cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                      timeout=300)
            return Result(proc.returncode, out.read_text(errors="replace"), int(peak.read_text()) / 1024)

    return run


@pytest.fixture
def cli_in_process(tmp_path, monkeypatch):
    """``cli`` in this process (CliRunner), for a test that watches which files the command opens."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.output, result.output
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def prepare(cli, out: Path, *sources: dict):
    return cli("prepare", "--sources", json.dumps(sources, default=str), "--out-dir", out, "--workers", 1)


# --------------------------------------------------------------------------- prepare
def test_a_deeply_nested_json_line_is_a_reject_and_the_other_rows_are_imported(tmp_path, cli):
    write_png(tmp_path / "a.png", 1)
    write_png(tmp_path / "b.png", 2)
    table = tmp_path / "posts.jsonl"
    table.write_text(json.dumps({"image": "a.png", "caption": "first"}) + "\n" + "[" * 1200 + "]" * 1200 + "\n"
                     + json.dumps({"image": "b.png", "caption": "third"}) + "\n")
    result = prepare(cli, tmp_path / "out", {"kind": "table", "path": table})
    assert result.exit_code == 0, result.output
    assert [r.image_id for r in read_manifest(tmp_path / "out" / "manifest.jsonl")] == ["table/a.png", "table/b.png"]
    assert RejectsReport.read(tmp_path / "out" / "rejects.jsonl") == [
        {"file": str(table), "line": 2, "reason": "malformed row: invalid JSON: nested too deeply"}]


def test_an_image_id_listed_twice_names_its_second_line(tmp_path, monkeypatch):
    from pipeline.data import manifest as manifest_lib
    from pipeline.data.manifest import ManifestError

    manifest = make_image_manifest(tmp_path / "data", 4)
    rows = manifest.read_text().splitlines()
    manifest.write_text("\n".join(rows + [rows[1]]) + "\n")
    with pytest.raises(ManifestError, match=rf"{manifest}:5: duplicate image_id 't/001'"):
        read_manifest(manifest)
    # ids are compared through 8-byte hashes first: two different ids with one hash are not duplicates
    manifest.write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(manifest_lib, "_id_hash", lambda image_id: 7)
    assert len(read_manifest(manifest)) == 4


def test_a_deeply_nested_manifest_row_is_one_error_line(tmp_path, cli):
    manifest = make_image_manifest(tmp_path / "data", 2)
    with open(manifest, "a") as f:
        f.write("[" * 1200 + "]" * 1200 + "\n")
    result = cli("extract", "--manifest", manifest, "--out-dir", tmp_path / "feat", *EXTRACT)
    assert result.exit_code == 2
    assert error_lines(result) == [f"error: {manifest}:3: malformed manifest row: JSON nested too deeply"]
    assert not (tmp_path / "feat").exists()


@pytest.mark.parametrize("kind", ["coco", "flickr8k", "table"])
def test_an_images_folder_that_does_not_exist_is_one_error_line(tmp_path, cli, kind):
    missing = tmp_path / "no-such-folder"
    if kind == "coco":
        ann = tmp_path / "captions_val2017.json"
        ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                   "annotations": [{"id": 1, "image_id": 1, "caption": "a cat"}]}))
        source = {"kind": "coco", "annotations": ann, "images": missing}
    elif kind == "flickr8k":
        (tmp_path / "captions.txt").write_text("image,caption\na.jpg,a cat\n")
        source = {"kind": "flickr8k", "captions": tmp_path / "captions.txt", "images": missing}
    else:
        (tmp_path / "t.csv").write_text("image,caption\na.jpg,a cat\n")
        source = {"kind": "table", "path": tmp_path / "t.csv", "images": missing}
    result = prepare(cli, tmp_path / "out", source)
    assert result.exit_code == 2
    assert error_lines(result) == [f"error: {missing}: images folder not found"]
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


@pytest.mark.parametrize("command", ["extract", "vocab", "train"])
def test_a_manifest_path_that_is_a_folder_is_one_error_line(tmp_path, cli, command):
    folder = tmp_path / "prepared"
    make_image_manifest(folder, 1)
    result = cli(command, "--manifest", folder)
    assert result.exit_code == 2
    assert error_lines(result) == [f"error: {folder}: is a folder, not a manifest file "
                                   f"(did you mean {folder / 'manifest.jsonl'}?)"]


def test_paths_outside_the_images_folder_are_rejected_unless_allowed(tmp_path, cli_in_process, monkeypatch):
    cli = cli_in_process
    import pipeline.data.importers as importers

    base = tmp_path.resolve()
    root = base / "src"
    write_png(root / "inside.png", 1)
    write_png(base / "outside.png", 2)  # a real image: rejected for where it is, not for what it is
    (root / "posts.csv").write_text("image,caption\ninside.png,fine\n../outside.png,climbs out\n"
                                    f"{base / 'outside.png'},absolute\n../../../../../../../../etc/passwd,hostile\n")
    coco = root / "captions_train2017.json"
    coco.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "inside.png"}, {"id": 2, "file_name": "../outside.png"},
                   {"id": 3, "file_name": "/etc/passwd"}],
        "annotations": [{"id": i, "image_id": i, "caption": f"caption {i}"} for i in (1, 2, 3)]}))
    opened = []  # every image file the import reads (a full check decodes through read_image_file)
    real_check, real_read = importers.check_image, importers.read_image_file
    monkeypatch.setattr(importers, "check_image", lambda path, mode, **kw: (opened.append(path),
                                                                            real_check(path, mode, **kw)))
    monkeypatch.setattr(importers, "read_image_file", lambda path, *a, **k: (opened.append(str(path)),
                                                                             real_read(path, *a, **k))[1])
    table = {"kind": "table", "path": root / "posts.csv"}
    coco_source = {"kind": "coco", "annotations": coco, "images": root}
    result = prepare(cli, tmp_path / "out", table, coco_source)
    assert result.exit_code == 0, result.output
    assert [r.image_id for r in read_manifest(tmp_path / "out" / "manifest.jsonl")] == ["coco/1", "table/inside.png"]
    assert opened == [str(root / "inside.png")] * 2  # the files outside were never opened
    rejects = RejectsReport.read(tmp_path / "out" / "rejects.jsonl")

    def reason(name: str) -> str:
        return (f"path outside the images folder: {name} is not inside {root} (set allow_outside_paths: true on "
                "the source to accept it)")

    # Rows 3 and 4 of the table name the same file: one image, rejected once, at its first line.
    assert sorted((r["id"], r.get("line"), r["reason"]) for r in rejects) == sorted([
        ("coco/2", None, reason("../outside.png")),
        ("coco/3", None, reason("/etc/passwd")),
        (f"table/{base / 'outside.png'}", 3, reason("../outside.png")),
        ("table//etc/passwd", 5, reason("../../../../../../../../etc/passwd")),
    ])
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["rejects"]["by_reason"] == {"path outside the images folder": 4}

    result = prepare(cli, tmp_path / "allowed", {**table, "allow_outside_paths": True},
                     {**coco_source, "allow_outside_paths": True})
    assert result.exit_code == 0, result.output
    records = {r.image_id: r for r in read_manifest(tmp_path / "allowed" / "manifest.jsonl")}
    outside = str(base / "outside.png")
    assert records["coco/2"].path == records["table/" + outside].path == outside
    assert records["table/" + outside].captions == ["climbs out", "absolute"]
    reasons = {r["id"]: r["reason"] for r in RejectsReport.read(tmp_path / "allowed" / "rejects.jsonl")}
    assert set(reasons) == {"coco/3", "table//etc/passwd"}  # followed, and refused for what they are
    assert all(r.startswith("not an image") for r in reasons.values()), reasons


def test_duplicate_and_control_character_captions_are_rejected_with_reasons(tmp_path, cli):
    write_png(tmp_path / "a.png", 1)
    write_png(tmp_path / "b.png", 2)
    rows = [("a.png", "a red  square"), ("a.png", "a blue circle"), ("a.png", "a red square"),
            ("a.png", "null\x00byte"), ("a.png", "  a red square "), ("b.png", "\x1b[31mred alert"),
            ("b.png", "bell\x07")]
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in rows))
    result = prepare(cli, tmp_path / "out", {"kind": "table", "path": table})
    assert result.exit_code == 0, result.output
    (record,) = read_manifest(tmp_path / "out" / "manifest.jsonl")
    assert (record.image_id, record.captions) == ("table/a.png", ["a red square", "a blue circle"])
    rejects = RejectsReport.read(tmp_path / "out" / "rejects.jsonl")
    assert [(r.get("line"), r["reason"]) for r in rejects] == [
        (3, "duplicate caption: same text as caption 1"),
        (4, "control character: caption contains U+0000"),
        (5, "duplicate caption: same text as caption 1"),
        (6, "control character: caption contains U+001B"),
        (7, "control character: caption contains U+0007"),
        (6, "no valid captions: all 2 captions rejected"),
    ]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["rejects"]["by_reason"] == {"control character": 3, "duplicate caption": 2, "no valid captions": 1}
    assert stats["captions"] == 2


def _sparse(path: Path, size: int) -> Path:
    """A file of ``size`` bytes that takes no disk space (zeros, never written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _flat_png(path: Path, width: int, height: int) -> Path:
    """A real RGB PNG of ``width`` x ``height`` grey pixels, compressed row by row (a few hundred KB that decode
    to 3 bytes a pixel) without ever holding the image."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\x00" + b"\x80" * (3 * width)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_a_2gb_file_is_refused_by_its_size_before_it_is_read(tmp_path, cli):
    root = tmp_path / "src"
    write_png(root / "a.png", 1)
    write_png(root / "b.png", 2)
    _sparse(root / "huge.jpg", 2 * 1024**3)
    _sparse(root / "big.jpg", 300 * 1024**2)  # under a raised limit: read, through a handle, and refused
    _flat_png(root / "wide.png", 11_000, 11_000)  # ~370 KB that decode to 121 M pixels (363 MB)
    table = root / "t.csv"
    table.write_text("image,caption\na.png,a red square\nhuge.jpg,a huge file\nb.png,a blue circle\n"
                     "wide.png,a vast grey field\n")
    result = prepare(cli, tmp_path / "out", {"kind": "table", "path": table})
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert result.peak_mb < 200, result.peak_mb  # reading the file whole cost 2.16 GB
    assert [r.image_id for r in read_manifest(tmp_path / "out" / "manifest.jsonl")] == ["table/a.png", "table/b.png"]
    assert {r["id"]: r["reason"] for r in RejectsReport.read(tmp_path / "out" / "rejects.jsonl")} == {
        "table/huge.jpg": "file too large: 2,147,483,648 bytes > max_file_bytes 52,428,800",
        "table/wide.png": "image too large: 11000x11000 = 121,000,000 pixels > max_pixels 40,000,000",
    }

    table.write_text("image,caption\na.png,a red square\nbig.jpg,a big file\n")
    result = cli("prepare", "--sources", json.dumps([{"kind": "table", "path": str(table)}]), "--out-dir",
                 tmp_path / "raised", "--workers", 1, "--max-file-bytes", 400 * 1024**2)
    assert result.exit_code == 0, result.output
    assert result.peak_mb < 200, result.peak_mb  # 300 MB hashed and its header read, never held
    assert [r.image_id for r in read_manifest(tmp_path / "raised" / "manifest.jsonl")] == ["table/a.png"]
    assert [r["reason"] for r in RejectsReport.read(tmp_path / "raised" / "rejects.jsonl")] == [
        "not an image: unrecognised image format"]


def test_extract_refuses_a_2gb_file_by_its_size_and_encodes_the_others(tmp_path, cli):
    manifest = make_image_manifest(tmp_path / "data", 2)
    _sparse(tmp_path / "data" / "img" / "huge.jpg", 2 * 1024**3)
    good = cli("extract", "--manifest", manifest, "--out-dir", tmp_path / "good", *EXTRACT)
    assert good.exit_code == 0, good.output
    with open(manifest, "a") as f:
        f.write(json.dumps({"image_id": "t/huge", "path": "img/huge.jpg", "captions": ["x"], "split": "train",
                            "source": "t"}) + "\n")
    result = cli("extract", "--manifest", manifest, "--out-dir", tmp_path / "feat", *EXTRACT)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert result.peak_mb < good.peak_mb + 100, (result.peak_mb, good.peak_mb)  # not + 2 GB
    rejects = [json.loads(line) for line in (tmp_path / "feat" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"], r["detail"]) for r in rejects] == [
        ("t/huge", "file too large", "2,147,483,648 bytes > max_file_bytes 52,428,800")]
    assert json.loads((tmp_path / "feat" / "meta.json").read_text())["records"] == 2


def test_a_link_out_of_the_images_folder_is_rejected_like_the_path_it_leads_to(tmp_path, cli_in_process,
                                                                                monkeypatch):
    import pipeline.data.importers as importers

    base = tmp_path.resolve()
    root = base / "src"
    write_png(root / "inside.jpg", 1)
    write_png(base / "outside.jpg", 2)
    (root / "link_outside.jpg").symlink_to("../outside.jpg")
    (root / "sub").mkdir()
    (root / "sub" / "link_inside.jpg").symlink_to("../inside.jpg")  # a link that stays inside: fine
    (base / "elsewhere").mkdir()
    (root / "linked_folder").symlink_to(base / "elsewhere")
    write_png(base / "elsewhere" / "far.jpg", 3)
    (root / "t.csv").write_text("image,caption\ninside.jpg,one\nlink_outside.jpg,two\nsub/link_inside.jpg,three\n"
                                "../outside.jpg,four\nlinked_folder/far.jpg,five\n")
    opened = []
    real_read = importers.read_image_file
    monkeypatch.setattr(importers, "read_image_file", lambda path, *a, **k: (opened.append(str(path)),
                                                                             real_read(path, *a, **k))[1])
    result = prepare(cli_in_process, tmp_path / "out", {"kind": "table", "path": root / "t.csv"})
    assert result.exit_code == 0, result.output
    assert [r.image_id for r in read_manifest(tmp_path / "out" / "manifest.jsonl")] == [
        "table/inside.jpg", "table/sub/link_inside.jpg"]
    assert sorted(opened) == [str(root / "inside.jpg"), str(root / "sub" / "link_inside.jpg")]
    hint = "(set allow_outside_paths: true on the source to accept it)"
    assert sorted((r["id"], r["reason"]) for r in RejectsReport.read(tmp_path / "out" / "rejects.jsonl")) == [
        (f"table/{base / 'outside.jpg'}", f"path outside the images folder: ../outside.jpg is not inside {root} {hint}"),
        ("table/link_outside.jpg", f"path outside the images folder: link_outside.jpg is a link to "
                                   f"{base / 'outside.jpg'}, which is not inside {root} {hint}"),
        ("table/linked_folder/far.jpg", f"path outside the images folder: linked_folder/far.jpg is a link to "
                                        f"{base / 'elsewhere' / 'far.jpg'}, which is not inside {root} {hint}"),
    ]


LONG_CAPTION = ("a dog " * 16_667)[:100_000]


@pytest.mark.parametrize("caption,reason", [
    (LONG_CAPTION, "caption too long: 100,000 characters > max_caption_chars 1,000"),
    ("a cat\u202egod a", "invisible character: caption contains U+202E (RIGHT-TO-LEFT OVERRIDE)"),
    ("\u2066a cat\u2069 on a mat", "invisible character: caption contains U+2066 (LEFT-TO-RIGHT ISOLATE)"),
    ("a c\u200bat", "invisible character: caption contains U+200B (ZERO WIDTH SPACE)"),
    ("a cat\ufeff", "invisible character: caption contains U+FEFF (ZERO WIDTH NO-BREAK SPACE)"),
    ("a cat\U000e0041\U000e0042", "invisible character: caption contains U+E0041 (TAG LATIN CAPITAL LETTER A)"),
])
def test_captions_too_long_or_with_invisible_characters_are_rejected_with_the_reason(tmp_path, cli, caption,
                                                                                        reason):
    write_png(tmp_path / "a.png", 1)
    rows = [("a.png", "a cat on a mat"), ("a.png", caption), ("a.png", "a family \U0001F468\u200d\U0001F469 "
                                                                     "in a park")]
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in rows))
    result = prepare(cli, tmp_path / "out", {"kind": "table", "path": table})
    assert result.exit_code == 0, result.output
    (record,) = read_manifest(tmp_path / "out" / "manifest.jsonl")  # the joiner of an emoji sequence is kept
    assert record.captions == ["a cat on a mat", "a family \U0001F468\u200d\U0001F469 in a park"]
    assert [(r.get("line"), r["reason"]) for r in RejectsReport.read(tmp_path / "out" / "rejects.jsonl")] == [
        (2, reason)]


def test_max_caption_chars_is_an_option(tmp_path, cli):
    write_png(tmp_path / "a.png", 1)
    (tmp_path / "t.csv").write_text("image,caption\na.png,a cat\na.png,a cat on a mat\n")
    result = cli("prepare", "--sources", json.dumps([{"kind": "table", "path": str(tmp_path / "t.csv")}]),
                 "--out-dir", tmp_path / "out", "--max-caption-chars", 10)
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "out" / "manifest.jsonl")[0].captions == ["a cat"]
    assert [r["reason"] for r in RejectsReport.read(tmp_path / "out" / "rejects.jsonl")] == [
        "caption too long: 14 characters > max_caption_chars 10"]


def test_prepare_with_every_row_rejected_fails_and_writes_the_rejects(tmp_path, cli):
    (tmp_path / "t.csv").write_text("image,caption\ngone.png,a cat\nalso-gone.png,a dog\n")
    result = prepare(cli, tmp_path / "out", {"kind": "table", "path": tmp_path / "t.csv"})
    assert result.exit_code == 2
    rejects = tmp_path / "out" / "rejects.jsonl"
    assert error_lines(result) == [f"error: no image imported: all 2 item(s) were rejected (missing image file: 2); "
                                   f"see {rejects}"]
    assert [r["reason"] for r in RejectsReport.read(rejects)] == ["missing image file"] * 2
    assert not (tmp_path / "out" / "manifest.jsonl").exists() and not (tmp_path / "out" / "stats.json").exists()


# --------------------------------------------------------------------------- extract
def test_extract_of_an_empty_manifest_is_one_error_line(tmp_path, cli):
    (tmp_path / "manifest.jsonl").write_text("")
    result = cli("extract", "--manifest", "manifest.jsonl", "--out-dir", tmp_path / "feat", *EXTRACT)
    assert result.exit_code == 2
    assert error_lines(result) == ["error: manifest.jsonl: the manifest holds no images; nothing to extract"]
    assert not (tmp_path / "feat").exists()


def test_extract_with_every_image_rejected_fails_and_keeps_the_rejects(tmp_path, cli):
    manifest = make_image_manifest(tmp_path / "data", 3)
    for png in (tmp_path / "data" / "img").iterdir():
        png.write_bytes(b"not an image")
    out = tmp_path / "feat"
    result = cli("extract", "--manifest", manifest, "--out-dir", out, *EXTRACT)
    assert result.exit_code == 2
    assert error_lines(result) == [f"error: {out}: no features written: all 3 image(s) were rejected "
                                   f"(not an image: 3); see {out / 'rejects.jsonl'}"]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rejects) == ["t/000", "t/001", "t/002"]
    assert not (out / "meta.json").exists()  # not a usable cache: readers refuse it
    assert not lock_path(out).exists()


@pytest.mark.parametrize("name,first", [("resnet9000", "resnet200"), ("resnet_18", "resnet18"),
                                        ("ResNet-50", "resnet50")])
def test_an_unknown_backbone_is_one_error_line_with_close_names(tmp_path, cli, name, first):
    manifest = make_image_manifest(tmp_path / "data", 1)
    result = cli("extract", "--manifest", manifest, "--out-dir", tmp_path / "feat", "--backbone", name)
    assert result.exit_code == 2
    (line,) = error_lines(result)
    assert line.startswith(f"error: unknown timm model {name!r}; did you mean {first}, "), line
    assert not (tmp_path / "feat").exists()


def test_a_shard_index_outside_the_shards_is_refused_at_config_time(tmp_path, cli):
    result = cli("extract", "--manifest", tmp_path / "missing.jsonl", "--shard-index", 5, "--num-shards", 2)
    assert result.exit_code == 2
    (line,) = error_lines(result)  # before the manifest is even looked at
    assert line.startswith("error: command line: ") and "shard_index 5 must be below num_shards 2" in line, line


# --------------------------------------------------------------------------- two runs, one output folder
def hold_lock(folder: Path, *extra: str) -> subprocess.Popen:
    """Another process holding ``output_lock(folder, ...)`` until its stdin closes (or it is killed)."""
    code = ("import sys\nfrom pipeline.files import output_lock\n"
            f"with output_lock(sys.argv[1]{', '.join([''] + list(extra))}):\n"
            "    print('locked', flush=True)\n    sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_extract_on_one_folder_is_refused_with_the_holders_pid(tmp_path, cli):
    manifest = make_image_manifest(tmp_path / "data", 2)
    out = tmp_path / "feat"
    holder = hold_lock(out)
    try:
        result = cli("extract", "--manifest", manifest, "--out-dir", out, *EXTRACT)
        assert result.exit_code == 2
        assert error_lines(result) == [f"error: {out}: another run (pid {holder.pid}) is writing it; wait for it to "
                                       f"end or stop it (lock file {tmp_path / '.feat.lock'})"]
        assert not out.exists()
    finally:
        holder.kill()  # a crash: the kernel drops the lock, the file stays
        holder.wait()
    assert lock_path(out).exists()
    result = cli("extract", "--manifest", manifest, "--out-dir", out, *EXTRACT)
    assert result.exit_code == 0, result.output
    assert (out / "meta.json").exists() and not lock_path(out).exists()


def test_shard_runs_share_the_lock_and_a_full_run_waits_for_them(tmp_path):
    from pipeline.files import OutputLockedError

    out = tmp_path / "feat"
    holders = [hold_lock(out, "shared=True") for _ in range(2)]  # both hold it at once
    try:
        with pytest.raises(OutputLockedError, match=rf"another run \(pid {holders[0].pid}, {holders[1].pid}\)"):
            with output_lock(out):
                pass
    finally:
        for h in holders:
            h.stdin.close()
            h.wait()
    assert not lock_path(out).exists()  # the last one out removed it
    with output_lock(out) as path:
        assert path.read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize("stage, option", [("train", "--out-dir"), ("scst", "--out-dir"), ("finetune", "--out-dir")])
def test_a_second_training_run_on_one_out_dir_is_refused(tmp_path, cli, stage, option):
    out = tmp_path / "models" / "transformer"
    with output_lock(out):
        result = cli(stage, "--manifest", tmp_path / "missing.jsonl", option, out, "--device", "cpu")
    assert result.exit_code == 2
    (line,) = error_lines(result)
    assert line.startswith(f"error: {out}: another run (pid ") and "is writing it" in line
    assert not out.exists()


def test_a_symlinked_out_dir_takes_its_targets_lock(tmp_path, cli):
    from pipeline.files import OutputLockedError

    real = tmp_path / "models" / "transformer"
    real.mkdir(parents=True)
    link = tmp_path / "mine"
    link.symlink_to(real)
    assert lock_path(link) == lock_path(real) == real.parent / ".transformer.lock"
    with output_lock(real):
        result = cli("train", "--manifest", tmp_path / "missing.jsonl", "--out-dir", link, "--device", "cpu")
    assert result.exit_code == 2
    (line,) = error_lines(result)
    assert line.startswith(f"error: {link}: another run (pid ") and str(lock_path(real)) in line, line
    holder = hold_lock(link)  # the other way round, across processes
    try:
        with pytest.raises(OutputLockedError, match=rf"another run \(pid {holder.pid}\)"):
            with output_lock(real):
                pass
    finally:
        holder.stdin.close()
        holder.wait()


def test_lock_files_lie_outside_every_dvc_output():
    from tests.test_dvc_deps import dvc_stages

    outs = [o for _, _, _, stage_outs in dvc_stages() for o in stage_outs]
    trained = sorted({o.split("/")[1] for o in outs if o.startswith("models/") and o.endswith("/bundle")})
    assert "transformer" in trained
    locks = [lock_path(Path("data/features"))] + [lock_path(Path("models") / name) for name in trained]
    for lock in locks:
        assert not any(lock.as_posix() == o or lock.as_posix().startswith(o + "/") for o in outs), lock


# --------------------------------------------------------------------------- train
def test_train_with_every_val_image_rejected_by_extraction_is_one_error_line(tmp_path, cli):
    manifest = make_image_manifest(tmp_path / "data", 6)  # splits train, val, test, train, val, test
    for i in (1, 4):
        (tmp_path / "data" / "img" / f"{i:03d}.png").write_bytes(b"not an image")
    assert cli("extract", "--manifest", manifest, "--out-dir", tmp_path / "feat", *EXTRACT).exit_code == 0
    assert cli("vocab", "--manifest", manifest, "--out-dir", tmp_path / "tok", "--kinds", "word",
               "--min-freq", 1).exit_code == 0
    result = cli("train", "--manifest", manifest, "--features", tmp_path / "feat", "--tokenizer", tmp_path / "tok/word",
                 "--out-dir", tmp_path / "run", "--device", "cpu")
    assert result.exit_code == 2
    assert error_lines(result) == [f"error: {manifest}: training needs train and val images with features; "
                                   "extraction rejected 2 image(s), leaving 2 train, 0 val "
                                   f"(see {tmp_path / 'feat' / 'rejects.jsonl'})"]
    assert not (tmp_path / "run" / "checkpoints").exists()
