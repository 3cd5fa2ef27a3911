"""Interleaved few-shot prompts: each image becomes its prefix and each text its token embeddings, left padding
changes nothing, cached scoring equals running every (prompt, candidate) whole, with our GPT-2 and transformers'."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformers import GPT2LMHeadModel

from minivlm import fewshot
from minivlm.captioner import CAPTIONER_PRESETS, Captioner
from minivlm.corpus import CorpusConfig, documents
from minivlm.data.episodes import binding_episode, to_prompts, vqa_episode
from minivlm.gpt2 import GPT2, GPT2Config
from minivlm.tokenizer import train_tokenizer

BACKENDS = ["minivlm", "transformers"]
DEEP = ["minivlm-deep", "transformers-deep"]  # the same, with the prefix read by both blocks (prefix_depth=2)
V, CONTEXT = 300, 128
P = CAPTIONER_PRESETS["tiny"].prefix_length
DEEP_CONFIG = replace(CAPTIONER_PRESETS["tiny"], prefix_depth=2)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(documents(CorpusConfig(), 300), vocab_size=V)


@pytest.fixture(scope="module")
def captioners():
    """The same random captioner (tiny CNN, P = 2) around our GPT-2 and around transformers', equal weights.

    The LM's weight matrices are spread (std 0.3) so its predictions vary with what it reads.
    """
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=4).to_hf()).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    out = {}
    for backend, lm in (("minivlm", GPT2.from_hf(hf)), ("transformers", copy.deepcopy(hf))):
        for name, config in ((backend, CAPTIONER_PRESETS["tiny"]), (f"{backend}-deep", DEEP_CONFIG)):
            torch.manual_seed(1)
            out[name] = Captioner.from_config(copy.deepcopy(lm), config).eval()
    return out


def prompts(n: int = 4, seed: int = 0) -> tuple[list, list]:
    """n 2-way, 1-shot binding episodes (different lengths) as image prompts, and the episodes."""
    rng = np.random.default_rng(seed)
    episodes = [binding_episode(rng, 2, 1 + i % 2, task_induction=i % 3 != 2) for i in range(n)]
    return to_prompts(episodes, "images"), episodes


@pytest.mark.parametrize("backend", BACKENDS + DEEP)
def test_embed_prompts_puts_each_prefix_and_each_text_in_place(captioners, tokenizer, backend):
    """Text as token embeddings, each image as its prefix (a deep prefix: K slots of D; text's deeper slots 0)."""
    cap = captioners[backend]
    image = torch.rand(3, 32, 32)
    embeds, mask = fewshot.embed_prompts(cap, tokenizer, [["answer with dax.", image, " this is a"], ["hi", image]],
                                         start_of_text=False)  # fmt: skip
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("answer with dax.", " this is a", "hi")]
    table = cap.lm.get_input_embeddings()
    length = len(ids[0]) + P + len(ids[1])
    assert embeds.shape == (2, length, 32 * cap.prefix_depth) and mask.shape == (2, length)
    assert_close(embeds[0, : len(ids[0])], table(torch.tensor(ids[0])))
    assert_close(embeds[0, len(ids[0]) : len(ids[0]) + P], cap.prefix(image[None])[0])
    assert_close(embeds[0, -len(ids[1]) :], table(torch.tensor(ids[1])))
    short = len(ids[2]) + P  # the second prompt is left-padded: zeros and mask 0, then its vectors
    assert mask[1].tolist() == [0] * (length - short) + [1] * short
    assert (embeds[1, : length - short] == 0).all()
    assert_close(embeds[1, -P:], cap.prefix(image[None])[0])


@pytest.mark.parametrize("backend", ["minivlm", "transformers-deep"])
def test_an_image_shown_as_its_word_view_is_read_exactly_as_the_words_it_writes(captioners, tokenizer, backend,
                                                                               monkeypatch):  # fmt: skip
    """view="words": each image becomes its W word vectors; a word view that writes a text's own token embeddings
    makes the prompt read exactly as that text (a deep prefix's deeper slots are zeros, as a token's are)."""
    cap = captioners[backend]
    config = replace(DEEP_CONFIG if cap.prefix_depth > 1 else CAPTIONER_PRESETS["tiny"], word_view=3)
    torch.manual_seed(2)
    viewed = Captioner.from_config(copy.deepcopy(cap.language_model), config).eval()
    image = torch.rand(3, 32, 32)
    embeds, mask = fewshot.embed_prompts(viewed, tokenizer, [[image, " this is a"], ["hi", image]], view="words")
    n = len(tokenizer(" this is a", add_special_tokens=False)["input_ids"])
    assert mask[0].sum() == 1 + 3 + n  # <|endoftext|>, as before any text, then W = 3 vectors for the image, not P
    table = viewed.lm.get_input_embeddings()  # wide for a deep prefix: zeros after the first D
    assert_close(embeds[0, -(1 + 3 + n)], table(torch.tensor(tokenizer.eos_token_id)))
    assert_close(embeds[0, -(3 + n) : -n], viewed.words(image[None])[0])
    assert_close(embeds[1, -3:], viewed.words(image[None])[0])
    unopened, _ = fewshot.embed_prompts(viewed, tokenizer, [[image, " this is a"]], view="words", start_of_text=False)
    assert unopened.shape[1] == 3 + n
    ids = tokenizer(" a red circle", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(viewed, "words", lambda images: table(torch.tensor(ids)).expand(len(images), -1, -1))
    shown = [["answer with dax or wug.", image, " this is a dax.", image, " this is a"],
             [image, " this is a dax.", image, " this is a"]]  # fmt: skip
    spelled = [["answer with dax or wug. a red circle this is a dax. a red circle this is a"],
               [" a red circle this is a dax. a red circle this is a"]]  # fmt: skip
    candidates = [[" dax.", " wug."]] * 2
    assert_close(fewshot.score(viewed, tokenizer, shown, candidates, view="words"),
                 fewshot.score(viewed, tokenizer, spelled, candidates), atol=1e-5, rtol=1e-5)  # fmt: skip
    assert (fewshot.complete(viewed, tokenizer, shown, view="words", max_new_tokens=4)
            == fewshot.complete(viewed, tokenizer, spelled, max_new_tokens=4))  # fmt: skip
    with pytest.raises(ValueError, match="unknown view 'pixels'"):
        fewshot.embed_prompts(viewed, tokenizer, shown, view="pixels")
    with pytest.raises(ValueError, match="has no word view"):
        fewshot.complete(cap, tokenizer, shown, view="words")


def test_a_prompt_that_opens_with_text_opens_with_end_of_text_as_pretraining_text_did(captioners, tokenizer):
    cap = captioners["minivlm"]
    image = torch.rand(3, 32, 32)
    table = cap.lm.get_input_embeddings()
    eot = table(torch.tensor([tokenizer.eos_token_id]))[0]
    text_first, image_first = ["hi", image, " this is a"], [image, " this is a"]
    prompts = [text_first, image_first]
    (with_start, mask), (without, _) = (fewshot.embed_prompts(cap, tokenizer, prompts, start_of_text=s)
                                        for s in (True, False))  # fmt: skip
    assert with_start.shape[1] == without.shape[1] + 1  # one more vector, in the text-first prompt only
    opens = mask[0].tolist().index(1)
    assert_close(with_start[0, opens], eot)  # <|endoftext|>, then the prompt as it was
    assert_close(with_start[0, opens + 1 :], without[0])
    n = len(tokenizer(" this is a", add_special_tokens=False)["input_ids"])
    assert mask[1].sum() == P + n  # image first: no <|endoftext|>, the prefix at position 0 as in training
    assert_close(with_start[1, -(P + n) :], without[1, -(P + n) :])
    assert_close(with_start[1, -(P + n) : -n], cap.prefix(image[None])[0])
    empty_text = fewshot.embed_prompts(cap, tokenizer, [["", image, " this is a"], ["hi", "", image, " this is a"]])
    assert empty_text[1][0].sum() == 1 + P + n  # an empty text is no vectors; it still opens with <|endoftext|>
    assert_close(empty_text[0][0, -(1 + P + n) :], torch.cat([eot[None], with_start[1, -(P + n) :]]))
    assert_close(empty_text[0][1], with_start[0])
    # complete and score read the same <|endoftext|> as a prompt that spells it out
    spelled = ["<|endoftext|>hi", image, " this is a"]
    said = fewshot.complete(cap, tokenizer, [text_first])
    assert said == fewshot.complete(cap, tokenizer, [spelled], start_of_text=False)
    assert_close(fewshot.score(cap, tokenizer, [text_first], [[" dax.", " wug."]]),
                 fewshot.score(cap, tokenizer, [spelled], [[" dax.", " wug."]], start_of_text=False))  # fmt: skip
    assert not torch.allclose(fewshot.score(cap, tokenizer, [text_first], [[" dax.", " wug."]]),
                              fewshot.score(cap, tokenizer, [text_first], [[" dax.", " wug."]], start_of_text=False))


@pytest.mark.parametrize("backend", BACKENDS + DEEP)
def test_complete_of_a_batch_equals_each_prompt_alone(captioners, tokenizer, backend):
    cap = captioners[backend]
    batch, _ = prompts(4)
    together = fewshot.complete(cap, tokenizer, batch, max_new_tokens=5)
    alone = [fewshot.complete(cap, tokenizer, [p], max_new_tokens=5)[0] for p in batch]
    assert together == alone
    assert len(set(together)) > 1  # the prompts lead somewhere different: the comparison is not vacuous


@pytest.mark.parametrize("backend", BACKENDS + DEEP)
def test_complete_of_one_image_is_the_captioners_caption(captioners, tokenizer, backend):
    cap = captioners[backend]
    images = torch.rand(3, 3, 32, 32)
    assert fewshot.complete(cap, tokenizer, [[im] for im in images], max_new_tokens=6) == cap.generate(
        images, tokenizer, max_new_tokens=6
    )


def reference_scores(cap: Captioner, tokenizer, batch: list, candidates: list[list[str]]) -> torch.Tensor:
    """Each (prompt, candidate) run whole, one at a time, with no cache and no padding: the definition."""
    out = torch.zeros(len(batch), len(candidates[0]))
    for i, prompt in enumerate(batch):
        embeds, _ = fewshot.embed_prompts(cap, tokenizer, [prompt])  # (1, L, D), no padding
        for j, text in enumerate(candidates[i]):
            ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
            whole = torch.cat([embeds[0], cap.lm.get_input_embeddings()(ids)])[None]  # (1, L + C, D)
            logp = cap.lm(inputs_embeds=whole).logits[0, -len(ids) - 1 : -1].log_softmax(-1)  # (C, V)
            out[i, j] = logp.gather(-1, ids[:, None]).sum()
    return out


@pytest.mark.parametrize("backend", BACKENDS + DEEP)
def test_cached_scoring_equals_running_each_candidate_whole(captioners, tokenizer, backend):
    cap = captioners[backend]
    batch, episodes = prompts(4)
    candidates = [[f" {c}." for c in e.candidates] + [" a small red circle."] for e in episodes]  # ragged lengths
    with torch.no_grad():
        assert_close(fewshot.score(cap, tokenizer, batch, candidates, batch_size=3),
                     reference_scores(cap, tokenizer, batch, candidates), atol=1e-4, rtol=1e-4)  # fmt: skip


@pytest.mark.parametrize("pair", [BACKENDS, DEEP])
def test_the_two_backends_agree(captioners, tokenizer, pair):
    batch, episodes = prompts(3)
    candidates = [[f" {c}." for c in e.candidates] for e in episodes]
    ours, theirs = (fewshot.score(captioners[b], tokenizer, batch, candidates) for b in pair)
    assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert fewshot.complete(captioners[pair[0]], tokenizer, batch) == fewshot.complete(
        captioners[pair[1]], tokenizer, batch
    )


def test_scoring_leaves_the_captioner_in_its_mode(captioners, tokenizer):
    cap = captioners["minivlm"].train()
    try:
        batch, episodes = prompts(2)
        fewshot.score(cap, tokenizer, batch, [list(e.candidates) for e in episodes])
        fewshot.complete(cap, tokenizer, batch)
        assert cap.training and not cap.lm.training
    finally:
        cap.eval()


def test_bad_prompts_get_clear_errors(captioners, tokenizer):
    cap = captioners["minivlm"]
    with pytest.raises(ValueError, match="must be \\(3, S, S\\)"):
        fewshot.embed_prompts(cap, tokenizer, [["hi", torch.rand(1, 32, 32)]])
    with pytest.raises(ValueError, match="expected images of shape"):
        fewshot.embed_prompts(cap, tokenizer, [["hi", torch.rand(3, 16, 16)]])
    with pytest.raises(ValueError, match="sequence of segments"):
        fewshot.embed_prompts(cap, tokenizer, ["just a string"])
    with pytest.raises(ValueError, match="is empty"):
        fewshot.embed_prompts(cap, tokenizer, [[]])
    with pytest.raises(ValueError, match="more than the language model's context of 128"):
        fewshot.embed_prompts(cap, tokenizer, [[torch.rand(3, 32, 32)] * 65])
    batch, _ = prompts(2)
    with pytest.raises(ValueError, match="same number"):
        fewshot.score(cap, tokenizer, batch, [[" dax."], [" dax.", " wug."]])
    with pytest.raises(ValueError, match="2 prompts but 1"):
        fewshot.score(cap, tokenizer, batch, [[" dax."]])
    with pytest.raises(ValueError, match="empty"):
        fewshot.score(cap, tokenizer, batch, [[""], [" dax."]])


def test_says_wants_the_answer_then_an_end():
    assert fewshot.says(" dax.", "dax") and fewshot.says(" dax", "dax")
    assert fewshot.says(" dax. a small red circle.", "dax")  # what comes after the full stop is the next sentence
    for wrong in (" daxes.", " dax blicket.", "dax.", " wug.", " da", ""):
        assert not fewshot.says(wrong, "dax"), wrong


def test_the_three_modes_show_the_same_episode(tokenizer):
    rng = np.random.default_rng(0)
    episode = binding_episode(rng, 2, 1, attribute="colour")
    images, blind, text = (to_prompts([episode], mode)[0] for mode in ("images", "blind", "text"))
    assert sum(isinstance(s, torch.Tensor) for s in images) == 3
    assert len(blind) == 1 and len(text) == 1  # one text each
    names = " or ".join(episode.candidates)
    assert blind[0].startswith(f"answer with {names}. this is a ") and blind[0].endswith(" this is a")
    assert text[0].startswith(f"answer with {names}. a ") and text[0].count(". this is a") == 3
    vqa = to_prompts([vqa_episode(rng, 1)], "text")[0][0]
    assert vqa.startswith("a ") and " q: what colour is the " in vqa and vqa.endswith(" a:")
    assert F.mse_loss(images[1], images[3]) > 0  # two different pictures
