"""The second built-in task, in the spirit of GenEval (the paper's main experiment): scenes of coloured shapes.

Prompts such as "two red squares", "a blue circle above a yellow triangle" ask for objects with counts, colours and
positions; every scene is rendered natively at the requested size (anti-aliased by supersampling, never upsampled),
so a larger image holds more detail. Four tags, as GenEval's: single, counting, two_object, position.

Held-out compositions: two count-shape pairs (HELD_OUT_COUNTS: "two ... triangles", "three ... circles") and a
quarter of the pairs of objects (`held_out_pair`) never appear together in a training prompt or a pre-training scene.
Every held-out prompt holds one of them: a combination of trained words that the model was never trained on, which
the word-reading prompt encoder (shapes.PromptEncoder) conditions on differently from every training prompt.

Fresh prompts (split "fresh"): prompts of the training distribution that no training prompt list and no pre-training
scene ever held. Each is made of trained compositions only (its count of a shape, or its pair of objects, is trained
through other prompts), so the judge on them measures generalisation to new prompts of the same distribution, not to
new compositions. `fresh_scenes` picks them (FRESH_PER_TAG, at most one per composition).

The judge (`judge`, the `scene_judge` reward) is an exact analytic detector with GenEval's rule.
"""
from __future__ import annotations

import functools
import itertools
import random
import re
import zlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

COLOURS = {"red": (1.0, 0.15, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.2, 0.35, 1.0), "yellow": (1.0, 0.85, 0.1)}
SHAPES = ("square", "circle", "triangle")
NUMBERS = {1: "a", 2: "two", 3: "three"}
RELATIONS = ("above", "below", "left of", "right of")
TAGS = ("single", "counting", "two_object", "position")
# Never seen together in training: counts of one shape, and (held_out_pair) a quarter of the pairs of objects.
HELD_OUT_COUNTS = ((2, "triangle"), (3, "circle"))
SIZES = (16, 24, 32)  # native renders; objects scale with the canvas


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    count: int = 1


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for: one or two object kinds (each with a count) and, for 'position', a relation of the
    first object to the second."""
    tag: str
    objects: tuple[Obj, ...]
    relation: str | None = None


def phrase(o: Obj) -> str:
    return f"{NUMBERS[o.count]} {o.colour} {o.shape}{'s' if o.count > 1 else ''}"


def text(s: Scene) -> str:
    """The prompt of a scene: 'a red square', 'two red squares', 'a red square and a blue circle',
    'a red square above a blue circle'."""
    if s.tag in ("single", "counting"):
        return phrase(s.objects[0])
    joint = "and" if s.tag == "two_object" else s.relation
    return f"{phrase(s.objects[0])} {joint} {phrase(s.objects[1])}"


_OBJ = r"(a|two|three) (" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")s?"
_PROMPT = re.compile(rf"^{_OBJ}(?: (and|{'|'.join(RELATIONS)}) {_OBJ})?$")


def parse(prompt: str) -> Scene:
    """The scene a prompt asks for (the inverse of `text`); ValueError naming the grammar otherwise."""
    m = _PROMPT.match(" ".join(prompt.lower().split()))
    if m is None:
        raise ValueError(f"prompt {prompt!r} is not a shapes prompt; write e.g. 'two red squares' or 'a red square "
                         f"above a blue circle' (counts a/two/three, colours {'/'.join(COLOURS)}, shapes "
                         f"{'/'.join(SHAPES)}, relations and/{'/'.join(RELATIONS)})")
    count = {w: n for n, w in NUMBERS.items()}
    first = Obj(m.group(2), m.group(3), count[m.group(1)])
    if m.group(4) is None:
        return Scene("single" if first.count == 1 else "counting", (first,))
    second = Obj(m.group(6), m.group(7), count[m.group(5)])
    if first.count != 1 or second.count != 1 or (first.colour, first.shape) == (second.colour, second.shape):
        raise ValueError(f"prompt {prompt!r}: two-object prompts name two different single objects ('a red square "
                         f"and a blue circle')")
    return Scene("two_object" if m.group(4) == "and" else "position", (first, second),
                 None if m.group(4) == "and" else m.group(4))


def all_scenes() -> dict[str, list[Scene]]:
    """Every scene of the grammar, by tag."""
    pairs = list(itertools.product(COLOURS, SHAPES))
    return dict(single=[Scene("single", (Obj(c, s),)) for c, s in pairs],
                counting=[Scene("counting", (Obj(c, s, n),)) for c, s in pairs for n in (2, 3)],
                two_object=[Scene("two_object", (Obj(*a), Obj(*b))) for a, b in itertools.permutations(pairs, 2)],
                position=[Scene("position", (Obj(*a), Obj(*b)), r) for a, b in itertools.permutations(pairs, 2)
                          for r in RELATIONS])


def held_out_pair(a: Obj, b: Obj) -> bool:
    """Is this pair of objects (colour and shape; either order) held out of training? A fixed quarter of the 66
    pairs, chosen by a crc32 of the pair (stable across processes and versions)."""
    key = "+".join(sorted(f"{o.colour} {o.shape}" for o in (a, b)))
    return zlib.crc32(key.encode()) % 4 == 0


def is_held_out(s: Scene) -> bool:
    """Does the scene hold a composition never trained on: a held-out count of a shape, or a held-out pair?"""
    if s.tag == "counting":
        return (s.objects[0].count, s.objects[0].shape) in HELD_OUT_COUNTS
    return len(s.objects) == 2 and held_out_pair(*s.objects)


# How many fresh prompts each tag gets. Counting has only four trained count-shape compositions (two ... squares /
# circles, three ... squares / triangles), so at most one fresh prompt each; a lone object's prompt is its only
# string, so the single tag has none (as the held-out compositions, the fresh split has three tags).
FRESH_PER_TAG = {"counting": 4, "two_object": 8, "position": 8}


def composition(s: Scene):
    """What a scene composes: its count of a shape (counting), or its unordered pair of objects."""
    if s.tag == "counting":
        return s.objects[0].count, s.objects[0].shape
    return frozenset((o.colour, o.shape) for o in s.objects)


@functools.cache
def fresh_scenes() -> frozenset[Scene]:
    """The fresh split: per tag, FRESH_PER_TAG[tag] scenes without a held-out composition, taken in the order of a
    crc32 of their prompt (stable across processes and versions), skipping any whose composition already has a fresh
    scene, so every fresh scene's composition stays trained through its other prompts (three other colours of a
    count, nine other prompts of a pair)."""
    chosen: list[Scene] = []
    for tag, n in FRESH_PER_TAG.items():
        pool = sorted((s for s in all_scenes()[tag] if not is_held_out(s)),
                      key=lambda s: zlib.crc32(f"fresh/{text(s)}".encode()))
        picked: list[Scene] = []
        for s in pool:
            if len(picked) < n and composition(s) not in {composition(c) for c in chosen + picked}:
                picked.append(s)
        chosen += picked
    return frozenset(chosen)


def scenes(split: str) -> dict[str, list[Scene]]:
    """The scenes of a split by tag: 'train' holds neither a held-out composition nor a fresh prompt; 'fresh' the
    fresh prompts (trained compositions, prompts never trained on); 'test' only held-out compositions (so neither
    'fresh' nor 'test' has single-object scenes)."""
    if split not in ("train", "fresh", "test"):
        raise ValueError(f"unknown split {split!r}; use 'train', 'fresh' or 'test'")
    fresh = fresh_scenes()
    which = {"train": lambda s: not is_held_out(s) and s not in fresh, "fresh": lambda s: s in fresh,
             "test": is_held_out}[split]
    return {tag: [s for s in ss if which(s)] for tag, ss in all_scenes().items()}


# -- rendering ---------------------------------------------------------------------------------------------------
SUPERSAMPLE = 4  # anti-aliasing: each pixel is the mean of 4 x 4 point samples of the exact shape
# An object's half-size, a fraction of the canvas side: as large as the scene allows (one or two objects, or three),
# so that a shape spans enough pixels to be told apart at 16x16.
RADIUS = {1: (0.19, 0.25), 2: (0.17, 0.23), 3: (0.14, 0.18)}
GAP = 0.12  # the least empty space between two objects' boxes, a fraction of the side


@dataclass
class Placed:
    colour: str
    shape: str
    x: float  # centre, pixels from the left / top
    y: float
    r: float  # half-size in pixels


def coverage(shape: str, x: float, y: float, r: float, size: int) -> np.ndarray:
    """The fraction of each pixel that the shape covers (size, size), by supersampling: a square of side 2r, a disc
    of radius r, an upward triangle of base and height 2r."""
    k = SUPERSAMPLE
    u = (np.arange(size * k) + 0.5) / k
    px, py = u[None, :] - x, u[:, None] - y
    if shape == "square":
        inside = (np.abs(px) <= r) & (np.abs(py) <= r)
    elif shape == "circle":
        inside = px ** 2 + py ** 2 <= r ** 2
    else:  # apex at (x, y - r), base from (x - r, y + r) to (x + r, y + r)
        inside = (np.abs(py) <= r) & (np.abs(px) <= (py + r) / 2)
    return inside.reshape(size, k, size, k).mean((1, 3))


def render(placed: list[Placed], size: int) -> np.ndarray:
    """An RGB image (3, size, size) in [0, 1]: the shapes on a black background."""
    img = np.zeros((3, size, size))
    for p in placed:
        img += np.asarray(COLOURS[p.colour])[:, None, None] * coverage(p.shape, p.x, p.y, p.r, size)[None]
    return img.clip(0, 1)


def layout(scene: Scene, size: int, rng: random.Random, tries: int = 100) -> list[Placed]:
    """Random sizes and positions for a scene's objects, placed one at a time: inside the canvas, apart from one
    another, and for 'position' the first object clearly in the named direction of the second (by a margin over
    what `relation_holds` asks)."""
    kinds = [o for o in scene.objects for _ in range(o.count)]
    for _ in range(tries):
        placed: list[Placed] = []
        for o in kinds:
            for _ in range(tries):
                r = rng.uniform(*RADIUS[len(kinds)]) * size
                p = Placed(o.colour, o.shape, rng.uniform(r, size - r), rng.uniform(r, size - r), r)
                if all(max(abs(p.x - q.x) - p.r - q.r, abs(p.y - q.y) - p.r - q.r) >= GAP * size for q in placed) \
                        and (len(placed) != scene.objects[0].count or scene.relation is None
                             or relation_holds(scene.relation, placed[0], p, margin=1.5)):
                    placed.append(p)
                    break
        if len(placed) == len(kinds):
            return placed
    raise RuntimeError(f"no layout found for {text(scene)!r} at {size}x{size}")


def relation_holds(relation: str, a, b, margin: float = 1.0) -> bool:
    """Is object a `relation` object b? Its centre lies that way from b's, along the relation's axis by more than
    `margin` times the offset across it (image y grows downwards)."""
    dx, dy = a.x - b.x, a.y - b.y
    along, across = {"above": (-dy, dx), "below": (dy, dx), "left of": (-dx, dy), "right of": (dx, dy)}[relation]
    return along > 0 and along > margin * abs(across)


# -- the judge: an exact analytic detector (GenEval's object detector + rules, for these scenes) -------------------
INK = 0.15  # a pixel belongs to an object if it holds at least this much of a palette colour
MIN_AREA = 0.5  # an object covers at least this fraction of the smallest object the renderer draws


@dataclass
class Found:
    """An object the judge detected: its colour, its best-fitting shape, centre and covered area (pixels)."""
    colour: str
    shape: str
    x: float
    y: float
    area: float
    misfit: float  # mean |coverage - best template| over the object's area: 0 for an exact render


def _template(shape: str, x: float, y: float, area: float, size: int) -> np.ndarray:
    """The coverage of `shape` with the given centroid and area, drawn by the renderer itself."""
    if shape == "square":
        r = np.sqrt(area) / 2
    elif shape == "circle":
        r = np.sqrt(area / np.pi)
    else:  # area 2 r^2; the centroid lies r/3 below the box centre
        r = np.sqrt(area / 2)
        y -= r / 3
    return coverage(shape, x, y, r, size)


def blobs(weight: np.ndarray, min_area: float) -> list[tuple[float, float, float, np.ndarray]]:
    """The connected regions (4-neighbour) of a map of how much each pixel belongs to a kind of object:
    (x, y, area, the region's weights) of each region of area at least min_area; x, y the weighted centroid."""
    labels, n = ndimage.label(weight >= INK)
    ys, xs = np.indices(weight.shape) + 0.5
    out = []
    for j in range(1, n + 1):
        w = np.where(labels == j, weight, 0.0)
        area = float(w.sum())
        if area >= min_area:
            out.append((float((w * xs).sum() / area), float((w * ys).sum() / area), area, w))
    return out


def min_area(size: int) -> float:
    """The least area an object may cover: MIN_AREA of the smallest triangle the renderer draws."""
    return MIN_AREA * (2 * RADIUS[3][0] * size) ** 2 / 2


def detect(image: np.ndarray) -> list[Found]:
    """The objects of an RGB image (3, S, S) in [0, 1]: pixels take the palette colour they are most aligned with
    (cosine), each colour's connected ink is one object, and its shape is the template (drawn by `coverage` with the
    object's centroid and area) that fits its coverage best: analysis by synthesis, exact on the renderer's scenes."""
    size = image.shape[-1]
    pal = np.array(list(COLOURS.values()))  # (K, 3)
    # coverage of colour k at a pixel: its projection on the palette colour, as render() multiplies colour by coverage
    proj = np.einsum("chw,kc->khw", image, pal) / (pal ** 2).sum(1)[:, None, None]
    norm = np.linalg.norm(image, axis=0) * np.linalg.norm(pal, axis=1)[:, None, None]
    cosine = np.einsum("chw,kc->khw", image, pal) / np.maximum(norm, 1e-8)
    owner = cosine.argmax(0)
    found = []
    for k, colour in enumerate(COLOURS):
        for x, y, area, c in blobs(proj[k].clip(0, 1) * (owner == k), min_area(size)):
            misfit = {s: float(np.abs(c - _template(s, x, y, area, size)).sum() / area) for s in SHAPES}
            shape = min(misfit, key=misfit.get)
            found.append(Found(colour, shape, x, y, area, misfit[shape]))
    return found


def credit(found: list[Found], scene: Scene) -> float:
    """GenEval's partial credit for these scenes (the graded form Flow-GRPO trains on), from detections: the mean
    over the prompt's checks: per object kind asked for n times, 1 - |found - n| / n (at least 0); 1 if nothing else
    was found; for 'position', 1 if the relation holds between the first detected of each kind."""
    kinds = [(o.colour, o.shape, o.count) for o in scene.objects]
    counts = [sum((f.colour, f.shape) == (c, s) for f in found) for c, s, _ in kinds]
    checks = [max(0.0, 1 - abs(k - n) / n) for k, (_, _, n) in zip(counts, kinds)]
    checks.append(float(len(found) == sum(counts)))  # no object the prompt did not ask for
    if scene.relation is not None:
        firsts = [next((f for f in found if (f.colour, f.shape) == (c, s)), None) for c, s, _ in kinds]
        checks.append(float(None not in firsts and relation_holds(scene.relation, *firsts)))
    return float(np.mean(checks))


def judge(image: np.ndarray, scene: Scene) -> bool:
    """GenEval's rule for these scenes, on the exact detections: every check of `credit` passes (exactly the objects
    the prompt asks for, nothing else, and for 'position' the first object in the named direction of the second)."""
    return credit(detect(image), scene) == 1.0
