"""Lesson 08's self-checks: each fails on the blank and on plausible mistakes, with the right hint, and
passes on correct answers (minivlm.fewshot's interleaved embedding, its scores and its open-ended rule,
and minivlm.data.episodes' blind and text baselines)."""

from __future__ import annotations

import re

import pytest
import torch

from minivlm import fewshot
from minivlm.__main__ import main
from minivlm.data import shapes as S
from minivlm.data.episodes import to_prompt
from minivlm.exercises import ExerciseFailed, ExerciseNotDone, check


def blank(*args):
    raise NotImplementedError("Exercise 8.x: blank")


# Exercise 8.1 -------------------------------------------------------------------------------------------


def embed(captioner, tokenizer, prompt, *, strip=False, order=None, positions=False, image=lambda x: x):
    """One prompt's (L, D) embedding, with one mistake switched on by the keyword arguments."""
    table = captioner.lm.get_input_embeddings()
    parts = []
    for segment in prompt:
        if isinstance(segment, str):
            text = segment.strip() if strip else segment
            parts.append(("text", table(torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"]))))
        else:
            parts.append(("image", image(captioner.prefix(segment[None])[0])))  # (P, D)
    if order:
        parts.sort(key=lambda kp: kp[0] != order)
    out = torch.cat([p for _, p in parts if p is not None])
    return out + captioner.lm.transformer.wpe(torch.arange(len(out))) if positions else out


def embed_batched(captioner, tokenizer, prompt):
    """A correct answer written another way: every image through the encoder at once, then put in place."""
    images = [s for s in prompt if not isinstance(s, str)]
    prefixes = iter(captioner.prefix(torch.stack(images))) if images else iter(())
    table = captioner.lm.get_input_embeddings()
    pieces = [table(torch.tensor(tokenizer.encode(s))) if isinstance(s, str) else next(prefixes) for s in prompt]
    return torch.cat(pieces)


# Exercise 8.2 -------------------------------------------------------------------------------------------


def score(captioner, tokenizer, prompt, candidate, *, shift=1, how="sum", axis=-1, batch=False):
    """log p(candidate | prompt) in one pass without a cache, with one mistake switched on by the keywords."""
    embeds = fewshot.embed_prompts(captioner, tokenizer, [prompt])[0]  # (1, L, D)
    ids = torch.tensor(tokenizer(candidate, add_special_tokens=False)["input_ids"])
    whole = torch.cat([embeds, captioner.lm.get_input_embeddings()(ids)[None]], dim=1)
    logits = captioner.lm(inputs_embeds=whole).logits  # (1, L + C, V)
    scores = logits if axis is None else logits.log_softmax(axis)
    start = embeds.shape[1] - shift
    picked = scores[0, start : start + len(ids)].gather(-1, ids[:, None])[:, 0]  # (C,)
    if how == "probabilities":
        return picked.exp().sum()
    out = {"sum": picked.sum, "mean": picked.mean, "first": lambda: picked[0], "last": lambda: picked[-1],
           "not first": lambda: picked[1:].sum(), "tokens": lambda: picked}[how]()  # fmt: skip
    return out[None] if batch else out


def score_with_positions(captioner, tokenizer, prompt, candidate):
    """A correct answer written another way: explicit position ids and a mask, returning a Python float."""
    embeds, mask = fewshot.embed_prompts(captioner, tokenizer, [prompt])
    ids = tokenizer.encode(candidate)
    whole = torch.cat([embeds[0], captioner.lm.get_input_embeddings()(torch.tensor(ids))])[None]
    logits = captioner.lm(inputs_embeds=whole, attention_mask=torch.ones(whole.shape[:2], dtype=torch.long),
                          position_ids=torch.arange(whole.shape[1])[None]).logits[0]  # fmt: skip
    total = 0.0
    for i, token in enumerate(ids):
        total += logits[embeds.shape[1] - 1 + i].log_softmax(-1)[token].item()
    return total


# Exercise 8.3 -------------------------------------------------------------------------------------------


def says_split(continuation, answer):
    """A correct answer written without a regular expression."""
    return continuation.split(".")[0] == f" {answer}"


# Exercise 8.4 -------------------------------------------------------------------------------------------


def baseline(episode, mode, *, glue=" ", strip=True, query=True, lstrip=True):
    """The blind or text prompt, with one mistake switched on by the keyword arguments."""
    scenes = [i for i, s in enumerate(episode.segments) if isinstance(s, S.Scene)]
    pieces = []
    for i, s in enumerate(episode.segments):
        if not isinstance(s, S.Scene):
            pieces.append(s)
        elif mode == "text" and (query or i != scenes[-1]):
            pieces.append(S.caption(s))
    if not strip:
        return glue.join(pieces)
    out = glue.join(p.strip() for p in pieces)
    return out if lstrip or not pieces[0].startswith(" ") else " " + out


def baseline_concatenated(episode, mode):
    """A correct answer written another way: the texts as they are, a space before each caption, then lstrip."""
    out = ""
    for s in episode.segments:
        if isinstance(s, S.Scene):
            out += (" " + S.caption(s)) if mode == "text" else ""
        else:
            out += s
    return out.lstrip()


# The tests ----------------------------------------------------------------------------------------------


def test_blanks_are_not_done():
    for exercise in ("8.1", "8.2", "8.3", "8.4"):
        with pytest.raises(ExerciseNotDone, match=f"^Exercise {exercise} is not done yet"):
            check(exercise, blank)


def test_correct_answers_pass(capsys):
    check("8.1", embed)
    check("8.1", embed_batched)
    check("8.1", lambda c, t, p: fewshot.embed_prompts(c, t, [p], start_of_text=False)[0][0])
    check("8.2", score)
    check("8.2", score_with_positions)
    check("8.2", lambda c, t, p, a: fewshot.score(c, t, [p], [[a]])[0])  # a (1,) tensor is one number too
    check("8.3", fewshot.says)
    check("8.3", says_split)
    check("8.4", baseline)
    check("8.4", baseline_concatenated)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"Exercise 8.{i} passed" for i in (1, 1, 1, 2, 2, 2, 3, 3, 4, 4)]


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        (lambda c, t, p: fewshot.embed_prompts(c, t, [p])[0][0], "this exercise leaves it out (start_of_text=False)"),
        (lambda c, t, p: embed(c, t, p, order="text"), "keep the segments in the prompt's order"),
        (lambda c, t, p: embed(c, t, p, order="image"), "keep the segments in the prompt's order"),
        (lambda c, t, p: embed(c, t, p, strip=True), "the leading space is part of the token"),
        (lambda c, t, p: embed(c, t, p, positions=True), "you added position embeddings (wpe)"),
        (lambda c, t, p: embed(c, t, p, image=lambda x: None), "your sequence has no image in it"),
        (lambda c, t, p: embed(c, t, p, image=lambda x: x[:1]), "each image gave one vector"),
        (lambda c, t, p: embed(c, t, p, image=lambda x: x.mean(0, keepdim=True)), "you averaged each image's prefix"),
        (lambda c, t, p: embed(c, t, p)[None], "without a batch axis"),
        (lambda c, t, p: embed(c, t, p).tolist(), "should return a tensor"),
        (lambda c, t, p: embed(c, t, p) * 2, "differs from the reference by up to"),
        (lambda c, t, p: torch.cat([c.prefix(s) if not isinstance(s, str) else c.lm.get_input_embeddings()(
            torch.tensor(t.encode(s))) for s in p]), "captioner.prefix(image[None])[0]"),  # no batch axis for the image
    ],
)  # fmt: skip
def test_embed_prompt_mistakes_get_their_hint(mistake, hint):
    with pytest.raises(ExerciseFailed, match=re.escape(hint)):
        check("8.1", mistake)


@pytest.mark.parametrize(
    ("keywords", "hint"),
    [
        (dict(shift=0), "you read the logits at the candidate's own positions"),
        (dict(how="not first"), "you left out the candidate's first token"),
        (dict(how="mean"), "you averaged the tokens' log-probabilities"),
        (dict(how="probabilities"), "you added up probabilities"),
        (dict(axis=None), "you summed raw logits"),
        (dict(axis=1), "you normalised over the wrong axis"),
        (dict(how="first"), "you scored only the candidate's first token"),
        (dict(how="last"), "you scored only the candidate's last token"),
        (dict(how="tokens"), "should return one number (a float or a 0-d tensor), got a tensor of shape"),
    ],
)  # fmt: skip
def test_score_candidate_mistakes_get_their_hint(keywords, hint):
    with pytest.raises(ExerciseFailed, match=re.escape(hint)):
        check("8.2", lambda c, t, p, a: score(c, t, p, a, **keywords))


def test_score_candidate_other_mistakes_get_their_hint():
    with pytest.raises(ExerciseFailed, match=re.escape("you returned the probability itself")):
        check("8.2", lambda c, t, p, a: score(c, t, p, a).exp())
    with pytest.raises(ExerciseFailed, match=re.escape("should return one number")):
        check("8.2", lambda c, t, p, a: "-3.2")
    with pytest.raises(ExerciseFailed, match=re.escape("position L - 1 + i predicts the candidate's token i")):
        check("8.2", lambda c, t, p, a: score(c, t, p, a) - 1.0)


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        (lambda c, a: c.startswith(f" {a}"), "a longer word that starts with the answer"),
        (lambda c, a: a in c, "you looked for the answer anywhere"),
        (lambda c, a: c == f" {a}.", "you asked for exactly ' dax.'"),
        (lambda c, a: c.startswith(f" {a}."), "' dax' with nothing after it is right too"),
        (lambda c, a: c.strip().split(".")[0] == a, "you ignored the leading space"),
        (lambda c, a: (c.split() or [""])[0].strip(".") == a, "you compared the first word only"),
        (lambda c, a: "yes" if fewshot.says(c, a) else "no", "should return True or False"),
        (lambda c, a: fewshot.says(c, a) and a != "red", "says(' red.', 'red') returned False, expected True"),
    ],
)  # fmt: skip
def test_says_mistakes_get_their_hint(mistake, hint):
    with pytest.raises(ExerciseFailed, match=re.escape(hint)):
        check("8.3", mistake)


@pytest.mark.parametrize(
    ("mistake", "hint"),
    [
        (lambda e, m: baseline(e, m, query=False), "the query's scene is missing"),
        (lambda e, m: baseline(e, m, glue=""), "the pieces are glued without spaces"),
        (lambda e, m: baseline(e, m, strip=False), "your prompt has two spaces between pieces"),
        (lambda e, m: baseline(e, m, lstrip=False), "your prompt starts with a space"),
        (lambda e, m: baseline(e, "text" if m == "blind" else "blind"), "returned the text prompt"),
        (lambda e, m: to_prompt(e, m), "returned a list with one string"),
        (lambda e, m: None, "should return one string"),
        (lambda e, m: baseline(e, m).upper(), "expected\n"),
    ],
)  # fmt: skip
def test_baseline_prompt_mistakes_get_their_hint(mistake, hint):
    with pytest.raises(ExerciseFailed, match=re.escape(hint)):
        check("8.4", mistake)


def test_checks_leave_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check("8.1", embed)
    check("8.2", score)
    assert torch.equal(torch.rand(3), expected)


def test_the_command_line_checks_the_lesson_notebooks(capsys):
    assert main(["check", "8.3", "--solutions"]) == 0
    assert capsys.readouterr().out.startswith("Exercise 8.3 passed: ")
    assert main(["check", "8.3"]) == 1  # exercises/ holds the blanks
    assert capsys.readouterr().out.startswith("Exercise 8.3 is not done yet")
