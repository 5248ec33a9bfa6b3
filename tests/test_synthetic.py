"""The built-in synthetic dataset: determinism, richness, captions true of the pixels, the noisy variant."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.manifest import ManifestRecord, read_manifest, write_manifest
from pipeline.data.synthetic import (
    COLOURS,
    SHAPE_PLURALS,
    SHAPES,
    TEMPLATE_NAMES,
    VOCABULARY,
    Background,
    Scene,
    SceneObject,
    SyntheticResult,
    describe,
    describe_tagged,
    generate_synthetic,
    layout_of,
    render_scene,
    sample_scene,
)

N_CLEAN, N_NOISY = 300, 120
PLURAL_TO_SHAPE = {p: s for s, p in SHAPE_PLURALS.items()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, SyntheticResult]:
    out = tmp_path_factory.mktemp("syn")
    return out, generate_synthetic(out, num_images=N_CLEAN, noisy_images=N_NOISY, image_size=128, seed=7,
                                   progress=False)


def scene_of(rec: ManifestRecord) -> Scene:
    return Scene.from_dict(rec.extra)


def words(caption: str) -> list[str]:
    return caption.split()


def named_objects(caption: str) -> list[tuple[str | None, str, str]]:
    """(size or None, colour, shape) for every 'colour shape(s)' phrase of a caption."""
    ws = words(caption)
    found = []
    for k in range(len(ws) - 1):
        if ws[k] in COLOURS:
            nxt = ws[k + 1]
            shape = nxt if nxt in SHAPES else PLURAL_TO_SHAPE.get(nxt)
            assert shape is not None, f"colour not followed by a shape in {caption!r}"
            size = {"large": "large", "big": "large", "small": "small", "little": "small"}.get(ws[k - 1]) if k else None
            found.append((size, ws[k], shape))
    return found


def counts_stated(caption: str) -> list[tuple[int, str, str]]:
    """(n, colour, shape) for every 'two|three [size] colour shapes' in a caption."""
    out = []
    for m in re.finditer(r"\b(two|three) (?:(?:large|small|big|little) )?(\w+) (\w+)s\b", caption):
        out.append(({"two": 2, "three": 3}[m.group(1)], m.group(2), m.group(3)))
    return [c for c in out if c[1] in COLOURS]


# --------------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_bytes_captions_and_labels(tmp_path):
    a = generate_synthetic(tmp_path / "a", num_images=20, noisy_images=8, seed=3, progress=False)
    b = generate_synthetic(tmp_path / "b", num_images=20, noisy_images=8, seed=3, progress=False)
    assert [r.to_json() for r in a.records] == [r.to_json() for r in b.records]
    assert [r.to_json() for r in a.noisy_records] == [r.to_json() for r in b.noisy_records]
    assert a.noisy_labels == b.noisy_labels
    for rec in a.records + a.noisy_records:
        assert (tmp_path / "a" / rec.path).read_bytes() == (tmp_path / "b" / rec.path).read_bytes()


def test_prefix_property_image_i_depends_only_on_seed_and_i(tmp_path):
    big = generate_synthetic(tmp_path / "big", num_images=24, noisy_images=10, seed=5, progress=False)
    small = generate_synthetic(tmp_path / "small", num_images=9, noisy_images=3, seed=5, progress=False)
    assert [r.to_json() for r in small.records] == [r.to_json() for r in big.records[:9]]
    assert [r.to_json() for r in small.noisy_records] == [r.to_json() for r in big.noisy_records[:3]]
    small_ids = {r.image_id for r in small.noisy_records}
    assert small.noisy_labels == [lab for lab in big.noisy_labels if lab["image_id"] in small_ids]
    for rec in small.records + small.noisy_records:
        assert (tmp_path / "small" / rec.path).read_bytes() == (tmp_path / "big" / rec.path).read_bytes()


def test_other_seed_gives_other_images(tmp_path):
    a = generate_synthetic(tmp_path / "a", num_images=6, noisy_images=0, seed=1, progress=False)
    b = generate_synthetic(tmp_path / "b", num_images=6, noisy_images=0, seed=2, progress=False)
    assert [r.captions for r in a.records] != [r.captions for r in b.records]
    assert all((tmp_path / "a" / r.path).read_bytes() != (tmp_path / "b" / r.path).read_bytes() for r in a.records)


def test_overwrites_existing_files(tmp_path):
    generate_synthetic(tmp_path, num_images=2, noisy_images=0, seed=0, progress=False)
    first = (tmp_path / "images/syn-000001.png").read_bytes()
    (tmp_path / "images/syn-000001.png").write_bytes(b"garbage")
    generate_synthetic(tmp_path, num_images=2, noisy_images=0, seed=0, progress=False)
    assert (tmp_path / "images/syn-000001.png").read_bytes() == first


# --------------------------------------------------------------------------- records and files
def test_records_files_and_manifest_round_trip(dataset, tmp_path):
    out, res = dataset
    assert len(res.records) == N_CLEAN and len(res.noisy_records) == N_NOISY
    for i, rec in enumerate(res.records):
        assert rec.image_id == f"synthetic/{i:06d}"
        assert rec.path == f"images/syn-{i:06d}.png"
        assert rec.source == "synthetic" and rec.split == "train"
    for i, rec in enumerate(res.noisy_records):
        assert rec.image_id == f"synthetic-noisy/{i:06d}"
        assert rec.path == f"images/noisy-{i:06d}.png"
        assert rec.source == "synthetic-noisy" and rec.split == "train"
    for rec in res.records[:20] + res.noisy_records[:10]:
        assert not Path(rec.path).is_absolute()
        with Image.open(out / rec.path) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (128, 128)
            im.load()
            assert not im.info.get("dpi") and "Software" not in im.info  # no metadata
    manifest = out / "manifest.jsonl"
    write_manifest(manifest, res.records + res.noisy_records)
    back = read_manifest(manifest)
    assert [r.to_json() for r in back] == [r.to_json() for r in res.records + res.noisy_records]


def test_custom_name_and_size(tmp_path):
    res = generate_synthetic(tmp_path, num_images=2, noisy_images=1, image_size=64, name="toy", progress=False)
    assert [r.image_id for r in res.records] == ["toy/000000", "toy/000001"]
    assert res.noisy_records[0].image_id == "toy-noisy/000000" and res.noisy_records[0].source == "toy-noisy"
    with Image.open(tmp_path / res.records[0].path) as im:
        assert im.size == (64, 64)
    # scenes and captions do not depend on the image size
    res128 = generate_synthetic(tmp_path / "b", num_images=2, noisy_images=1, name="toy", progress=False)
    assert [r.captions for r in res.records] == [r.captions for r in res128.records]


# --------------------------------------------------------------------------- richness
def test_richness(dataset):
    _, res = dataset
    objects = [o for r in res.records for o in r.extra["objects"]]
    assert len({o["colour"] for o in objects}) >= 6
    assert len({o["shape"] for o in objects}) >= 4
    assert {o["size"] for o in objects} == {"small", "large"}
    assert {len(r.extra["objects"]) for r in res.records} == {1, 2, 3}
    assert len({r.extra["background"]["name"] for r in res.records}) >= 4
    layouts = Counter(r.extra["layout"] for r in res.records)
    assert set(layouts) == {"single", "pair_h", "pair_v", "twin_h", "twin_v", "two_top", "two_bottom"}
    captions = [c for r in res.records for c in r.captions]
    assert len({w for c in captions for w in words(c)}) >= 40
    assert len({t for r in res.records for t in r.extra["templates"]}) >= 20
    assert any(counts_stated(c) for c in captions)  # counts such as "two red circles" occur
    for rel in ("left of", "right of", "above", "below"):
        assert any(rel in c for c in captions), rel
    for pos in ("on the left", "on the right", "at the top", "at the bottom", "in the centre"):
        assert any(pos in c for c in captions), pos


def test_five_distinct_captions_from_distinct_templates(dataset):
    _, res = dataset
    for rec in res.records:
        assert len(rec.captions) == 5
        assert len(set(rec.captions)) == 5
        assert len(set(rec.extra["templates"])) == 5 and set(rec.extra["templates"]) <= set(TEMPLATE_NAMES)


def test_vocabulary_and_caption_form(dataset):
    _, res = dataset
    assert len(VOCABULARY) >= 40
    for rec in res.records:
        for c in rec.captions:
            assert c == c.lower() == c.strip() and "  " not in c
            assert 3 <= len(words(c)) <= 16, c
            assert set(words(c)) <= VOCABULARY, set(words(c)) - VOCABULARY


# --------------------------------------------------------------------------- captions agree with the scene
def test_captions_are_true_of_the_scene(dataset):
    _, res = dataset
    for rec in res.records:
        scene = scene_of(rec)
        kinds = Counter(o.kind for o in scene.objects)
        colour_shapes = Counter((o.colour, o.shape) for o in scene.objects)
        n = len(scene.objects)
        for c in rec.captions:
            for size, colour, shape in named_objects(c):
                assert (colour, shape) in colour_shapes, (c, rec.extra)
                if size is not None:
                    assert (size, colour, shape) in kinds, (c, rec.extra)
            for count, colour, shape in counts_stated(c):
                stated = sum(1 for o in scene.objects if (o.colour, o.shape) == (colour, shape))
                assert stated == count, (c, rec.extra)
            if "three" in words(c):
                assert n == 3, c
            if "background" in c:
                assert f"a {scene.background.name} background" in c
            if n == 1:
                o = scene.objects[0]
                assert o.colour in words(c) and o.shape in words(c), c
                assert "two" not in words(c) and "three" not in words(c)
            if n > 1:
                assert "single" not in words(c)


def test_single_object_captions_state_its_position_and_size():
    for pos, (x, y) in {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
                        "centre": (0.5, 0.5)}.items():
        scene = Scene(objects=(SceneObject("star", "orange", "small", x, y),))
        caps = describe(scene, np.random.default_rng(0), n=6)
        other = {"left", "right", "top", "bottom", "centre", "middle"} - {pos, "middle" if pos == "centre" else ""}
        for c in caps:
            assert "orange star" in c
            assert not set(words(c)) & other, c
            assert "large" not in words(c) and "big" not in words(c)
            if "background" not in c:
                assert pos in words(c) or (pos == "centre" and "middle" in words(c)), c


def test_spatial_relations_on_constructed_pairs():
    a = SceneObject("circle", "red", "large", 0.25, 0.52)
    b = SceneObject("square", "blue", "small", 0.74, 0.47)
    for objects in ((a, b), (b, a)):  # the geometry, not the listing order, decides
        scene = Scene(objects=objects)
        assert layout_of(scene) == "pair_h"
        caps = describe(scene, np.random.default_rng(1), n=6)
        seen = set()
        for c in caps:
            ia, ib = c.find("red circle"), c.find("blue square")
            assert ia >= 0 and ib >= 0, c
            if "left of" in c:
                assert ia < ib, c
                seen.add("left of")
            if "right of" in c:
                assert ib < ia, c
                seen.add("right of")
            if "on the left" in c:
                assert c.find("on the left") > ia and (c.find("on the right") > ib)
            assert "above" not in c and "below" not in c
        assert seen == {"left of", "right of"}
    top = SceneObject("triangle", "green", "small", 0.52, 0.26)
    bottom = SceneObject("star", "yellow", "large", 0.47, 0.75)
    scene = Scene(objects=(bottom, top))
    assert layout_of(scene) == "pair_v"
    seen = set()
    for c in describe(scene, np.random.default_rng(2), n=6):
        it, ib = c.find("green triangle"), c.find("yellow star")
        assert it >= 0 and ib >= 0
        for rel, first_is_top in (("above", True), ("over", True), ("below", False)):
            if f" {rel} " in c:
                assert (it < ib) == first_is_top, c
                seen.add(rel)
        assert "left" not in c and "right" not in c
    assert {"above", "below"} <= seen


def test_twins_and_triples_state_counts():
    twin = Scene(objects=(SceneObject("circle", "red", "large", 0.26, 0.5), SceneObject("circle", "red", "large", 0.74, 0.5)))
    assert layout_of(twin) == "twin_h"
    caps = describe(twin, np.random.default_rng(0), n=6)
    assert all("red circle" in c for c in caps)
    assert sum("two" in words(c) for c in caps) >= 4
    assert any("two large red circles" in c for c in caps)
    triple = Scene(objects=(SceneObject("square", "blue", "small", 0.26, 0.27),
                            SceneObject("square", "blue", "small", 0.74, 0.28),
                            SceneObject("diamond", "purple", "large", 0.5, 0.73)))
    assert layout_of(triple) == "two_top"
    caps = describe(triple, np.random.default_rng(0), n=6)
    assert "two small blue squares above a large purple diamond" in caps
    assert "a large purple diamond below two small blue squares" in caps
    assert "an image with two blue squares and a purple diamond" in caps
    flipped = Scene(objects=tuple(SceneObject(o.shape, o.colour, o.size, o.x, 1 - o.y) for o in triple.objects))
    assert layout_of(flipped) == "two_bottom"
    caps = describe(flipped, np.random.default_rng(0), n=6)
    assert "two small blue squares below a large purple diamond" in caps
    assert "a large purple diamond above two small blue squares" in caps


def test_scene_round_trips_through_extra(dataset):
    _, res = dataset
    for rec in res.records[:50]:
        scene = scene_of(rec)
        assert scene.to_dict()["objects"] == rec.extra["objects"]
        assert layout_of(scene) == rec.extra["layout"]


# --------------------------------------------------------------------------- pixels
def _nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda c: float(np.sum((np.asarray(COLOURS[c]) - rgb) ** 2)))


def test_pixels_show_the_object_colour_at_its_location(dataset):
    out, res = dataset
    for rec in res.records[:120]:
        arr = np.asarray(Image.open(out / rec.path).convert("RGB"), dtype=np.float32)
        S = arr.shape[0]
        for o in rec.extra["objects"]:
            cx, cy = int(o["x"] * S), int(o["y"] * S)
            patch = arr[cy - 1:cy + 2, cx - 1:cx + 2].reshape(-1, 3).mean(axis=0)
            assert np.abs(patch - np.asarray(COLOURS[o["colour"]])).max() < 35, (rec.image_id, o, patch)
            assert _nearest_colour(patch) == o["colour"]


def test_large_objects_cover_much_more_area_than_small_ones(dataset):
    out, res = dataset
    areas: dict[str, list[float]] = {"small": [], "large": []}
    for rec in res.records:
        if len(rec.extra["objects"]) != 1:
            continue
        o = rec.extra["objects"][0]
        arr = np.asarray(Image.open(out / rec.path).convert("RGB"), dtype=np.float32)
        close = np.abs(arr - np.asarray(COLOURS[o["colour"]])).max(axis=2) < 40
        areas[o["size"]].append(close.mean())
    assert len(areas["small"]) >= 10 and len(areas["large"]) >= 10
    assert min(areas["large"]) > max(areas["small"])
    assert np.mean(areas["large"]) > 3 * np.mean(areas["small"])


def test_noise_and_jitter(dataset):
    scene = Scene(objects=(SceneObject("triangle", "purple", "large", 0.5, 0.5, rotation=8.0),),
                  background=Background("gray", (150.0,)))
    a = np.asarray(render_scene(scene, 96, np.random.default_rng(1)), dtype=np.int16)
    b = np.asarray(render_scene(scene, 96, np.random.default_rng(2)), dtype=np.int16)
    again = np.asarray(render_scene(scene, 96, np.random.default_rng(1)), dtype=np.int16)
    assert a.shape == (96, 96, 3)
    assert (a == again).all()
    assert (a != b).mean() > 0.5  # pixel noise everywhere
    assert np.abs(a - b).mean() < 20  # ... but the same picture
    _, res = dataset
    singles_left = [r.extra["objects"][0] for r in res.records
                    if len(r.extra["objects"]) == 1 and r.extra["objects"][0]["x"] < 0.4]
    assert len({o["x"] for o in singles_left}) > 5 and len({o["y"] for o in singles_left}) > 5
    objs = [o for r in res.records for o in r.extra["objects"]]
    assert len({o["r"] for o in objs if o["size"] == "large"}) > 20
    assert len({o["rotation"] for o in objs if o["shape"] == "square"}) > 10


def test_sample_scene_is_deterministic_and_varied():
    s1 = sample_scene(np.random.default_rng([0, 0, 4]))
    s2 = sample_scene(np.random.default_rng([0, 0, 4]))
    assert s1 == s2
    scenes = [sample_scene(np.random.default_rng(k)) for k in range(200)]
    assert len({s.layout for s in scenes}) == 7
    assert len({s.background.name for s in scenes}) == 5


# --------------------------------------------------------------------------- the noisy social variant
def test_noisy_labels_align_with_captions(dataset):
    _, res = dataset
    by_image: dict[str, list[dict]] = {}
    for lab in res.noisy_labels:
        assert set(lab) == {"image_id", "caption_index", "match", "kind"}
        by_image.setdefault(lab["image_id"], []).append(lab)
    assert set(by_image) == {r.image_id for r in res.noisy_records}
    for rec in res.noisy_records:
        labs = by_image[rec.image_id]
        assert [lab["caption_index"] for lab in labs] == list(range(len(rec.captions)))
        assert 3 <= len(rec.captions) <= 5
        assert {lab["match"] for lab in labs} == {True, False}  # a mix in every image
        for lab in labs:
            assert lab["match"] == (lab["kind"] in ("clean", "decorated"))
        # the label is kept apart from the manifest row
        assert "match" not in rec.to_json() and "kind" not in rec.extra
    frac = np.mean([lab["match"] for lab in res.noisy_labels])
    assert 0.3 <= frac <= 0.7
    kinds = Counter(lab["kind"] for lab in res.noisy_labels)
    assert set(kinds) == {"clean", "decorated", "unrelated", "mismatched"}
    assert min(kinds.values()) >= 0.1 * len(res.noisy_labels)


def test_noisy_captions_are_true_or_false_as_labelled(dataset):
    _, res = dataset
    labels = {(lab["image_id"], lab["caption_index"]): lab for lab in res.noisy_labels}
    for rec in res.noisy_records:
        scene = scene_of(rec)
        present = {(o.colour, o.shape) for o in scene.objects}
        for j, cap in enumerate(rec.captions):
            lab = labels[(rec.image_id, j)]
            named = {(c, s) for _, c, s in named_objects(re.sub(r"[^\x00-\x7f]", " ", cap))}
            if lab["kind"] == "clean":
                assert set(words(cap)) <= VOCABULARY and named <= present, cap
            elif lab["kind"] == "decorated":
                assert "#" in cap or any(ord(ch) > 127 for ch in cap), cap
                assert named <= present, cap
            elif lab["kind"] == "mismatched":
                assert named and not named & present, (cap, rec.extra)  # describes a different scene
            else:  # unrelated social-media chatter: names no shape at all
                assert not named and not set(words(cap)) & set(SHAPES), cap


def test_noisy_ids_and_files_are_disjoint_from_clean(dataset):
    out, res = dataset
    clean_ids = {r.image_id for r in res.records}
    noisy_ids = {r.image_id for r in res.noisy_records}
    assert not clean_ids & noisy_ids
    assert not {r.path for r in res.records} & {r.path for r in res.noisy_records}
    # a different seed stream: noisy image i is not clean image i
    assert (out / res.noisy_records[0].path).read_bytes() != (out / res.records[0].path).read_bytes()
    assert [r.extra["objects"] for r in res.noisy_records[:20]] != [r.extra["objects"] for r in res.records[:20]]


def test_describe_tagged_uses_distinct_templates():
    scene = sample_scene(np.random.default_rng(11))
    tagged = describe_tagged(scene, np.random.default_rng(0), n=5)
    assert len({t for t, _ in tagged}) == 5
    assert [c for _, c in tagged] == describe(scene, np.random.default_rng(0), n=5)
    assert len(describe(scene, np.random.default_rng(0), n=8)) == 8
