"""Lesson 01's self-checks: each fails on the blank and on plausible mistakes, with the right hint, and
passes on a correct answer (minivlm.attention's own functions, and einops)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from einops import rearrange

from minivlm.__main__ import main
from minivlm.attention import scaled_dot_product_attention
from minivlm.exercises import ExerciseFailed, ExerciseNotDone, check


def blank(*args):
    raise NotImplementedError("Exercise 1.x: blank")


def scores(q, k, scale=True):
    return q @ k.transpose(-2, -1) / (math.sqrt(q.shape[-1]) if scale else 1)


def causal(q, k, v, diagonal=0, fill=float("-inf"), upper=False, scale=True):
    t = q.shape[-2]
    ones = torch.ones(t, t, dtype=torch.bool)
    keep = ones.triu(diagonal) if upper else ones.tril(diagonal)
    return scores(q, k, scale).masked_fill(~keep, fill).softmax(-1) @ v


def split(x, h):
    return rearrange(x, "b t (h k) -> b h t k", h=h)


def merge(x):
    return rearrange(x, "b h t k -> b t (h k)")


def test_blanks_are_not_done():
    for exercise, answers in (("1.1", [blank]), ("1.2", [blank]), ("1.3", [blank, merge]), ("1.3", [split, blank])):
        with pytest.raises(ExerciseNotDone, match=f"^Exercise {exercise} is not done yet"):
            check(exercise, *answers)


def test_correct_answers_pass(capsys):
    check("1.1", scaled_dot_product_attention)
    check("1.1", lambda q, k, v: scores(q, k).softmax(-1) @ v)
    check("1.2", lambda q, k, v: scaled_dot_product_attention(q, k, v, causal=True))
    check("1.2", lambda q, k, v: causal(q, k, v, fill=-1e9))  # a large negative number does as well as -inf
    check("1.3", split, merge)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["Exercise 1.1 passed"] * 2 + ["Exercise 1.2 passed"] * 2 + [
        "Exercise 1.3 passed"]  # fmt: skip


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        (lambda q, k, v: scores(q, k, scale=False).softmax(-1) @ v, "forgot to divide the scores by √K"),
        (lambda q, k, v: (q @ k.transpose(-2, -1) / q.shape[-1]).softmax(-1) @ v, "divide by its square root"),
        (lambda q, k, v: (q @ k.transpose(-2, -1) / k.shape[-2] ** 0.5).softmax(-1) @ v, "square root of the number "
         "of keys"),
        (lambda q, k, v: scores(q, k).softmax(-2) @ v, "did you apply softmax on the last axis (dim=-1)?"),
        (lambda q, k, v: scores(q, k) @ v, "turn them into weights first"),
        (lambda q, k, v: scores(q, k).exp() @ v, "did not divide by their sum over the keys"),
        (lambda q, k, v: scores(q, k).softmax(-1), "the weights: multiply them by v"),
        (lambda q, k, v: (q @ k.transpose(2, 3) / q.shape[-1] ** 0.5).softmax(-1) @ v, "raised IndexError"),
    ],
)  # fmt: skip
def test_attention_mistakes_get_their_hint(mistake, hint):
    with pytest.raises(ExerciseFailed, match=re.escape(hint)):
        check("1.1", mistake)


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        (lambda q, k, v: scores(q, k).softmax(-1) @ v, "the future is not hidden"),
        (lambda q, k, v: causal(q, k, v, upper=True), "you hid the past and kept the future"),
        (lambda q, k, v: causal(q, k, v, diagonal=-1), "your output has NaN"),
        (lambda q, k, v: causal(q, k, v, diagonal=-1, fill=-1e9), "your mask hides the diagonal"),
        (lambda q, k, v: causal(q, k, v, diagonal=1), "one key into the future"),
        (lambda q, k, v: causal(q, k, v, fill=0.0), "masked scores set to 0 still get weight"),
        (lambda q, k, v: (scores(q, k).softmax(-1) * torch.ones(q.shape[-2], q.shape[-2]).tril()) @ v,
         "you masked the weights after the softmax"),
        (lambda q, k, v: causal(q, k, v, scale=False), "not divided by √K"),
    ],
)  # fmt: skip
def test_causal_mistakes_get_their_hint(mistake, hint):
    with pytest.raises(ExerciseFailed, match=hint):
        check("1.2", mistake)


@pytest.mark.parametrize(
    ("split_heads", "merge_heads", "hint"),
    [
        (lambda x, h: x.reshape(x.shape[0], h, x.shape[1], -1), merge, "a plain reshape to \\(B, H, T, K\\) mixes"),
        (lambda x, h: rearrange(x, "b t (k h) -> b h t k", h=h), merge, "not \\(k h\\)"),
        (lambda x, h: rearrange(x, "b t (h k) -> b t h k", h=h), merge, "put the heads before the tokens"),
        (lambda x, h: rearrange(x, "b t (h k) -> b h t k", h=3), merge, "use the n_heads argument"),
        (split, lambda x: x.reshape(x.shape[0], x.shape[2], -1), "move h next to k first"),
        (split, lambda x: rearrange(x, "b h t k -> b t (k h)"), "head 0's K features first"),
    ],
)  # fmt: skip
def test_head_mistakes_get_their_hint(split_heads, merge_heads, hint):
    with pytest.raises(ExerciseFailed, match=hint):
        check("1.3", split_heads, merge_heads)


def test_checks_leave_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check("1.3", split, merge)
    check("1.1", scaled_dot_product_attention)
    assert torch.equal(torch.rand(3), expected)


def test_the_command_line_checks_the_lesson_notebooks(capsys):
    assert main(["check", "1.2", "--solutions"]) == 0
    assert capsys.readouterr().out.startswith("Exercise 1.2 passed: ")
    assert main(["check", "1.1"]) == 1  # exercises/ holds the blanks
    assert capsys.readouterr().out.startswith("Exercise 1.1 is not done yet")
