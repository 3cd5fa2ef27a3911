"""Self-checks for lesson 08, few-shot prompting (solutions/08_few_shot.ipynb).

Each check runs the learner's answer on a tiny random captioner (a 2-layer GPT-2 of width 32 whose
weights are spread, std 0.3, so that its predictions vary with what it reads; the tiny SmallCNN and a
linear mapper with P = 2) and a byte-level BPE tokenizer trained in about 50 ms on 300 corpus
documents, the recipe of tests/test_fewshot.py. The prompts are shapes-world episodes
(`minivlm.data.episodes`) and a few made by hand. Exercise 8.1's interleaved embedding is compared with
`minivlm.fewshot.embed_prompts`, exercise 8.2's log-probability of an answer with `fewshot.score`,
exercise 8.3's open-ended rule with `fewshot.says`, exercise 8.4's baseline prompts with
`minivlm.data.episodes.to_prompt`. When an answer is wrong, the check recomputes the usual mistakes
and names the one the answer matches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from minivlm import fewshot
from minivlm.captioner import CAPTIONER_PRESETS, Captioner
from minivlm.corpus import CorpusConfig, documents
from minivlm.data import shapes as S
from minivlm.data.episodes import Episode, binding_episode, to_prompt, to_prompts, vqa_episode
from minivlm.exercises import fail
from minivlm.exercises.tools import Mistakes, call, diagnose, same, tensor
from minivlm.gpt2 import GPT2, GPT2Config
from minivlm.tokenizer import train_tokenizer

__all__ = ["CHECKS"]

V, D = 300, 32  # the checks' vocabulary and LM width (P = 2 prefix vectors: P, D and every length differ)
P = CAPTIONER_PRESETS["tiny"].prefix_length


@functools.cache
def _tokenizer():
    """A byte-level BPE tokenizer trained on 300 corpus documents (about 50 ms, once per session)."""
    return train_tokenizer(documents(CorpusConfig(), 300), vocab_size=V)


def _captioner() -> Captioner:
    """A tiny random captioner in eval mode, the same on every call; the learner's random state is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(8)
        lm = GPT2(GPT2Config(vocab_size=V, n_positions=128, n_embd=D, n_layer=2, n_head=4))
        with torch.no_grad():
            for p in lm.parameters():
                if p.ndim == 2:
                    p.normal_(0.0, 0.3)  # spread: an untrained GPT-2 predicts nearly the same token everywhere
        return Captioner.from_config(lm, "tiny").eval()  # tiny CNN, linear mapper, P = 2


def _prompts() -> list[list]:
    """Interleaved prompts: binding (text first), VQA (image first), two images side by side, text only."""
    rng = np.random.default_rng(8)
    episodes = [binding_episode(rng, 2, 1, attribute="shape"), vqa_episode(rng, 1, kind="colour")]
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(8))
    return to_prompts(episodes, "images") + [[image, image.flip(-1), " two of them. this is a"], ["answer with dax."]]


def _describe(prompt: list) -> str:
    """A prompt as a short readable list: texts quoted, each image shown as `image`."""
    return "[" + ", ".join(repr(s) if isinstance(s, str) else "image" for s in prompt) + "]"


# Exercise 8.1: one interleaved prompt as one inputs_embeds sequence ----------------------------------------


def _embed(captioner: Captioner, tokenizer, prompt: list, *, text=lambda s: s, image=None, order=None,
           positions=False) -> Tensor:  # fmt: skip
    """The (L, D) embedding of one prompt, with one mistake switched on by the keyword arguments."""
    table = captioner.lm.get_input_embeddings()
    parts = []
    for segment in prompt:
        if isinstance(segment, str):
            parts.append(("text", table(torch.tensor(tokenizer(text(segment), add_special_tokens=False)["input_ids"]))))
        else:
            prefix = captioner.prefix(segment[None])[0]  # (P, D)
            if image is not None:
                prefix = image(prefix)
            if prefix is not None:
                parts.append(("image", prefix))
    if order is not None:  # every part of one kind first
        parts = sorted(parts, key=lambda kp: kp[0] != order)
    out = torch.cat([p for _, p in parts])  # (L, D)
    if positions:
        out = out + captioner.lm.transformer.wpe(torch.arange(len(out)))
    return out


EMBED_MISTAKES: Mistakes = {
    "start of text": (lambda c, t, p: fewshot.embed_prompts(c, t, [p])[0][0],
                      "your sequence starts with <|endoftext|>, as fewshot.embed_prompts' default puts it in front of a "
                      "prompt that opens with text: this exercise leaves it out (start_of_text=False); embed the "
                      "segments alone"),
    "texts first": (lambda c, t, p: _embed(c, t, p, order="text"),
                    "your sequence has every text first and every image after: keep the segments in the prompt's "
                    "order, each image's P vectors exactly where the image stands"),
    "images first": (lambda c, t, p: _embed(c, t, p, order="image"),
                     "your sequence has every image first and the texts after: keep the segments in the prompt's "
                     "order, each image's P vectors exactly where the image stands"),
    "stripped": (lambda c, t, p: _embed(c, t, p, text=str.strip),
                 "you stripped the texts: the leading space is part of the token (' this' and 'this' are different "
                 "tokens, and the corpus writes ' this is a' after a sentence). Tokenize each text exactly as given"),
    "positions added": (lambda c, t, p: _embed(c, t, p, positions=True),
                        "you added position embeddings (wpe): inputs_embeds holds the token and prefix vectors only; "
                        "the LM adds the positions itself, from position_ids"),
    "no images": (lambda c, t, p: _embed(c, t, p, image=lambda x: None),
                  "your sequence has no image in it: each image must become its P prefix vectors, "
                  "captioner.prefix(image[None])[0]"),
    "one vector per image": (lambda c, t, p: _embed(c, t, p, image=lambda x: x[:1]),
                             "each image gave one vector: captioner.prefix gives P of them, (B, P, D); keep all P"),
    "prefix averaged": (lambda c, t, p: _embed(c, t, p, image=lambda x: x.mean(0, keepdim=True)),
                        "you averaged each image's prefix into one vector: keep all P vectors, (P, D)"),
}  # fmt: skip


def _named_mistake(out: Tensor, args: tuple, mistakes: Mistakes) -> None:
    """Fail with the hint of the first mistake `out` equals (shapes may differ from the reference's)."""
    for mistake, hint in mistakes.values():
        with torch.no_grad():
            if same(out, mistake(*args)):
                fail(hint)


def check_embed_prompt(embed_prompt: Callable) -> str:
    """Exercise 8.1: embed_prompt(captioner, tokenizer, prompt) equals embed_prompts(start_of_text=False)'s row."""
    captioner, tokenizer = _captioner(), _tokenizer()
    shapes = []
    for prompt in _prompts():
        what = f"embed_prompt(captioner, tokenizer, {_describe(prompt)})"
        hint = ("An image (3, S, S) becomes captioner.prefix(image[None])[0], (P, D); a text becomes "
                "captioner.lm.get_input_embeddings()(torch.tensor(tokenizer(text, add_special_tokens=False)"
                "['input_ids'])), (T, D); torch.cat the pieces along the first axis")  # fmt: skip
        out = tensor(call(embed_prompt, captioner, tokenizer, list(prompt), what=what, hint=hint), what)
        out = out.detach().float()
        with torch.no_grad():
            expected = fewshot.embed_prompts(captioner, tokenizer, [prompt], start_of_text=False)[0][0]  # (L, D)
        if out.ndim == 3 and out.shape[0] == 1:
            fail(f"{what} has shape {tuple(out.shape)}: return one prompt's (L, D), without a batch axis")
        n_images = sum(not isinstance(s, str) for s in prompt)
        if out.shape != expected.shape:
            _named_mistake(out, (captioner, tokenizer, prompt), EMBED_MISTAKES)
            n_tokens = len(expected) - n_images * P
            fail(f"{what} has shape {tuple(out.shape)}, expected (L, D) = {tuple(expected.shape)}: {n_images} "
                 f"image(s) x P = {P} vectors, plus {n_tokens} text tokens, each of width D = {D}")  # fmt: skip
        if not same(out, expected):
            diagnose(out, (captioner, tokenizer, prompt), EMBED_MISTAKES, what, expected,
                     "each image's P prefix vectors and each text's token embeddings, in order")  # fmt: skip
        shapes.append(f"{n_images} image(s) -> {tuple(out.shape)}")
    return (f"equals fewshot.embed_prompts(start_of_text=False) on four prompts (text first, image first, two images "
            f"side by side, text only): {', '.join(shapes)}, P = {P} vectors per image")


# Exercise 8.2: the log-probability of a candidate answer, without a cache -------------------------------------

CANDIDATES = (" dax.", " blicket.", " a small red circle.")  # 4, 8 and 7 tokens for the checks' tokenizer


def _log_probs(captioner: Captioner, tokenizer, prompt: list, candidate: str, *, shift: int = 1,
               axis: int = -1) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(C, V) scores at the positions meant to predict the candidate's C tokens, and its (C,) ids.

    shift=1 is right (position L-1+i predicts token i); shift=0 reads the logits at the tokens themselves.
    The scores are log-softmaxed over `axis` of the (1, L + C, V) logits (-1: over the vocabulary).
    """
    embeds = fewshot.embed_prompts(captioner, tokenizer, [prompt])[0]  # (1, L, D)
    ids = torch.tensor(tokenizer(candidate, add_special_tokens=False)["input_ids"])  # (C,)
    whole = torch.cat([embeds, captioner.lm.get_input_embeddings()(ids)[None]], dim=1)  # (1, L + C, D)
    logits = captioner.lm(inputs_embeds=whole).logits  # (1, L + C, V)
    scores = logits.log_softmax(axis) if axis is not None else logits
    start = embeds.shape[1] - shift
    return scores[0, start : start + len(ids)], ids


def _picked(captioner, tokenizer, prompt, candidate, **kwargs) -> Tensor:
    """(C,) the scores of the candidate's own tokens (see _log_probs)."""
    scores, ids = _log_probs(captioner, tokenizer, prompt, candidate, **kwargs)
    return scores.gather(-1, ids[:, None])[:, 0]


def _mistake(how: Callable[[Tensor], Tensor], **kwargs) -> Callable[..., Tensor]:
    """A score that reduces the picked (C,) scores with `how`, with _log_probs' keyword arguments."""
    return lambda c, t, p, a: how(_picked(c, t, p, a, **kwargs))


SCORE_MISTAKES: Mistakes = {
    "not shifted": (_mistake(torch.sum, shift=0),
                    "you read the logits at the candidate's own positions: position i predicts token i + 1, so the "
                    "candidate's first token is scored by the prompt's *last* position, L - 1 "
                    "(logits[L - 1 : L + C - 1])"),
    "first token left out": (lambda c, t, p, a: _picked(c, t, p, a)[1:].sum(),
                             "you left out the candidate's first token: it is predicted by the prompt's last "
                             "position, L - 1; score all C tokens, with logits[L - 1 : L + C - 1]"),
    "mean": (_mistake(torch.mean),
             "you averaged the tokens' log-probabilities: the log-probability of the whole answer is their *sum* "
             "(the probability of a sequence is the product of its tokens'), as fewshot.score returns"),
    "probabilities": (lambda c, t, p, a: _picked(c, t, p, a).exp().sum(),
                      "you added up probabilities: a sequence's probability is the *product* of its tokens', so "
                      "add their log-probabilities (log_softmax, then gather, then sum)"),
    "probability": (lambda c, t, p, a: _picked(c, t, p, a).sum().exp(),
                    "you returned the probability itself: return its log, the sum of the tokens' log-probabilities "
                    "(it ranks the same, but a product of many small numbers underflows)"),
    "raw logits": (_mistake(torch.sum, axis=None),
                   "you summed raw logits: turn them into log-probabilities first, logits.log_softmax(-1), so that "
                   "each position's scores are normalised over the vocabulary"),
    "wrong axis": (_mistake(torch.sum, axis=1),
                   "you normalised over the wrong axis: log_softmax over the vocabulary, the last axis (-1), not "
                   "over the positions"),
    "first token only": (lambda c, t, p, a: _picked(c, t, p, a)[0],
                         "you scored only the candidate's first token: sum the log-probabilities of all its tokens"),
    "last token only": (lambda c, t, p, a: _picked(c, t, p, a)[-1],
                        "you scored only the candidate's last token: sum the log-probabilities of all its tokens"),
}  # fmt: skip


def _number(out, what: str) -> float:
    """The answer as a float, or a hint."""
    if isinstance(out, Tensor):
        if out.numel() != 1:
            fail(f"{what} should return one number (a float or a 0-d tensor), got a tensor of shape {tuple(out.shape)}")
        return float(out.detach())
    if isinstance(out, (int, float, np.floating)):
        return float(out)
    fail(f"{what} should return one number, the summed log-probability, got {type(out).__name__}")


def check_score_candidate(score_candidate: Callable) -> str:
    """Exercise 8.2: score_candidate(captioner, tokenizer, prompt, candidate) equals fewshot.score's entry."""
    captioner, tokenizer = _captioner(), _tokenizer()
    prompts = _prompts()[:3]
    with torch.no_grad():
        expected = fewshot.score(captioner, tokenizer, prompts, [list(CANDIDATES)] * len(prompts))  # (B, K)
    for i, prompt in enumerate(prompts):
        for j, candidate in enumerate(CANDIDATES):
            what = f"score_candidate(captioner, tokenizer, {_describe(prompt)}, {candidate!r})"
            hint = ("Embed the prompt (fewshot.embed_prompts(captioner, tokenizer, [prompt])[0], (1, L, D)), append "
                    "the candidate's token embeddings, run captioner.lm(inputs_embeds=...) once, and sum the "
                    "log-probabilities of the candidate's tokens")  # fmt: skip
            out = _number(call(score_candidate, captioner, tokenizer, list(prompt), candidate, what=what, hint=hint),
                          what)
            if not same(torch.tensor(out), expected[i, j]):
                diagnose(torch.tensor(out), (captioner, tokenizer, prompt, candidate), SCORE_MISTAKES, what,
                         expected[i, j], "position L - 1 + i predicts the candidate's token i: sum "
                         "logits.log_softmax(-1) at those positions, gathered at the candidate's tokens")  # fmt: skip
    return (f"equals fewshot.score, which reuses the prompt's KV cache, on {len(prompts)} prompts x "
            f"{len(CANDIDATES)} candidates of 4 to 8 tokens: every log p(candidate | prompt), to float round-off")


# Exercise 8.3: the open-ended rule -----------------------------------------------------------------------

SAYS_CASES = (  # (continuation, answer): the decoded text after "... this is a", and the right name
    (" dax.", "dax"),
    (" dax", "dax"),  # said, then end-of-text (complete() cuts it there)
    (" dax. a small red circle.", "dax"),  # said, then went on with a new sentence
    (" daxes.", "dax"),  # a longer word that starts with the answer
    (" dax blicket.", "dax"),  # more than the answer
    ("dax.", "dax"),  # no space: the text would read "this is adax."
    (" wug.", "dax"),
    ("", "dax"),  # nothing said
    (" a dax.", "dax"),
    (" red.", "red"),  # a VQA answer
    (" red circle.", "red"),
    (" blicket.\n", "blicket"),
)

SAYS_MISTAKES: dict[str, tuple[Callable[[str, str], bool], str]] = {
    "starts with": (lambda c, a: c.startswith(f" {a}"),
                    "your rule accepts a longer word that starts with the answer (' daxes.') and more words before "
                    "the full stop (' dax blicket.'): the answer must be followed by '.' or by nothing at all"),
    "contains": (lambda c, a: a in c,
                 "you looked for the answer anywhere in the continuation: ' a dax.' and ' daxes.' contain 'dax' but "
                 "do not say it; the continuation must *begin* with ' ' + answer, then '.' or nothing"),
    "exactly": (lambda c, a: c == f" {a}.",
                "you asked for exactly ' dax.': the LM often goes on after the full stop (' dax. a small red "
                "circle.'), and a continuation cut at end-of-text may have no full stop (' dax'); both said dax"),
    "full stop needed": (lambda c, a: c.startswith(f" {a}."),
                         "' dax' with nothing after it is right too: complete() cuts the text at end-of-text, so "
                         "it means the LM said dax and stopped"),
    "no space": (lambda c, a: c.strip().split(".")[0] == a,
                 "you ignored the leading space: after '... this is a' the name is the token ' dax'; 'dax.' with no "
                 "space would read 'this is adax.'. The continuation must start with ' ' + answer"),
    "first word": (lambda c, a: (c.split() or [""])[0].strip(".") == a,
                   "you compared the first word only: ' dax blicket.' says more than the answer, and 'dax.' has no "
                   "leading space. The continuation must be ' ' + answer, then '.' or nothing"),
}  # fmt: skip


def _verdict(out, what: str) -> bool:
    if isinstance(out, str):
        fail(f"{what} should return True or False, got the string {out!r}")
    if isinstance(out, Tensor) and out.numel() != 1:
        fail(f"{what} should return True or False, got a tensor of shape {tuple(out.shape)}")
    return bool(out)


def check_says(says: Callable) -> str:
    """Exercise 8.3: says(continuation, answer) agrees with fewshot.says on every case."""
    got = []
    for continuation, answer in SAYS_CASES:
        what = f"says({continuation!r}, {answer!r})"
        got.append(_verdict(call(says, continuation, answer, what=what,
                                 hint="return True when the continuation is ' ' + answer, then '.' (and anything) or "
                                      "nothing"), what))  # fmt: skip
    expected = [fewshot.says(c, a) for c, a in SAYS_CASES]
    if got != expected:
        for mistake, hint in SAYS_MISTAKES.values():
            if got == [mistake(c, a) for c, a in SAYS_CASES]:
                fail(hint)
        i = next(k for k, (g, e) in enumerate(zip(got, expected)) if g != e)
        c, a = SAYS_CASES[i]
        fail(f"says({c!r}, {a!r}) returned {got[i]}, expected {expected[i]}: right means the continuation is "
             "' ' + answer followed by '.' (and anything after it) or by nothing")
    right = sum(expected)
    return (f"agrees with fewshot.says on {len(SAYS_CASES)} continuations ({right} right, {len(SAYS_CASES) - right} "
            "wrong: longer words, extra words, no space, a different name, nothing)")


# Exercise 8.4: the blind and text baselines -------------------------------------------------------------


def _episodes() -> list[tuple[str, Episode]]:
    """(description, episode): binding with and without task induction, with repeats, and VQA with a shot."""
    rng = np.random.default_rng(84)
    return [
        ("a 2-way 1-shot binding episode with task induction", binding_episode(rng, 2, 1, attribute="shape")),
        ("a 2-way 1-shot binding episode without task induction",
         binding_episode(rng, 2, 1, attribute="colour", task_induction=False)),
        ("a 3-way 1-shot binding episode, repeated twice", binding_episode(rng, 3, 1, repeats=2)),
        ("a 1-shot VQA episode", vqa_episode(rng, 1, kind="shape")),
    ]  # fmt: skip


def _baseline(episode: Episode, mode: str, *, query=True, glue=" ", strip=True, keep_first_space=False) -> str:
    """The blind or text prompt, with one mistake switched on by the keyword arguments."""
    scenes = [i for i, s in enumerate(episode.segments) if isinstance(s, S.Scene)]
    pieces = []
    for i, segment in enumerate(episode.segments):
        if isinstance(segment, S.Scene):
            if mode == "text" and (query or i != scenes[-1]):
                pieces.append(S.caption(segment))
        else:
            pieces.append(segment)
    if not strip:  # each piece as it is: texts keep their leading space
        return glue.join(pieces)
    space = " " if keep_first_space and pieces[0].startswith(" ") else ""
    return space + glue.join(p.strip() for p in pieces)


BASELINE_MISTAKES: dict[str, tuple[Callable[[Episode, str], str], str]] = {
    "query left out": (lambda e, m: _baseline(e, m, query=False),
                       "the query's scene is missing: in the text baseline *every* scene becomes its caption, the "
                       "query too, else the prompt asks for the name of nothing"),
    "no spaces": (lambda e, m: _baseline(e, m, glue=""),
                  "the pieces are glued without spaces ('answer with dax or wug.a small red circle.'): join them with "
                  "one space, as the corpus writes"),
    "double spaces": (lambda e, m: _baseline(e, m, strip=False),
                      "your prompt has two spaces between pieces (or starts with a space): the texts already begin "
                      "with one (' this is a dax.'); strip each piece, then join with one space"),
    "leading space": (lambda e, m: _baseline(e, m, keep_first_space=True),
                      "your prompt starts with a space: a text that followed an image keeps its ' ' at the front once "
                      "the image is gone, but the first word of a document has none ('this', not ' this'); strip it"),
}  # fmt: skip


def _text(out, what: str) -> str:
    if isinstance(out, (list, tuple)) and len(out) == 1 and isinstance(out[0], str):
        fail(f"{what} returned a list with one string: return the string itself (to_prompt gives it as a "
             "one-segment prompt, [text])")
    if not isinstance(out, str):
        fail(f"{what} should return one string, the whole prompt as text, got {type(out).__name__}")
    return out


def check_baseline_prompt(baseline_prompt: Callable) -> str:
    """Exercise 8.4: baseline_prompt(episode, mode) equals to_prompt(episode, mode)'s one text, for blind and text."""
    for description, episode in _episodes():
        for mode in ("blind", "text"):
            what = f"baseline_prompt(episode, {mode!r}) for {description}"
            out = _text(call(baseline_prompt, episode, mode, what=what,
                             hint="go through episode.segments: a str is kept; a scene (minivlm.data.shapes.Scene) "
                                  "is dropped (blind) or replaced by S.caption(scene) (text); join the pieces, "
                                  "each stripped, with one space"), what)  # fmt: skip
            expected = to_prompt(episode, mode)[0]
            if out == expected:
                continue
            other = to_prompt(episode, "text" if mode == "blind" else "blind")[0]
            if out == other:
                fail(f"{what} returned the {'text' if mode == 'blind' else 'blind'} prompt: 'blind' removes every "
                     "scene, 'text' replaces each scene by its caption, S.caption(scene)")
            for mistake, hint in BASELINE_MISTAKES.values():
                if out == mistake(episode, mode):
                    fail(hint)
            fail(f"{what} returned\n  {out!r}\nexpected\n  {expected!r}")
    return ("equals to_prompt's 'blind' and 'text' prompts on binding episodes with and without task induction, "
            "with repeats, and on a VQA episode with one shot")


CHECKS: dict[str, Callable[..., str]] = {
    "8.1": check_embed_prompt,
    "8.2": check_score_candidate,
    "8.3": check_says,
    "8.4": check_baseline_prompt,
}
