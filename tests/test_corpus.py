"""The LM's text corpus: deterministic, grammatical, and built so that context must be read."""

from __future__ import annotations

import re

import numpy as np
import pytest

from minivlm.corpus import (
    FACTS, KINDS, LIST_WORDS, NAMES, RECALL_KEYS, CorpusConfig, binding_prompt, document, documents, made_up_word,
)  # fmt: skip
from minivlm.data import shapes as S

PHRASE = re.compile(rf"a ({'|'.join(S.SIZES)}) ({'|'.join(S.COLOURS)}) ({'|'.join(S.SHAPES)})")


def test_documents_are_a_pure_function_of_config_and_index():
    config = CorpusConfig()
    assert list(documents(config, 50)) == list(documents(config, 50))
    assert list(documents(config, 10, start=20)) == [document(config, i) for i in range(20, 30)]
    assert list(documents(config, 50)) != list(documents(CorpusConfig(seed=1), 50))


def test_the_default_mix_holds_every_kind_in_its_share():
    n = 2100  # the default weights sum to 21: about 100 documents per unit of weight
    docs = list(documents(CorpusConfig(), n))
    assert 250 < sum(PHRASE.search(d) is not None and "this is a" in d for d in docs) < 350  # binding, weight 3
    assert 250 < sum(d.startswith(RECALL_KEYS) and ". this is a" in d and not PHRASE.search(d) for d in docs) < 350
    assert 70 < sum(" q: " in d for d in docs) < 130  # qa, weight 1
    said_again = [len(set(parts)) == 1 < len(parts) for parts in (d.rstrip(".").split(". ") for d in docs)]
    assert 610 < sum(said_again) < 790  # repeats (4) and drills (3) say one text two or more times
    facts = [d for d in docs if S.try_parse(d.split(". ")[0] + ".") is None and " is " in d and "this is" not in d]
    assert 520 < len(facts) < 680  # facts, weight 6
    assert all(d and d.endswith(".") for d in docs)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_alone(kind):
    docs = list(documents(CorpusConfig(mix={kind: 1.0}), 40))
    if kind == "caption":
        assert all(S.try_parse(d) is not None for d in docs)
    elif kind == "repeat":
        for d in docs:
            sentences = [s + "." for s in d.split(". ") if s]
            sentences[-1] = sentences[-1].rstrip(".") + "."
            assert len(set(sentences)) == 1 and 2 <= len(sentences) <= 3 and S.try_parse(sentences[0])
    elif kind == "qa":
        for d in docs:
            caption, _, rest = d.partition(" q: ")
            S.parse_caption(caption)
            assert re.fullmatch(r"([a-z ]+\? a: [a-z]+\.)( q: [a-z ]+\? a: [a-z]+\.){0,2}", rest), d
    elif kind == "drill":
        for d in docs:
            first, second = d[:-1].split(". ")
            words = first.split()
            assert first == second and 4 <= len(words) <= 11
            assert set(words) <= set(LIST_WORDS) and len(set(words)) == len(words)  # whole words, each once
    elif kind == "fact":  # every sentence states a thing's true size, colour or shape
        known = {thing: attribute for attribute, things in FACTS.items() for thing in things}
        for d in docs:
            for sentence in d[:-1].split(". "):
                m = re.fullmatch(r"(?:a|the) ([a-z ]+) is (?:a )?(\w+)", sentence)
                assert m and m.group(2) in S.SIZES + S.COLOURS + S.SHAPES, sentence
                assert known.get(m.group(1), m.group(2)) == m.group(2), sentence
    elif kind == "recall":  # one-word descriptions named, then asked again: always the name bound first
        for d in docs:
            pairs = re.findall(r"(\w+)\. this is a (\w+)\.", d)
            assert " ".join(f"{k}. this is a {n}." for k, n in pairs) == d
            keys = [k for k, _ in pairs]
            assert set(keys) <= set(RECALL_KEYS) and 5 <= len(pairs) <= 12 and 2 <= len(set(keys)) <= 4
            assert len(keys) - len(set(keys)) >= 3  # 3-8 questions after the first naming of each
            bound: dict[str, str] = {}
            assert all(bound.setdefault(k, n) == n for k, n in pairs), d
            assert len(set(bound.values())) == len(bound)  # each key its own name
    else:  # binding: every query's name is the one bound to its category earlier in the document
        for d in docs:
            check_binding(d)


def check_binding(text: str, attribute: str = "colour") -> None:
    """Every 'X. this is a N.' after the first of its category (its colour, or shape) names the category's first name."""
    examples = re.findall(rf"({PHRASE.pattern})\. this is a (\w+)\.", text)
    assert len(examples) >= 2
    bound: dict[str, str] = {}
    for _, size, colour, shape, name in examples:
        category = colour if attribute == "colour" else shape
        assert bound.setdefault(category, name) == name, text
    assert len(set(bound.values())) == len(bound), text  # each category its own name


def test_binding_prompt_answers_are_bound_in_context():
    rng = np.random.default_rng(0)
    for ways, shots in [(2, 1), (2, 5), (5, 1), (3, 3)]:
        for induction in (True, False):
            prompt, name = binding_prompt(rng, ways, shots, task_induction=induction)
            assert prompt.endswith("this is a") and not prompt.endswith(" ")
            check_binding(f"{prompt} {name}.")
            names = re.findall(r"this is a (\w+)\.", prompt)
            assert len(names) == ways * shots and len(set(names)) == ways and name in names
            assert prompt.startswith("answer with ") == induction


def test_binding_documents_name_colours_and_say_nothing_by_their_shapes():
    rng = np.random.default_rng(0)
    shape_says_name = []
    for _ in range(300):
        prompt, name = binding_prompt(rng, 2, 1, task_induction=False)
        (_, _, c1, s1, n1), (_, _, c2, s2, n2) = re.findall(rf"({PHRASE.pattern})\. this is a (\w+)\.", prompt)
        colour, shape = re.search(rf"{PHRASE.pattern}\. this is a$", prompt).group(2, 3)
        assert c1 != c2 and colour in (c1, c2) and name == (n1 if colour == c1 else n2)
        if s1 != s2 and shape in (s1, s2):
            shape_says_name.append(name == (n1 if shape == s1 else n2))
    assert 0.35 < np.mean(shape_says_name) < 0.65  # a shape match points to the right name by chance only
    prompt, name = binding_prompt(rng, 4, 2, task_induction=True, attribute="shape")
    check_binding(f"{prompt} {name}.", "shape")
    with pytest.raises(ValueError, match="there are 4 shapes, so ways must be 1 to 4"):
        binding_prompt(rng, 5, 1, task_induction=False, attribute="shape")
    with pytest.raises(ValueError, match="unknown attribute 'size'; choose one of \\['colour', 'shape'\\]"):
        binding_prompt(rng, 2, 1, task_induction=False, attribute="size")


def test_an_echo_query_repeats_an_earlier_example_of_its_category_word_for_word():
    rng = np.random.default_rng(0)
    for ways, shots in [(2, 1), (3, 2), (5, 1), (2, 3)]:
        prompt, name = binding_prompt(rng, ways, shots, task_induction=False, echo=True)
        check_binding(f"{prompt} {name}.")
        examples = {(e[0], e[-1]) for e in re.findall(rf"({PHRASE.pattern})\. this is a (\w+)\.", prompt)}
        query = re.search(rf"({PHRASE.pattern})\. this is a$", prompt).group(1)
        assert (query, name) in examples
    fresh = [binding_prompt(np.random.default_rng(i), 2, 1, task_induction=False)[0] for i in range(20)]
    echoed = [binding_prompt(np.random.default_rng(i), 2, 1, task_induction=False, echo=True)[0] for i in range(20)]
    assert 0 < sum(f == e for f, e in zip(fresh, echoed)) < 10  # a fresh query only sometimes repeats a description


def test_binding_names_can_be_chosen():
    for made_up, expect_names in ((False, True), (True, False)):
        rng = np.random.default_rng(0)
        for _ in range(20):
            prompt, name = binding_prompt(rng, 2, 1, task_induction=False, made_up=made_up)
            assert (name in NAMES) == expect_names, prompt
            check_binding(f"{prompt} {name}.")
    rng = np.random.default_rng(0)
    mixed = [binding_prompt(rng, 2, 1, task_induction=False)[1] in NAMES for _ in range(40)]
    assert 0 < sum(mixed) < 40


def test_made_up_names_are_fresh_and_not_world_words():
    rng = np.random.default_rng(0)
    words = {made_up_word(rng) for _ in range(500)}
    assert len(words) > 400
    assert all(w.isalpha() and w.islower() for w in words)
    docs = list(documents(CorpusConfig(mix={"binding": 1.0}), 200))
    used = {n for d in docs for n in re.findall(r"this is a (\w+)\.", d)}
    assert used & set(NAMES) and used - set(NAMES)  # both the classic names and made-up ones
    assert not used & set(S.SHAPES + S.COLOURS + S.SIZES)


def test_strict_corpus_never_mentions_a_held_out_pair():
    def pairs(config):
        found = set()
        for d in documents(config, 2000):
            found |= {(c, s) for _, c, s in PHRASE.findall(d)}
        return found & set(S.HELD_OUT_PAIRS)

    assert pairs(CorpusConfig()) == set(S.HELD_OUT_PAIRS)  # the default text does name them
    assert pairs(CorpusConfig(strict=True)) == set()


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unknown document kinds"):
        CorpusConfig(mix={"novels": 1.0})
    with pytest.raises(ValueError, match="not all zero"):
        CorpusConfig(mix={"caption": 0.0})
    with pytest.raises(ValueError, match="ways must be"):
        binding_prompt(np.random.default_rng(0), 6, 1, task_induction=False)
