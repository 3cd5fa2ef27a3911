"""Text-only probes: does the pretrained LM read its context? Copying, name binding, answering.

Perplexity says how well an LM predicts text on average; it does not say whether the LM *uses what
came before*, and that is the only thing a visual prefix can work through. These probes ask it
directly, with greedy decoding (`minivlm.decoding.greedy`), before any image is involved:

- copy: after "a small red circle. a" does it go on " small red circle."? (the corpus's repeats; the
  prompt's " a", which starts every caption, says that the text goes on rather than ends)
- bind: after "a red circle. this is a dax. a blue square. this is a wug. a red triangle. this is a"
  does it say " dax."? Names are drawn fresh for each episode, so only the context can tell (Frozen's
  fast-binding task, Tsimpoukelli et al., 2021, in text); chance is 1 / ways.
- answer: after "<caption> q: what colour is the circle? a:" does it say the right colour?
- list copy: after "wug red dax small circle. wug red" does it go on " dax small circle."? Lists of
  distinct words of the world and the binding names, in random order and of random length, so neither
  grammar nor a fixed distance says what comes next: only finding the earlier copy of the current word
  and saying what followed it, an induction head's work (Olsson et al., 2022). A caption can be copied
  partly by its grammar; this probe says whether the LM copies *tokens*.
- copy, per attribute: the copies read back by the caption parser (`minivlm.evaluate`): an LM can
  copy a sentence's *shape* (how many objects, which links) by position alone, and still lose the
  content words (colour, shape, size), which are what a visual prefix has to get across.
- word similarity: the cosine similarity of the token embeddings of words the corpus uses
  interchangeably (" red" and " blue"). Where nothing in the text depends on *which* colour was said
  except copying, training can leave them all but the same vector; an LM that cannot tell " red" from
  " blue" apart cannot copy one of them either.

A probe scores an answer right only if the continuation starts with exactly the expected text, the
closing "." included. Every prompt starts with <|endoftext|>, as every text the course LM was trained on
does (`minivlm.lm.token_stream` packs "<|endoftext|> document <|endoftext|> ...", and its training
windows begin at those tokens): position 0 of the course LM has only ever held <|endoftext|>, and a
prompt without it asks the LM about text it has never seen. It matters: the course LM, which copies
captions and lists almost perfectly after <|endoftext|>, copies none of the captions without it and far
fewer of the lists (lesson 03, section 6). GPT-2's own tokenizer adds no such token either, but GPT-2
was trained on windows that start anywhere. Works with our GPT2 and transformers' GPT2LMHeadModel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from minivlm.corpus import LIST_WORDS, binding_prompt
from minivlm.data import shapes as S
from minivlm.decoding import greedy

__all__ = ["complete", "accuracy", "copy_accuracy", "copy_attribute_scores", "binding_accuracy", "answer_accuracy",
           "LIST_WORDS", "list_copy_accuracy",
           "WORD_GROUPS", "word_similarity"]  # fmt: skip

WORD_GROUPS = {"size": S.SIZES, "colour": S.COLOURS, "shape": S.SHAPES}  # words a caption uses interchangeably


@torch.no_grad()
def complete(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 64,
             start_of_text: bool = True) -> list[str]:  # fmt: skip
    """Greedy continuations of `prompts` (batched, left-padded), each cut at <|endoftext|> or the context's end.

    Each prompt is read as a document is in pretraining: after <|endoftext|> (see the module docstring);
    start_of_text=False leaves it out, to see what that costs.
    """
    context = model.config.n_positions
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    start = tokenizer.eos_token if start_of_text else ""  # parsed as the special token, not its letters
    for i in range(0, len(prompts), batch_size):
        texts = [start + p for p in prompts[i : i + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True,
                          padding_side="left", add_special_tokens=False)  # fmt: skip
        t = batch["input_ids"].shape[1]
        if t >= context:
            raise ValueError(f"a prompt of {t} tokens leaves no room in the model's context of {context} tokens")
        new = greedy(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                     max_new_tokens=min(max_new_tokens, context - t), eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        out += tokenizer.batch_decode(new, skip_special_tokens=True)
    model.train(was_training)
    return out


def accuracy(model: nn.Module, tokenizer, prompts: Sequence[str], targets: Sequence[str], *,
             start_of_text: bool = True) -> float:  # fmt: skip
    """Fraction of prompts whose greedy continuation starts with its target (`complete`, with start_of_text)."""
    if len(prompts) != len(targets) or not prompts:
        raise ValueError(f"need as many targets as prompts, and at least one: got {len(prompts)} and {len(targets)}")
    longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets)
    continuations = complete(model, tokenizer, prompts, max_new_tokens=longest + 1, start_of_text=start_of_text)
    return float(np.mean([c.startswith(t) for c, t in zip(continuations, targets)]))


def copy_accuracy(model: nn.Module, tokenizer, captions: Sequence[str]) -> float:
    """After a caption and the " a" that starts every caption, does the LM say the caption again, word for word?"""
    if not all(c.startswith("a ") for c in captions):
        raise ValueError("copy_accuracy expects shapes-world captions, which all start with 'a '")
    return accuracy(model, tokenizer, [f"{c} a" for c in captions], [c[1:] for c in captions])


def copy_attribute_scores(model: nn.Module, tokenizer, captions: Sequence[str]) -> dict[str, float]:
    """The copy probe's continuations, scored attribute by attribute against the caption (`attribute_scores`)."""
    from minivlm.evaluate import attribute_scores  # pycocoevalcap is imported only where it is needed

    if not all(c.startswith("a ") for c in captions):
        raise ValueError("copy_attribute_scores expects shapes-world captions, which all start with 'a '")
    longest = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in captions)
    continuations = complete(model, tokenizer, [f"{c} a" for c in captions], max_new_tokens=longest + 1)
    return attribute_scores(["a" + c.split(".")[0] + "." for c in continuations], list(captions))


@torch.no_grad()
def word_similarity(model: nn.Module, tokenizer, groups: dict[str, Sequence[str]] = WORD_GROUPS) -> dict[str, float]:
    """Mean pairwise cosine similarity of the input embeddings of each group's words, each read as ' word'.

    A word the tokenizer splits into several tokens is represented by the mean of their embeddings.
    """
    table = model.get_input_embeddings().weight
    out = {}
    for name, words in groups.items():
        if len(words) < 2:
            raise ValueError(f"group {name!r} needs at least two words to compare, got {list(words)}")
        ids = [tokenizer(f" {w}", add_special_tokens=False)["input_ids"] for w in words]
        e = torch.stack([table[i].float().mean(0) for i in ids])  # (W, D)
        e = torch.nn.functional.normalize(e, dim=-1)
        cos = e @ e.T  # (W, W)
        w = len(ids)
        out[name] = float((cos.sum() - w) / (w * (w - 1)))  # the mean off the diagonal
    return out


def binding_accuracy(
    model: nn.Module, tokenizer, *, ways: int, shots: int = 1, task_induction: bool = True, episodes: int = 200,
    seed: int = 0, strict: bool = False, echo: bool = False, made_up: bool | None = None, attribute: str = "colour",
) -> float:  # fmt: skip
    """Open-ended N-way fast binding in text: is the query's name, bound earlier in the prompt, said next?

    The names follow `attribute`: the colour, as in the corpus, or the shape, which the corpus never binds.
    echo=True makes the query's description a word-for-word repeat of an earlier example's, so that the
    match is as easy as it gets: an LM that fails even then does not look back past "this is a".
    made_up: the names, as in `binding_prompt` (None: half NAMES, half made up; False: NAMES, the single
    tokens "dax", "wug", ...; True: made up, mostly several tokens, which the LM must also spell right).
    """
    rng = np.random.default_rng([seed, ways, shots, task_induction] + ([1] if echo else [])
                                + ([] if made_up is None else [2 + made_up]) + ([4] if attribute == "shape" else []))
    episodes_ = [binding_prompt(rng, ways, shots, task_induction=task_induction, strict=strict, echo=echo,
                                made_up=made_up, attribute=attribute) for _ in range(episodes)]  # fmt: skip
    return accuracy(model, tokenizer, [p for p, _ in episodes_], [f" {name}." for _, name in episodes_])


def answer_accuracy(model: nn.Module, tokenizer, scenes: Sequence[S.Scene], seed: int = 0) -> float:
    """After '<caption> q: <question> a:', is the one-word answer right? One random question per scene."""
    rng = np.random.default_rng(seed)
    prompts, targets = [], []
    for scene in scenes:
        pairs = S.questions(scene)
        question, answer = pairs[rng.integers(len(pairs))]
        prompts.append(f"{S.caption(scene)} q: {question} a:")
        targets.append(f" {answer}.")
    return accuracy(model, tokenizer, prompts, targets)


def list_copy_accuracy(model: nn.Module, tokenizer, *, episodes: int = 200, seed: int = 0) -> float:
    """After a list of 4-11 distinct words and its first 1-3 words again, is the rest of the list said, word for word?

    The words come from LIST_WORDS in a fresh random order each time; the answer ends with the list's '.'.
    """
    rng = np.random.default_rng([seed, 4])
    prompts, targets = [], []
    for _ in range(episodes):
        words = [LIST_WORDS[j] for j in rng.permutation(len(LIST_WORDS))[: int(rng.integers(4, 12))]]
        given = int(rng.integers(1, 4))
        prompts.append(f"{' '.join(words)}. {' '.join(words[:given])}")
        targets.append(f" {' '.join(words[given:])}.")
    return accuracy(model, tokenizer, prompts, targets)
