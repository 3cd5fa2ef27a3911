"""Lesson 05's self-checks: each fails on the blank and on plausible mistakes, with the right hint, and
passes on correct answers (written two ways each, and the package's own Captioner.embed and RMSNorm)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from minivlm.__main__ import main
from minivlm.exercises import ExerciseFailed, ExerciseNotDone, check


def blank(*args):
    raise NotImplementedError("Exercise 5.x: blank")


# Correct answers -------------------------------------------------------------------------------------------


def build_inputs(prefix, input_ids, attention_mask, embedding):
    ones = attention_mask.new_ones(prefix.shape[:2])
    return torch.cat([prefix, embedding(input_ids)], dim=1), torch.cat([ones, attention_mask], dim=1)


def build_inputs_bool(prefix, input_ids, attention_mask, embedding):
    """Another correct answer: the table indexed directly, a boolean mask."""
    b, p, _ = prefix.shape
    mask = torch.cat([torch.ones(b, p, dtype=torch.bool), attention_mask.bool()], dim=1)
    return torch.cat([prefix, embedding.weight[input_ids]], dim=1), mask


def caption_labels(input_ids, attention_mask, prefix_length):
    ignored = input_ids.new_full((input_ids.shape[0], prefix_length), -100)
    return torch.cat([ignored, input_ids.masked_fill(attention_mask == 0, -100)], dim=1)


def caption_labels_where(input_ids, attention_mask, prefix_length):
    """Another correct answer: torch.where over the full (B, P + T) mask."""
    full_mask = F.pad(attention_mask, (prefix_length, 0), value=0)  # the prefix counts as "not a label"
    full_ids = F.pad(input_ids, (prefix_length, 0), value=0)
    return torch.where(full_mask.bool(), full_ids, torch.tensor(-100))


def token_scale(weight):
    return weight.square().sum(-1).mean().sqrt()


def token_scale_float(weight):
    return float(torch.linalg.vector_norm(weight, dim=1).pow(2).mean() ** 0.5)


def rescale(prefix, target):
    return prefix / prefix.norm(dim=-1, keepdim=True) * target


def rescale_rms(prefix, target):
    """Another correct answer: minivlm.prefix's own formula."""
    d = prefix.shape[-1]
    return F.rms_norm(prefix, (d,), eps=1e-6) * target / d**0.5


def test_blanks_are_not_done():
    cases = [("5.1", [blank]), ("5.2", [blank]), ("5.3", [blank, rescale]), ("5.3", [token_scale, blank])]
    for exercise, answers in cases:
        with pytest.raises(ExerciseNotDone, match=f"^Exercise {exercise} is not done yet"):
            check(exercise, *answers)


def test_correct_answers_pass(capsys):
    check("5.1", build_inputs)
    check("5.1", build_inputs_bool)
    check("5.2", caption_labels)
    check("5.2", caption_labels_where)
    check("5.3", token_scale, rescale)
    check("5.3", token_scale_float, rescale_rms)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"Exercise 5.{n} passed" for n in (1, 1, 2, 2, 3, 3)]


# Exercise 5.1 mistakes --------------------------------------------------------------------------------------


def _ones(prefix, mask):
    return mask.new_ones(prefix.shape[:2])


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        (lambda x, ids, m, e: (torch.cat([e(ids), x], 1), torch.cat([m, _ones(x, m)], 1)),
         "your prefix comes after the text"),
        (lambda x, ids, m, e: (torch.cat([x, e(ids)], 1), m), "needs P ones for the prefix in front"),
        (lambda x, ids, m, e: (torch.cat([x, e(ids)], 1), torch.cat([0 * _ones(x, m), m], 1)),
         "the prefix positions are 0 in your mask"),
        (lambda x, ids, m, e: (torch.cat([x, e(ids)], 1), torch.cat([m, _ones(x, m)], 1)),
         "puts the prefix's ones after the caption's mask"),
        (lambda x, ids, m, e: (torch.cat([x, e(ids)], 1), torch.ones(m.shape[0], x.shape[1] + m.shape[1])),
         "your mask is all ones"),
        (lambda x, ids, m, e: (torch.cat([x.detach(), e(ids)], 1), torch.cat([_ones(x, m), m], 1)),
         "do not depend on the prefix for autograd"),
        (lambda x, ids, m, e: (e(ids), m), "the tokens alone"),
        (lambda x, ids, m, e: (torch.cat([x, e(ids)], 0), m), "raised RuntimeError"),
        (lambda x, ids, m, e: (torch.cat([x[:, :1].expand(-1, ids.shape[1], -1), e(ids)], 0), m),
         "you joined along the batch axis"),
        (lambda x, ids, m, e: (torch.cat([x, e(ids) * 2], 1), torch.cat([_ones(x, m), m], 1)),
         "the token part is wrong"),
        (lambda x, ids, m, e: torch.cat([x, e(ids)], 1), "should return two tensors"),
    ],
)  # fmt: skip
def test_build_inputs_mistakes_get_their_hint(mistake, hint):
    with pytest.raises(ExerciseFailed, match=re.escape(hint)):
        check("5.1", mistake)


# Exercise 5.2 mistakes --------------------------------------------------------------------------------------


def _prefix_labels(ids, p, value=-100):
    return ids.new_full((ids.shape[0], p), value)


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        (lambda ids, m, p: ids.masked_fill(m == 0, -100), "P labels of -100 for the prefix in front"),
        (lambda ids, m, p: torch.cat([_prefix_labels(ids, p, 0), ids.masked_fill(m == 0, -100)], 1),
         "the prefix positions must be -100"),
        (lambda ids, m, p: torch.cat([_prefix_labels(ids, p), ids], 1), "the padding positions (attention_mask 0)"),
        (lambda ids, m, p: torch.cat([_prefix_labels(ids, p), ids.masked_fill(ids == 0, -100)], 1),
         "GPT-2 pads with EOT itself"),
        (lambda ids, m, p: torch.cat([_prefix_labels(ids, p), ids.masked_fill(m == 0, -100)], 1)[:, 1:],
         "do not shift or cut the labels"),
        (lambda ids, m, p: F.pad(torch.cat([_prefix_labels(ids, p), ids.masked_fill(m == 0, -100)], 1)[:, 1:], (0, 1),
                                 value=-100), "shifted twice"),
        (lambda ids, m, p: torch.cat([_prefix_labels(ids, 4), ids.masked_fill(m == 0, -100)], 1),
         "use the prefix_length argument"),
        (lambda ids, m, p: torch.cat([_prefix_labels(ids, p), ids.masked_fill_(m == 0, -100)], 1), "in place"),
        (lambda ids, m, p: torch.cat([_prefix_labels(ids, p), ids.masked_fill(m == 0, -100)], 1).float(),
         "labels are token ids, an integer"),
    ],
)  # fmt: skip
def test_caption_labels_mistakes_get_their_hint(mistake, hint):
    with pytest.raises(ExerciseFailed, match=re.escape(hint)):
        check("5.2", mistake)


# Exercise 5.3 mistakes --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        (lambda w: w.norm(dim=-1).mean(), "the plain mean of the lengths"),
        (lambda w: w.norm(dim=-1).max(), "you took the longest embedding"),
        (lambda w: w.square().mean().sqrt(), "the scale of one coordinate"),
        (lambda w: w.square().sum(0).mean().sqrt(), "you summed the squares over the tokens (dim=0)"),
        (lambda w: w.square().sum(-1).mean(), "you forgot the square root"),
        (lambda w: w.norm(dim=-1), "returned the V = 128 lengths"),
        (lambda w: w.norm(dim=0), "one per *column*"),
        (lambda w: "1.8", "should return a number, got str"),
    ],
)  # fmt: skip
def test_token_scale_mistakes_get_their_hint(mistake, hint):
    with pytest.raises(ExerciseFailed, match=re.escape(hint)):
        check("5.3", mistake, rescale)


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        (lambda x, s: x / x.norm(dim=1, keepdim=True) * s, "over the prefix axis P (dim=1)"),
        (lambda x, s: x / x.norm(dim=0, keepdim=True) * s, "over the batch axis (dim=0)"),
        (lambda x, s: x / x.norm(dim=(1, 2), keepdim=True) * s, "whole (P, D) prefix"),
        (lambda x, s: x / x.norm(dim=-1, keepdim=True).max() * s, "by the longest one's length"),
        (lambda x, s: x / x.norm(dim=-1, keepdim=True).mean() * s, "by the mean length"),
        (lambda x, s: F.rms_norm(x, x.shape[-1:]) * s, "√D times too long"),
        (lambda x, s: x / x.norm(dim=-1, keepdim=True), "your vectors have length 1"),
        (lambda x, s: F.layer_norm(x, x.shape[-1:]) * s / x.shape[-1] ** 0.5, "LayerNorm also subtracts"),
        (lambda x, s: x / x.norm(dim=-1) * s, "raised RuntimeError"),
        (lambda x, s: x.norm(dim=-1), "did you forget keepdim=True?"),
        (lambda x, s: x * s, "differs from the reference"),
    ],
)  # fmt: skip
def test_rescale_mistakes_get_their_hint(mistake, hint):
    with pytest.raises(ExerciseFailed, match=re.escape(hint)):
        check("5.3", token_scale, mistake)


def test_checks_leave_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check("5.1", build_inputs)
    check("5.2", caption_labels)
    check("5.3", token_scale, rescale)
    assert torch.equal(torch.rand(3), expected)


def test_the_command_line_checks_the_lesson_notebooks(capsys):
    assert main(["check", "5.2", "--solutions"]) == 0
    assert capsys.readouterr().out.startswith("Exercise 5.2 passed: ")
    assert main(["check", "5.1"]) == 1  # exercises/ holds the blanks
    assert capsys.readouterr().out.startswith("Exercise 5.1 is not done yet")
