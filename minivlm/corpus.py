"""The text corpus that the course's small GPT-2 is pretrained on, before it is frozen.

What it teaches: a frozen language model can only be steered by a visual prefix if its pretraining
taught it to *use its context*. An LM pretrained on independent captions learns the grammar and
ignores what came before; then nothing put in front of a caption changes it. So besides captions the
corpus holds documents that are only predictable by reading back:

- "repeat": a caption said again ("a small red circle. a small red circle."): copying from context;
- "qa": a caption followed by questions about it and their answers: reading an attribute from context;
- "binding": descriptions, each followed by a made-up name ("a small red circle. this is a dax."),
  then a new description of the same colour, whose name can only come from the earlier lines: in-context
  name binding, the skill Frozen's few-shot results rest on (Tsimpoukelli et al., 2021, section 4.2).
  Names always follow the colour, whatever the number of names (2 to 5: the world has five colours), and
  the shapes are drawn at random, so they say nothing. One example per name cannot tell which attribute
  the names follow ("a red circle. this is a dax. a blue square. this is a wug. a red square. this is a"),
  so that has to come from pretraining, and it has to be one attribute: in scratch runs whose documents
  bound by shape in some episodes and by colour in others, the course LM learned the look-up of
  whichever was the more common and answered at chance by the other. (Until CACHE_VERSION 8 names followed
  the shape, with colours only for 5 names, more than there are shapes; the LM then bound 2-way episodes
  and answered 5-way ones at chance.) `bench/lm.py` measures binding by colour and by shape;
- "drill": a list of distinct words in random order, said again ("wug red dax small circle. wug red dax
  small circle."): copying tokens never seen in that order before, which no grammar predicts, builds
  "induction heads" (Olsson et al., 2022), the attention pattern that finds the earlier copy of the
  current token and predicts what followed it. The words are whole tokens (LIST_WORDS: the world's
  sizes, colours and shapes, and the names), each at most once in a list, so the earlier copy of a
  token is one place. Drills of made-up words did not build it: with 512 tokens they fall apart into
  one- and two-letter pieces (" kumo" is " k" "u" "mo") that recur within a list;
- "recall": one-word descriptions, each named, then asked again ("circle. this is a dax. red. this is a
  wug. circle. this is a dax."): the look-up that binding needs, with nothing else in the description.
  Answering "this is a" needs the word four tokens back, past "this is a", which is the same before
  every name; an induction head that matches only the token before (" a") finds every name at once.
  From binding documents alone the course LM never learned to look further (2-way binding at or below
  chance with more binding documents, more queries, more steps, queries that repeat an example word for
  word); with these, and position embeddings that start as sinusoids (`minivlm.lm`), it did;
- "fact": what things in the world look like ("a whale is large. grass is green. a wheel is a
  circle."): the only documents in which *which* size, colour or shape comes next follows from the
  words alone. Everywhere else the words of a kind are interchangeable, and an LM that never has to
  tell " small" from " large" can leave them all but the same vector, which no prefix can then pick
  apart. Real text is full of such facts; our small corpus has to say them on purpose.

How much of each: copying and facts are what the captioner needs most, so the default mix has four
"repeat" and six "fact" documents for each caption, and three each of drills, binding and recall. With every
kind equally common, the course LM's shape words stayed all but one vector (cosine similarity 0.81),
and an induction head that finds the earlier " circle" cannot say it again if " circle" and " square"
are one vector; the facts pulled them apart. `bench/lm.py` measures what the mix gives; the README has
the figures.

Half of the binding and recall documents name things with made-up words drawn fresh for the document
("kumo", "vefasi"), the other half with NAMES in a fresh pairing, so no name can be memorised: the only
way to predict it is to find it earlier in the context. Every document is a pure function of (seed,
index), like the shapes world's samples.

The scenes come from the shapes world. `strict=True` keeps the held-out colour–shape pairs out of the
text too (the stricter compositional test: the LM never read "a red triangle").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from minivlm.data import shapes as S

__all__ = ["KINDS", "NAMES", "LIST_WORDS", "RECALL_KEYS", "BINDING_ATTRIBUTES", "CorpusConfig", "made_up_word",
           "made_up_names", "document", "documents", "binding_prompt"]  # fmt: skip

KINDS = ("caption", "repeat", "qa", "binding", "drill", "fact", "recall")
# Names in the style of the Frozen paper's miniImageNet tasks; half of all binding documents use these,
# the other half fresh made-up words.
NAMES = ("dax", "blicket", "wug", "zib", "fep", "toma", "kiki", "bouba", "gazzer", "tufa", "modi", "pilk")
# "fact" documents: things whose size, colour or shape everyone knows, one sentence pattern per kind.
FACTS = {
    "small": ("mouse", "coin", "ant", "pea", "button", "bee", "seed", "pebble"),
    "large": ("whale", "house", "elephant", "mountain", "ship", "tree", "bus", "castle"),
    "red": ("tomato", "cherry", "strawberry", "fire truck", "ruby", "rose"),
    "green": ("grass", "leaf", "frog", "lime", "cucumber", "forest"),
    "blue": ("sky", "sea", "blueberry", "sapphire", "ocean", "lake"),
    "yellow": ("sun", "banana", "lemon", "egg yolk", "sunflower", "canary"),
    "purple": ("grape", "plum", "violet", "lavender", "eggplant", "amethyst"),
    "circle": ("wheel", "plate", "clock face", "full moon", "ring", "pizza"),
    "square": ("chessboard", "window pane", "tile", "napkin", "stamp", "box lid"),
    "triangle": ("sail", "roof", "pyramid face", "slice of cake", "warning sign", "coat hanger"),
    "diamond": ("kite", "playing card pip", "road sign", "rhombus", "gem", "harlequin patch"),
}
# "drill" documents (and the list-copy probe, `minivlm.probes.list_copy_accuracy`) list these words:
# every one a single token of the course tokenizer, and all distinct.
LIST_WORDS = (*S.SIZES, *S.COLOURS, *S.SHAPES, *NAMES)
# "recall" documents name these one-word descriptions.
RECALL_KEYS = (*S.SIZES, *S.COLOURS, *S.SHAPES)
# What names in a binding episode can follow: the corpus's own documents use colours only (module docstring).
BINDING_ATTRIBUTES = {"shape": S.SHAPES, "colour": S.COLOURS}
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"


@dataclass(frozen=True)
class CorpusConfig:
    """How the corpus is mixed; the defaults are what the course's LM is pretrained on."""

    mix: dict[str, float] = field(
        default_factory=lambda: {"caption": 1.0, "repeat": 4.0, "qa": 1.0, "binding": 3.0, "drill": 3.0, "fact": 6.0,
                                 "recall": 3.0}
    )  # relative frequency of each document kind in KINDS (the module docstring says why these weights)
    seed: int = 0  # with a document's index, fixes its text
    strict: bool = False  # True: no held-out colour–shape pair appears anywhere in the text

    def __post_init__(self):
        unknown = sorted(set(self.mix) - set(KINDS))
        if unknown or not self.mix:
            raise ValueError(f"unknown document kinds {unknown} in mix; expected some of {KINDS}")
        if any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ValueError(f"mix weights must be non-negative and not all zero, got {self.mix}")


def made_up_word(rng: np.random.Generator) -> str:
    """A pronounceable nonsense word of 1–3 syllables ("ko", "vefasi", "dunmil")."""
    syllables = []
    for _ in range(int(rng.integers(1, 4))):
        coda = CONSONANTS[rng.integers(len(CONSONANTS))] if rng.random() < 0.3 else ""
        syllables.append(CONSONANTS[rng.integers(len(CONSONANTS))] + VOWELS[rng.integers(len(VOWELS))] + coda)
    return "".join(syllables)


def made_up_names(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct made-up words, none of them a word of the shapes world."""
    names: list[str] = []
    while len(names) < n:
        word = made_up_word(rng)
        if word not in names and word not in S.SHAPES + S.COLOURS + S.SIZES:
            names.append(word)
    return names


def _course_names(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct names from NAMES."""
    return [NAMES[j] for j in rng.permutation(len(NAMES))[:n]]


def _names(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct names: from NAMES or made up, half the time each."""
    return _course_names(rng, n) if rng.random() < 0.5 else made_up_names(rng, n)


def _scene(rng: np.random.Generator, strict: bool) -> S.Scene:
    """A scene for the text; held-out pairs appear (as often as any other pair) unless strict."""
    split = "train" if strict or rng.random() < 0.8 else "heldout"
    return S.sample_scene(split, seed=int(rng.integers(1 << 31)), index=0)


def _phrase(rng: np.random.Generator, strict: bool, *, shape: str | None = None, colour: str | None = None) -> str:
    """'a {size} {colour} {shape}.' with the given attributes fixed and the rest drawn."""
    while True:
        s = shape or S.SHAPES[rng.integers(len(S.SHAPES))]
        c = colour or S.COLOURS[rng.integers(len(S.COLOURS))]
        if not (strict and (c, s) in S.HELD_OUT_PAIRS):
            return f"a {S.SIZES[rng.integers(len(S.SIZES))]} {c} {s}."


def _fact(rng: np.random.Generator) -> str:
    """One sentence of world knowledge: 'a whale is large.', 'the sky is blue.', 'a wheel is a circle.'."""
    attribute = list(FACTS)[rng.integers(len(FACTS))]
    thing = FACTS[attribute][rng.integers(len(FACTS[attribute]))]
    shape = attribute in S.SHAPES
    return f"{'the' if rng.random() < 0.5 else 'a'} {thing} is {'a ' if shape else ''}{attribute}."


def binding_prompt(
    rng: np.random.Generator, ways: int, shots: int, *, task_induction: bool, strict: bool = False, queries: int = 1,
    echo: bool = False, made_up: bool | None = None, attribute: str = "colour",
) -> tuple[str, str]:
    """A fast-binding episode as text: (prompt ending in 'this is a', the query's name).

    Each of `ways` categories (colours; shapes with attribute="shape") gets a name; `shots` described
    examples of each, in random order, are each followed by 'this is a <name>.'; with task induction the
    episode opens with 'answer with <name> or <name>.'. The other attributes of every description are
    drawn at random. `queries` - 1 more solved examples come before the final, unanswered one.
    echo=True: the final query repeats, word for word, the description of an earlier example of its
    category (the easiest match there is); otherwise it is described afresh. The names are NAMES or made
    up, half the time each (as in the corpus); made_up=False: always NAMES, True: always made up.
    The corpus binds by colour (see the module docstring); attribute="shape" asks what it never taught.
    """
    if attribute not in BINDING_ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; choose one of {sorted(BINDING_ATTRIBUTES)}")
    pool = BINDING_ATTRIBUTES[attribute]
    if not 1 <= ways <= len(pool):
        raise ValueError(f"there are {len(pool)} {attribute}s, so ways must be 1 to {len(pool)}, got {ways}")
    categories = [pool[j] for j in rng.permutation(len(pool))[:ways]]
    names = _names(rng, ways) if made_up is None else made_up_names(rng, ways) if made_up else _course_names(rng, ways)

    def example(w: int) -> str:
        return _phrase(rng, strict, **{attribute: categories[w]})

    parts = [f"answer with {' or '.join(names)}."] if task_induction else []
    order = np.repeat(np.arange(ways), shots)[rng.permutation(ways * shots)]
    described = [(int(w), example(w)) for w in order]
    parts += [f"{phrase} this is a {names[w]}." for w, phrase in described]
    asked = [int(rng.integers(ways)) for _ in range(queries)]
    parts += [f"{example(w)} this is a {names[w]}." for w in asked[:-1]]
    if echo:
        earlier = [phrase for w, phrase in described if w == asked[-1]]
        parts.append(f"{earlier[int(rng.integers(len(earlier)))]} this is a")
    else:
        parts.append(f"{example(asked[-1])} this is a")
    return " ".join(parts), names[asked[-1]]


def document(config: CorpusConfig, index: int) -> str:
    """Document `index` of the corpus: a pure function of (config, index)."""
    rng = np.random.default_rng([config.seed, index])
    kinds = list(config.mix)
    weights = np.array([config.mix[k] for k in kinds], dtype=float)
    kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
    if kind == "caption":
        return S.caption(_scene(rng, config.strict))
    if kind == "repeat":
        return " ".join([S.caption(_scene(rng, config.strict))] * int(rng.integers(2, 4)))
    if kind == "qa":
        scene = _scene(rng, config.strict)
        pairs = S.questions(scene)
        asked = rng.permutation(len(pairs))[: int(rng.integers(1, 4))]
        return S.caption(scene) + "".join(f" q: {pairs[j][0]} a: {pairs[j][1]}." for j in asked)
    if kind == "binding":
        ways = int(rng.choice([2, 2, 3, 5]))
        prompt, name = binding_prompt(rng, ways, int(rng.integers(1, 4)), task_induction=bool(rng.random() < 0.5),
                                      strict=config.strict, queries=int(rng.integers(1, 4)))  # fmt: skip
        return f"{prompt} {name}."
    if kind == "fact":
        return " ".join(_fact(rng) for _ in range(int(rng.integers(2, 6))))
    if kind == "recall":  # 2-4 one-word descriptions named, then 3-8 of them asked again
        n = int(rng.integers(2, 5))
        keys = [RECALL_KEYS[j] for j in rng.permutation(len(RECALL_KEYS))[:n]]
        names = _names(rng, n)
        order = list(range(n)) + [int(rng.integers(n)) for _ in range(int(rng.integers(3, 9)))]
        return " ".join(f"{keys[k]}. this is a {names[k]}." for k in order)
    words = " ".join(LIST_WORDS[j] for j in rng.permutation(len(LIST_WORDS))[: int(rng.integers(4, 12))])  # drill
    return f"{words}. {words}."


def documents(config: CorpusConfig, n: int, start: int = 0) -> Iterator[str]:
    """Documents start, start + 1, ..., start + n - 1."""
    return (document(config, i) for i in range(start, start + n))
