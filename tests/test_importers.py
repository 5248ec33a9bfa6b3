"""Importers: every source format into manifest records; bad input into the rejects report."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import (
    CocoSource,
    Flickr8kSource,
    Flickr30kSource,
    KarpathySource,
    SyntheticSource,
    TableSource,
)
from pipeline.data.importers import (
    AnnotationFileError,
    ImportLimits,
    import_coco,
    import_flickr8k,
    import_flickr30k,
    import_karpathy,
    import_source,
    import_table,
    invisible_character,
)
from pipeline.data.manifest import ManifestRecord, RejectsReport


# --------------------------------------------------------------------------- fixtures
def jpeg(path: Path, color=(200, 30, 30), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG")
    return path


def truncated_jpeg(path: Path) -> Path:
    """A valid noisy JPEG cut in half (noise so the cut lands inside the scan data)."""
    arr = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def corrupt_png(path: Path) -> Path:
    """A 4x4 PNG whose rows use an invalid filter type: decodes as 'corrupt image'."""
    path.write_bytes(_png(4, 4, zlib.compress(bytes([9] + [0] * 12) * 4)))
    return path


def huge_png(path: Path) -> Path:
    """A PNG header claiming 20000x20000 pixels: refused as a decompression bomb."""
    path.write_bytes(_png(20000, 20000, zlib.compress(b"\0" * 10)))
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def reasons(rejects: RejectsReport) -> list[tuple[str, int | None, str | None]]:
    """(stable phrase, line, id) of each reject, in order."""
    return [(r.reason.split(":")[0], r.line, r.id) for r in rejects.items]


def by_id(records: list[ManifestRecord]) -> dict[str, ManifestRecord]:
    return {r.image_id: r for r in records}


# --------------------------------------------------------------------------- COCO
def coco_fixture(tmp_path: Path, name="captions_val2017.json") -> Path:
    images = tmp_path / "val2017"
    jpeg(images / "000000000139.jpg")
    jpeg(images / "000000000285.jpg", color=(0, 90, 200))
    jpeg(images / "000000000042.jpg", color=(10, 200, 10))
    return write_json(tmp_path / "annotations" / name, {
        "info": {"year": 2017},
        "images": [
            {"id": 139, "file_name": "000000000139.jpg", "height": 8, "width": 8},
            {"id": 285, "file_name": "000000000285.jpg"},
            {"id": 42, "file_name": "000000000042.jpg"},
        ],
        "annotations": [
            {"image_id": 285, "id": 11, "caption": "A big Brown BEAR sitting in the grass."},
            {"image_id": 139, "id": 10, "caption": "  A woman\tstands in the\n dining area  "},
            {"image_id": 139, "id": 12, "caption": "A room with chairs, a table, and a woman in it."},
            {"image_id": 42, "id": 13, "caption": "Café table with croissants 🥐"},
        ],
    })


def test_coco_good(tmp_path, monkeypatch):
    ann = coco_fixture(tmp_path)
    monkeypatch.chdir(tmp_path)  # a relative images folder still gives absolute paths
    rejects = RejectsReport()
    records = import_coco(CocoSource(annotations=ann, images=Path("val2017")), rejects)
    assert len(rejects) == 0
    assert [r.image_id for r in records] == ["coco/139", "coco/285", "coco/42"]  # sorted by image_id
    rec = records[0]
    assert rec.captions == ["A woman stands in the dining area", "A room with chairs, a table, and a woman in it."]
    assert rec.path == str((tmp_path / "val2017" / "000000000139.jpg").resolve())
    assert Path(rec.path).is_absolute()
    assert rec.split == "val" and rec.source == "coco"
    assert rec.extra == {"native_id": "139"}
    assert records[1].captions == ["A big Brown BEAR sitting in the grass."]  # case kept
    assert records[2].captions == ["Café table with croissants 🥐"]


@pytest.mark.parametrize(
    "name, split, expected, needs_split",
    [
        ("captions_train2017.json", "auto", "train", False),
        ("captions_train2014.json", "auto", "train", False),
        ("captions_val2014.json", "auto", "val", False),
        ("my_captions.json", "auto", "train", True),
        ("captions_val2017.json", "test", "test", False),  # cfg.split wins over the file name
        ("captions_val2017.json", "train", "train", False),
        ("captions_val2017.json", "seeded", "train", True),  # placeholder; prepare assigns the seeded split
        ("my_captions.json", "val", "val", False),
    ],
)
def test_coco_split(tmp_path, name, split, expected, needs_split):
    ann = coco_fixture(tmp_path, name)
    records = import_coco(CocoSource(annotations=ann, images=tmp_path / "val2017", split=split), RejectsReport())
    assert {r.split for r in records} == {expected}
    assert all(r.extra.get("needs_split", False) is needs_split for r in records)


def test_coco_bad_items(tmp_path):
    images = tmp_path / "imgs"
    jpeg(images / "ok.jpg")
    jpeg(images / "dup.jpg")
    jpeg(images / "blank.jpg")
    (images / "zero.jpg").write_bytes(b"")
    truncated_jpeg(images / "half.jpg")
    (images / "text.jpg").write_text("this is not a JPEG")
    corrupt_png(images / "corrupt.png")
    huge_png(images / "huge.png")
    ann = write_json(tmp_path / "captions_train2017.json", {
        "images": [
            {"id": 1, "file_name": "ok.jpg"},
            {"id": 2, "file_name": "dup.jpg"},
            {"id": 2, "file_name": "dup.jpg"},  # duplicate image id
            {"id": 3, "file_name": "blank.jpg"},
            {"id": 4, "file_name": "missing.jpg"},
            {"id": 5, "file_name": "zero.jpg"},
            {"id": 6, "file_name": "half.jpg"},
            {"id": 7, "file_name": "text.jpg"},
            {"id": 8, "file_name": "corrupt.png"},
            {"id": 9, "file_name": "huge.png"},
            {"id": 10},  # no file_name
        ],
        "annotations": [
            {"image_id": 1, "id": 100, "caption": "a good caption"},
            {"image_id": 1, "id": 100, "caption": "same annotation id again"},
            {"image_id": 999, "id": 101, "caption": "points nowhere"},
            {"image_id": 2, "id": 102, "caption": "dup image caption"},
            {"image_id": 3, "id": 103, "caption": "   "},
            {"image_id": 3, "id": 104, "caption": ""},
            {"image_id": 1, "id": 105, "caption": "\n"},
            {"image_id": 1, "id": 106},  # no caption key
        ] + [{"image_id": i, "id": 200 + i, "caption": f"caption {i}"} for i in range(4, 10)],
    })
    rejects = RejectsReport()
    records = import_coco(CocoSource(annotations=ann, images=images), rejects)
    assert [(r.image_id, r.captions) for r in records] == [
        ("coco/1", ["a good caption"]),
        ("coco/2", ["dup image caption"]),
    ]
    assert reasons(rejects) == [
        ("duplicate id", None, "coco/2"),
        ("malformed row", None, "coco/10"),
        ("duplicate id", None, "coco/1"),
        ("unknown image id", None, "coco/999"),
        ("empty caption", None, "coco/3"),
        ("empty caption", None, "coco/3"),
        ("empty caption", None, "coco/1"),
        ("malformed row", None, "coco/1"),
        ("no valid captions", None, "coco/3"),
        ("missing image file", None, "coco/4"),
        ("empty file", None, "coco/5"),
        ("truncated image", None, "coco/6"),
        ("not an image", None, "coco/7"),
        ("corrupt image", None, "coco/8"),
        ("image too large", None, "coco/9"),
    ]
    msgs = [r.reason for r in rejects.items]
    assert msgs[0] == "duplicate id: image 2 listed again in 'images' (images[2])"
    assert msgs[1] == "malformed row: image 10 has no 'file_name'"
    assert msgs[2] == "duplicate id: annotation 100 repeated (annotations[1])"
    assert msgs[3] == "unknown image id: annotation 101 refers to image 999"
    assert msgs[4] == "empty caption: annotation 103"
    assert msgs[7] == "malformed row: annotation 106 is missing key 'caption'"
    assert msgs[8] == "no valid captions: all 2 captions rejected"
    assert msgs[9] == "missing image file"
    # Annotation problems name the annotation file; image problems name the image.
    assert rejects.items[3].file == str(ann)
    assert rejects.items[9].file == str((images / "missing.jpg").resolve())
    assert rejects.summary()["by_reason"]["empty caption"] == 3


def test_coco_image_without_annotations_is_rejected(tmp_path):
    jpeg(tmp_path / "a.jpg")
    jpeg(tmp_path / "b.jpg")
    ann = write_json(tmp_path / "c.json", {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
        "annotations": [{"image_id": 1, "id": 1, "caption": "x"}],
    })
    rejects = RejectsReport()
    records = import_coco(CocoSource(annotations=ann, images=tmp_path), rejects)
    assert [r.image_id for r in records] == ["coco/1"]
    assert [(r.reason, r.id) for r in rejects.items] == [("no valid captions: no captions", "coco/2")]


def test_coco_invalid_json_names_file_and_position(tmp_path):
    ann = tmp_path / "captions_val2017.json"
    ann.write_text('{\n  "images": [],\n  "annotations": [{"id": 1 "image_id": 2}]\n}\n')
    rejects = RejectsReport()
    with pytest.raises(AnnotationFileError) as exc:
        import_coco(CocoSource(annotations=ann, images=tmp_path), rejects)
    assert str(exc.value) == f"{ann}:3:28: invalid JSON: Expecting ',' delimiter"
    assert (exc.value.line, exc.value.col) == (3, 28)
    assert len(rejects) == 0


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty file"),
        ("  \n", "empty file"),
        ('{"images": []}', "missing top-level key 'annotations'"),
        ('{"annotations": []}', "missing top-level key 'images'"),
        ('{"images": [], "dataset": "coco"}',
         "missing top-level key 'annotations' (this looks like a Karpathy split file: use kind 'karpathy')"),
        ("[1, 2]", "expected a JSON object with 'images' and 'annotations', got a list"),
        ('{"images": {}, "annotations": []}', "top-level 'images' must be a list, got a dict"),
    ],
)
def test_coco_whole_file_errors(tmp_path, content, message):
    ann = tmp_path / "captions_val2017.json"
    ann.write_text(content)
    with pytest.raises(AnnotationFileError) as exc:
        import_coco(CocoSource(annotations=ann, images=tmp_path), RejectsReport())
    assert str(exc.value) == f"{ann}: {message}"


def test_missing_annotation_file(tmp_path):
    with pytest.raises(AnnotationFileError, match=r"nope\.json: annotation file not found$"):
        import_coco(CocoSource(annotations=tmp_path / "nope.json", images=tmp_path), RejectsReport())
    assert issubclass(AnnotationFileError, ValueError)


# --------------------------------------------------------------------------- Karpathy
def test_karpathy_coco_style(tmp_path):
    jpeg(tmp_path / "val2014" / "COCO_val2014_000000391895.jpg")
    jpeg(tmp_path / "val2014" / "COCO_val2014_000000522418.jpg")
    jpeg(tmp_path / "train2014" / "COCO_train2014_000000318556.jpg")
    jpeg(tmp_path / "val2014" / "COCO_val2014_000000184613.jpg")
    ann = write_json(tmp_path / "dataset_coco.json", {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "cocoid": 391895, "imgid": 0,
         "split": "test", "sentences": [
             {"raw": "A man with a red helmet on a small moped on a dirt road. ", "tokens": ["a"], "sentid": 770337},
             {"raw": "Man riding a motor bike on a dirt road on the countryside.", "tokens": ["man"], "sentid": 771687}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000522418.jpg", "cocoid": 522418, "imgid": 1,
         "split": "restval", "sentences": [{"raw": "A woman wearing a net on her head cutting a cake. ", "sentid": 1}]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000318556.jpg", "cocoid": 318556, "imgid": 2,
         "split": "train", "sentences": [{"raw": "A very clean and well decorated empty bathroom", "sentid": 2}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000184613.jpg", "cocoid": 184613, "imgid": 3,
         "split": "val", "sentences": [{"raw": "A child holding a flowered umbrella and petting a yak.", "sentid": 3}]},
    ]})
    rejects = RejectsReport()
    records = by_id(import_karpathy(KarpathySource(annotations=ann, images=tmp_path), rejects))
    assert len(rejects) == 0
    assert sorted(records) == ["karpathy/184613", "karpathy/318556", "karpathy/391895", "karpathy/522418"]
    test = records["karpathy/391895"]
    assert test.split == "test"
    assert test.captions == ["A man with a red helmet on a small moped on a dirt road.",
                             "Man riding a motor bike on a dirt road on the countryside."]
    assert test.path == str((tmp_path / "val2014" / "COCO_val2014_000000391895.jpg").resolve())
    assert test.extra == {"native_id": "391895"}
    assert records["karpathy/522418"].split == "train"  # restval counts as train
    assert records["karpathy/522418"].extra == {"native_id": "522418", "karpathy_split": "restval"}
    assert records["karpathy/318556"].split == "train"
    assert records["karpathy/184613"].split == "val"


def test_karpathy_flickr_style_and_bad_items(tmp_path):
    root = tmp_path / "Flicker8k_Dataset"
    for name in ["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg", "1002674143_1b742ab4b8.jpg",
                 "1003163366_44323f5815.jpg", "1007129816_e794419615.jpg"]:
        jpeg(root / name)
    ann = write_json(tmp_path / "dataset_flickr8k.json", {"dataset": "flickr8k", "images": [
        {"filename": "1000268201_693b08cb0e.jpg", "imgid": 0, "split": "train",
         "sentences": [{"raw": "A child in a pink dress is climbing up a set of stairs in an entry way .", "sentid": 0},
                       {"raw": "  ", "sentid": 1}]},
        {"filename": "1001773457_577c3a7d70.jpg", "imgid": 1, "split": "dev",  # not a Karpathy split
         "sentences": [{"raw": "A black dog and a spotted dog are fighting", "sentid": 5}]},
        {"filename": "1002674143_1b742ab4b8.jpg", "imgid": 2, "split": "test",
         "sentences": [{"tokens": ["no", "raw"], "sentid": 10}, {"raw": "", "sentid": 11}]},
        {"filename": "1000268201_693b08cb0e.jpg", "imgid": 3, "split": "train",  # same image again
         "sentences": [{"raw": "again", "sentid": 12}]},
        {"filename": "1003163366_44323f5815.jpg", "imgid": 4, "split": "val", "sentences": "oops"},
        {"imgid": 5, "split": "val", "sentences": []},
        {"filename": "1007129816_e794419615.jpg", "imgid": 6, "split": "val",
         "sentences": [{"raw": "A man in an orange hat starring at something .", "sentid": 30}]},
    ]})
    rejects = RejectsReport()
    records = import_karpathy(KarpathySource(name="f8k", annotations=ann, images=root), rejects)
    assert [(r.image_id, r.split, r.captions) for r in records] == [
        ("f8k/1000268201_693b08cb0e", "train",
         ["A child in a pink dress is climbing up a set of stairs in an entry way ."]),
        ("f8k/1007129816_e794419615", "val", ["A man in an orange hat starring at something ."]),
    ]
    assert records[0].path == str((root / "1000268201_693b08cb0e.jpg").resolve())  # no filepath
    assert records[0].extra == {"native_id": "1000268201_693b08cb0e"}
    assert reasons(rejects) == [
        ("empty caption", None, "f8k/1000268201_693b08cb0e"),
        ("malformed row", None, "f8k/1001773457_577c3a7d70"),
        ("malformed row", None, "f8k/1002674143_1b742ab4b8"),
        ("empty caption", None, "f8k/1002674143_1b742ab4b8"),
        ("duplicate id", None, "f8k/1000268201_693b08cb0e"),
        ("malformed row", None, "f8k/1003163366_44323f5815"),
        ("malformed row", None, "images[5]"),
        ("no valid captions", None, "f8k/1002674143_1b742ab4b8"),
    ]
    msgs = [r.reason for r in rejects.items]
    assert msgs[0] == "empty caption: sentence 1"
    assert msgs[1] == "malformed row: unknown split 'dev' (expected train, val, test or restval)"
    assert msgs[2] == "malformed row: sentence 10 has no 'raw'"
    assert msgs[5] == "malformed row: 'sentences' is missing or not a list"


def test_karpathy_whole_file_errors(tmp_path):
    ann = tmp_path / "dataset_coco.json"
    ann.write_text('{"dataset": "coco"}')
    with pytest.raises(AnnotationFileError, match=r"dataset_coco\.json: missing top-level key 'images'$"):
        import_karpathy(KarpathySource(annotations=ann, images=tmp_path), RejectsReport())
    coco = write_json(tmp_path / "captions_val2017.json",
                      {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []})
    with pytest.raises(AnnotationFileError, match="looks like a COCO captions file"):
        import_karpathy(KarpathySource(annotations=coco, images=tmp_path), RejectsReport())
    bad = tmp_path / "dataset_flickr30k.json"
    bad.write_text('{"images": [\n{"filename": "a.jpg",}\n]}')
    with pytest.raises(AnnotationFileError) as exc:
        import_karpathy(KarpathySource(annotations=bad, images=tmp_path), RejectsReport())
    assert str(exc.value) == f"{bad}:2:22: invalid JSON: Expecting property name enclosed in double quotes"


# --------------------------------------------------------------------------- Flickr8k
F8K_IMAGES = ["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg", "1002674143_1b742ab4b8.jpg"]
F8K_CAPTIONS = {
    "1000268201_693b08cb0e.jpg": ["A child in a pink dress is climbing up a set of stairs in an entry way .",
                                  "A girl going into a wooden building ."],
    "1001773457_577c3a7d70.jpg": ["A black dog and a spotted dog are fighting",
                                  "Two dogs, one black and one spotted, play on the road ."],
    "1002674143_1b742ab4b8.jpg": ['A little girl covered in paint sits in front of a "painted" rainbow .'],
}


def f8k_images(tmp_path: Path) -> Path:
    root = tmp_path / "Flicker8k_Dataset"
    for i, name in enumerate(F8K_IMAGES):
        jpeg(root / name, color=(40 * i, 100, 200))
    return root


def write_kaggle(path: Path, rows: list[tuple[str, str]]) -> Path:
    import csv

    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)  # quotes captions holding commas or quotes, like pandas
        w.writerow(["image", "caption"])
        w.writerows(rows)
    return path


def write_token(path: Path, rows: list[tuple[str, str]]) -> Path:
    counts: dict[str, int] = {}
    lines = []
    for name, cap in rows:
        n = counts.get(name, 0)
        counts[name] = n + 1
        lines.append(f"{name}#{n}\t{cap}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def f8k_rows() -> list[tuple[str, str]]:
    return [(name, cap) for name, caps in F8K_CAPTIONS.items() for cap in caps]


def test_flickr8k_both_forms_give_the_same_records(tmp_path):
    root = f8k_images(tmp_path)
    kaggle = write_kaggle(tmp_path / "captions.txt", f8k_rows())
    assert '"Two dogs, one black and one spotted, play on the road ."' in kaggle.read_text()
    token = write_token(tmp_path / "Flickr8k.token.txt", f8k_rows())
    results = []
    for captions in (kaggle, token):
        rejects = RejectsReport()
        results.append(import_flickr8k(Flickr8kSource(captions=captions, images=root), rejects))
        assert len(rejects) == 0
    assert results[0] == results[1]
    records = results[0]
    assert [r.image_id for r in records] == ["flickr8k/" + Path(n).stem for n in F8K_IMAGES]
    for rec, name in zip(records, F8K_IMAGES):
        assert rec.captions == F8K_CAPTIONS[name]
        assert rec.path == str((root / name).resolve())
        assert rec.split == "train" and rec.extra == {"native_id": Path(name).stem, "needs_split": True}
        assert rec.source == "flickr8k"


def test_flickr8k_split_lists(tmp_path):
    root = f8k_images(tmp_path)
    token = write_token(tmp_path / "Flickr8k.token.txt", f8k_rows())
    lists = tmp_path / "Flickr8k_text"
    lists.mkdir()
    (lists / "Flickr_8k.trainImages.txt").write_text("1000268201_693b08cb0e.jpg\n")
    (lists / "Flickr_8k.devImages.txt").write_text("1001773457_577c3a7d70.jpg\n")
    (lists / "Flickr_8k.testImages.txt").write_text("3637013_c675de7705.jpg\n")  # 1002674143 is in no list
    rejects = RejectsReport()
    records = import_flickr8k(Flickr8kSource(captions=token, images=root, split_lists=lists), rejects)
    assert [(r.image_id, r.split, r.extra) for r in records] == [
        ("flickr8k/1000268201_693b08cb0e", "train", {"native_id": "1000268201_693b08cb0e"}),
        ("flickr8k/1001773457_577c3a7d70", "val", {"native_id": "1001773457_577c3a7d70"}),  # dev -> val
    ]
    assert [(r.reason, r.line, r.id, r.file) for r in rejects.items] == [
        ("not in any split list", 5, "flickr8k/1002674143_1b742ab4b8", str(token)),
    ]


def test_flickr8k_split_list_folder_errors(tmp_path):
    root = f8k_images(tmp_path)
    token = write_token(tmp_path / "Flickr8k.token.txt", f8k_rows())
    with pytest.raises(AnnotationFileError, match="split list folder not found"):
        import_flickr8k(Flickr8kSource(captions=token, images=root, split_lists=tmp_path / "nope"), RejectsReport())
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnnotationFileError, match="no split lists found"):
        import_flickr8k(Flickr8kSource(captions=token, images=root, split_lists=tmp_path / "empty"), RejectsReport())
    (tmp_path / "empty" / "Flickr_8k.devImages.txt").write_text("")
    with pytest.raises(AnnotationFileError, match=r"Flickr_8k\.devImages\.txt: empty file$"):
        import_flickr8k(Flickr8kSource(captions=token, images=root, split_lists=tmp_path / "empty"), RejectsReport())


def test_flickr8k_token_bad_lines(tmp_path):
    root = f8k_images(tmp_path)
    token = tmp_path / "Flickr8k.token.txt"
    token.write_bytes(b"\n".join([
        b"1000268201_693b08cb0e.jpg#0\tA child in a pink dress .",
        b"1000268201_693b08cb0e.jpg#0\tThe same comment number again .",     # 2 duplicate id
        b"1000268201_693b08cb0e.jpg#x\tNot a number .",                      # 3 malformed
        b"1000268201_693b08cb0e.jpg#1 no tab here",                          # 4 malformed
        b"1001773457_577c3a7d70.jpg#0\t   ",                                 # 5 empty caption
        b"",                                                                 # blank: skipped
        b"2258277193_586949ec62.jpg.1#0\tA dog on the beach .",              # 7 the real file's stray name
        b"1002674143_1b742ab4b8.jpg#0\tbad byte \xff here",                  # 8 not UTF-8
    ]) + b"\n")
    rejects = RejectsReport()
    records = import_flickr8k(Flickr8kSource(captions=token, images=root), rejects)
    assert [(r.image_id, r.captions) for r in records] == [("flickr8k/1000268201_693b08cb0e", ["A child in a pink dress ."])]
    assert reasons(rejects) == [
        ("duplicate id", 2, "flickr8k/1000268201_693b08cb0e"),
        ("malformed row", 3, "flickr8k/1000268201_693b08cb0e"),
        ("malformed row", 4, None),
        ("empty caption", 5, "flickr8k/1001773457_577c3a7d70"),
        ("malformed row", 8, "flickr8k/1002674143_1b742ab4b8"),
        ("no valid captions", 5, "flickr8k/1001773457_577c3a7d70"),
        ("no valid captions", 8, "flickr8k/1002674143_1b742ab4b8"),
        ("missing image file", None, "flickr8k/2258277193_586949ec62.jpg"),
    ]
    msgs = [r.reason for r in rejects.items]
    assert msgs[0] == "duplicate id: 1000268201_693b08cb0e.jpg#0 already on line 1"
    assert msgs[1] == "malformed row: comment number 'x' is not an integer"
    assert msgs[2] == "malformed row: expected 'name.jpg#N<TAB>caption'"
    assert msgs[4] == "malformed row: caption is not valid UTF-8"
    assert rejects.items[7].file == str((root / "2258277193_586949ec62.jpg.1").resolve())


def test_flickr8k_kaggle_bad_rows(tmp_path):
    root = f8k_images(tmp_path)
    caps = tmp_path / "captions.txt"
    caps.write_text(
        "image,caption\n"
        "1000268201_693b08cb0e.jpg,A child in a pink dress .\n"
        "1000268201_693b08cb0e.jpg,unquoted, comma\n"           # 3: three columns
        '1001773457_577c3a7d70.jpg,"a quoted\ncaption over two lines"\n'  # 4-5: one row
        "1001773457_577c3a7d70.jpg,\n"                          # 6: empty caption
        ",no image\n",                                           # 7
        encoding="utf-8",
    )
    rejects = RejectsReport()
    records = import_flickr8k(Flickr8kSource(captions=caps, images=root), rejects)
    assert [(r.image_id, r.captions) for r in records] == [
        ("flickr8k/1000268201_693b08cb0e", ["A child in a pink dress ."]),
        ("flickr8k/1001773457_577c3a7d70", ["a quoted caption over two lines"]),
    ]
    assert reasons(rejects) == [
        ("malformed row", 3, "flickr8k/1000268201_693b08cb0e"),
        ("empty caption", 6, "flickr8k/1001773457_577c3a7d70"),
        ("malformed row", 7, None),
    ]
    assert rejects.items[0].reason == "malformed row: expected 2 columns (image,caption), got 3"


def test_flickr8k_unknown_format(tmp_path):
    caps = tmp_path / "captions.txt"
    caps.write_text("filename,text\na.jpg,a dog\n")
    with pytest.raises(AnnotationFileError) as exc:
        import_flickr8k(Flickr8kSource(captions=caps, images=tmp_path), RejectsReport())
    assert str(exc.value).startswith(f"{caps}:1: not a Flickr8k captions file: expected a header 'image,caption'")
    caps.write_text("")
    with pytest.raises(AnnotationFileError, match=r"captions\.txt: empty file$"):
        import_flickr8k(Flickr8kSource(captions=caps, images=tmp_path), RejectsReport())


# --------------------------------------------------------------------------- Flickr30k
def test_flickr30k(tmp_path):
    root = tmp_path / "flickr30k_images"
    jpeg(root / "1000092795.jpg")
    jpeg(root / "10002456.jpg")
    jpeg(root / "2199200615.jpg")
    results = tmp_path / "results.csv"
    results.write_text(
        "image_name| comment_number| comment\n"
        "1000092795.jpg| 0| Two young guys with shaggy hair look at their hands while hanging out in the yard .\n"
        "1000092795.jpg| 1| Two young , White males are outside near many bushes .\n"
        "10002456.jpg| 0| Several men in hard hats are operating a giant pulley system .\n"
        "10002456.jpg| 1| A sign reads | open | today .\n"
        "2199200615.jpg| 4 A dog runs across the grass .\n"         # 6: the real file's missing '|'
        "2199200615.jpg| four| A dog .\n"                            # 7: not an integer
        "10002456.jpg| 0| The same comment number again .\n"        # 8: duplicate
        "1000092795.jpg| 2|   \n",                                  # 9: empty caption
        encoding="utf-8",
    )
    rejects = RejectsReport()
    records = import_flickr30k(Flickr30kSource(captions=results, images=root), rejects)
    assert [(r.image_id, r.captions, r.split, r.extra) for r in records] == [
        ("flickr30k/1000092795", ["Two young guys with shaggy hair look at their hands while hanging out in the yard .",
                                  "Two young , White males are outside near many bushes ."],
         "train", {"native_id": "1000092795", "needs_split": True}),
        ("flickr30k/10002456", ["Several men in hard hats are operating a giant pulley system .",
                                "A sign reads | open | today ."],
         "train", {"native_id": "10002456", "needs_split": True}),
    ]
    assert records[0].path == str((root / "1000092795.jpg").resolve())
    assert reasons(rejects) == [
        ("malformed row", 6, "flickr30k/2199200615"),
        ("malformed row", 7, "flickr30k/2199200615"),
        ("duplicate id", 8, "flickr30k/10002456"),
        ("empty caption", 9, "flickr30k/1000092795"),
    ]
    assert rejects.items[0].reason == "malformed row: expected 3 '|'-separated columns, got 2"
    assert rejects.items[1].reason == "malformed row: comment number 'four' is not an integer"
    assert rejects.items[2].reason == "duplicate id: 10002456.jpg#0 already on line 4"


def test_flickr30k_missing_header(tmp_path):
    results = tmp_path / "results.csv"
    results.write_text("image| caption\n1000092795.jpg| 0| Two guys .\n")
    with pytest.raises(AnnotationFileError) as exc:
        import_flickr30k(Flickr30kSource(captions=results, images=tmp_path), RejectsReport())
    assert str(exc.value) == (f"{results}:1: missing header 'image_name| comment_number| comment' "
                              "(Flickr30k results.csv), got 'image| caption'")


# --------------------------------------------------------------------------- tables
INSTA = [
    "Sunset vibes 🌅🔥 #nofilter #goldenhour",
    "Família reunida ❤️ 👨‍👩‍👧‍👦 — melhor domingo!",
    "東京の夜景 ✨ #tokyo @friend",
    "¡Qué día! 👍🏽 \"quoted\", with commas",
]


def test_table_csv_merges_rows_and_keeps_emoji(tmp_path):
    import csv

    posts = tmp_path / "posts"
    jpeg(posts / "p1.jpg")
    jpeg(posts / "sub" / "p2.jpg")
    table = tmp_path / "posts.csv"
    with open(table, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["likes", "image", "caption"])
        w.writerow(["10", "posts/p1.jpg", INSTA[0]])
        w.writerow(["3", "posts/sub/p2.jpg", INSTA[2]])
        w.writerow(["7", "posts/p1.jpg", INSTA[1] + "\n  second line  "])
        w.writerow(["1", "./posts/p1.jpg", INSTA[3]])  # same file, spelled differently
    rejects = RejectsReport()
    records = import_table(TableSource(name="insta", path=table), rejects)
    assert len(rejects) == 0
    assert [(r.image_id, r.captions) for r in records] == [
        ("insta/posts/p1.jpg", [INSTA[0], INSTA[1] + " second line", INSTA[3]]),
        ("insta/posts/sub/p2.jpg", [INSTA[2]]),
    ]
    assert records[0].path == str((posts / "p1.jpg").resolve())  # relative to the table's folder
    assert records[0].extra == {"native_id": "posts/p1.jpg", "needs_split": True}
    # Round trip through the manifest's JSON keeps every character.
    assert ManifestRecord.from_dict(json.loads(records[0].to_json())).captions == records[0].captions


def test_table_jsonl_images_root_split_column_and_bad_rows(tmp_path):
    root = tmp_path / "media"
    jpeg(root / "a.jpg")
    jpeg(root / "b.jpg")
    jpeg(root / "c.jpg")
    table = tmp_path / "meta" / "table.jsonl"
    table.parent.mkdir()
    rows = [
        {"file": "a.jpg", "text": INSTA[0], "part": "train"},        # 1
        {"file": "b.jpg", "text": INSTA[2], "part": "dev"},          # 2 dev -> val
        '{"file": "a.jpg", "text": "broken"',                        # 3 invalid JSON
        {"file": "a.jpg"},                                           # 4 missing key
        {"file": "a.jpg", "text": INSTA[1], "part": ""},             # 5 blank split inherits
        {"file": "a.jpg", "text": "other split", "part": "test"},    # 6 conflicting split
        {"file": "c.jpg", "text": "odd split", "part": "holdout"},   # 7 unknown split
        ["not", "an", "object"],                                     # 8
        {"file": "b.jpg", "text": None, "part": "val"},              # 9 empty caption
        {"file": "b.jpg", "text": 42, "part": "val"},                # 10 not a string
    ]
    table.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                     encoding="utf-8")
    cfg = TableSource(path=table, images=root, image_column="file", caption_column="text", split_column="part")
    rejects = RejectsReport()
    records = import_table(cfg, rejects)
    assert [(r.image_id, r.split, r.captions, r.extra) for r in records] == [
        ("table/a.jpg", "train", [INSTA[0], INSTA[1]], {"native_id": "a.jpg"}),
        ("table/b.jpg", "val", [INSTA[2]], {"native_id": "b.jpg"}),
    ]
    assert records[1].path == str((root / "b.jpg").resolve())
    assert reasons(rejects) == [
        ("malformed row", 3, None),
        ("malformed row", 4, None),
        ("malformed row", 6, "table/a.jpg"),
        ("malformed row", 7, "table/c.jpg"),
        ("malformed row", 8, None),
        ("empty caption", 9, "table/b.jpg"),
        ("malformed row", 10, "table/b.jpg"),
    ]
    msgs = [r.reason for r in rejects.items]
    assert msgs[0].startswith("malformed row: invalid JSON: Expecting ',' delimiter")
    assert msgs[1] == "malformed row: missing key 'text'"
    assert msgs[2] == "malformed row: split 'test' conflicts with 'train' given earlier"
    assert msgs[3] == "malformed row: unknown split 'holdout'"
    assert msgs[4] == "malformed row: not a JSON object (list)"
    assert msgs[6] == "malformed row: caption is not a string (int)"


def test_table_csv_bad_rows_missing_images_and_no_valid_captions(tmp_path):
    jpeg(tmp_path / "ok.jpg")
    (tmp_path / "zero.jpg").write_bytes(b"")
    table = tmp_path / "t.csv"
    table.write_text(
        "image,caption\n"
        "ok.jpg,fine 🙂\n"
        "ok.jpg,too,many\n"        # 3
        "gone.jpg,missing file\n"  # 4
        "zero.jpg,empty file\n"    # 5
        "ok.jpg\n"                 # 6: one column
        "blank.jpg,   \n",         # 7: only caption empty -> image rejected too
        encoding="utf-8",
    )
    rejects = RejectsReport()
    records = import_table(TableSource(path=table), rejects)
    assert [(r.image_id, r.captions) for r in records] == [("table/ok.jpg", ["fine 🙂"])]
    assert reasons(rejects) == [
        ("malformed row", 3, None),
        ("malformed row", 6, None),
        ("empty caption", 7, "table/blank.jpg"),
        ("no valid captions", 7, "table/blank.jpg"),
        ("missing image file", None, "table/gone.jpg"),
        ("empty file", None, "table/zero.jpg"),
    ]
    assert rejects.items[0].reason == "malformed row: expected 2 columns, got 3"


def test_table_tsv_keeps_quotes(tmp_path):
    jpeg(tmp_path / "x.jpg")
    table = tmp_path / "t.tsv"
    table.write_text('image\tcaption\nx.jpg\t"Best" day ever, 100% 🎉\n', encoding="utf-8")
    records = import_table(TableSource(path=table), RejectsReport())
    assert records[0].captions == ['"Best" day ever, 100% 🎉']


def test_table_whole_file_errors(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("img,caption\nx.jpg,hi\n")
    with pytest.raises(AnnotationFileError) as exc:
        import_table(TableSource(path=table), RejectsReport())
    assert str(exc.value) == f"{table}:1: missing required column 'image' (header: img, caption)"
    with pytest.raises(AnnotationFileError, match="missing required column 'split'"):
        import_table(TableSource(path=table, image_column="img", split_column="split"), RejectsReport())
    other = tmp_path / "t.xlsx"
    other.write_text("x")
    with pytest.raises(AnnotationFileError, match=r"unsupported table format '\.xlsx'"):
        import_table(TableSource(path=other), RejectsReport())
    notjson = tmp_path / "t.jsonl"
    notjson.write_text("image,caption\nx.jpg,hi\n")
    with pytest.raises(AnnotationFileError, match=r"t\.jsonl:1:1: not JSON Lines: no line is valid JSON"):
        import_table(TableSource(path=notjson), RejectsReport())
    wrong_keys = tmp_path / "w.jsonl"
    wrong_keys.write_text('\n{"img": "x.jpg", "text": "hi"}\n{"img": "y.jpg", "text": "yo"}\n')
    with pytest.raises(AnnotationFileError) as exc:
        import_table(TableSource(path=wrong_keys), RejectsReport())
    assert str(exc.value) == f"{wrong_keys}:2: no row has key 'image', 'caption' (keys of the first row: img, text)"
    blank_header = tmp_path / "b.csv"
    blank_header.write_text(" , \n")
    with pytest.raises(AnnotationFileError, match=r"b\.csv: no header row$"):
        import_table(TableSource(path=blank_header), RejectsReport())


# --------------------------------------------------------------------------- dispatch, workers, check modes
def test_import_source_dispatches_and_is_deterministic_across_workers(tmp_path):
    ann = coco_fixture(tmp_path)
    (tmp_path / "val2017" / "000000000285.jpg").write_bytes(b"")
    cfg = CocoSource(annotations=ann, images=tmp_path / "val2017")
    outs = []
    for workers in (1, 2, 4):
        rejects = RejectsReport()
        records = import_source(cfg, rejects, workers=workers)
        outs.append(([r.to_json() for r in records], [r.to_dict() for r in rejects.items]))
    assert outs[0] == outs[1] == outs[2]
    assert [json.loads(r)["image_id"] for r in outs[0][0]] == ["coco/139", "coco/42"]
    assert [r["reason"] for r in outs[0][1]] == ["empty file: zero bytes"]
    with pytest.raises(ValueError, match="no importer for source kind 'synthetic'"):
        import_source(SyntheticSource(), RejectsReport())
    with pytest.raises(ValueError, match="check_images"):
        import_source(cfg, RejectsReport(), check_images="fast")


def test_check_images_mode_is_passed_on(tmp_path):
    jpeg(tmp_path / "ok.jpg")
    truncated_jpeg(tmp_path / "half.jpg")
    table = tmp_path / "t.csv"
    table.write_text("image,caption\nok.jpg,a\nhalf.jpg,b\n")
    full = RejectsReport()
    assert [r.image_id for r in import_source(TableSource(path=table), full, check_images="full")] == ["table/ok.jpg"]
    assert reasons(full) == [("truncated image", None, "table/half.jpg")]
    header = RejectsReport()  # a header check does not decode the pixels, so the cut goes unseen
    records = import_source(TableSource(path=table), header, check_images="header")
    assert [r.image_id for r in records] == ["table/half.jpg", "table/ok.jpg"] and len(header) == 0


@pytest.mark.parametrize("check", ["full", "header", "none"])
def test_import_limits_are_passed_on(tmp_path, check):
    jpeg(tmp_path / "ok.jpg", size=(8, 8))
    jpeg(tmp_path / "wide.jpg", size=(40, 8))
    (tmp_path / "big.jpg").write_bytes(b"\xff" * 5000)
    table = tmp_path / "t.csv"
    table.write_text("image,caption\nok.jpg,short\nok.jpg,a caption of thirty characters\nwide.jpg,x\nbig.jpg,y\n")
    rejects = RejectsReport()
    limits = ImportLimits(max_file_bytes=4000, max_pixels=100, max_caption_chars=20)
    records = import_source(TableSource(path=table), rejects, check_images=check, limits=limits)
    assert [(r.image_id, r.captions) for r in records] == [("table/ok.jpg", ["short"])] + (
        [("table/wide.jpg", ["x"])] if check == "none" else [])  # the pixels are read from the header
    expected = [("caption too long: 30 characters > max_caption_chars 20", 3, "table/ok.jpg"),
                ("file too large: 5,000 bytes > max_file_bytes 4,000", None, "table/big.jpg")]
    if check != "none":
        expected.append(("image too large: 40x8 = 320 pixels > max_pixels 100", None, "table/wide.jpg"))
    assert [(r.reason, r.line, r.id) for r in rejects.items] == expected


@pytest.mark.parametrize("text,found", [
    ("a plain caption", None), ("un café à Paris", None), ("\u0645\u0631\u062d\u0628\u0627", None),
    ("\U0001F468\u200d\U0001F469\u200d\U0001F467 family", None),  # joiners of an emoji sequence: kept
    ("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", None),  # Persian with a zero-width non-joiner
    ("abc\u202edef", "\u202e"), ("\u2066x\u2069", "\u2066"), ("\u2067x", "\u2067"), ("\u2068x", "\u2068"),
    ("x\u2069", "\u2069"), ("zero\u200bwidth", "\u200b"), ("\u200fmark", "\u200f"), ("bom\ufeff", "\ufeff"),
    ("soft\u00adhyphen", "\u00ad"), ("word\u2060joiner", "\u2060"), ("tag\U000e0069", "\U000e0069"),
])
def test_invisible_characters(text, found):
    assert invisible_character(text) == found


def test_flickr8k_image_in_two_split_lists_and_same_stem(tmp_path):
    root = f8k_images(tmp_path)
    jpeg(root / "1000268201_693b08cb0e.png")
    rows = f8k_rows() + [("1000268201_693b08cb0e.png", "Same stem, other file .")]
    caps = write_kaggle(tmp_path / "captions.txt", rows)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "Flickr_8k.trainImages.txt").write_text("1000268201_693b08cb0e.jpg\n1002674143_1b742ab4b8.jpg\n")
    (lists / "Flickr_8k.devImages.txt").write_text("1001773457_577c3a7d70.jpg\n")
    (lists / "Flickr_8k.testImages.txt").write_text("1002674143_1b742ab4b8.jpg\n")  # also in train
    rejects = RejectsReport()
    records = import_flickr8k(Flickr8kSource(captions=caps, images=root, split_lists=lists), rejects)
    assert [(r.image_id, r.split) for r in records] == [
        ("flickr8k/1000268201_693b08cb0e", "train"),
        ("flickr8k/1001773457_577c3a7d70", "val"),
        ("flickr8k/1002674143_1b742ab4b8", "train"),  # the first list wins; the repeat is rejected
    ]
    assert [(r.reason, r.line, r.id, Path(r.file).name) for r in rejects.items] == [
        ("duplicate id: '1000268201_693b08cb0e.png' has the same id as '1000268201_693b08cb0e.jpg' (line 2)",
         7, "flickr8k/1000268201_693b08cb0e", "captions.txt"),
        ("duplicate id: 1002674143_1b742ab4b8.jpg already listed in Flickr_8k.trainImages.txt:2 (train)",
         1, "flickr8k/1002674143_1b742ab4b8", "Flickr_8k.testImages.txt"),
    ]


def test_table_csv_with_byte_order_mark(tmp_path):
    jpeg(tmp_path / "x.jpg")
    table = tmp_path / "excel.csv"
    table.write_bytes("image,caption\r\nx.jpg,Olá 👋\r\n".encode("utf-8-sig"))
    rejects = RejectsReport()
    records = import_table(TableSource(path=table), rejects)
    assert len(rejects) == 0 and records[0].captions == ["Olá 👋"]


def test_undecodable_bytes_are_rejected_and_the_report_stays_writable(tmp_path):
    root = f8k_images(tmp_path)
    token = tmp_path / "Flickr8k.token.txt"
    token.write_bytes(b"1000268201_693b08cb0e.jpg#0\tfine .\n"
                      b"caf\xe9.jpg#0\ta latin-1 file name .\n")
    rejects = RejectsReport()
    records = import_flickr8k(Flickr8kSource(captions=token, images=root), rejects)
    assert [r.image_id for r in records] == ["flickr8k/1000268201_693b08cb0e"]
    assert [(r.reason, r.line, r.id) for r in rejects.items] == [
        ("malformed row: image name is not valid UTF-8", 2, "flickr8k/caf\\udce9"),
    ]
    rejects.write(tmp_path / "rejects.jsonl")  # no UnicodeEncodeError
    assert RejectsReport.read(tmp_path / "rejects.jsonl")[0]["id"] == "flickr8k/caf\\udce9"


# --------------------------------------------------------------------------- the `split` option of every source
def karpathy_fixture(root: Path) -> Path:
    """Four images, one per Karpathy split (restval included)."""
    entries = []
    for i, split in enumerate(("train", "restval", "val", "test")):
        jpeg(root / "imgs" / f"k{i}.jpg", color=(10 * i, 20, 30))
        entries.append({"filename": f"k{i}.jpg", "filepath": "imgs", "split": split,
                        "sentences": [{"raw": f"karpathy image {i}", "sentid": i}]})
    return write_json(root / "dataset_coco.json", {"dataset": "coco", "images": entries})


@pytest.mark.parametrize("split, expected, needs_split", [
    ("auto", {"karpathy/k0": "train", "karpathy/k1": "train", "karpathy/k2": "val", "karpathy/k3": "test"}, False),
    ("test", dict.fromkeys(["karpathy/k0", "karpathy/k1", "karpathy/k2", "karpathy/k3"], "test"), False),
    ("seeded", dict.fromkeys(["karpathy/k0", "karpathy/k1", "karpathy/k2", "karpathy/k3"], "train"), True),
])
def test_karpathy_split_option(tmp_path, split, expected, needs_split):
    ann = karpathy_fixture(tmp_path)
    records = import_karpathy(KarpathySource(annotations=ann, images=tmp_path, split=split), RejectsReport())
    assert {r.image_id: r.split for r in records} == expected
    assert [r.extra.get("needs_split", False) for r in records] == [needs_split] * 4
    assert records[1].extra["karpathy_split"] == "restval"  # the file's own split stays on record


def test_flickr_and_table_split_option(tmp_path):
    jpeg(tmp_path / "a.jpg")
    jpeg(tmp_path / "b.jpg", color=(1, 2, 3))
    results = tmp_path / "results.csv"
    results.write_text("image_name| comment_number| comment\na.jpg| 0| one\nb.jpg| 0| two\n")
    val = import_flickr30k(Flickr30kSource(captions=results, images=tmp_path, split="val"), RejectsReport())
    assert [(r.split, r.extra) for r in val] == [("val", {"native_id": "a"}), ("val", {"native_id": "b"})]
    caps = tmp_path / "captions.txt"
    caps.write_text("image,caption\na.jpg,one\nb.jpg,two\n")
    train = import_flickr8k(Flickr8kSource(captions=caps, images=tmp_path, split="train"), RejectsReport())
    assert [r.split for r in train] == ["train", "train"] and not any("needs_split" in r.extra for r in train)
    table = tmp_path / "t.csv"
    table.write_text("image,caption\na.jpg,one\nb.jpg,two\n")
    test = import_table(TableSource(path=table, split="test"), RejectsReport())
    assert [r.split for r in test] == ["test", "test"]
    seeded = import_table(TableSource(path=table, split="seeded"), RejectsReport())
    assert [r.extra.get("needs_split") for r in seeded] == [True, True]


def test_split_option_values_are_checked():
    from pydantic import ValidationError

    for kind in (SyntheticSource, CocoSource, KarpathySource, Flickr8kSource, Flickr30kSource, TableSource):
        assert kind.model_fields["split"].default == "auto", kind.__name__
    with pytest.raises(ValidationError, match=r"split\n.*'auto', 'train', 'val', 'test' or 'seeded'"):
        CocoSource(annotations="a.json", images="imgs", split="holdout")
    with pytest.raises(ValidationError, match="split_lists and split 'seeded' both say where the images go"):
        Flickr8kSource(captions="c.txt", images="imgs", split_lists="lists", split="seeded")
    with pytest.raises(ValidationError, match="split_column and split 'train' both say where the images go"):
        TableSource(path="t.csv", split_column="part", split="train")
    TableSource(path="t.csv", split_column="part", split="auto")  # auto uses the column


def test_full_check_records_file_and_pixel_digests(tmp_path):
    import hashlib

    from pipeline.data.importers import pixels_sha256

    jpeg(tmp_path / "a.jpg", color=(5, 6, 7), size=(9, 4))
    table = tmp_path / "t.csv"
    table.write_text("image,caption\na.jpg,one\n")
    (full,) = import_table(TableSource(path=table), RejectsReport(), check_images="full")
    assert full.sha256 == hashlib.sha256((tmp_path / "a.jpg").read_bytes()).hexdigest()
    with Image.open(tmp_path / "a.jpg") as img:
        pixels = np.asarray(img.convert("RGB"))
    assert full.pixels_sha256 == hashlib.sha256(b"9x4x3:" + pixels.tobytes()).hexdigest()
    assert full.pixels_sha256 == pixels_sha256(Image.fromarray(pixels))
    assert "pixels_sha256" not in full.to_json() and full.sha256 in full.to_json()
    (header,) = import_table(TableSource(path=table), RejectsReport(), check_images="header")
    assert header.sha256 is None and header.pixels_sha256 is None  # prepare hashes these itself
