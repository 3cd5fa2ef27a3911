"""The text probes score what they claim: an oracle scores 100%, plausible wrong rules score chance or less."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from minivlm.corpus import CorpusConfig, documents
from minivlm.data import shapes as S
from minivlm.probes import (
    LIST_WORDS, accuracy, answer_accuracy, binding_accuracy, complete, copy_accuracy, copy_attribute_scores,
    list_copy_accuracy, word_similarity,
)  # fmt: skip
from minivlm.tokenizer import train_tokenizer

CAPTIONS = [S.caption(S.sample_scene("test", 0, i)) for i in range(30)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(documents(CorpusConfig(), 2000), vocab_size=400)


class Oracle(nn.Module):
    """A stand-in LM that answers each prompt with `rule(prompt)`, one token per step, through greedy's cache API.

    Its "KV cache" is simply the tokens so far; a row's prompt is recognised as the longest text it starts with
    that ends a prompt ('.', 'this is a', 'a:'), the way the probes build them. Like the course LM, it has only
    ever read text that starts with <|endoftext|>, and refuses a prompt that does not.
    """

    def __init__(self, tokenizer, rule):
        super().__init__()
        self.tokenizer, self.rule = tokenizer, rule
        self.config = SimpleNamespace(n_positions=512)
        self.anchor = nn.Parameter(torch.zeros(1))  # so that next(model.parameters()) gives a device
        self.prompt_tokens = None  # (B,) prompt lengths, known at the first call of each batch

    def forward(self, input_ids, attention_mask, position_ids=None, past_key_values=None, use_cache=False,
                logits_to_keep=0):  # fmt: skip
        if attention_mask is None:  # nothing padded (decoding then passes no mask): every position is real
            past = 0 if past_key_values is None else past_key_values.shape[1]
            attention_mask = torch.ones(len(input_ids), past + input_ids.shape[1], dtype=torch.long)
        if past_key_values is None:
            self.prompt_tokens = attention_mask.sum(-1)
            ids = input_ids
        else:
            ids = torch.cat([past_key_values, input_ids], dim=1)
        logits = torch.full((len(ids), 1, len(self.tokenizer)), -1e9)
        for b, (row, mask) in enumerate(zip(ids, attention_mask)):
            real = row[mask.bool()]
            if real[0] != self.tokenizer.eos_token_id:
                raise AssertionError(f"a prompt must start with <|endoftext|>, as pretraining text does: {real[:5]}")
            prompt = self.tokenizer.decode(real[1 : self.prompt_tokens[b]])
            answer = [*self.tokenizer(self.rule(prompt), add_special_tokens=False)["input_ids"], self.tokenizer.eos_token_id]
            done = len(real) - int(self.prompt_tokens[b])
            logits[b, 0, answer[min(done, len(answer) - 1)]] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=ids if use_cache else None)


def solve_by(attribute: str):
    """A rule that names the query after the first earlier example sharing its colour (or shape); the first
    name if none does."""
    def solve(prompt: str) -> str:
        examples = re.findall(r"a \w+ (\w+) (\w+)\. this is a (\w+)\.", prompt)
        query = re.search(r"a \w+ (\w+) (\w+)\. this is a$", prompt).groups()
        k = 0 if attribute == "colour" else 1
        return next((f" {e[2]}." for e in examples if e[k] == query[k]), f" {examples[0][2]}.")

    return solve


solve_binding, solve_by_shape = solve_by("colour"), solve_by("shape")  # the corpus binds by colour


def first_name(prompt: str) -> str:
    """A plausible wrong rule: repeat the first name in the prompt (position, not content)."""
    return " " + re.search(r"this is a (\w+)\.", prompt).group(1) + "."


def test_complete_returns_the_continuation_without_the_prompt(tokenizer):
    out = complete(Oracle(tokenizer, lambda p: " a large red square."), tokenizer, CAPTIONS[:3], max_new_tokens=20)
    assert out == [" a large red square."] * 3
    short = complete(Oracle(tokenizer, lambda p: " a large red square."), tokenizer, CAPTIONS[:1], max_new_tokens=2)
    assert short == [" a large"]


class Recorder(nn.Module):
    """A stand-in LM that writes down each prompt it is given and then ends the text at once."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer, self.prompts = tokenizer, []
        self.config = SimpleNamespace(n_positions=512)
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=False, **kwargs):
        if past_key_values is None:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            self.prompts += [row[m.bool()].tolist() for row, m in zip(input_ids, mask)]
        logits = torch.full((len(input_ids), 1, len(self.tokenizer)), -1e9)
        logits[..., self.tokenizer.eos_token_id] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=input_ids if use_cache else None)


def test_a_prompt_starts_with_end_of_text_unless_asked_not_to(tokenizer):
    ids = tokenizer(CAPTIONS[0], add_special_tokens=False)["input_ids"]
    for start_of_text, expected in ((True, [tokenizer.eos_token_id, *ids]), (False, ids)):
        model = Recorder(tokenizer)
        assert accuracy(model, tokenizer, CAPTIONS[:1], [" x."], start_of_text=start_of_text) == 0.0
        assert model.prompts == [expected]


def test_copy_probe(tokenizer):
    again = lambda p: p[p.index(" ") : -2]  # noqa: E731  "CAPTION a" -> " <CAPTION after its 'a'>"
    assert copy_accuracy(Oracle(tokenizer, again), tokenizer, CAPTIONS) == 1.0
    assert copy_accuracy(Oracle(tokenizer, lambda p: " small red circle."), tokenizer, CAPTIONS) < 0.2
    assert copy_accuracy(Oracle(tokenizer, lambda p: again(p)[:-1] + ","), tokenizer, CAPTIONS) == 0.0  # '.' counts
    with pytest.raises(ValueError, match="shapes-world captions"):
        copy_accuracy(Oracle(tokenizer, again), tokenizer, ["the cat sat."])


@pytest.mark.parametrize("ways", [2, 5])
def test_binding_probe(tokenizer, ways):
    score = lambda rule, **kw: binding_accuracy(Oracle(tokenizer, rule), tokenizer, ways=ways, episodes=100, **kw)
    assert score(solve_binding) == 1.0
    assert score(solve_binding, task_induction=False, shots=3) == 1.0
    assert abs(score(first_name) - 1 / ways) < 0.15  # about chance
    assert score(lambda p: " dax.") < 0.2  # one fixed name
    assert score(solve_binding, echo=True) == 1.0  # the query repeats an example's description
    assert abs(score(first_name, echo=True) - 1 / ways) < 0.15
    if ways <= 4:  # names that follow the shape: one look-up is right, the other at about chance
        assert score(solve_by_shape, attribute="shape") == 1.0
        assert abs(score(solve_binding, attribute="shape") - 1 / ways) < 0.15
    assert score(solve_by_shape) < 0.75  # by shape where names follow the colour


def test_answer_probe(tokenizer):
    scenes = [S.sample_scene("test", 0, i) for i in range(40)]
    truth = {f"{S.caption(s)} q: {q} a:": f" {a}." for s in scenes for q, a in S.questions(s)}
    assert answer_accuracy(Oracle(tokenizer, truth.__getitem__), tokenizer, scenes) == 1.0
    assert answer_accuracy(Oracle(tokenizer, lambda p: " yes."), tokenizer, scenes) < 0.3


def rest_of_list(prompt: str) -> str:
    """The induction rule: find the earlier copy of the words said so far and go on from there."""
    listed, again = prompt.split(". ")
    words, said = listed.split(), again.split()
    return " " + " ".join(words[len(said) :]) + "."


def test_list_copy_probe(tokenizer):
    assert list_copy_accuracy(Oracle(tokenizer, rest_of_list), tokenizer, episodes=100) == 1.0
    # plausible wrong rules: the grammar of a caption; the list from its start; one word too few
    assert list_copy_accuracy(Oracle(tokenizer, lambda p: " small red circle."), tokenizer, episodes=100) == 0.0
    assert list_copy_accuracy(Oracle(tokenizer, lambda p: " " + p.split(". ")[0] + "."), tokenizer, episodes=100) == 0.0
    drop_last = lambda p: rest_of_list(p).rsplit(" ", 1)[0] + "."  # noqa: E731
    assert list_copy_accuracy(Oracle(tokenizer, drop_last), tokenizer, episodes=100) < 0.05
    assert len(set(LIST_WORDS)) == len(LIST_WORDS)  # distinct words: the earlier copy of each is unique


def test_a_prompt_longer_than_the_context_is_refused(tokenizer):
    model = Oracle(tokenizer, lambda p: " x.")
    model.config.n_positions = 8
    with pytest.raises(ValueError, match="leaves no room in the model's context of 8 tokens"):
        complete(model, tokenizer, CAPTIONS[:2], max_new_tokens=5)


def test_copy_attribute_scores_tell_the_sentence_from_its_words(tokenizer):
    again = lambda p: p[p.index(" ") : -2]  # noqa: E731  a perfect copy
    assert copy_attribute_scores(Oracle(tokenizer, again), tokenizer, CAPTIONS)["exact match"] == 1.0
    # right sentence shape, wrong colour: count and shape survive, colour does not
    recolour = lambda p: again(p).replace(" red ", " blue ").replace(" green ", " red ")  # noqa: E731
    scores = copy_attribute_scores(Oracle(tokenizer, recolour), tokenizer, CAPTIONS)
    assert scores["count"] == 1.0 and scores["shape"] == 1.0 and scores["colour"] < 1.0


def test_word_similarity_is_one_for_merged_words_and_low_for_distinct_ones(tokenizer):
    from minivlm.gpt2 import GPT2, GPT2Config

    model = GPT2(GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=64, n_layer=1, n_head=2))
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=1.0)
    assert all(abs(v) < 0.4 for v in word_similarity(model, tokenizer).values())  # random vectors: nearly orthogonal
    table = model.get_input_embeddings().weight.data
    small, large = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" small", " large"))
    table[large] = 3 * table[small]  # same direction
    assert word_similarity(model, tokenizer)["size"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least two words"):
        word_similarity(model, tokenizer, {"x": ["small"]})
