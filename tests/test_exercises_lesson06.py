"""Lesson 06's self-checks: each fails on the blank and on plausible mistakes, with the right hint, and passes
on a correct answer (minivlm.train's own step, groups and batch_indices)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from minivlm.__main__ import main
from minivlm.exercises import ExerciseFailed, ExerciseNotDone, check
from minivlm.exercises import lesson06 as L
from minivlm.train import batch_indices


def blank(*args):
    raise NotImplementedError("Exercise 6.x: blank")


def loss_of(captioner, batch):
    return captioner(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"]).loss


def step(captioner, optimizer, batch, max_norm):
    optimizer.zero_grad()
    loss = loss_of(captioner, batch)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(captioner.parameters(), max_norm)  # frozen weights have no .grad: same norm
    optimizer.step()
    return loss.item(), norm.item()


def groups(captioner, weight_decay):
    params = [p for p in captioner.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip


def test_blanks_are_not_done():
    for exercise in ("6.1", "6.2", "6.3"):
        with pytest.raises(ExerciseNotDone, match=f"^Exercise {exercise} is not done yet"):
            check(exercise, blank)


def test_correct_answers_pass(capsys):
    check("6.1", step)
    check("6.1", lambda c, o, b, m: tuple(torch.tensor(x) for x in step(c, o, b, m)))  # tensors are fine too
    check("6.2", groups)
    check("6.2", lambda c, wd: [{"params": [p for p in c.trainable_parameters() if p.ndim < 2], "weight_decay": 0},
                                {"params": (p for p in c.trainable_parameters() if p.ndim > 1),
                                 "weight_decay": wd}])  # fmt: skip
    check("6.3", batch_indices)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["Exercise 6.1 passed"] * 2 + ["Exercise 6.2 passed"] * 2 + [
        "Exercise 6.3 passed"]  # fmt: skip


def no_zero_grad(captioner, optimizer, batch, max_norm):
    loss = loss_of(captioner, batch)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(captioner.trainable_parameters(), max_norm)
    optimizer.step()
    return loss.item(), norm.item()


def clip_after_step(captioner, optimizer, batch, max_norm):
    optimizer.zero_grad()
    loss = loss_of(captioner, batch)
    loss.backward()
    optimizer.step()
    return loss.item(), nn.utils.clip_grad_norm_(captioner.trainable_parameters(), max_norm).item()


def no_clip(captioner, optimizer, batch, max_norm):
    optimizer.zero_grad()
    loss = loss_of(captioner, batch)
    loss.backward()
    optimizer.step()
    return loss.item(), 0.0


def clip_before_backward(captioner, optimizer, batch, max_norm):
    optimizer.zero_grad()
    loss = loss_of(captioner, batch)
    norm = nn.utils.clip_grad_norm_(captioner.trainable_parameters(), max_norm)
    loss.backward()
    optimizer.step()
    return loss.item(), norm.item()


def zero_grad_after_backward(captioner, optimizer, batch, max_norm):
    loss = loss_of(captioner, batch)
    loss.backward()
    optimizer.zero_grad()
    norm = nn.utils.clip_grad_norm_(captioner.trainable_parameters(), max_norm)
    optimizer.step()
    return loss.item(), norm.item()


def norm_after_clipping(captioner, optimizer, batch, max_norm):
    optimizer.zero_grad()
    loss = loss_of(captioner, batch)
    loss.backward()
    nn.utils.clip_grad_norm_(captioner.trainable_parameters(), max_norm)
    norm = nn.utils.clip_grad_norm_(captioner.trainable_parameters(), max_norm)  # a second call: already clipped
    optimizer.step()
    return loss.item(), norm.item()


def loss_after_step(captioner, optimizer, batch, max_norm):
    _, norm = step(captioner, optimizer, batch, max_norm)
    with torch.no_grad():
        return loss_of(captioner, batch).item(), norm


def steps_the_lm_too(captioner, optimizer, batch, max_norm):
    captioner.lm.requires_grad_(True)  # "train everything"
    everything = torch.optim.SGD(captioner.parameters(), lr=0.1)
    everything.zero_grad()
    loss = loss_of(captioner, batch)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(captioner.parameters(), max_norm)
    everything.step()
    return loss.item(), norm.item()


def steps_twice(captioner, optimizer, batch, max_norm):
    out = step(captioner, optimizer, batch, max_norm)
    optimizer.step()
    return out


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        (no_zero_grad, "call optimizer.zero_grad() before loss.backward()"),
        (zero_grad_after_backward, "erases the gradients you just computed"),
        (clip_after_step, "after the step it is too late"),
        (no_clip, "the step was not clipped"),
        (clip_before_backward, "did you clip before loss.backward()"),
        (norm_after_clipping, "the norm before clipping"),
        (loss_after_step, "from a second forward pass after the step"),
        (steps_the_lm_too, "the LM is frozen and never takes a step"),
        (steps_twice, "check the order, and that you step the optimizer you are given once"),
        (lambda c, o, b, m: step(c, o, b, m)[0], "should return two numbers"),
        (lambda c, o, b, m: step(c, o, list(b.values()), m), "raised TypeError"),
        (lambda c, o, b, m: (lambda loss: (loss.backward(), o.step(), (loss.item(), 0.0))[-1])(c(**b).loss),
         "raised TypeError"),  # CaptionCollator's batch holds the captions too: captioner(**batch) fails
    ],
)  # fmt: skip
def test_step_mistakes_get_their_hint(mistake, hint):
    with pytest.raises(ExerciseFailed, match=re.escape(hint)):
        check("6.1", mistake)


def by_name(captioner, weight_decay):
    """The vision side picked by name: right for a frozen LM, but misses the LM's weights when train_lm=True."""
    params = [p for name, p in captioner.named_parameters() if name.startswith(("encoder.", "mapper."))]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        (lambda c, wd: [{"params": list(c.parameters()), "weight_decay": wd}], "you included"),
        (lambda c, wd: [{"params": [p for p in c.parameters() if p.ndim >= 2], "weight_decay": wd},
                        {"params": [p for p in c.parameters() if p.ndim < 2], "weight_decay": 0.0}],
         "the frozen LM's weights"),
        (lambda c, wd: [{"params": c.trainable_parameters(), "weight_decay": wd}], "you decay every parameter"),
        (lambda c, wd: [{"params": c.trainable_parameters(), "weight_decay": 0.0}], "no parameter is decayed"),
        (lambda c, wd: [{**groups(c, wd)[0], "weight_decay": 0.0}, {**groups(c, wd)[1], "weight_decay": wd}],
         "swapped"),
        (lambda c, wd: [{**groups(c, wd)[0], "weight_decay": 0.01}, groups(c, wd)[1]], "not a fixed number"),
        (lambda c, wd: groups(c, wd)[:1], "you left out the biases and norm gains"),
        (lambda c, wd: groups(c, wd) + [{"params": c.trainable_parameters()[:1], "weight_decay": wd}],
         "more than one group"),
        (lambda c, wd: [{"params": c.trainable_parameters()}], "every group needs 'params' and 'weight_decay'"),
        (lambda c, wd: {"params": c.trainable_parameters(), "weight_decay": wd}, "should return a list of dicts"),
        (by_name, "not by their names"),
    ],
)  # fmt: skip
def test_group_mistakes_get_their_hint(mistake, hint):
    with pytest.raises(ExerciseFailed, match=re.escape(hint)):
        check("6.2", mistake)


def global_rng(seed, step, n, batch_size):
    epoch, k = divmod(step, n // batch_size)
    np.random.seed(seed + 1000 * epoch)
    return np.random.permutation(n)[k * batch_size : (k + 1) * batch_size]


SHARED = np.random.default_rng(0)


def shared_generator(seed, step, n, batch_size):
    return SHARED.permutation(n)[:batch_size]


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        (global_rng, "changed NumPy's global random state"),
        (shared_generator, "the same (seed, step) gave two different batches"),
        (lambda seed, step, n, b: np.random.default_rng([seed, step]).integers(0, n, b), "with replacement"),
        (lambda seed, step, n, b: np.random.default_rng([seed, step]).permutation(n)[:b],
         "a new permutation every step"),
        (L._no_reshuffle, "every epoch sees the images in the same order"),
        (lambda seed, step, n, b: np.random.default_rng(seed).permutation(n)[step % (n // b) * b :][:b],
         "seeded with the epoch too"),
        (L._seed_plus_epoch, "pass both numbers as a list"),
        (L._run_over, "the last n % batch_size images sit the epoch out"),
        (lambda seed, step, n, b: np.random.default_rng(step // (n // b)).permutation(n)[
            step % (n // b) * b : (step % (n // b) + 1) * b], "np.random.default_rng([seed, epoch]).permutation(n)"),
        (lambda seed, step, n, b: batch_indices(seed, step, n, b)[:-1], "integer indices, shape"),
        (lambda seed, step, n, b: batch_indices(seed, step, n, b).astype(float), "integer indices"),
    ],
)  # fmt: skip
def test_batch_mistakes_get_their_hint(mistake, hint):
    with pytest.raises(ExerciseFailed, match=re.escape(hint)):
        check("6.3", mistake)


def test_every_step_of_the_check_is_clipped():
    """MAX_NORM is below the tiny captioner's gradient norms: otherwise a missing clip would not show."""
    _, norms, _, _ = L._trace(L._reference)
    assert min(norms) > 2 * L.MAX_NORM


def test_checks_leave_the_global_random_states_alone():
    torch.manual_seed(123)
    np.random.seed(123)
    expected = torch.rand(3), np.random.rand(3)
    torch.manual_seed(123)
    np.random.seed(123)
    for exercise, answer in (("6.1", step), ("6.2", groups), ("6.3", batch_indices)):
        check(exercise, answer)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


def test_the_command_line_checks_the_lesson_notebooks(capsys):
    assert main(["check", "6.3", "--solutions"]) == 0
    assert capsys.readouterr().out.startswith("Exercise 6.3 passed: ")
    assert main(["check", "6.1"]) == 1  # exercises/ holds the blanks
    assert capsys.readouterr().out.startswith("Exercise 6.1 is not done yet")
