"""Lesson 07's self-checks: each fails on the blank and on plausible mistakes, with the right hint, and
passes on correct answers (minivlm.decoding's greedy loop, the beam score, minivlm.evaluate's scores)."""

from __future__ import annotations

import re

import pytest
import torch

from minivlm.__main__ import main
from minivlm.data.shapes import try_parse
from minivlm.evaluate import attribute_scores
from minivlm.exercises import ExerciseFailed, ExerciseNotDone, check


def blank(*args):
    raise NotImplementedError("Exercise 7.x: blank")


def loop(step, batch_size, max_new_tokens, eos_token_id, *, stop="all", mask=True, append=True, dim=-1):
    """The greedy loop, with one mistake switched on by the keyword arguments."""
    new = torch.zeros(batch_size, 0, dtype=torch.long)
    finished = torch.zeros(batch_size, dtype=torch.bool)
    for _ in range(max_new_tokens):
        token = step(new if append else new[:, :0]).argmax(dim=dim)
        if mask:
            token = token.masked_fill(finished, eos_token_id)
        finished |= token == eos_token_id
        new = torch.cat([new, token[:, None]], dim=1)
        if (stop == "all" and finished.all()) or (stop == "any" and finished.any()):
            break
    return new


def loop_as_lists(step, batch_size, max_new_tokens, eos_token_id):
    """A correct answer written another way: Python lists, one row at a time, then a tensor."""
    rows, done = [[] for _ in range(batch_size)], [False] * batch_size
    for _ in range(max_new_tokens):
        logits = step(torch.tensor(rows, dtype=torch.long).reshape(batch_size, -1))
        for b in range(batch_size):
            rows[b].append(eos_token_id if done[b] else int(logits[b].argmax()))
            done[b] = rows[b][-1] == eos_token_id
        if all(done):
            break
    return torch.tensor(rows)


def score(log_probs, lengths, alpha):
    return log_probs.sum(-1) / lengths**alpha


def exact(predictions, references):
    return sum(p.strip() in [r.strip() for r in refs] for p, refs in zip(predictions, references)) / len(predictions)


def colour(predictions, references):
    hits = total = 0
    for p, r in zip(predictions, references):
        said, true = try_parse(p.strip()), try_parse(r)
        total += len(true.objects)
        if said is not None:
            hits += sum(a[1] == b[1] for a, b in zip(said.objects, true.objects))
    return hits / total


def test_blanks_are_not_done():
    for exercise, answers in (("7.1", [blank]), ("7.2", [blank]), ("7.3", [blank, colour]), ("7.3", [exact, blank])):
        with pytest.raises(ExerciseNotDone, match=f"^Exercise {exercise} is not done yet"):
            check(exercise, *answers)


def test_correct_answers_pass(capsys):
    check("7.1", loop)
    check("7.1", loop_as_lists)
    check("7.2", score)
    check("7.2", lambda lp, n, a: torch.stack([row[:k].sum() / k**a for row, k in zip(lp, n.tolist())]))
    check("7.3", exact, colour)
    check("7.3", lambda p, r: attribute_scores(p, r)["exact match"], lambda p, r: attribute_scores(p, r)["colour"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"Exercise 7.{i} passed" for i in (1, 1, 2, 2, 3, 3)]


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        (lambda *a: loop(*a, stop="never", mask=False), "your loop does not stop at end-of-text"),
        (lambda *a: loop(*a, mask=False), "replace its token by eos_token_id"),
        (lambda *a: loop(*a, stop="never"), "the loop always runs max_new_tokens steps"),
        (lambda *a: loop(*a, stop="any"), "not finished.any()"),
        (lambda *a: loop(*a, append=False), "you never append the chosen token"),
        (lambda *a: loop(*a, dim=0), "logits.argmax(dim=-1)"),
        (lambda *a: loop(*a).tolist(), "should return a tensor"),
        (lambda *a: loop(*a).float(), "an integer tensor"),
    ],
)  # fmt: skip
def test_greedy_mistakes_get_their_hint(mistake, hint):
    with pytest.raises(ExerciseFailed, match=re.escape(hint)):
        check("7.1", mistake)


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        (lambda lp, n, a: lp.exp().sum(-1) / n**a, "you added up probabilities"),
        (lambda lp, n, a: lp.sum(-1).exp() / n**a, "divide the log-probability"),
        (lambda lp, n, a: lp.sum(-1), "you did not normalise"),
        (lambda lp, n, a: lp.sum(-1) / lp.shape[1] ** a, "you divided by the padded width"),
        (lambda lp, n, a: lp.mean(-1), "you divided by the padded width"),
        (lambda lp, n, a: lp.sum(-1) / n, "ignored length_penalty"),
        (lambda lp, n, a: lp.sum(-1) / (n - 1) ** a, "the end-of-text token counts"),
        (lambda lp, n, a: lp.sum(), "one score per hypothesis"),
    ],
)  # fmt: skip
def test_beam_score_mistakes_get_their_hint(mistake, hint):
    with pytest.raises(ExerciseFailed, match=re.escape(hint)):
        check("7.2", mistake)


def raw(predictions, references):
    return sum(p in refs for p, refs in zip(predictions, references)) / len(predictions)


def first_only(predictions, references):
    return sum(p.strip() == refs[0].strip() for p, refs in zip(predictions, references)) / len(predictions)


def skip_unparsed(predictions, references):
    pairs = [(try_parse(p.strip()), try_parse(r)) for p, r in zip(predictions, references)]
    pairs = [(s, t) for s, t in pairs if s is not None]
    return sum(a[1] == b[1] for s, t in pairs for a, b in zip(s.objects, t.objects)) / sum(len(t.objects) for _, t in pairs)


def per_caption(predictions, references):
    return sum(colour([p], [r]) for p, r in zip(predictions, references)) / len(predictions)


@pytest.mark.parametrize(
    ("exact_match", "colour_accuracy", "hint"),
    [
        (raw, colour, "you compared the raw strings"),
        (first_only, colour, "you compared with the first reference only"),
        (lambda p, r: exact(p, r) * len(p), colour, "not the number of hits"),
        (lambda p, r: sum(x in rs[:1] for x, rs in zip(p, r)) / len(p), colour, "strip whitespace, and accept any"),
        (exact, skip_unparsed, "you left out the predictions the parser rejects"),
        (exact, per_caption, "you averaged per caption"),
        (exact, lambda p, r: "0.5", "should return a number"),
        (exact, lambda p, r: colour([x.split(".")[0] for x in p], r), "expected 0.533"),
    ],
)  # fmt: skip
def test_caption_score_mistakes_get_their_hint(exact_match, colour_accuracy, hint):
    with pytest.raises(ExerciseFailed, match=re.escape(hint)):
        check("7.3", exact_match, colour_accuracy)


def test_checks_leave_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check("7.1", loop)
    check("7.2", score)
    assert torch.equal(torch.rand(3), expected)


def test_the_command_line_checks_the_lesson_notebooks(capsys):
    assert main(["check", "7.2", "--solutions"]) == 0
    assert capsys.readouterr().out.startswith("Exercise 7.2 passed: ")
    assert main(["check", "7.2"]) == 1  # exercises/ holds the blanks
    assert capsys.readouterr().out.startswith("Exercise 7.2 is not done yet")
