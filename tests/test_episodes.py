"""Few-shot episodes: only the context can give the answer, the structure is Frozen's, and bad settings are refused."""

from __future__ import annotations

import numpy as np
import pytest

from minivlm.data import shapes as S
from minivlm.data.episodes import ATTRIBUTES, binding_episode, single_object_scene, to_prompts, vqa_episode


def attribute_of(scene: S.Scene, attribute: str) -> str:
    (obj,) = scene.objects
    return getattr(obj, attribute)


@pytest.mark.parametrize("attribute, ways", [("shape", 2), ("shape", 4), ("colour", 5)])
@pytest.mark.parametrize("shots, repeats", [(1, 1), (3, 2)])
def test_binding_episode_names_each_category_and_asks_about_one(attribute, ways, shots, repeats):
    rng = np.random.default_rng(0)
    for _ in range(20):
        e = binding_episode(rng, ways, shots, attribute=attribute, repeats=repeats)
        assert e.segments[0] == f"answer with {' or '.join(e.candidates)}."
        scenes = [s for s in e.segments if isinstance(s, S.Scene)]
        assert len(scenes) == ways * shots * repeats + 1
        assert len(set(e.candidates)) == ways and e.answer in e.candidates
        named = {}  # category -> the name that followed its support images
        for scene, text in zip(e.segments[1:-2:2], e.segments[2:-2:2]):
            assert text.startswith(" this is a ") and text.endswith(".")
            named.setdefault(attribute_of(scene, attribute), set()).add(text[len(" this is a ") : -1])
        assert len(named) == ways and all(len(n) == 1 for n in named.values())  # one name per category
        assert named[attribute_of(e.segments[-2], attribute)] == {e.answer}  # the query's category has its name
        assert e.segments[-1] == " this is a"
        for scene in scenes:
            assert all(pair not in S.HELD_OUT_PAIRS for pair in [(scene.objects[0].colour, scene.objects[0].shape)])


def test_query_image_is_new_and_categories_vary():
    rng = np.random.default_rng(1)
    episodes = [binding_episode(rng, 2, 1) for _ in range(200)]
    assert all(e.segments[-2] not in e.segments[:-2] for e in episodes)
    assert {e.answer == e.candidates[0] for e in episodes} == {True, False}  # the answer is not always first
    assert {attribute_of(e.segments[-2], "colour") for e in episodes} == set(S.COLOURS)
    assert {attribute_of(e.segments[-2], "shape") for e in episodes} == set(S.SHAPES)  # the other attribute varies
    # unless told otherwise, names follow the colour, as in the course corpus's binding documents
    assert episodes[0] == binding_episode(np.random.default_rng(1), 2, 1, attribute="colour")
    assert episodes[0] != binding_episode(np.random.default_rng(1), 2, 1, attribute="shape")


def test_episodes_are_a_function_of_the_generator():
    one, two = (binding_episode(np.random.default_rng(5), 5, 1, attribute="colour") for _ in range(2))
    assert one == two


def test_heldout_split_uses_heldout_pairs_only():
    rng = np.random.default_rng(2)
    for attribute in ATTRIBUTES:
        e = binding_episode(rng, 4, 1, attribute=attribute, split="heldout")
        for scene in (s for s in e.segments if isinstance(s, S.Scene)):
            assert (scene.objects[0].colour, scene.objects[0].shape) in S.HELD_OUT_PAIRS
    with pytest.raises(ValueError, match="ways must be 1 to 4"):  # purple is in no held-out pair
        binding_episode(rng, 5, 1, attribute="colour", split="heldout")


def test_zero_shots_and_task_induction_and_made_up_names():
    rng = np.random.default_rng(3)
    e = binding_episode(rng, 2, 0)
    assert len(e.segments) == 3 and e.segments[0].startswith("answer with ")  # induction, query, "this is a"
    e = binding_episode(rng, 2, 1, task_induction=False, made_up_names=True)
    assert isinstance(e.segments[0], S.Scene)
    from minivlm.corpus import NAMES

    assert not set(e.candidates) & set(NAMES)


def test_bad_binding_settings_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown attribute"):
        binding_episode(rng, 2, 1, attribute="size")
    with pytest.raises(ValueError, match="ways must be 1 to 4"):
        binding_episode(rng, 5, 1, attribute="shape")
    with pytest.raises(ValueError, match="never says a name"):
        binding_episode(rng, 2, 0, task_induction=False)
    with pytest.raises(ValueError, match="shots >= 0"):
        binding_episode(rng, 2, -1)
    with pytest.raises(ValueError, match="unknown attributes"):
        single_object_scene(rng, weight="heavy")


@pytest.mark.parametrize("kind", ["colour", "shape"])
def test_vqa_answers_are_true_of_the_asked_scene(kind):
    rng = np.random.default_rng(4)
    for shots in (0, 2):
        e = vqa_episode(rng, shots, kind=kind)
        scenes = [s for s in e.segments if isinstance(s, S.Scene)]
        assert len(scenes) == shots + 1
        question = e.segments[-1].removeprefix(" q: ").removesuffix(" a:")
        assert (question, e.answer) in S.questions(scenes[-1])
        assert e.answer in e.candidates == ATTRIBUTES[kind]
        for scene, text in zip(e.segments[:-2:2], e.segments[1:-2:2]):  # the solved examples are right too
            q, _, a = text.removeprefix(" q: ").rpartition(" a: ")
            assert (q, a.removesuffix(".")) in S.questions(scene)


def test_to_prompts_checks_the_mode():
    with pytest.raises(ValueError, match="unknown mode"):
        to_prompts([binding_episode(np.random.default_rng(0), 2, 1)], "audio")
