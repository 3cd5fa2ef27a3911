"""The shapes world: procedural scenes of 1–3 coloured shapes whose captions can be checked exactly.

What it teaches: a dataset built so that evaluation is measured, not guessed. Every caption follows a
tiny grammar ("a small blue square to the left of a large red circle."), so `parse_caption` turns any
text, ours or a model's, back into the sizes, colours, shapes and relations it claims, and a generated
caption is scored attribute by attribute. The "heldout" split tests compositional generalisation: four
colour–shape pairs never appear in training images, as in CLEVR's CoGenT condition (Johnson et al.,
2017, "CLEVR: A Diagnostic Dataset for Compositional Language and Elementary Visual Reasoning").

Two more habits worth copying. Every sample is a pure function of (split, seed, index): its random
numbers come from `np.random.default_rng([seed, split id, index])`, never a global generator, so any
sample is the same on every run and machine and can be drawn in any order. Images are anti-aliased
by supersampling: each pixel is the mean of 16 point samples, so an edge pixel gets the fraction of
it that the shape covers; drawing every object of one size and shape in one numpy operation renders
tens of thousands of 32-pixel images per second on a laptop CPU (`bench/render.py` measures it).

Coordinates: x grows to the right, y grows *downward* (as in image rows), both in [0, 1].
Axis letters: N images, H height, W width, M objects drawn at once, P patch side in pixels, S² point
samples per pixel.
"""

from __future__ import annotations

import itertools
import math
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from einops import rearrange, reduce

__all__ = [
    "COLOURS", "SHAPES", "SIZES", "RELATIONS", "HELD_OUT_PAIRS", "RGB", "BACKGROUND", "SPLITS", "RADIUS",
    "MIN_IMAGE_SIZE", "Obj", "Scene", "ParsedScene", "caption", "describe", "parse_caption", "try_parse",
    "questions", "relation", "orders", "canonical", "sample_scene", "render", "render_batch", "ShapesWorld",
]  # fmt: skip

COLOURS = ("red", "green", "blue", "yellow", "purple")
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
RELATIONS = ("to the left of", "to the right of", "above", "below")
# Colour–shape pairs never drawn in "train" or "test" images; each "heldout" scene has one of them.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"), ("green", "diamond"), ("blue", "circle"), ("yellow", "square")
)  # fmt: skip
RGB = {"red": (220, 40, 40), "green": (30, 150, 60), "blue": (40, 80, 220), "yellow": (235, 185, 0),
       "purple": (140, 50, 170)}  # fmt: skip
BACKGROUND = (240, 240, 240)  # light grey
SPLITS = ("train", "test", "heldout")  # the index of a split is part of every sample's seed
MIN_IMAGE_SIZE = 24  # pixels; below this a small triangle is a smudge

RADIUS = {"small": 0.075, "large": 0.14}  # half the side of an object's bounding box, fraction of the image side
GAP = 0.04  # least space between two boxes (1.3 px at 32 px, so no pixel touches two shapes)
MARGIN = 0.01  # least space between a box and the image border
SLOPE = 0.5  # "left of" needs |dy| <= SLOPE |dx| between centres (within 27° of level): never also "above"
SUPERSAMPLE = 4  # each pixel is the mean of SUPERSAMPLE² point samples (see SAMPLES)
NUMBERS = ("one", "two", "three")

OPPOSITE = {"to the left of": "to the right of", "to the right of": "to the left of",
            "above": "below", "below": "above"}  # fmt: skip

# Where a pixel's point samples lie inside it, (S², 2) x and y in [0, 1): one in each cell of an S × S
# grid, and no two in the same row or column of an S² × S² grid ("n-rooks"), so an edge along x or y
# is placed to 1/S² of a pixel (1/16), not 1/S (1/4), for the same number of samples.
SAMPLES = np.array([(i * SUPERSAMPLE + j + 0.5, j * SUPERSAMPLE + i + 0.5) for i in range(SUPERSAMPLE)
                    for j in range(SUPERSAMPLE)]) / SUPERSAMPLE**2  # fmt: skip

# Is the point (u, v), relative to the centre in units of RADIUS, inside the shape? The shapes fill
# their box to about the same area: circle 0.9 in radius, square 0.8 in half-side, and a triangle
# (pointing up) and a diamond (a square turned 45°) that touch the box's sides.
INSIDE = {
    "circle": lambda u, v: u * u + v * v <= 0.81,
    "square": lambda u, v: (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8),
    "triangle": lambda u, v: (v <= 1) & (2 * np.abs(u) <= v + 1),
    "diamond": lambda u, v: np.abs(u) + np.abs(v) <= 1,
}


def _one_of(value: str, options: tuple[str, ...], what: str) -> None:
    """Raise a ValueError naming the options unless `value` is one of them."""
    if value not in options:
        raise ValueError(f"unknown {what} {value!r}; expected one of {options}")


@dataclass(frozen=True)
class Obj:
    """One shape in a scene: what it is, and where its centre lies."""

    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    size: str  # one of SIZES
    x: float  # centre, fraction of the image width from the left edge
    y: float  # centre, fraction of the image height from the top edge

    def __post_init__(self):
        _one_of(self.shape, SHAPES, "shape")
        _one_of(self.colour, COLOURS, "colour")
        _one_of(self.size, SIZES, "size")


@dataclass(frozen=True)
class Scene:
    """1–3 objects in caption order; relations[i] says where objects[i] stands relative to objects[i + 1]."""

    objects: tuple[Obj, ...]  # 1 to 3 objects, all shapes distinct and all colours distinct
    relations: tuple[str, ...]  # len(objects) - 1 of RELATIONS

    def __post_init__(self):
        if not 1 <= len(self.objects) <= 3 or len(self.relations) != len(self.objects) - 1:
            raise ValueError(f"a scene has 1 to 3 objects and one relation fewer, got {len(self.objects)} objects "
                             f"and {len(self.relations)} relations")  # fmt: skip
        for relation in self.relations:
            _one_of(relation, RELATIONS, "relation")
        for what in ("shape", "colour"):  # so that "the circle" or "the red object" names one object
            values = [getattr(o, what) for o in self.objects]
            if len(set(values)) < len(values):
                raise ValueError(f"the objects of a scene have distinct {what}s, got {values}")


@dataclass(frozen=True)
class ParsedScene:
    """What a caption says, without coordinates: `parse_caption(caption(s)) == describe(s)`."""

    objects: tuple[tuple[str, str, str], ...]  # (size, colour, shape) of each object, in caption order
    relations: tuple[str, ...]  # relations[i] relates objects[i] to objects[i + 1]


def describe(scene: Scene) -> ParsedScene:
    """The part of a scene a caption can state: attributes and relations, in order."""
    return ParsedScene(tuple((o.size, o.colour, o.shape) for o in scene.objects), scene.relations)


def caption(scene: Scene) -> str:
    """The one caption of a scene: 'a {size} {colour} {shape}' phrases chained by relations."""
    phrases = [f"a {o.size} {o.colour} {o.shape}" for o in scene.objects]
    text = phrases[0]
    for i, (relation, phrase) in enumerate(zip(scene.relations, phrases[1:])):
        text += f" {relation} {phrase}" if i == 0 else f", which is {relation} {phrase}"
    return text + "."


_PHRASE = re.compile(f"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})")
_LINKS = (re.compile(f" ({'|'.join(RELATIONS)}) "), re.compile(f", which is ({'|'.join(RELATIONS)}) "))
_EXPECTED_PHRASE = f"'a <size> <colour> <shape>' with size in {SIZES}, colour in {COLOURS}, shape in {SHAPES}"
_EXPECTED_LINK = (f"'.' or ' <relation> ' with relation one of {RELATIONS}",
                  f"'.' or ', which is <relation> ' with relation one of {RELATIONS}",
                  "'.' (a caption describes at most three objects)")  # fmt: skip


def parse_caption(text: str) -> ParsedScene:
    """Read a caption back into what it says; raise ValueError saying where it leaves the grammar.

    Only the grammar is checked: 'a small red circle to the left of a large red circle.' parses,
    although no scene has two red objects, so a model's mistakes can still be scored per attribute.
    """
    pos, objects, relations = 0, [], []
    while True:
        phrase = _PHRASE.match(text, pos)
        if phrase is None:
            expected = _EXPECTED_PHRASE
            break
        objects.append(phrase.groups())
        pos = phrase.end()
        if text[pos:] == ".":
            return ParsedScene(tuple(objects), tuple(relations))
        link = _LINKS[len(relations)].match(text, pos) if len(relations) < 2 else None
        if link is None:
            expected = _EXPECTED_LINK[len(relations)]
            break
        relations.append(link.group(1))
        pos = link.end()
    raise ValueError(f"not a shapes-world caption: {text!r}; at character {pos} ({text[pos:]!r}) expected {expected}")


def try_parse(text: str) -> ParsedScene | None:
    """`parse_caption(text)`, or None where the text is not in the grammar: for scoring generated captions."""
    try:
        return parse_caption(text)
    except ValueError:
        return None


def questions(scene: Scene) -> list[tuple[str, str]]:
    """Question–answer pairs, true of the scene, with one-word answers: count, colour, shape, size, relations."""
    qa = [("how many objects are there?", NUMBERS[len(scene.objects) - 1])]
    for o in scene.objects:
        qa += [(f"what colour is the {o.shape}?", o.colour), (f"what shape is the {o.colour} object?", o.shape),
               (f"what size is the {o.colour} {o.shape}?", o.size)]  # fmt: skip
    for a, relation, b in zip(scene.objects, scene.relations, scene.objects[1:]):
        qa += [(f"is the {a.colour} {a.shape} {relation} the {b.colour} {b.shape}?", "yes"),
               (f"is the {a.colour} {a.shape} {OPPOSITE[relation]} the {b.colour} {b.shape}?", "no")]  # fmt: skip
    return qa


def _relation(a: tuple[float, float], b: tuple[float, float], reach: float) -> str | None:
    """The relation centre `a` clearly stands in to centre `b`, or None; `reach` adds up their boxes' half-sides.

    Clearly "to the left of": the boxes are at least GAP apart along x, and the centres' offset along y
    is at most SLOPE times their offset along x (so never also "above" or "below"). Likewise for y.
    """
    dx, dy = b[0] - a[0], b[1] - a[1]
    if abs(dx) >= reach + GAP and abs(dy) <= SLOPE * abs(dx):
        return "to the left of" if dx > 0 else "to the right of"
    if abs(dy) >= reach + GAP and abs(dx) <= SLOPE * abs(dy):
        return "above" if dy > 0 else "below"  # y grows downward
    return None


def _apart(a: tuple[float, float], b: tuple[float, float], reach: float) -> bool:
    """Are two boxes, centred at `a` and `b` with half-sides adding up to `reach`, GAP apart along x or y?"""
    return max(abs(b[0] - a[0]), abs(b[1] - a[1])) >= reach + GAP


def _layout(rng: np.random.Generator, radii: list[float]) -> tuple[list[tuple[float, float]], tuple[str, ...]]:
    """Centres for boxes of these radii, and the relations between neighbours, drawn by rejection.

    Centres are drawn uniformly, keeping every box inside the image, until each neighbour pair stands
    in one clear relation and the first and last of three boxes are at least GAP apart.
    """
    lows = [MARGIN + r for r in radii]  # least x or y of a centre
    for _ in range(10_000):
        uniform = rng.random((len(radii), 2)).tolist()
        xy = [(low + (1 - 2 * low) * u, low + (1 - 2 * low) * v) for low, (u, v) in zip(lows, uniform)]
        relations = tuple(_relation(xy[i], xy[i + 1], radii[i] + radii[i + 1]) for i in range(len(xy) - 1))
        if None not in relations and (len(xy) < 3 or _apart(xy[0], xy[2], radii[0] + radii[2])):
            return xy, relations
    raise RuntimeError(f"no layout found for radii {radii}")


def relation(a: Obj, b: Obj) -> str | None:
    """The relation object `a` clearly stands in to object `b` ("to the left of", ...), or None: the world's rule."""
    return _relation((a.x, a.y), (b.x, b.y), RADIUS[a.size] + RADIUS[b.size])


def orders(scene: Scene) -> list[Scene]:
    """The scene told in every order of its objects in which each neighbouring pair stands in one clear relation.

    That is the rule `sample_scene` draws layouts by, so each such order is a caption the world could
    have written for the same image; the reversed order always qualifies, others sometimes. Relations
    are read from the objects' centres, so a hand-built scene whose objects stand too close has none.
    """
    told = []
    for objects in itertools.permutations(scene.objects):
        relations = tuple(relation(a, b) for a, b in zip(objects, objects[1:]))
        if None not in relations:
            told.append(Scene(objects, relations))
    return told


def canonical(scene: Scene) -> Scene:
    """The scene in one fixed order of `orders(scene)`: the leftmost object first, then the leftmost of the rest.

    Named in any order that `orders` allows, one image would have up to six true captions; told
    canonically it has exactly one. `sample_scene` tells every scene canonically.
    """
    told = orders(scene)
    if not told:
        raise ValueError(f"no order of these objects has a clear relation between each neighbouring pair: {scene}")
    return min(told, key=lambda s: [(o.x, o.y) for o in s.objects])


def sample_scene(split: str, seed: int, index: int) -> Scene:
    """The scene at `index` of `split`: a pure function of its arguments, the same on every machine.

    1, 2 or 3 objects (equally likely) with distinct shapes and colours and sizes drawn uniformly;
    the relations follow from where the objects fall. The objects are told in their canonical order
    (`canonical`: the leftmost first), so each image has one caption: a caption whose objects come in
    a random order leaves the relation to agree with whichever object a model happened to name first,
    and `bench/diagnose.py` measured that even a fine-tuned LM given the true attributes then states
    two-object relations at chance. Told from the left, "to the right of" is rare (about 1 relation in
    80, in three-object scenes only), "to the left of" is about 44% of relations, "above" and "below" 28% each.
    "train" and "test" scenes hold no held-out colour–shape pair; "heldout" scenes exactly one.
    """
    _one_of(split, SPLITS, "split")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    n = int(rng.integers(1, 4))
    while True:  # redraw until the colour–shape pairs suit the split
        shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
        colours = [COLOURS[i] for i in rng.permutation(len(COLOURS))[:n]]
        if sum(pair in HELD_OUT_PAIRS for pair in zip(colours, shapes)) == (split == "heldout"):
            break
    sizes = [SIZES[i] for i in rng.integers(0, len(SIZES), n)]
    xy, relations = _layout(rng, [RADIUS[s] for s in sizes])
    objects = tuple(Obj(s, c, z, float(x), float(y)) for s, c, z, (x, y) in zip(shapes, colours, sizes, xy))
    return canonical(Scene(objects, relations))


def _check_image_size(image_size: int) -> None:
    """Raise a ValueError unless `image_size` is an int of at least MIN_IMAGE_SIZE."""
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an int of at least {MIN_IMAGE_SIZE} pixels "
                         f"(smaller shapes are unrecognisable), got {image_size!r}")  # fmt: skip


def render(scene: Scene, image_size: int) -> np.ndarray:
    """One (H, W, 3) uint8 image of a scene, H = W = image_size."""
    return render_batch([scene], image_size)[0]


def render_batch(scenes: Sequence[Scene], image_size: int, chunk: int = 1024) -> np.ndarray:
    """(N, H, W, 3) uint8 images of scenes, drawn `chunk` images at a time to bound memory."""
    _check_image_size(image_size)
    out = np.empty((len(scenes), image_size, image_size, 3), np.uint8)  # (N, H, W, 3)
    background = np.full((image_size, image_size, 3), BACKGROUND, np.uint8)  # (H, W, 3)
    for start in range(0, len(scenes), chunk):
        out[start : start + chunk] = background  # copying whole images: far faster than 3 bytes at a time
        _draw(out[start : start + chunk], scenes[start : start + chunk])
    return out


def _draw(out: np.ndarray, scenes: Sequence[Scene]) -> None:
    """Paint the scenes' objects into `out` (N, H, W, 3), all objects of one size and shape at once.

    An image holds at most one object of each shape, so a group never writes one pixel twice.
    """
    w = out.shape[1]
    owner, objs = zip(*[(n, o) for n, scene in enumerate(scenes) for o in scene.objects])
    owner = np.array(owner)  # (M,) image of each object
    kind = np.array([(SIZES.index(o.size), SHAPES.index(o.shape)) for o in objs])  # (M, 2)
    centre = np.array([(o.x, o.y) for o in objs]) * w  # (M, 2) in pixels
    colour = np.array([RGB[o.colour] for o in objs], np.float32)  # (M, 3)
    for size_id, size in enumerate(SIZES):
        r = RADIUS[size] * w  # box half-side in pixels
        p = math.ceil(2 * r) + 1  # P: a patch of P × P pixels holds the box wherever it falls
        samples = np.arange(p)[:, None] + SAMPLES.T[:, None]  # (2, P, S²) x or y of each pixel's samples in a patch
        for shape_id, shape in enumerate(SHAPES):
            group = np.flatnonzero((kind[:, 0] == size_id) & (kind[:, 1] == shape_id))
            if len(group) == 0:
                continue
            corner = np.clip(np.floor(centre[group] - r).astype(int), 0, w - p)  # (M, 2) patch top-left
            offset = (corner[:, :, None, None] + samples - centre[group, :, None, None]) / r  # (M, 2, P, S²)
            u, v = rearrange(offset, "m xy p k -> xy m p k")  # (M, P, S²) each, in units of the box half-side
            inside = INSIDE[shape](u[:, None], v[:, :, None])  # (M, P rows, P columns, S²)
            cover = reduce(inside.astype(np.float32), "m p q k -> m p q 1", "mean")  # fraction of samples inside
            rows, cols = corner[:, 1, None] + np.arange(p), corner[:, 0, None] + np.arange(p)  # (M, P) each
            where = (owner[group, None, None], rows[:, :, None], cols[:, None, :])
            old = out[where].astype(np.float32)  # (M, P, P, 3)
            out[where] = np.rint(old + cover * (colour[group, None, None] - old))


@dataclass(frozen=True)
class ShapesWorld:
    """One split of the shapes world: `length` samples, each a scene, its image and its caption."""

    split: str = "train"  # "train"; "test": other scenes, same distribution; "heldout": one held-out pair each
    image_size: int = 32  # H = W in pixels, at least MIN_IMAGE_SIZE
    seed: int = 0  # with split and index, fixes every sample
    length: int = 10_000  # number of samples

    def __post_init__(self):
        _one_of(self.split, SPLITS, "split")
        _check_image_size(self.image_size)
        for name in ("seed", "length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative int, got {getattr(self, name)!r}")

    def __len__(self) -> int:
        return self.length

    def _index(self, i: int) -> int:
        """`i` as an int in range(length), or an IndexError that says the range."""
        i = operator.index(i)
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} is out of range for a ShapesWorld of length {self.length}")
        return i

    def scene(self, i: int) -> Scene:
        """Sample i's scene."""
        return sample_scene(self.split, self.seed, self._index(i))

    def image(self, i: int) -> np.ndarray:
        """Sample i's (H, W, 3) uint8 image."""
        return render(self.scene(i), self.image_size)

    def caption(self, i: int) -> str:
        """Sample i's caption."""
        return caption(self.scene(i))

    def images(self, indices: Sequence[int]) -> np.ndarray:
        """(N, H, W, 3) uint8 images of many samples, rendered together: far faster than one by one."""
        return render_batch([self.scene(i) for i in indices], self.image_size)
