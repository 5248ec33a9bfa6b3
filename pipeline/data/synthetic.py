"""The built-in synthetic world: the project's default dataset, rendered from a seed.

Each image shows 1-3 flat shapes on a plain, gradient or textured neutral
background, with pixel noise and position/size/rotation/colour jitter. Every
image gets five captions from different phrasings, all true of the image and all
built from the same visible facts (colour, shape, size, count, position,
relation), so a decoder can learn them from the pixels.

Layouts (the geometry decides which one a scene is, see :func:`layout_of`):

* ``single``   one object on the left/right/top/bottom or in the centre;
* ``pair_h``   two different objects side by side (``left of`` / ``right of``);
* ``pair_v``   two different objects one above the other (``above`` / ``below``);
* ``twin_h`` / ``twin_v``  two identical objects (``two red circles``);
* ``two_top`` / ``two_bottom``  three objects, a row of two above / below a single one.

Determinism: image ``i`` depends only on ``(seed, i)`` (its own
``numpy.random.default_rng([seed, stream, i])``), so a 100-image set is the
prefix of a 1000-image set, and the same call writes byte-identical PNGs.
Scenes and captions are drawn before rendering, so they do not depend on
``image_size`` either.

The *noisy social* variant (another seed stream, ids ``{name}-noisy/...``) pairs
each image with a few captions, roughly half matching (plain or decorated with
hashtags/emoji) and half not (unrelated social-media posts, or true descriptions
of a different synthetic scene). Its match labels are returned separately and
are never part of a manifest row.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from pipeline.data.manifest import ManifestRecord
from pipeline.progress import progress as progress_bar

# --------------------------------------------------------------------------- the world's facts
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 225),
    "yellow": (240, 215, 40),
    "purple": (145, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
SHAPE_PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
SIZES: tuple[str, ...] = ("small", "large")
SIZE_SYNONYMS: dict[str, str] = {"small": "little", "large": "big"}
# Nominal radius (fraction of the image side) and its jitter; large is twice small.
SIZE_RADIUS: dict[str, tuple[float, float]] = {"small": (0.078, 0.006), "large": (0.155, 0.010)}
# Rotation jitter (degrees, +-) per shape; circles do not rotate.
ROTATION_JITTER: dict[str, float] = {"circle": 0.0, "square": 12.0, "triangle": 15.0, "star": 18.0, "diamond": 10.0}

# Neutral backgrounds only, so that no object colour can ever vanish into them.
BACKGROUNDS: tuple[str, ...] = ("white", "gray", "black", "gradient", "textured")
_PLAIN_LEVELS = {"white": (232, 250), "gray": (140, 170), "black": (12, 40)}

POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
# Anchor (x, y) of a single object at each position, as fractions of the image side.
_SINGLE_ANCHORS = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "centre": (0.5, 0.5),
}
_POS_A = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
          "centre": "in the centre"}
_POS_B = {"left": "on the left side", "right": "on the right side", "top": "near the top",
          "bottom": "near the bottom", "centre": "in the middle"}
_NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}

LAYOUTS: tuple[str, ...] = ("single", "pair_h", "pair_v", "twin_h", "twin_v", "two_top", "two_bottom")

# --------------------------------------------------------------------------- templates
# Each layout has six phrasings; every image gets five distinct ones. Field names:
# np* full noun phrase with size ("a large red circle"), npb* the same with the size
# synonym ("a big red circle"), nps* without size ("a red circle").
TEMPLATES: dict[str, dict[str, str]] = {
    "single": {
        "s_plain": "{np} {pos_a}",
        "s_there": "there is {npb} {pos_b}",
        "s_image": "an image with {np} {pos_a}",
        "s_picture_bg": "a picture of {np} on a {bg} background",
        "s_single": "a single {size} {colour} {shape} {pos_b}",
        "s_the": "the {size} {colour} {shape} is {pos_a}",
    },
    "pair_h": {
        "h_left_of": "{np_a} to the left of {np_b}",
        "h_right_of": "{np_b} to the right of {np_a}",
        "h_sides": "{np_a} on the left and {np_b} on the right",
        "h_there": "there is {npb_a} left of {npb_b}",
        "h_image": "an image with {nps_a} and {nps_b} side by side",
        "h_picture_bg": "a picture of {nps_a} and {nps_b} on a {bg} background",
    },
    "pair_v": {
        "v_above": "{np_a} above {np_b}",
        "v_below": "{np_b} below {np_a}",
        "v_ends": "{np_a} at the top and {np_b} at the bottom",
        "v_there": "there is {npb_a} over {npb_b}",
        "v_image": "an image with {nps_a} and {nps_b} one above the other",
        "v_picture_bg": "a picture of {nps_a} and {nps_b} on a {bg} background",
    },
    "twin": {
        "t_count": "two {size} {colour} {shapes} {arr_a}",
        "t_there": "there are two {bsize} {colour} {shapes} {arr_b}",
        "t_image": "an image with two {colour} {shapes}",
        "t_pair": "a pair of {size} {colour} {shapes}",
        "t_another": "{np} {rel} another {colour} {shape}",
        "t_picture_bg": "a picture of two {colour} {shapes} on a {bg} background",
    },
    "triple": {
        "r_pair_rel": "{pair} {pair_rel} {np_s}",
        "r_single_rel": "{np_s} {single_rel} {pair}",
        "r_three": "three shapes with {nps_s} at the {single_pos}",
        "r_rows": "{pair_s} {row_where} with {nps_s} {single_where}",
        "r_count": "an image with {count_phrase}",
        "r_picture_bg": "three shapes on a {bg} background",
    },
}
TEMPLATE_NAMES: tuple[str, ...] = tuple(t for group in TEMPLATES.values() for t in group)
# Templates that name no object (colour + shape); never used as a "mismatched" caption.
_NON_SPECIFIC = frozenset({"r_picture_bg"})
_TWIN_WORDS = {"h": {"arr_a": "side by side", "arr_b": "in a row", "rel": "next to"},
               "v": {"arr_a": "one above the other", "arr_b": "in a column", "rel": "above"}}


def _compute_vocabulary() -> frozenset[str]:
    words: set[str] = set()
    for group in TEMPLATES.values():
        for text in group.values():
            words.update(re.sub(r"\{[a-z_]+\}", " ", text).split())
    fills = [*COLOURS, *SHAPES, *SHAPE_PLURALS.values(), *SIZES, *SIZE_SYNONYMS.values(), *BACKGROUNDS,
             *_POS_A.values(), *_POS_B.values(), *POSITIONS, *_NUMBER_WORDS.values(), "an", "and",
             "above", "below", "on top", "at the bottom", *(w for d in _TWIN_WORDS.values() for w in d.values())]
    for f in fills:
        words.update(f.split())
    return frozenset(words)


VOCABULARY: frozenset[str] = _compute_vocabulary()
"""Every word a clean caption can contain (captions are lower-case words separated by spaces)."""

# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneObject:
    """One shape. ``x``, ``y`` (centre) and ``r`` (nominal radius) are fractions of the image side."""

    shape: str
    colour: str
    size: str
    x: float
    y: float
    r: Optional[float] = None  # None: the size's nominal radius
    rotation: float = 0.0  # degrees

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}")

    @property
    def radius(self) -> float:
        return self.r if self.r is not None else SIZE_RADIUS[self.size][0]

    @property
    def kind(self) -> tuple[str, str, str]:
        """(size, colour, shape): objects with equal kinds are described as identical."""
        return (self.size, self.colour, self.shape)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "x": round(self.x, 4),
                "y": round(self.y, 4), "r": round(self.radius, 4), "rotation": round(self.rotation, 2)}


@dataclass(frozen=True)
class Background:
    """``name`` is one of :data:`BACKGROUNDS`. ``levels``: grey level(s) (plain: 1, gradient: 2 ends, textured: base)."""

    name: str = "white"
    levels: tuple[float, ...] = (242.0,)
    direction: str = "vertical"  # gradients: vertical | horizontal | diagonal

    def __post_init__(self) -> None:
        if self.name not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.name!r}")

    def to_dict(self) -> dict:
        d = {"name": self.name, "levels": [round(v, 1) for v in self.levels]}
        if self.name == "gradient":
            d["direction"] = self.direction
        return d


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: Background = field(default_factory=Background)

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"a scene has 1 to 3 objects, not {len(self.objects)}")

    @property
    def layout(self) -> str:
        return layout_of(self)

    def to_dict(self) -> dict:
        return {"layout": self.layout, "background": self.background.to_dict(),
                "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        bg = d.get("background") or {}
        background = Background(name=bg.get("name", "white"), levels=tuple(bg.get("levels", (242.0,))),
                                direction=bg.get("direction", "vertical"))
        objects = tuple(SceneObject(shape=o["shape"], colour=o["colour"], size=o["size"], x=o["x"], y=o["y"],
                                    r=o.get("r"), rotation=o.get("rotation", 0.0)) for o in d["objects"])
        return cls(objects=objects, background=background)


def _arrange(scene: Scene) -> tuple[str, list[SceneObject]]:
    """The layout and the objects in canonical (reading) order, decided from the geometry alone."""
    objs = list(scene.objects)
    if len(objs) == 1:
        return "single", objs
    if len(objs) == 2:
        a, b = objs
        horizontal = abs(a.x - b.x) >= abs(a.y - b.y)
        objs.sort(key=(lambda o: o.x) if horizontal else (lambda o: o.y))
        twin = a.kind == b.kind
        return ("twin_" if twin else "pair_") + ("h" if horizontal else "v"), objs
    objs.sort(key=lambda o: o.y)
    if objs[1].y - objs[0].y < objs[2].y - objs[1].y:  # a row of two on top, one below
        return "two_top", sorted(objs[:2], key=lambda o: o.x) + [objs[2]]
    return "two_bottom", [objs[0]] + sorted(objs[1:], key=lambda o: o.x)


def layout_of(scene: Scene) -> str:
    """One of :data:`LAYOUTS`, from the objects' positions and kinds."""
    return _arrange(scene)[0]


def position_of(obj: SceneObject) -> str:
    """The position word (left/right/top/bottom/centre) of a lone object: the nearest anchor."""
    return min(POSITIONS, key=lambda p: (obj.x - _SINGLE_ANCHORS[p][0]) ** 2 + (obj.y - _SINGLE_ANCHORS[p][1]) ** 2)


def _jit(rng: np.random.Generator, amount: float) -> float:
    return float(rng.uniform(-amount, amount))


def _sample_kind(rng: np.random.Generator) -> tuple[str, str, str]:
    return (SIZES[rng.integers(len(SIZES))], list(COLOURS)[rng.integers(len(COLOURS))],
            SHAPES[rng.integers(len(SHAPES))])


def _make_object(rng: np.random.Generator, kind: tuple[str, str, str], x: float, y: float) -> SceneObject:
    size, colour, shape = kind
    r0, rj = SIZE_RADIUS[size]
    return SceneObject(shape=shape, colour=colour, size=size, x=x, y=y, r=r0 + _jit(rng, rj),
                       rotation=_jit(rng, ROTATION_JITTER[shape]) if ROTATION_JITTER[shape] else 0.0)


def _sample_background(rng: np.random.Generator) -> Background:
    name = BACKGROUNDS[rng.choice(len(BACKGROUNDS), p=[0.25, 0.2, 0.15, 0.2, 0.2])]
    if name in _PLAIN_LEVELS:
        lo, hi = _PLAIN_LEVELS[name]
        return Background(name, (float(rng.uniform(lo, hi)),))
    if name == "gradient":
        light, dark = float(rng.uniform(200, 245)), float(rng.uniform(35, 90))
        ends = (light, dark) if rng.random() < 0.5 else (dark, light)
        return Background(name, ends, ("vertical", "horizontal", "diagonal")[rng.integers(3)])
    return Background(name, (float(rng.uniform(185, 220)),))


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene: 1-3 objects in one of the layouts, with position/size/rotation jitter."""
    background = _sample_background(rng)
    layout = LAYOUTS[rng.choice(len(LAYOUTS), p=[0.25, 0.15, 0.15, 0.075, 0.075, 0.15, 0.15])]
    if layout == "single":
        pos = POSITIONS[rng.integers(len(POSITIONS))]
        ax, ay = _SINGLE_ANCHORS[pos]
        objs = [_make_object(rng, _sample_kind(rng), ax + _jit(rng, 0.04), ay + _jit(rng, 0.04))]
    elif layout in ("pair_h", "pair_v", "twin_h", "twin_v"):
        ka = _sample_kind(rng)
        if layout.startswith("twin"):
            kb = ka
        else:
            kb = _sample_kind(rng)
            while kb[1:] == ka[1:]:  # a different colour or shape: no accidental "twins" of two sizes
                kb = _sample_kind(rng)
        along, across = 0.26, 0.5
        coords = [(along + _jit(rng, 0.04), across + _jit(rng, 0.1)),
                  (1 - along + _jit(rng, 0.04), across + _jit(rng, 0.1))]
        if layout.endswith("_v"):
            coords = [(c[1], c[0]) for c in coords]
        objs = [_make_object(rng, ka, *coords[0]), _make_object(rng, kb, *coords[1])]
    else:  # a row of two and a single object
        k1 = _sample_kind(rng)
        k2 = k1 if rng.random() < 0.3 else _sample_kind(rng)
        if k2[1:] == k1[1:]:
            # the row is "two red circles": the third object is something else, so counts stay exact
            k3 = _sample_kind(rng)
            while k3[1:] == k1[1:]:
                k3 = _sample_kind(rng)
        elif rng.random() < 0.25:  # "two red circles and a blue square", across the rows
            k3 = (_sample_kind(rng)[0],) + (k1 if rng.random() < 0.5 else k2)[1:]
        else:
            k3 = _sample_kind(rng)
        row_y, single_y = (0.27, 0.73) if layout == "two_top" else (0.73, 0.27)
        objs = [_make_object(rng, k1, 0.26 + _jit(rng, 0.03), row_y + _jit(rng, 0.03)),
                _make_object(rng, k2, 0.74 + _jit(rng, 0.03), row_y + _jit(rng, 0.03)),
                _make_object(rng, k3, 0.5 + _jit(rng, 0.04), single_y + _jit(rng, 0.03))]
    return Scene(objects=tuple(objs), background=background)


# --------------------------------------------------------------------------- captions
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(o: SceneObject, size: Optional[str] = "plain") -> str:
    """'a large red circle' (size='plain'), 'a big red circle' (size='synonym'), 'a red circle' (size=None)."""
    words = [o.colour, o.shape]
    if size == "plain":
        words.insert(0, o.size)
    elif size == "synonym":
        words.insert(0, SIZE_SYNONYMS[o.size])
    return f"{_article(words[0])} {' '.join(words)}"


def _count_phrase(objs: Sequence[SceneObject]) -> str:
    """'two red circles and a blue square': objects grouped by colour and shape, in reading order."""
    groups: dict[tuple[str, str], int] = {}
    for o in objs:
        groups[(o.colour, o.shape)] = groups.get((o.colour, o.shape), 0) + 1
    parts = []
    for (colour, shape), n in groups.items():
        parts.append(f"{_article(colour)} {colour} {shape}" if n == 1
                     else f"{_NUMBER_WORDS[n]} {colour} {SHAPE_PLURALS[shape]}")
    return " and ".join(parts)


def _fields(scene: Scene) -> tuple[str, dict[str, str]]:
    layout, objs = _arrange(scene)
    f: dict[str, str] = {"bg": scene.background.name}
    if layout == "single":
        o = objs[0]
        pos = position_of(o)
        f.update(np=_np(o), npb=_np(o, "synonym"), size=o.size, colour=o.colour, shape=o.shape,
                 pos_a=_POS_A[pos], pos_b=_POS_B[pos])
        return "single", f
    if layout.startswith("pair"):
        a, b = objs
        f.update(np_a=_np(a), np_b=_np(b), npb_a=_np(a, "synonym"), npb_b=_np(b, "synonym"),
                 nps_a=_np(a, None), nps_b=_np(b, None))
        return layout, f
    if layout.startswith("twin"):
        o = objs[0]
        f.update(np=_np(o), size=o.size, bsize=SIZE_SYNONYMS[o.size], colour=o.colour, shape=o.shape,
                 shapes=SHAPE_PLURALS[o.shape], **_TWIN_WORDS[layout[-1]])
        return "twin", f
    if layout == "two_top":
        p1, p2, s = objs
        f.update(pair_rel="above", single_rel="below", single_pos="bottom", row_where="on top",
                 single_where="below")
    else:
        s, p1, p2 = objs
        f.update(pair_rel="below", single_rel="above", single_pos="top", row_where="at the bottom",
                 single_where="above")
    if p1.kind == p2.kind:
        pair = f"two {p1.size} {p1.colour} {SHAPE_PLURALS[p1.shape]}"
    else:
        pair = f"{_np(p1)} and {_np(p2)}"
    if (p1.colour, p1.shape) == (p2.colour, p2.shape):
        pair_s = f"two {p1.colour} {SHAPE_PLURALS[p1.shape]}"
    else:
        pair_s = f"{_np(p1, None)} and {_np(p2, None)}"
    reading = [p1, p2, s] if layout == "two_top" else [s, p1, p2]
    f.update(pair=pair, pair_s=pair_s, np_s=_np(s), nps_s=_np(s, None), count_phrase=_count_phrase(reading))
    return "triple", f


def describe_tagged(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[tuple[str, str]]:
    """``n`` (template name, caption) pairs, from distinct templates while there are enough."""
    group, f = _fields(scene)
    templates = TEMPLATES[group]
    names = list(templates)
    order: list[str] = []
    while len(order) < n:
        order.extend(names[j] for j in rng.permutation(len(names)))
    return [(t, templates[t].format(**f)) for t in order[:n]]


def describe(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` captions of ``scene``, all true of it, from distinct phrasings (six per layout)."""
    return [c for _, c in describe_tagged(scene, rng, n)]


# --------------------------------------------------------------------------- rendering
def _shape_polygon(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]]:
    """Vertices (pixel coordinates, y down) of a non-circle shape of nominal radius ``r``."""
    if shape == "square":
        h = 0.86 * r * math.sqrt(2)
        pts = [(h * math.cos(math.radians(a)), h * math.sin(math.radians(a))) for a in (45, 135, 225, 315)]
    elif shape == "triangle":  # apex up
        R = 1.2 * r
        pts = [(R * math.cos(math.radians(a)), R * math.sin(math.radians(a))) for a in (-90, 30, 150)]
    elif shape == "star":
        R = 1.15 * r
        pts = []
        for k in range(10):
            rad = R if k % 2 == 0 else 0.45 * R
            a = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "diamond":
        pts = [(0.0, -1.15 * r), (0.72 * r, 0.0), (0.0, 1.15 * r), (-0.72 * r, 0.0)]
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    return [(cx + px * c - py * s, cy + px * s + py * c) for px, py in pts]


def _background_array(bg: Background, size: int, rng: np.random.Generator) -> np.ndarray:
    tint = rng.uniform(-4, 4, 3).astype(np.float32)
    if bg.name in _PLAIN_LEVELS:
        grey = np.full((size, size), bg.levels[0], np.float32)
    elif bg.name == "gradient":
        t = np.linspace(0.0, 1.0, size, dtype=np.float32)
        if bg.direction == "vertical":
            ramp = np.broadcast_to(t[:, None], (size, size))
        elif bg.direction == "horizontal":
            ramp = np.broadcast_to(t[None, :], (size, size))
        else:
            ramp = (t[:, None] + t[None, :]) / 2
        grey = bg.levels[0] + (bg.levels[1] - bg.levels[0]) * ramp
    else:  # textured: low-frequency blotches plus fine grain
        coarse = rng.uniform(-1.0, 1.0, (6, 6)).astype(np.float32)
        blotches = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))
        grain = rng.uniform(-6.0, 6.0, (size, size)).astype(np.float32)
        grey = bg.levels[0] + 16.0 * blotches + grain
    return np.repeat(grey[:, :, None], 3, axis=2) + tint


def render_scene(scene: Scene, image_size: int = 128, rng: Optional[np.random.Generator] = None) -> Image.Image:
    """Draw ``scene`` as an RGB image; ``rng`` drives colour jitter, texture and pixel noise."""
    if rng is None:
        rng = np.random.default_rng(0)
    S = int(image_size)
    canvas = _background_array(scene.background, S, rng)
    ss = 2 if S >= 96 else 4  # supersampling factor for anti-aliased edges
    for o in scene.objects:
        cx, cy, r = o.x * S, o.y * S, o.radius * S
        ext = 1.3 * r + 2
        x0, y0 = max(0, int(math.floor(cx - ext))), max(0, int(math.floor(cy - ext)))
        x1, y1 = min(S, int(math.ceil(cx + ext))), min(S, int(math.ceil(cy + ext)))
        if x1 <= x0 or y1 <= y0:
            continue
        mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
        draw = ImageDraw.Draw(mask)
        lcx, lcy, lr = (cx - x0) * ss, (cy - y0) * ss, r * ss
        if o.shape == "circle":
            draw.ellipse([lcx - lr, lcy - lr, lcx + lr, lcy + lr], fill=255)
        else:
            draw.polygon(_shape_polygon(o.shape, lcx, lcy, lr, o.rotation), fill=255)
        alpha = np.asarray(mask.reduce(ss), dtype=np.float32)[:, :, None] / 255.0
        colour = np.asarray(COLOURS[o.colour], np.float32) + rng.uniform(-10, 10, 3).astype(np.float32)
        region = canvas[y0:y1, x0:x1]
        canvas[y0:y1, x0:x1] = region + (colour - region) * alpha
    sigma = float(rng.uniform(2.0, 7.0))
    canvas += rng.standard_normal((S, S, 3), dtype=np.float32) * sigma
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mode="RGB")


# --------------------------------------------------------------------------- the noisy social variant
_HASHTAGS = ("#art", "#shapes", "#colorful", "#minimal", "#design", "#geometry", "#abstract", "#instaart",
             "#pattern", "#aesthetic", "#artoftheday", "#create", "#vibes", "#love")
_EMOJI = ("✨", "😍", "🎨", "🔥", "💯", "👌", "🌈", "💖", "🙌", "😎")
_PREFIXES = ("so cute", "love this", "obsessed with this", "check it out", "new post", "omg", "mood",
             "just made this", "can't stop looking at this")
UNRELATED_CAPTIONS: tuple[str, ...] = (
    "best brunch ever #foodie #sundayvibes",
    "can't wait for the weekend 🎉",
    "monday mood ☕",
    "sunset at the beach 🌅 #nofilter",
    "new shoes who dis 👟",
    "throwback to summer #tbt",
    "my dog is the best boy 🐶",
    "gym time 💪 #fitness #nopainnogain",
    "coffee first, questions later ☕ #morning",
    "road trip with the squad 🚗",
    "happy birthday to me 🎂🎈",
    "rainy days and good books 📚",
    "pizza night 🍕 #yum",
    "feeling blessed #grateful",
    "new hair, new me 💇",
    "that concert was amazing 🎶",
    "just landed in lisbon ✈️ #travel #wanderlust",
    "homemade pasta for dinner #foodporn",
    "who else is watching the game tonight? 🏈",
    "ootd #fashion #style",
    "cannot believe it's already friday",
    "lazy sunday with my cat 🐱",
    "hiking with friends #outdoors #nature",
    "first day at the new job! wish me luck 🙏",
    "date night 🍷❤️",
    "beach please 🏖️ #summer",
    "snow day!!! ❄️",
    "tacos are life 🌮",
    "morning run done ✅ #running",
    "family time is the best time",
    "midnight snack attack 🍩",
    "exam week, send help 😩 #studentlife",
    "look at this view 😮 #mountains",
    "new recipe, who wants to try? #baking",
    "goodbye 2023, hello new year 🥂",
    "link in bio 👆",
    "tag someone who needs this",
    "like and follow for more",
)


def decorate(caption: str, rng: np.random.Generator) -> str:
    """Dress a caption up Instagram-style: an optional exclamation prefix, hashtags and/or emoji."""
    parts = []
    if rng.random() < 0.4:
        parts.append(_PREFIXES[rng.integers(len(_PREFIXES))] + (" 😍" if rng.random() < 0.3 else "!"))
    parts.append(caption)
    tail = [_EMOJI[j] for j in rng.choice(len(_EMOJI), size=rng.integers(0, 3), replace=False)]
    tail += [_HASHTAGS[j] for j in rng.choice(len(_HASHTAGS), size=rng.integers(0 if tail else 1, 4), replace=False)]
    parts.append(" ".join(tail))
    return " ".join(parts)


def _unrelated(rng: np.random.Generator) -> str:
    text = UNRELATED_CAPTIONS[rng.integers(len(UNRELATED_CAPTIONS))]
    if rng.random() < 0.3:
        text += " " + _EMOJI[rng.integers(len(_EMOJI))]
    return text


def _mismatched(scene: Scene, rng: np.random.Generator) -> str:
    """A true caption of a different scene sharing no (colour, shape) with ``scene``: false of ``scene``."""
    present = {(o.colour, o.shape) for o in scene.objects}
    while True:
        other = sample_scene(rng)
        if not present & {(o.colour, o.shape) for o in other.objects}:
            break
    for name, caption in describe_tagged(other, rng, n=6):
        if name not in _NON_SPECIFIC:
            return caption
    raise AssertionError("unreachable: every layout has object-naming templates")


def noisy_captions(scene: Scene, rng: np.random.Generator) -> tuple[list[str], list[tuple[bool, str]]]:
    """3-5 captions for a noisy-variant image and their (match, kind) labels; at least one of each label."""
    k = int(rng.integers(3, 6))
    matches = list(rng.random(k) < 0.5)
    if all(matches) or not any(matches):
        matches[int(rng.integers(k))] = not matches[0]
    true_caps = iter(describe(scene, rng, n=sum(matches)))
    caps: list[str] = []
    labels: list[tuple[bool, str]] = []
    for m in matches:
        if m:
            cap = next(true_caps)
            if rng.random() < 0.5:
                caps.append(decorate(cap, rng))
                labels.append((True, "decorated"))
            else:
                caps.append(cap)
                labels.append((True, "clean"))
        elif rng.random() < 0.5:
            caps.append(_unrelated(rng))
            labels.append((False, "unrelated"))
        else:
            cap = _mismatched(scene, rng)
            caps.append(decorate(cap, rng) if rng.random() < 0.3 else cap)
            labels.append((False, "mismatched"))
    return caps, labels


# --------------------------------------------------------------------------- the dataset
CLEAN_STREAM, NOISY_STREAM = 0, 1


@dataclass
class SyntheticResult:
    records: list[ManifestRecord]
    noisy_records: list[ManifestRecord]
    noisy_labels: list[dict]  # {"image_id", "caption_index", "match", "kind"}: never in a manifest row


def _save_png(img: Image.Image, path: Path) -> None:
    # No metadata chunks and fixed compression settings: the same pixels always give the same bytes.
    # Run-length deflate: the pixel noise defeats LZ matching anyway, and it is twice as fast.
    img.save(path, format="PNG", optimize=False, compress_level=6, compress_type=zlib.Z_RLE)


def generate_synthetic(out_dir: Path, *, num_images: int, noisy_images: int, image_size: int = 128, seed: int = 0,
                       name: str = "synthetic", progress: bool = True) -> SyntheticResult:
    """Render the synthetic dataset under ``out_dir/images`` and return its manifest records.

    Clean images ``images/syn-NNNNNN.png`` (ids ``{name}/NNNNNN``, 5 captions each) and noisy
    social images ``images/noisy-NNNNNN.png`` (ids ``{name}-noisy/NNNNNN``, 3-5 captions each,
    labels returned apart). Paths are relative to ``out_dir``; every split is ``"train"``
    (the prepare stage assigns splits). Image ``i`` depends only on ``(seed, i)``.
    """
    if num_images < 0 or noisy_images < 0:
        raise ValueError("num_images and noisy_images must be >= 0")
    if seed < 0:
        raise ValueError("seed must be >= 0 (numpy seed sequences take non-negative integers)")
    if image_size < 16:
        raise ValueError("image_size must be at least 16 pixels")
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    records: list[ManifestRecord] = []
    noisy_records: list[ManifestRecord] = []
    noisy_labels: list[dict] = []
    with progress_bar(total=num_images + noisy_images, desc=f"render {name}", unit="img", disable=not progress) as bar:
        for i in range(num_images):
            rng = np.random.default_rng([seed, CLEAN_STREAM, i])
            scene = sample_scene(rng)
            tagged = describe_tagged(scene, rng, n=5)
            rel = f"images/syn-{i:06d}.png"
            _save_png(render_scene(scene, image_size, rng), out_dir / rel)
            extra = scene.to_dict()
            extra["templates"] = [t for t, _ in tagged]
            records.append(ManifestRecord(image_id=f"{name}/{i:06d}", path=rel, captions=[c for _, c in tagged],
                                          split="train", source=name, extra=extra))
            bar.update(1)
        for i in range(noisy_images):
            rng = np.random.default_rng([seed, NOISY_STREAM, i])
            scene = sample_scene(rng)
            caps, labels = noisy_captions(scene, rng)
            rel = f"images/noisy-{i:06d}.png"
            _save_png(render_scene(scene, image_size, rng), out_dir / rel)
            image_id = f"{name}-noisy/{i:06d}"
            noisy_records.append(ManifestRecord(image_id=image_id, path=rel, captions=caps, split="train",
                                                source=f"{name}-noisy", extra=scene.to_dict()))
            noisy_labels.extend({"image_id": image_id, "caption_index": j, "match": bool(m), "kind": kind}
                                for j, (m, kind) in enumerate(labels))
            bar.update(1)
    return SyntheticResult(records=records, noisy_records=noisy_records, noisy_labels=noisy_labels)
