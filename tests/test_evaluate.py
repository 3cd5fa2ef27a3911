"""minivlm.evaluate: attribute scores on hand-made captions; n-gram metrics equal pycocoevalcap's own; the table."""

from __future__ import annotations

import math

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from minivlm.data.shapes import ShapesWorld, parse_caption
from minivlm.evaluate import (
    ATTRIBUTES, CAPTION_METRICS, ERROR_KINDS, attribute_scores, caption_metrics, error_kinds, evaluate_captions,
    metrics_table, simple_tokenize, true_captions,
)  # fmt: skip

TRUE = "a small red circle to the left of a large blue square."
ALL_RIGHT = dict.fromkeys(ATTRIBUTES, 1.0)
WORLD = ShapesWorld("test", seed=0, length=60)
CAPTIONS = [WORLD.caption(i) for i in range(len(WORLD))]


@pytest.mark.parametrize(
    "prediction, wrong",
    [
        (TRUE, {}),
        (f"  {TRUE}\n", {}),  # surrounding whitespace is stripped
        ("a small green circle to the left of a large blue square.", {"exact match": 0, "colour": 0.5}),
        ("a small red circle to the left of a small blue square.", {"exact match": 0, "size": 0.5}),
        ("a small red triangle to the left of a large blue square.", {"exact match": 0, "shape": 0.5}),
        ("a small red circle above a large blue square.", {"exact match": 0, "relation": 0}),
        # one object short: the first object is still right, the missing one and its relation are not
        ("a small red circle.", {"exact match": 0, "count": 0, "colour": 0.5, "shape": 0.5, "size": 0.5,
                                 "relation": 0}),
        # one object too many costs only count and exact match
        (TRUE[:-1] + ", which is above a small green triangle.", {"exact match": 0, "count": 0}),
        ("a small red blob to the left of a large blue square.", dict.fromkeys(ATTRIBUTES, 0.0)),  # unparseable
        ("", dict.fromkeys(ATTRIBUTES, 0.0)),
    ],
)
def test_attribute_scores_lower_exactly_what_is_wrong(prediction, wrong):
    assert attribute_scores([prediction], [TRUE]) == ALL_RIGHT | wrong


def test_attribute_scores_average_over_objects_and_relations_of_all_captions():
    references = ["a large green diamond.", TRUE]
    predictions = ["a large green diamond.", "a small red circle below a large purple square."]
    scores = attribute_scores(predictions, references)
    assert scores["exact match"] == 0.5 and scores["count"] == 1.0
    assert scores["colour"] == pytest.approx(2 / 3)  # 3 objects in all, 2 colours right
    assert scores["relation"] == 0.0  # the one relation is wrong; the one-object caption has none
    assert math.isnan(attribute_scores(["a large green diamond."], ["a large green diamond."])["relation"])


def test_several_references_score_a_prediction_against_the_one_it_matches():
    reversed_true = "a large blue square to the right of a small red circle."
    assert attribute_scores([reversed_true], [[TRUE, reversed_true]]) == ALL_RIGHT
    assert attribute_scores([reversed_true], [TRUE])["colour"] == 0.0


def test_true_captions_are_every_ordering_of_the_same_objects():
    for i in range(len(WORLD)):
        scene = WORLD.scene(i)
        captions = true_captions(scene)
        assert captions[0] == CAPTIONS[i] and len(set(captions)) == len(captions)
        assert len(captions) >= min(len(scene.objects), 2)  # the reversed order is always true
        objects = sorted(parse_caption(CAPTIONS[i]).objects)
        assert all(sorted(parse_caption(c).objects) == objects for c in captions)
        # a perfect model's reversed caption is an exact match once all true captions are references
        scores = attribute_scores([captions[-1]], [captions]).values()
        assert all(v == 1.0 or math.isnan(v) for v in scores)  # NaN: a one-object scene has no relation


@pytest.mark.parametrize(
    "predictions, references",
    [([TRUE], [TRUE, TRUE]), ([], []), (TRUE, TRUE), ([TRUE], [[]])],
    ids=["length mismatch", "empty", "a string, not a list", "no reference"],
)
def test_bad_inputs_raise(predictions, references):
    for score in (attribute_scores, caption_metrics, evaluate_captions):
        with pytest.raises(ValueError, match="prediction"):
            score(predictions, references)


@pytest.mark.parametrize(
    "prediction, kind",
    [
        (TRUE, "exact match"),
        ("a large blue square to the right of a small red circle.", "exact match"),  # another true order
        ("a small red circle.", "count or grammar wrong"),
        ("a small red blob to the left of a large blue square.", "count or grammar wrong"),
        ("a small green circle to the left of a large blue square.", "a colour or shape wrong"),
        ("a small red circle to the left of a large blue triangle.", "a colour or shape wrong"),
        ("a small red square to the left of a large blue circle.", "colours and shapes paired wrongly"),
        ("a small blue circle to the left of a large red square.", "colours and shapes paired wrongly"),
        ("a large red circle to the left of a large blue square.", "size, relation or order wrong"),
        ("a small red circle above a large blue square.", "size, relation or order wrong"),
        ("a large blue square to the left of a small red circle.", "size, relation or order wrong"),
    ],
)
def test_error_kinds_sort_each_caption_into_the_first_kind_that_fits(prediction, kind):
    references = [[TRUE, "a large blue square to the right of a small red circle."]]  # the scene's two true captions
    assert error_kinds([prediction], references) == {k: float(k == kind) for k in ERROR_KINDS}


def test_error_kinds_are_fractions_that_add_up_to_one():
    predictions = [TRUE, "a small red square to the left of a large blue circle.", "", TRUE]
    kinds = error_kinds(predictions, [TRUE] * 4)
    assert list(kinds) == list(ERROR_KINDS) and sum(kinds.values()) == pytest.approx(1.0)
    assert (kinds["exact match"], kinds["colours and shapes paired wrongly"], kinds["count or grammar wrong"]) == (
        0.5, 0.25, 0.25)
    with pytest.raises(ValueError, match="prediction"):
        error_kinds([TRUE], [])


def test_a_reference_outside_the_grammar_raises():
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        attribute_scores([TRUE], ["a red circle."])


def test_simple_tokenize_lowercases_and_drops_punctuation():
    text = " A small red circle, which is Above a  square.\n"
    assert simple_tokenize(text) == "a small red circle which is above a square"


def test_identical_captions_score_one():
    scores = caption_metrics(CAPTIONS, CAPTIONS)
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == 1.0
    assert scores["CIDEr"] == pytest.approx(10.0)  # pycocoevalcap's CIDEr-D scale is 0-10


def test_cider_ranks_right_captions_above_shuffled_ones():
    shuffled = CAPTIONS[1:] + CAPTIONS[:1]
    right, wrong = caption_metrics(CAPTIONS, CAPTIONS), caption_metrics(shuffled, CAPTIONS)
    assert wrong["CIDEr"] < right["CIDEr"] / 2
    assert all(wrong[name] < right[name] for name in CAPTION_METRICS)


def test_caption_metrics_equal_pycocoevalcap_called_directly():
    predictions = ["A small red circle.", "a large blue square above a small red circle", "a small green diamond."]
    references = [
        ["a small red circle.", "A small red circle to the left of a large blue square."],
        "a large blue square above a small green circle.",
        ["a small green diamond."],
    ]  # one image with two references, one as a bare string, one as a list of one
    res = {0: ["a small red circle"], 1: ["a large blue square above a small red circle"], 2: ["a small green diamond"]}
    gts = {
        0: ["a small red circle", "a small red circle to the left of a large blue square"],
        1: ["a large blue square above a small green circle"],
        2: ["a small green diamond"],
    }
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected = bleu + [Rouge().compute_score(gts, res)[0], Cider().compute_score(gts, res)[0]]
    scores = caption_metrics(predictions, references)
    assert list(scores) == list(CAPTION_METRICS)
    assert list(scores.values()) == pytest.approx(expected, rel=1e-12)


def test_evaluate_captions_holds_every_number():
    assert list(evaluate_captions(CAPTIONS[:5], CAPTIONS[:5])) == list(ATTRIBUTES + CAPTION_METRICS)


def test_metrics_table_puts_splits_side_by_side():
    results = {"test": {"exact match": 0.5, "CIDEr": 1.234}, "heldout": {"exact match": 0.25, "relation": math.nan}}
    table = metrics_table(results)
    lines = table.splitlines()
    assert lines[0] == "| metric | test | heldout |"
    assert lines[2:] == ["| exact match | 50.0 | 25.0 |", "| CIDEr | 123.4 | – |", "| relation | – | – |"]
    with pytest.raises(ValueError, match="at least one split"):
        metrics_table({})
