"""Self-checks for lesson 07, decoding and evaluation (solutions/07_decoding_evaluation.ipynb).

Exercise 7.1's greedy loop runs against a tiny seeded *bigram* language model, a module with the
interface `minivlm.decoding` drives, so the learner's tokens are compared with `minivlm.decoding.greedy`
on the same model; its rows reach end-of-text at different steps, so a loop that stops too early, too
late, or lets a finished row go on shows. Exercise 7.2's beam score is compared with the rule
`minivlm.decoding.beam_search` ranks finished hypotheses by, Σ log p / Nᵅ; exercise 7.3's exact match
and colour accuracy with `minivlm.evaluate.attribute_scores`. When an answer is wrong, the check
recomputes the usual mistakes and names the one the answer matches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from minivlm.data import shapes as S
from minivlm.decoding import greedy
from minivlm.evaluate import attribute_scores
from minivlm.exercises import fail
from minivlm.exercises.tools import Mistakes, call, diagnose, randn, same, tensor

__all__ = ["CHECKS"]

# Exercise 7.1: a greedy decoding loop ---------------------------------------------------------------------

V, EOT = 11, 0  # the bigram model's vocabulary (V ≠ B, so an argmax over the batch axis shows) and end-of-text
CHAINS = ([3, 5, 7, EOT], [4, 6, EOT], [8, 9, 10, 2, 1, EOT])  # each row's greedy path from its prompt token


class _Bigram(nn.Module):
    """A language model whose next-token scores depend on the last token only, with `minivlm.decoding`'s interface.

    Random scores, plus a large bonus along CHAINS, so greedy decoding from prompt token c[0] walks the chain
    c and ends at EOT after len(c) - 1 tokens; from EOT it would go on to a non-EOT token.
    """

    def __init__(self):
        super().__init__()
        table = randn(V, V, seed=70)  # (V, V): row = last token, column = next token
        for chain in CHAINS:
            for a, b in zip(chain, chain[1:]):
                table[a, b] += 10.0
        table[EOT, EOT] = -10.0  # after end-of-text the model babbles: a loop must not let a finished row go on
        self.table = table
        self.embed = nn.Embedding.from_pretrained(torch.zeros(V, 1))  # unused, but decoding asks every model for one

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                logits_to_keep=0, **_):  # fmt: skip
        return SimpleNamespace(logits=self.table[input_ids], past_key_values=None)  # (B, T, V)


def _step_for(model: _Bigram, prompt: Tensor, seen: list) -> Callable[[Tensor], Tensor]:
    """step(new (B, n)) -> (B, V): the model's scores after prompt + new; records each call's argument."""

    def step(new: Tensor) -> Tensor:
        if not isinstance(new, Tensor) or new.ndim != 2 or new.shape[0] != prompt.shape[0]:
            shape = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
            raise ValueError(f"step() takes the tokens chosen so far as a (B, n) tensor with B = {prompt.shape[0]} "
                             f"rows (torch.zeros(B, 0, dtype=torch.long) at first), got {shape}")
        seen.append(new.shape[1])
        return model(torch.cat([prompt, new.long()], dim=1)).logits[:, -1]  # (B, V)

    return step


def _run_loop(prompt, max_new, *, stop="all", mask=True, append=True):
    """The greedy loop with one mistake switched on: how a learner's answer might go wrong."""
    model = _Bigram()
    new = torch.zeros(prompt.shape[0], 0, dtype=torch.long)
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool)
    for _ in range(max_new):
        logits = model(torch.cat([prompt, new], dim=1) if append else prompt).logits[:, -1]
        token = logits.argmax(dim=-1)
        if mask:
            token = token.masked_fill(finished, EOT)
        finished |= token == EOT
        new = torch.cat([new, token[:, None]], dim=1)
        if (stop == "all" and finished.all()) or (stop == "any" and finished.any()):
            break
    return new


LOOP_MISTAKES: Mistakes = {
    "never stops": (lambda p, n: _run_loop(p, n, stop="never", mask=False),
                    "your loop does not stop at end-of-text: rows go on after they produced eos_token_id. A finished "
                    "row must keep producing eos_token_id, and the loop stops once every row has finished"),
    "finished rows go on": (lambda p, n: _run_loop(p, n, mask=False),
                            "a row that has produced eos_token_id goes on with other tokens while the other rows "
                            "finish: once a row has finished, replace its token by eos_token_id "
                            "(token.masked_fill(finished, eos_token_id))"),
    "stops only at max": (lambda p, n: _run_loop(p, n, stop="never"),
                          "your rows end properly but the loop always runs max_new_tokens steps: stop as soon as "
                          "every row has finished (finished.all())"),
    "stops at the first": (lambda p, n: _run_loop(p, n, stop="any"),
                           "your loop stops when the *first* row finishes: stop only when *every* row has "
                           "(finished.all(), not finished.any())"),
    "not appended": (lambda p, n: _run_loop(p, n, append=False),
                     "every step picks the same token: you never append the chosen token, so step() sees the same "
                     "input each time. Append it: new = torch.cat([new, token[:, None]], dim=1)"),
}  # fmt: skip


def check_greedy_decode(greedy_decode: Callable) -> str:
    """Exercise 7.1: greedy_decode(step, batch_size, max_new_tokens, eos_token_id) equals minivlm's greedy."""
    model = _Bigram()
    prompt = torch.tensor([[c[0]] for c in CHAINS])  # (B, 1): row b starts its chain
    for max_new in (8, 4):  # room for every chain; then too little for the longest
        seen: list[int] = []
        what = f"greedy_decode(step, batch_size=3, max_new_tokens={max_new}, eos_token_id={EOT})"
        out = tensor(call(greedy_decode, _step_for(model, prompt, seen), 3, max_new, EOT, what=what,
                          hint="Each step's logits are (B, V): pick with logits.argmax(dim=-1), a (B,) tensor, "
                               "and append it as a column: torch.cat([new, token[:, None]], dim=1)"), what)  # fmt: skip
        expected = greedy(model, prompt, max_new_tokens=max_new, eos_token_id=EOT)  # (B, N)
        if out.dtype not in (torch.int64, torch.int32):
            fail(f"{what} should return token ids (an integer tensor), got dtype {out.dtype}")
        if out.ndim != 2 or out.shape[0] != 3:
            fail(f"{what} should return a (B, N) tensor with B = 3 rows, got shape {tuple(out.shape)}")
        if seen and seen[0] != 0:
            fail("the first call to step() should get the empty (B, 0) tensor: nothing is chosen before the first step")
        if not torch.equal(out.long(), expected):
            for mistake, hint in LOOP_MISTAKES.values():
                if torch.equal(out.long(), mistake(prompt, max_new)):
                    fail(hint)
            fail(f"{what} returned {out.tolist()}, minivlm.decoding.greedy {expected.tolist()}: each step, take "
                 "the argmax over the vocabulary, replace finished rows' tokens by eos_token_id, append, and stop "
                 "once every row has finished")  # fmt: skip
        if len(seen) != expected.shape[1]:
            fail(f"step() was called {len(seen)} times for {expected.shape[1]} tokens: call it once per token")
    return ("equals minivlm.decoding.greedy on a batch whose rows end at different steps: finished rows repeat "
            "end-of-text, the loop stops once all have ended or at max_new_tokens, one step() call per token")


# Exercise 7.2: the length-normalised beam score -----------------------------------------------------------


def _beam_cases() -> list[tuple[Tensor, Tensor, float]]:
    """(log_probs (K, N) zero-padded after each hypothesis' end, lengths (K,), α): lengths differ, α ≠ 1 too."""
    cases = []
    for seed, lengths, alpha in ((71, [3, 6, 2, 5], 1.0), (72, [4, 1, 7], 0.7), (73, [2, 5, 3, 8, 6], 0.0)):
        lengths = torch.tensor(lengths)
        n = int(lengths.max()) + 2  # wider than the longest hypothesis: padding the learner must not count
        log_probs = -randn(len(lengths), n, seed=seed).abs() - 0.05  # (K, N) log-probabilities, all < 0
        log_probs = log_probs.masked_fill(torch.arange(n) >= lengths[:, None], 0.0)  # nothing after the end
        cases.append((log_probs, lengths, alpha))
    return cases


SUMMED = ("you added up probabilities: a sequence's probability is the *product* of its tokens', so add their "
          "log-probabilities (the inputs are already log p)")
BEAM_MISTAKES: Mistakes = {
    "probabilities summed": (lambda lp, n, a: lp.exp().sum(-1) / n**a, SUMMED),
    "probabilities summed, padding left out": (
        lambda lp, n, a: (lp.exp() * (torch.arange(lp.shape[1]) < n[:, None])).sum(-1) / n**a, SUMMED),
    "probabilities multiplied": (lambda lp, n, a: lp.sum(-1).exp() / n**a,
                                 "you normalised the probability exp(Σ log p): divide the log-probability "
                                 "Σ log p itself by Nᵅ"),
    "no normalisation": (lambda lp, n, a: lp.sum(-1),
                         "you did not normalise: Σ log p alone always prefers the shortest hypothesis, since every "
                         "token adds a negative number. Divide by lengths ** length_penalty"),
    "padded width": (lambda lp, n, a: lp.sum(-1) / lp.shape[1] ** a,
                     "you divided by the padded width N = log_probs.shape[1] (as log_probs.mean(-1) does), the "
                     "same for every hypothesis: divide each by its own length, lengths ** length_penalty"),
    "α ignored": (lambda lp, n, a: lp.sum(-1) / n,
                  "you divided by the length but ignored length_penalty: divide by lengths ** length_penalty "
                  "(α = 0 is no normalisation, α = 1 the mean log-probability)"),
    "one too short": (lambda lp, n, a: lp.sum(-1) / (n - 1).clamp_min(1) ** a,
                      "you divided by length - 1: the end-of-text token counts, N = lengths"),
}  # fmt: skip


def check_beam_score(beam_score: Callable) -> str:
    """Exercise 7.2: beam_score(log_probs, lengths, length_penalty) = Σ log p / Nᵅ per hypothesis."""
    for log_probs, lengths, alpha in _beam_cases():
        what = f"beam_score(log_probs {tuple(log_probs.shape)}, lengths {lengths.tolist()}, length_penalty={alpha})"
        out = tensor(call(beam_score, log_probs.clone(), lengths.clone(), alpha, what=what,
                          hint="sum each row over the tokens (dim=-1), then divide by lengths ** length_penalty"),
                     what)  # fmt: skip
        expected = log_probs.sum(-1) / lengths**alpha  # (K,) how minivlm.decoding.beam_search ranks hypotheses
        if out.shape != expected.shape:
            fail(f"{what} should give one score per hypothesis, shape {tuple(expected.shape)} = (K,), "
                 f"got {tuple(out.shape)}")  # fmt: skip
        if not same(out.float(), expected):
            diagnose(out.float(), (log_probs, lengths, alpha), BEAM_MISTAKES, what, expected,
                     "the score is log_probs.sum(-1) / lengths ** length_penalty")  # fmt: skip
    return ("equals Σ log p / Nᵅ, the score minivlm.decoding.beam_search ranks finished hypotheses by, for "
            "α = 1, 0.7 and 0 on zero-padded hypotheses of different lengths")


# Exercise 7.3: exact match and colour accuracy --------------------------------------------------------------

# Predictions as a decoder writes them (a stray leading space, a trailing newline) against every true
# caption of their image: some equal a reference other than the first, some are right only in part.
PREDICTIONS = [
    " a small red circle.",  # right, with a leading space
    "a large blue square to the left of a small green diamond.\n",  # right, the first reference
    "a small green diamond to the right of a large blue square.",  # right, the *second* reference
    "a small yellow triangle above a large purple circle.",  # right colours, wrong sizes
    "a large red square below a small green circle.",  # one colour wrong
    "a large purple diamond.",  # right colour, too few objects
    "a small blue",  # not a caption: unparseable
    "a small blue circle to the left of a small purple diamond.",  # one colour right, one wrong, one object missing
]
REFERENCES = [
    ["a small red circle."],
    ["a large blue square to the left of a small green diamond.",
     "a small green diamond to the right of a large blue square."],
    ["a large blue square to the left of a small green diamond.",
     "a small green diamond to the right of a large blue square."],
    ["a large yellow triangle above a small purple circle.", "a small purple circle below a large yellow triangle."],
    ["a large red square below a small yellow circle.", "a small yellow circle above a large red square."],
    ["a large purple diamond to the left of a small red circle.", "a small red circle to the right of a large purple "
     "diamond."],
    ["a small blue triangle."],
    ["a small blue circle to the left of a small red diamond, which is below a large yellow square."],
]  # fmt: skip


def _exact(preds, refs, clean=str.strip, first_only=False, fraction=True):
    hits = sum(clean(p) in [clean(r) for r in (rs[:1] if first_only else rs)] for p, rs in zip(preds, refs))
    return hits / len(preds) if fraction else hits


EXACT_MISTAKES = {
    "raw strings": (lambda p, r: _exact(p, r, clean=lambda s: s),
                    "you compared the raw strings: ' a small red circle.' (leading space) and a caption ending in "
                    "'\\n' never equal their reference. Strip surrounding whitespace first (text.strip()), as "
                    "minivlm.evaluate does"),
    "first reference only": (lambda p, r: _exact(p, r, first_only=True),
                             "you compared with the first reference only: an image has every true caption in its "
                             "list (the objects can be named in another order), and matching any of them is right"),
    "a count": (lambda p, r: _exact(p, r, fraction=False),
                "return a fraction of the predictions (hits / len(predictions)), not the number of hits"),
    "neither": (lambda p, r: _exact(p, r, clean=lambda s: s, first_only=True),
                "you compared raw strings with the first reference only: strip whitespace, and accept any reference"),
}  # fmt: skip


def _colour(preds, refs, skip_unparsed=False, per_caption=False, by_prediction=False):
    """Colour accuracy with one of its mistakes (references: one caption each)."""
    hits, totals = [], []
    for p, r in zip(preds, refs):
        said, true = S.try_parse(p.strip()), S.parse_caption(r)
        if said is None and skip_unparsed:
            continue
        right = sum(a[1] == b[1] for a, b in zip(said.objects, true.objects)) if said else 0
        hits.append(right)
        totals.append(len(said.objects) if by_prediction and said else len(true.objects))
    if not hits:
        return math.nan  # every prediction skipped: no mistake gives a number here
    if per_caption:
        return sum(h / t for h, t in zip(hits, totals)) / len(hits)
    return sum(hits) / sum(totals)


COLOUR_MISTAKES = {
    "skipped unparsed": (lambda p, r: _colour(p, r, skip_unparsed=True),
                         "you left out the predictions the parser rejects: a caption that is not a caption names "
                         "no colour right, so its objects count as wrong (still in the denominator)"),
    "per caption": (lambda p, r: _colour(p, r, per_caption=True),
                    "you averaged per caption: the accuracy is over *objects*, hits summed over all captions "
                    "divided by the number of objects in all references"),
    "per predicted object": (lambda p, r: _colour(p, r, by_prediction=True),
                             "you divided by the number of objects the *predictions* name: a prediction that leaves "
                             "objects out must not score higher; divide by the references' objects"),
}  # fmt: skip


def _close(out, expected: float, what: str) -> bool:
    if isinstance(out, Tensor) and out.numel() == 1:
        out = out.item()
    if not isinstance(out, (int, float)):
        fail(f"{what} should return a number (a fraction in [0, 1]), got {type(out).__name__}")
    return math.isclose(out, expected, abs_tol=1e-9)


def check_caption_scores(exact_match: Callable, colour_accuracy: Callable) -> str:
    """Exercise 7.3: exact_match (several references each) and colour_accuracy (one each) equal attribute_scores."""
    preds, refs = list(PREDICTIONS), [list(r) for r in REFERENCES]
    what = "exact_match(predictions, references)"
    out = call(exact_match, preds, refs, what=what,
               hint="references[i] is a list of strings: check whether predictions[i] is in it")  # fmt: skip
    expected = attribute_scores(PREDICTIONS, REFERENCES)["exact match"]
    if not _close(out, expected, what):
        for mistake, hint in EXACT_MISTAKES.values():
            if _close(out, mistake(PREDICTIONS, REFERENCES), what):
                fail(hint)
        fail(f"{what} gave {out}, expected {expected:.3f} ({round(expected * len(preds))} of {len(preds)} right): "
             "strip each caption, and count a prediction right when it equals any of its references")
    firsts = [r[0] for r in REFERENCES]
    what = "colour_accuracy(predictions, references)"
    out = call(colour_accuracy, list(PREDICTIONS), list(firsts), what=what,
               hint="parse each caption with minivlm.data.shapes.try_parse (None when it is not a caption) and "
                    "compare .objects[i][1], the colour, position by position")  # fmt: skip
    expected = attribute_scores(PREDICTIONS, firsts)["colour"]
    if not _close(out, expected, what):
        for mistake, hint in COLOUR_MISTAKES.values():
            if _close(out, mistake(PREDICTIONS, firsts), what):
                fail(hint)
        fail(f"{what} gave {out}, expected {expected:.3f}: over all objects of all references, the fraction whose "
             "prediction parses and names the same colour at the same position")
    return (f"exact match {attribute_scores(PREDICTIONS, REFERENCES)['exact match']:.3f} and colour accuracy "
            f"{expected:.3f} equal minivlm.evaluate.attribute_scores on captions with stray whitespace, several "
            "references, a wrong object count and an unparseable one")


CHECKS: dict[str, Callable[..., str]] = {
    "7.1": check_greedy_decode,
    "7.2": check_beam_score,
    "7.3": check_caption_scores,
}
