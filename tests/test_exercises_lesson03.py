"""Lesson 03's self-checks: each fails on the blank and on plausible mistakes, with the right hint, and
passes on correct answers (minivlm.lm's own learning_rate and freeze, and perplexity written two ways)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from minivlm.__main__ import main
from minivlm.exercises import ExerciseFailed, ExerciseNotDone, check
from minivlm.lm import freeze, learning_rate


def blank(*args, **kwargs):
    raise NotImplementedError("Exercise 3.x: blank")


def perplexity(losses, mask):
    mask = mask.float()
    return math.exp(float((losses * mask).sum() / mask.sum()))


def test_blanks_are_not_done():
    for exercise in ("3.1", "3.2", "3.3"):
        with pytest.raises(ExerciseNotDone, match=f"^Exercise {exercise} is not done yet"):
            check(exercise, blank)


def test_correct_answers_pass(capsys):
    check("3.1", perplexity)
    check("3.1", lambda losses, mask: losses[mask.bool()].mean().exp())  # a tensor of one number will do
    check("3.2", learning_rate)
    check("3.3", freeze)
    check("3.3", lambda model: model.requires_grad_(False).eval())
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == (
        ["Exercise 3.1 passed"] * 2 + ["Exercise 3.2 passed"] + ["Exercise 3.3 passed"] * 2
    )


def mean_over_rows(losses, mask):
    return ((losses * mask).sum(1) / mask.sum(1)).mean()


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        (lambda l, m: (l * m).sum().exp(), "exponential of the \\*sum\\*"),
        (lambda l, m: l.mean().exp(), "padding included"),
        (lambda l, m: ((l * m).sum() / l.numel()).exp(), "divided by every position"),
        (lambda l, m: (l * m).sum() / m.sum(), "that is the mean loss"),
        (lambda l, m: 2 ** ((l * m).sum() / m.sum()), "not 2 \\*\\*"),
        (lambda l, m: ((l * m).sum(1) / m.sum(1)).exp().mean(), "averaged the perplexities of the rows"),
        (lambda l, m: mean_over_rows(l, m).exp(), "a short row's tokens count more"),
        (lambda l, m: l[m].mean().exp(), "picks \\*rows\\* 0 and 1"),
        (lambda l, m: ((l * m).sum(1) / m.sum(1)).exp(), "got a tensor of shape \\(4,\\)"),
        (lambda l, m: f"{perplexity(l, m):.2f}", "got str"),
        (lambda l, m: (l * m).sum() / m.sum() + None, "raised TypeError"),
    ],
)  # fmt: skip
def test_perplexity_mistakes_get_their_hint(mistake, hint):
    with pytest.raises(ExerciseFailed, match=hint):
        check("3.1", mistake)


def test_perplexity_that_fails_on_a_boolean_mask_is_caught():
    def integer_mask_only(losses, mask):
        if mask.dtype == torch.bool:
            return 1.0
        return perplexity(losses, mask)

    with pytest.raises(ExerciseFailed, match="not with a boolean one"):
        check("3.1", integer_mask_only)


def cosine(progress):
    return 0.5 * (1 + math.cos(math.pi * progress))


def schedule(warmup_rate=None, decay=None, end=None):
    """learning_rate with one part replaced: the warm-up, the progress of the decay, or how the floor enters."""

    def rate(step, *, peak, warmup, steps, floor=0.1):
        if step < warmup:
            return warmup_rate(step, peak, warmup) if warmup_rate else peak * (step + 1) / warmup
        progress = decay(step, warmup, steps) if decay else (step - warmup) / max(1, steps - 1 - warmup)
        if end:
            return end(peak, floor, progress)
        return peak * (floor + (1 - floor) * cosine(progress))

    return rate


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        (schedule(warmup_rate=lambda s, p, w: p * s / w), "warm-up is off by one"),
        (schedule(end=lambda p, f, x: p * cosine(x)), "decays to 0"),
        (schedule(end=lambda p, f, x: f + (p - f) * cosine(x)), "the floor is a fraction of the peak"),
        (schedule(end=lambda p, f, x: max(f * p, p * cosine(x))), "you clamped the cosine at the floor"),
        (schedule(decay=lambda s, w, n: (s - w) / (n - w)), "never reaches the floor"),
        (schedule(decay=lambda s, w, n: s / (n - 1)), "counts from step 0"),
        (schedule(end=lambda p, f, x: p * (f + (1 - f) * math.cos(math.pi * x))), "from 1 down to -1"),
        (schedule(end=lambda p, f, x: p * (f + (1 - f) * math.cos(math.pi / 2 * x))), "a quarter cosine"),
        (lambda step, *, peak, warmup, steps, floor: peak * min(1, (step + 1) / warmup),  # no decay at all
         "The schedule: peak \\* \\(step \\+ 1\\) / warmup"),
        (lambda step, *, peak, warmup, steps, floor: (learning_rate(step, peak=peak, warmup=warmup, steps=steps,
                                                                    floor=floor) if warmup else 1 / warmup),
         "with warmup=0 there is no warm-up at all"),
    ],
)  # fmt: skip
def test_learning_rate_mistakes_get_their_hint(mistake, hint):
    with pytest.raises(ExerciseFailed, match=hint):
        check("3.2", mistake)


def only_first_layers(model):
    for p in model.transformer.h[0].parameters():  # "frozen prefix" misread as "freeze the first layers"
        p.requires_grad_(False)
    return model.eval()


def with_no_grad(model):
    with torch.no_grad():
        return model.eval()


def attribute_only(model):
    model.requires_grad = False
    return model.eval()


def top_module_only(model):
    model.requires_grad_(False)
    model.training = False
    return model


def grad_off_everywhere(model):
    torch.set_grad_enabled(False)
    return model.requires_grad_(False).eval()


def zeroed(model):
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
    return model.requires_grad_(False).eval()


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        (lambda model: model.requires_grad_(False), "also call model.eval\\(\\)"),
        (lambda model: model.eval(), "every weight still has requires_grad=True"),
        (with_no_grad, "torch.no_grad\\(\\) only stops recording inside its with-block"),
        (only_first_layers, "not its first layers"),
        (attribute_only, "only adds an attribute"),
        (top_module_only, "changes the top module only"),
        (grad_off_everywhere, "switched gradients off for \\*everything\\*"),
        (lambda model: None if model.requires_grad_(False).eval() else None, "returned None"),
        (lambda model: __import__("copy").deepcopy(model).requires_grad_(False).eval(), "not a copy"),
        (zeroed, "changed the weights' values"),
    ],
)  # fmt: skip
def test_freeze_mistakes_get_their_hint(mistake, hint):
    with pytest.raises(ExerciseFailed, match=hint):
        check("3.3", mistake)
    assert torch.is_grad_enabled()  # the check undid a global switch-off


def test_checks_leave_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    for exercise, answer in (("3.1", perplexity), ("3.2", learning_rate), ("3.3", freeze)):
        check(exercise, answer)
    assert torch.equal(torch.rand(3), expected)


def test_the_hints_name_the_formula_when_no_known_mistake_fits():
    with pytest.raises(ExerciseFailed, match=re.escape("exp(Σ loss·mask / Σ mask)")):
        check("3.1", lambda losses, mask: perplexity(losses, mask) + 1)


def test_the_command_line_checks_the_lesson_notebooks(capsys):
    assert main(["check", "3.3", "--solutions"]) == 0
    assert capsys.readouterr().out.startswith("Exercise 3.3 passed: ")
    assert main(["check", "3.1"]) == 1  # exercises/ holds the blanks
    assert capsys.readouterr().out.startswith("Exercise 3.1 is not done yet")
