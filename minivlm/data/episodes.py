"""Few-shot episodes in the shapes world: Frozen's fast-binding and visual-question-answering tasks, in miniature.

What it teaches: how Frozen's few-shot experiments are built, so that only the context can give the
answer (Tsimpoukelli et al., 2021, section 4; their Open-Ended miniImageNet follows Vinyals et al.,
2016). One *episode* is one prompt and its answer:

- **fast binding** (`binding_episode`): N categories ("ways") of one attribute (colours, as in the
  course corpus's binding documents, or shapes) each get a nonsense name drawn for this episode only
  (dax, blicket, ...); the other attributes of each image are drawn at random.
  The *support*: `shots` images of each category ("inner shots"), each followed by "this is a
  <name>.", shuffled, the whole block said `repeats` times. Then the *query*, a new image of one of the
  categories, and "this is a": the answer is its name. With *task induction* the episode opens with
  "answer with dax or blicket.", which tells the LM what kind of answer is wanted.
- **visual question answering** (`vqa_episode`): an image, "q: what colour is the circle? a:" and the
  one-word answer; with shots, solved examples come first.

An episode keeps the *scenes*, not their pictures, so the same episode can be shown three ways
(`to_prompt`), which are the experiment's baselines:
- "images": each scene as an image, what the captioner's visual prefix must carry;
- "blind": the scenes removed, the text alone: what the LM guesses without seeing;
- "text": each scene as its true caption, the LM reading words instead of pictures: how well it binds
  in text, the ceiling a perfect visual prefix could reach.
The text follows the course corpus's formats ("... this is a dax.", "q: ... a: ..."), which is what
the LM read in pretraining (`minivlm.corpus`); everything is lowercase, as the corpus is.

Query and support scenes come from the "test" split's distribution (never trained on) or the
"heldout" one (a colour–shape pair no training image shows). Every episode is a pure function of its
arguments and the generator's state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from minivlm.corpus import BINDING_ATTRIBUTES, NAMES, made_up_names
from minivlm.data import shapes as S
from minivlm.data.folders import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["ATTRIBUTES", "MODES", "Episode", "single_object_scene", "binding_episode", "vqa_episode", "to_prompt",
           "to_prompts"]  # fmt: skip

ATTRIBUTES = BINDING_ATTRIBUTES  # what a binding category can be, as in the corpus's text episodes
MODES = ("images", "blind", "text")  # how an episode's scenes are shown (see the module docstring)


@dataclass(frozen=True)
class Episode:
    """One few-shot prompt: text and scenes in order, the answer, and the candidates a ranking chooses among."""

    segments: tuple[str | S.Scene, ...]  # the prompt; scenes become images, captions or nothing (to_prompt)
    answer: str  # the word that should come next, without its leading space: "dax", "red"
    candidates: tuple[str, ...]  # every answer the task allows, the right one among them


def single_object_scene(rng: np.random.Generator, split: str = "test", **fixed: str) -> S.Scene:
    """A scene of one object, with the attributes in `fixed` (shape=, colour=, size=) and the rest drawn.

    split "train" or "test": never a held-out colour–shape pair; "heldout": always one (so `fixed` must allow it).
    """
    S._one_of(split, S.SPLITS, "split")
    unknown = sorted(set(fixed) - {"shape", "colour", "size"})
    if unknown:
        raise ValueError(f"unknown attributes {unknown}; fix any of shape, colour, size")
    for _ in range(1000):
        shape = fixed.get("shape") or S.SHAPES[rng.integers(len(S.SHAPES))]
        colour = fixed.get("colour") or S.COLOURS[rng.integers(len(S.COLOURS))]
        if ((colour, shape) in S.HELD_OUT_PAIRS) == (split == "heldout"):
            break
    else:
        raise ValueError(f"no {split!r} object has {fixed}")
    size = fixed.get("size") or S.SIZES[rng.integers(len(S.SIZES))]
    low = S.MARGIN + S.RADIUS[size]  # the least x or y of a centre that keeps the object inside
    x, y = low + (1 - 2 * low) * rng.random(2)
    return S.Scene((S.Obj(shape, colour, size, float(x), float(y)),), ())


def _names(rng: np.random.Generator, n: int, made_up: bool) -> list[str]:
    """n distinct names: Frozen's style (dax, blicket, ...) or fresh made-up words."""
    if not made_up:
        return [NAMES[j] for j in rng.permutation(len(NAMES))[:n]]
    return made_up_names(rng, n)


def binding_episode(
    rng: np.random.Generator, ways: int, shots: int, *, attribute: str = "colour", task_induction: bool = True,
    repeats: int = 1, split: str = "test", made_up_names: bool = False,
) -> Episode:  # fmt: skip
    """An N-way fast-binding episode: support images named with nonsense words, then a new query image to name."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; choose one of {sorted(ATTRIBUTES)}")
    pool = ATTRIBUTES[attribute]
    if split == "heldout":  # only values that take part in a held-out pair (purple is in none)
        pool = tuple(v for v in pool if any(v in pair for pair in S.HELD_OUT_PAIRS))
    if not 1 <= ways <= len(pool):
        raise ValueError(f"{attribute} has {len(pool)} values in split {split!r}, so ways must be 1 to {len(pool)}, "
                         f"got {ways}")  # fmt: skip
    if shots < 0 or repeats < 1:
        raise ValueError(f"need shots >= 0 and repeats >= 1, got shots={shots}, repeats={repeats}")
    if shots == 0 and not task_induction:
        raise ValueError("with no shots and no task induction the prompt never says a name: nothing to answer with")
    categories = [pool[j] for j in rng.permutation(len(pool))[:ways]]
    names = _names(rng, ways, made_up_names)
    support = [(single_object_scene(rng, split, **{attribute: categories[w]}), w) for w in range(ways) for _ in range(shots)]
    support = [support[j] for j in rng.permutation(len(support))]
    segments: list[str | S.Scene] = [f"answer with {' or '.join(names)}."] if task_induction else []
    for _ in range(repeats):
        for scene, w in support:
            segments += [scene, f" this is a {names[w]}."]
    w = int(rng.integers(ways))
    segments += [single_object_scene(rng, split, **{attribute: categories[w]}), " this is a"]
    return Episode(tuple(segments), names[w], tuple(names))


def vqa_episode(rng: np.random.Generator, shots: int = 0, *, kind: str = "colour", split: str = "test") -> Episode:
    """A VQA episode: `shots` solved examples, then an image and a question about one object's colour or shape."""
    if kind not in ATTRIBUTES:
        raise ValueError(f"unknown question kind {kind!r}; choose one of {sorted(ATTRIBUTES)}")
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    opening = "what colour is" if kind == "colour" else "what shape is"
    segments: list[str | S.Scene] = []
    for i in range(shots + 1):
        scene = S.sample_scene(split, seed=int(rng.integers(1 << 31)), index=0)
        pairs = [(q, a) for q, a in S.questions(scene) if q.startswith(opening)]
        question, answer = pairs[rng.integers(len(pairs))]
        segments += [scene, f" q: {question} a:" + (f" {answer}." if i < shots else "")]
    return Episode(tuple(segments), answer, ATTRIBUTES[kind])


def _images(scenes: list[S.Scene], image_size: int, normalize: bool) -> Tensor:
    """(N, 3, S, S) float images in [0, 1] (or ImageNet-normalised), as `ShapesCaptions` gives them."""
    pixels = torch.from_numpy(S.render_batch(scenes, image_size)).permute(0, 3, 1, 2)  # (N, 3, S, S) uint8
    images = pixels.float() / 255
    return F.normalize(images, IMAGENET_MEAN, IMAGENET_STD) if normalize else images


def to_prompts(episodes: list[Episode], mode: str = "images", *, image_size: int = 32,
               normalize: bool = False) -> list[list[str | Tensor]]:  # fmt: skip
    """The episodes as prompts for `minivlm.fewshot`: scenes shown as images, removed ("blind") or captioned ("text").

    Text segments that end up next to each other are joined, so a "text" prompt reads exactly like the
    corpus: "answer with dax or wug. a small red circle. this is a dax. ...".
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    scenes = [s for e in episodes for s in e.segments if isinstance(s, S.Scene)]
    pictures = iter(_images(scenes, image_size, normalize)) if mode == "images" and scenes else iter(())
    prompts = []
    for episode in episodes:
        prompt: list[str | Tensor] = []
        for segment in episode.segments:
            if isinstance(segment, S.Scene):
                if mode == "images":
                    prompt.append(next(pictures))
                    continue
                segment = ("" if not prompt else " ") + S.caption(segment) if mode == "text" else ""
            if prompt and isinstance(prompt[-1], str):
                prompt[-1] += segment
            elif segment:
                prompt.append(segment)
        if mode == "blind" and isinstance(prompt[0], str):
            prompt[0] = prompt[0].lstrip()  # no image before it any more
        prompts.append(prompt)
    return prompts


def to_prompt(episode: Episode, mode: str = "images", **kwargs) -> list[str | Tensor]:
    """One episode as a prompt (see `to_prompts`)."""
    return to_prompts([episode], mode, **kwargs)[0]
