"""The shapes world: samples are pure functions of (split, seed, index), captions parse back exactly,
the splits keep the held-out pairs apart, every stated relation is true in the picture, images are
anti-aliased with the right colours and sizes, and bad input is refused clearly."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from minivlm.data.shapes import (
    BACKGROUND, GAP, HELD_OUT_PAIRS, OPPOSITE, RADIUS, RELATIONS, RGB, SHAPES, SIZES, SPLITS, Obj, ParsedScene, Scene,
    ShapesWorld, canonical, caption, describe, orders, parse_caption, questions, relation, render, render_batch,
    sample_scene, try_parse,
)  # fmt: skip

ROOT = Path(__file__).resolve().parents[1]
N_SCENES = 2000  # scenes checked per split


@cache
def scenes(split: str) -> tuple[Scene, ...]:
    """The first N_SCENES scenes of a split with seed 0, sampled once for all tests."""
    return tuple(sample_scene(split, 0, i) for i in range(N_SCENES))


def all_scenes():
    return [s for split in SPLITS for s in scenes(split)]


def scene_of(*objects: Obj, relations: tuple[str, ...] = ()) -> Scene:
    return Scene(tuple(objects), relations)


def pixels_of(image: np.ndarray, colour: str) -> np.ndarray:
    """(K, 2) rows and columns of the pixels fully covered by an object of `colour`."""
    return np.argwhere((image == RGB[colour]).all(-1))


def coverage(image: np.ndarray, colour: str) -> np.ndarray:
    """(H, W) fraction of each pixel covered by `colour`, unmixed from the background."""
    bg, fg = np.array(BACKGROUND, float), np.array(RGB[colour], float)
    return (bg - image) @ (bg - fg) / ((bg - fg) @ (bg - fg))


# ---- determinism ----------------------------------------------------------------------------------------


def test_samples_are_pure_functions_of_split_seed_and_index():
    a, b = ShapesWorld(split="test", seed=3, length=100), ShapesWorld(split="test", seed=3, length=100)
    forward = a.images(range(40))
    backward = b.images(range(39, -1, -1))[::-1]  # another object, the other order
    assert forward.tobytes() == backward.tobytes()
    assert [a.scene(i) for i in range(40)] == [b.scene(i) for i in range(40)]
    other = ShapesWorld(split="test", seed=4, length=100)
    assert sum(a.scene(i) != other.scene(i) for i in range(40)) == 40, "another seed must give other scenes"


def test_batch_rendering_equals_one_by_one():
    world = ShapesWorld(image_size=32, length=50)
    assert np.array_equal(world.images(range(50)), np.stack([world.image(i) for i in range(50)]))
    assert np.array_equal(render_batch(scenes("train")[:30], 40, chunk=7), render_batch(scenes("train")[:30], 40))


def test_first_captions_are_the_same_on_every_machine():
    """If you change the world on purpose, update these; otherwise a change here means lost reproducibility."""
    assert ShapesWorld().caption(0) == (
        "a large purple circle to the left of a large blue triangle, which is below a large red square."
    )
    assert ShapesWorld(split="test").caption(0) == "a small yellow diamond below a small green square."


# ---- captions and the parser ----------------------------------------------------------------------------


def test_captions_follow_the_grammar():
    red, blue = Obj("circle", "red", "large", 0.7, 0.3), Obj("square", "blue", "small", 0.2, 0.3)
    green = Obj("triangle", "green", "small", 0.7, 0.8)
    assert caption(scene_of(red)) == "a large red circle."
    assert caption(scene_of(blue, red, relations=("to the left of",))) == (
        "a small blue square to the left of a large red circle."
    )
    three = scene_of(blue, red, green, relations=("to the left of", "above"))
    assert caption(three) == (
        "a small blue square to the left of a large red circle, which is above a small green triangle."
    )
    assert parse_caption(caption(three)) == ParsedScene(
        objects=(("small", "blue", "square"), ("large", "red", "circle"), ("small", "green", "triangle")),
        relations=("to the left of", "above"),
    )


def test_parser_round_trips_every_caption():
    for scene in all_scenes():
        assert parse_caption(caption(scene)) == describe(scene)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a huge red circle.", "size in"),
        ("a red circle.", "size in"),
        ("a large red circle", r"expected '\.' or ' <relation> '"),
        ("a large red circle near a small blue square.", "relation one of"),
        ("a large red circle above a small blue square above a small green triangle.", "which is"),
        ("a large red circle above a small blue square, which is below a small green triangle, "
         "which is above a small purple diamond.", "at most three objects"),
        ("A large red circle.", "size in"),
        ("a large red circle. ", r"expected '\.'"),
        ("", "size in"),
    ],
)  # fmt: skip
def test_parser_rejects_text_outside_the_grammar(text, expected):
    with pytest.raises(ValueError, match="not a shapes-world caption") as error:
        parse_caption(text)
    assert repr(text) in str(error.value)
    assert error.match(expected)
    assert try_parse(text) is None


def test_parser_checks_grammar_not_possibility():
    """A model that names two red objects still gets a parse, so each attribute can be scored."""
    text = "a small red circle to the left of a large red circle."
    assert try_parse(text).objects == (("small", "red", "circle"), ("large", "red", "circle"))


# ---- splits and the distribution ------------------------------------------------------------------------


def held_out(scene: Scene) -> int:
    return sum((o.colour, o.shape) in HELD_OUT_PAIRS for o in scene.objects)


def test_train_and_test_never_show_a_held_out_pair_and_heldout_always_does():
    assert all(held_out(s) == 0 for s in scenes("train") + scenes("test"))
    assert all(held_out(s) == 1 for s in scenes("heldout"))
    seen = {(o.colour, o.shape) for s in scenes("heldout") for o in s.objects}
    assert seen >= set(HELD_OUT_PAIRS), "every held-out pair is tested"


def test_train_and_test_are_different_scenes():
    train, test = scenes("train")[:300], scenes("test")[:300]
    assert not set(train) & set(test)
    train_images = {image.tobytes() for image in render_batch(train, 32)}
    assert not train_images & {image.tobytes() for image in render_batch(test, 32)}


def test_counts_and_sizes_are_balanced_and_relations_read_from_the_left():
    """1–3 objects and both sizes about equally often (2,000 scenes: within a few percent). Told from the
    left, "above" and "below" come equally often, "to the left of" most, "to the right of" only rarely."""
    train = scenes("train")
    counts = Counter(len(s.objects) for s in train)
    sizes = Counter(o.size for s in train for o in s.objects)
    for counter, k in ((counts, 3), (sizes, 2)):
        share = np.array(list(counter.values())) / sum(counter.values())
        assert len(counter) == k and np.all(abs(share - 1 / k) < 0.05), counter
    relations = Counter(r for s in train for r in s.relations)
    share = {r: n / sum(relations.values()) for r, n in relations.items()}
    assert abs(share["above"] - share["below"]) < 0.03 and share["to the left of"] > 0.4, share
    assert 0 < share["to the right of"] < 0.03, share


def test_every_scene_is_told_in_its_canonical_order():
    assert all(canonical(scene) == scene for scene in all_scenes())


# ---- scene geometry -------------------------------------------------------------------------------------


def test_scene_invariants_hold_for_every_sample():
    for scene in all_scenes():
        objs = scene.objects
        assert len({o.shape for o in objs}) == len({o.colour for o in objs}) == len(objs)
        for o in objs:  # the box of every object lies inside the image
            r = RADIUS[o.size]
            assert 0 <= o.x - r and o.x + r <= 1 and 0 <= o.y - r and o.y + r <= 1
        for i, a in enumerate(objs):  # boxes never overlap: they are GAP apart along x or y
            for b in objs[i + 1 :]:
                assert max(abs(a.x - b.x), abs(a.y - b.y)) >= RADIUS[a.size] + RADIUS[b.size] + GAP - 1e-12


def test_every_stated_relation_is_clearly_true():
    """'a to the left of b': a's box ends before b's begins, and b is less than half as far off level as
    it is to the side. Likewise for the other three (y grows downward)."""
    for scene in all_scenes():
        for a, relation, b in zip(scene.objects, scene.relations, scene.objects[1:]):
            dx, dy = b.x - a.x, b.y - a.y
            along, across = {"to the left of": (dx, dy), "to the right of": (-dx, dy),
                             "above": (dy, dx), "below": (-dy, dx)}[relation]  # fmt: skip
            assert along >= RADIUS[a.size] + RADIUS[b.size] + GAP - 1e-12, (scene, relation)
            assert abs(across) <= 0.5 * along, (scene, relation)


def test_orders_tell_the_same_scene_and_include_its_own_and_the_reverse():
    for scene in scenes("test")[:500]:
        told = orders(scene)
        reverse = Scene(scene.objects[::-1], tuple(OPPOSITE[r] for r in scene.relations[::-1]))
        assert scene in told and reverse in told
        assert len(set(told)) == len(told) and all(sorted(t.objects, key=repr) == sorted(scene.objects, key=repr)
                                                   for t in told)  # fmt: skip
        assert {parse_caption(caption(t)) for t in told} == {describe(t) for t in told}  # each a caption


def test_canonical_names_the_leftmost_object_first_and_is_one_caption_per_image():
    circle, square = Obj("circle", "red", "small", 0.8, 0.5), Obj("square", "blue", "large", 0.2, 0.5)
    assert canonical(scene_of(circle, square, relations=("to the right of",))) == scene_of(
        square, circle, relations=("to the left of",))
    above = scene_of(Obj("circle", "red", "small", 0.5, 0.8), Obj("square", "blue", "large", 0.45, 0.2),
                     relations=("below",))  # fmt: skip
    assert canonical(above).objects[0].shape == "square" and canonical(above).relations == ("above",)
    for scene in scenes("train")[:500]:
        first = canonical(scene)
        assert first in orders(scene) and canonical(first) == first
        assert all(canonical(t) == first for t in orders(scene))  # every true caption of an image: one canonical
        assert [o.x for o in first.objects][0] == min(o.x for o in scene.objects) or len(scene.objects) == 3


def test_relation_reads_the_clear_relation_from_the_centres():
    left, right = Obj("circle", "red", "small", 0.2, 0.5), Obj("square", "blue", "large", 0.8, 0.5)
    top = Obj("triangle", "green", "small", 0.8, 0.1)
    assert relation(left, right) == "to the left of" and relation(right, left) == "to the right of"
    assert relation(top, right) == "above" and relation(right, top) == "below"
    assert relation(left, Obj("square", "blue", "small", 0.25, 0.5)) is None  # too close to be clear


def test_canonical_refuses_objects_with_no_clear_relation():
    touching = scene_of(Obj("circle", "red", "small", 0.5, 0.5), Obj("square", "blue", "small", 0.52, 0.5),
                        relations=("to the left of",))  # fmt: skip
    assert orders(touching) == []
    with pytest.raises(ValueError, match="no order of these objects has a clear relation"):
        canonical(touching)


def test_relations_are_true_in_the_pixels():
    """Every fully covered pixel of the first object lies on the stated side of every one of the second."""
    chained = [s for s in scenes("train")[:400] if s.relations]
    for scene, image in zip(chained, render_batch(chained, 64)):
        for a, relation, b in zip(scene.objects, scene.relations, scene.objects[1:]):
            pa, pb = pixels_of(image, a.colour), pixels_of(image, b.colour)  # (K, 2) rows, columns
            side = {"to the left of": pa[:, 1].max() < pb[:, 1].min(),
                    "to the right of": pa[:, 1].min() > pb[:, 1].max(),
                    "above": pa[:, 0].max() < pb[:, 0].min(),
                    "below": pa[:, 0].min() > pb[:, 0].max()}  # fmt: skip
            assert side[relation], (caption(scene), scene)


# ---- rendering ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [24, 32, 64])
def test_images_are_uint8_rgb_of_the_asked_size(size):
    world = ShapesWorld(image_size=size, length=8)
    image = world.image(0)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert world.images([0, 5, 5]).shape == (3, size, size, 3)
    assert render(world.scene(0), size).tobytes() == image.tobytes()


@pytest.mark.parametrize("size", [32, 64])
def test_edges_are_anti_aliased(size):
    """Pixels on an edge are blends: neither the background nor any object's colour."""
    pure = np.array([BACKGROUND, *RGB.values()])  # (6, 3)
    for image in ShapesWorld(image_size=size, length=50).images(range(50)):
        blends = ~(image[:, :, None] == pure).all(-1).any(-1)  # (H, W)
        assert blends.sum() >= 4


def test_the_pixel_at_each_centre_has_the_objects_colour():
    chosen = scenes("test")[:300]
    for scene, image in zip(chosen, render_batch(chosen, 64)):
        for o in scene.objects:
            assert tuple(image[int(o.y * 64), int(o.x * 64)]) == RGB[o.colour], (o, caption(scene))


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("shape", SHAPES)
def test_coverage_adds_up_to_the_true_area_and_large_is_3_5x_small(shape, size):
    """Anti-aliasing by coverage: the blended pixels sum to the shape's area (within 5% and half a pixel:
    16 samples a pixel place an edge only so finely), wherever the shape falls."""
    area = {"circle": math.pi * 0.9**2, "square": 1.6**2, "triangle": 2.0, "diamond": 2.0}[shape]  # in radius²
    measured = {}
    for size_name in SIZES:
        colour = "purple"
        objs = [Obj(shape, colour, size_name, x, y) for x, y in ((0.5, 0.5), (0.31, 0.62), (0.777, 0.2))]
        images = render_batch([scene_of(o) for o in objs], size)
        measured[size_name] = [coverage(image, colour).sum() for image in images]  # pixels
        true = area * (RADIUS[size_name] * size) ** 2
        assert np.allclose(measured[size_name], true, rtol=0.05, atol=0.5), (size_name, measured[size_name], true)
    ratio = np.array(measured["large"]) / np.array(measured["small"])
    assert np.all((3 < ratio) & (ratio < 4)), ratio  # radius ratio 0.14 / 0.075 ≈ 1.87, area ratio ≈ 3.5


def test_triangles_point_up_and_diamonds_are_widest_in_the_middle():
    for shape, check in (("triangle", lambda rows: rows[: len(rows) // 2].sum() < 0.5 * rows[len(rows) // 2 :].sum()),
                         ("diamond", lambda rows: rows.argmax() in (len(rows) // 2 - 1, len(rows) // 2))):  # fmt: skip
        cover = coverage(render(scene_of(Obj(shape, "blue", "large", 0.5, 0.5)), 64), "blue")  # (H, W)
        rows = cover.sum(1)[cover.sum(1) > 0.01]  # covered width of each row the shape touches, top to bottom
        assert check(rows), (shape, rows.round(1))


# ---- questions ------------------------------------------------------------------------------------------


def test_questions_for_a_known_scene():
    blue, red = Obj("square", "blue", "small", 0.2, 0.5), Obj("circle", "red", "large", 0.7, 0.5)
    assert questions(scene_of(blue, red, relations=("to the left of",))) == [
        ("how many objects are there?", "two"),
        ("what colour is the square?", "blue"),
        ("what shape is the blue object?", "square"),
        ("what size is the blue square?", "small"),
        ("what colour is the circle?", "red"),
        ("what shape is the red object?", "circle"),
        ("what size is the red circle?", "large"),
        ("is the blue square to the left of the red circle?", "yes"),
        ("is the blue square to the right of the red circle?", "no"),
    ]


def test_question_answers_agree_with_every_scene():
    for scene in scenes("heldout")[:500]:
        by_shape = {o.shape: o for o in scene.objects}
        by_colour = {o.colour: o for o in scene.objects}
        qa = questions(scene)
        assert len(qa) == 3 * len(scene.objects) + 2 * len(scene.relations) + 1
        for question, answer in qa:
            words = question.rstrip("?").split()
            assert " " not in answer
            if question.startswith("how many"):
                assert answer == ("one", "two", "three")[len(scene.objects) - 1]
            elif question.startswith("what colour"):
                assert answer == by_shape[words[-1]].colour
            elif question.startswith("what shape"):
                assert answer == by_colour[words[-2]].shape
            elif question.startswith("what size"):
                assert answer == by_colour[words[-2]].size == by_shape[words[-1]].size
            else:  # "is the red circle above the blue square?": true only for the stated relation
                a, b = by_colour[words[2]], by_colour[words[-2]]
                stated = scene.relations[scene.objects.index(a)]
                assert scene.objects.index(b) == scene.objects.index(a) + 1
                assert (answer == "yes") == (" ".join(words[4:-3]) == stated)
                assert " ".join(words[4:-3]) in RELATIONS


# ---- bad input ------------------------------------------------------------------------------------------


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match=r"unknown split 'val'; expected one of \('train', 'test', 'heldout'\)"):
        ShapesWorld(split="val")
    with pytest.raises(ValueError, match="image_size must be an int of at least 24 pixels.*got 16"):
        ShapesWorld(image_size=16)
    with pytest.raises(ValueError, match="length must be a non-negative int"):
        ShapesWorld(length=-1)
    world = ShapesWorld(length=10)
    for i in (10, -1):
        with pytest.raises(IndexError, match=f"index {i} is out of range for a ShapesWorld of length 10"):
            world.image(i)
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        Obj("circle", "pink", "small", 0.5, 0.5)
    red_circle, red_square = Obj("circle", "red", "small", 0.2, 0.5), Obj("square", "red", "small", 0.8, 0.5)
    with pytest.raises(ValueError, match="distinct colours"):
        scene_of(red_circle, red_square, relations=("to the left of",))
    with pytest.raises(ValueError, match="1 to 3 objects and one relation fewer"):
        scene_of(red_circle, relations=("above",))
    with pytest.raises(ValueError, match="unknown relation 'near'"):
        scene_of(red_circle, Obj("square", "blue", "small", 0.8, 0.5), relations=("near",))


def test_render_benchmark_quick_run():
    out = subprocess.run([sys.executable, "bench/render.py", "--quick"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "render batch" in out.stdout and "/s" in out.stdout
