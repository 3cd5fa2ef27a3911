"""Decoding: greedy, sampling and beam search give the same tokens with and without a KV cache, batched or
one by one, from ids or embeddings, with our GPT-2 or transformers'; beam search finds better sequences."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from minivlm.decoding import (
    STRATEGIES,
    beam_search,
    filter_logits,
    generate,
    greedy,
    positions_from_mask,
    sample,
)
from minivlm.gpt2 import GPT2, GPT2Config

VOCAB = 50
IDS = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(1))  # (B, T) prompts
LEFT_PADDED = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]])


def seeded_sample(*args, **kwargs):
    """Sampling with every filter on and a fresh generator, so that two calls draw the same random numbers."""
    return sample(*args, temperature=0.8, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(0), **kwargs)


DECODERS = {"greedy": greedy, "beam": partial(beam_search, num_beams=3), "sample": seeded_sample}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """A tiny random GPT-2, the same with from-scratch attention, and its transformers twin."""
    torch.manual_seed(0)
    ours = GPT2(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    with torch.no_grad():  # GPT-2's init (std 0.02) makes an untrained model say one token over and over
        for p in ours.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3)
    math = GPT2(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, attn_impl="math"))
    math.load_state_dict(ours.state_dict())
    return {"ours": ours, "ours-math": math.eval(), "transformers": ours.to_hf().eval()}


@pytest.fixture(scope="module")
def ours(models) -> GPT2:
    return models["ours"]


@pytest.fixture(scope="module")
def eos(ours) -> int:
    """Pretend the 4th token greedy gives row 0 is end-of-text, so that some rows end early and others do not."""
    return int(greedy(ours, IDS, LEFT_PADDED, max_new_tokens=4)[0, 3])


def decode(name: str, model: nn.Module, *args, **kwargs) -> torch.Tensor:
    """Run decoder `name` (a key of DECODERS); eos_token_id defaults to None (stop at max_new_tokens only)."""
    return DECODERS[name](model, *args, **{"eos_token_id": None, **kwargs})


def log_probs(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, S, V) next-token log-probabilities at every position of left-padded sequences, in one forward."""
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits.log_softmax(-1)


def normalised_log_prob(model: nn.Module, new: torch.Tensor, eos: int, alpha: float) -> torch.Tensor:
    """(B,) Σ log p of each row's new tokens up to its first `eos` / their number**alpha, teacher-forced."""
    ids, mask = torch.cat([IDS, new], dim=1), torch.cat([LEFT_PADDED, torch.ones_like(new)], dim=1)
    log_p = log_probs(model, ids, mask)[:, IDS.shape[1] - 1 : -1].gather(-1, rearrange(new, "b n -> b n 1"))[..., 0]
    after_end = F.pad((new == eos).cumsum(dim=1)[:, :-1], (1, 0)) > 0  # (B, N) tokens after the first eos
    return log_p.masked_fill(after_end, 0.0).sum(dim=1) / (~after_end).sum(dim=1) ** alpha


class EndsAtOnce(nn.Module):
    """`model` with end-of-text made overwhelmingly likely: every strategy must stop after one token."""

    def __init__(self, model: nn.Module, eos: int):
        super().__init__()
        self.model, self.eos = model, eos

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.logits[..., self.eos] += 100.0
        return out


# ---- invariances: cache, batching, prompt as embeddings, which GPT-2 ------------------------------


@pytest.mark.parametrize("which", ["ours", "ours-math", "transformers"])
@pytest.mark.parametrize("name", DECODERS)
def test_cached_and_uncached_give_the_same_tokens(models, name, which, eos):
    model = models[which]
    cached = decode(name, model, IDS, LEFT_PADDED, max_new_tokens=20)
    assert cached.shape == (3, 20)
    assert len(cached.unique()) >= 5, "the test model must not emit one token over and over"
    assert torch.equal(decode(name, model, IDS, LEFT_PADDED, max_new_tokens=20, use_cache=False), cached)
    with_eos = decode(name, model, IDS, LEFT_PADDED, max_new_tokens=20, eos_token_id=eos)
    uncached = decode(name, model, IDS, LEFT_PADDED, max_new_tokens=20, eos_token_id=eos, use_cache=False)
    assert torch.equal(uncached, with_eos)


@pytest.mark.parametrize("which", ["ours", "transformers"])
@pytest.mark.parametrize("name", ["greedy", "beam"])  # sampling row by row would draw other random numbers
def test_batched_left_padded_equals_one_by_one(models, name, which, eos):
    model = models[which]
    batched = decode(name, model, IDS, LEFT_PADDED, max_new_tokens=12, eos_token_id=eos)
    ends = {int(row.eq(eos).nonzero()[0]) if row.eq(eos).any() else None for row in batched}
    assert len(ends) > 1, "the test should have rows that end at different steps"
    for row, mask in enumerate(LEFT_PADDED):
        alone = decode(name, model, IDS[row : row + 1, mask.bool()], max_new_tokens=12, eos_token_id=eos)[0]
        assert torch.equal(batched[row, : len(alone)], alone)
        assert (batched[row, len(alone) :] == eos).all(), "a row that ended is padded with end-of-text"


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("which", ["ours", "transformers"])
@pytest.mark.parametrize("name", DECODERS)
def test_prompt_as_embeddings_equals_prompt_as_ids(models, name, which, use_cache, eos):
    """The captioner's path: a prompt of vectors (here the token embeddings themselves), then new tokens as ids."""
    model = models[which]
    embeds = model.get_input_embeddings()(IDS)  # (B, T, D)
    kw = dict(max_new_tokens=12, eos_token_id=eos, use_cache=use_cache)
    from_ids = decode(name, model, IDS, LEFT_PADDED, **kw)
    assert torch.equal(decode(name, model, attention_mask=LEFT_PADDED, inputs_embeds=embeds, **kw), from_ids)


@pytest.mark.parametrize("name", DECODERS)
def test_ours_and_transformers_give_the_same_tokens(models, name, eos):
    ours, theirs = (models["ours"], models["transformers"])
    kw = dict(max_new_tokens=16, eos_token_id=eos)
    assert torch.equal(decode(name, ours, IDS, LEFT_PADDED, **kw), decode(name, theirs, IDS, LEFT_PADDED, **kw))


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_greedy_and_beam_search_equal_transformers_generate(models, length_penalty, eos):
    """Same weights, same prompts: our decoders give the tokens transformers' generate() gives."""
    kw = dict(attention_mask=LEFT_PADDED, max_new_tokens=12, eos_token_id=eos, pad_token_id=eos)
    hf = models["transformers"]
    expected_greedy = hf.generate(IDS, do_sample=False, **kw)[:, IDS.shape[1] :]
    expected_beam = hf.generate(IDS, do_sample=False, num_beams=3, length_penalty=length_penalty, **kw)
    expected_beam = expected_beam[:, IDS.shape[1] :]
    assert not torch.equal(expected_beam, expected_greedy), "the test should tell beam search from greedy"
    for model in (models["ours"], hf):
        assert torch.equal(greedy(model, IDS, LEFT_PADDED, max_new_tokens=12, eos_token_id=eos), expected_greedy)
        beam = beam_search(model, IDS, LEFT_PADDED, max_new_tokens=12, eos_token_id=eos, num_beams=3,
                           length_penalty=length_penalty)  # fmt: skip
        assert torch.equal(beam, expected_beam)


# ---- stopping ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DECODERS)
def test_stops_at_max_new_tokens(ours, name):
    for n in (0, 1, 5):
        assert decode(name, ours, IDS, LEFT_PADDED, max_new_tokens=n).shape == (3, n)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("which", ["ours", "transformers"])
@pytest.mark.parametrize("name", DECODERS)
def test_stops_at_end_of_text(models, name, which, use_cache, eos):
    model = EndsAtOnce(models[which], eos)
    out = decode(name, model, IDS, LEFT_PADDED, max_new_tokens=10, eos_token_id=eos, use_cache=use_cache)
    assert torch.equal(out, torch.full((3, 1), eos)), "every row ends at once, so decoding stops after one token"


@pytest.mark.parametrize("name", ["greedy", "sample"])
def test_end_of_text_cuts_the_free_continuation(ours, name, eos):
    """Up to and including the first end-of-text, the same tokens as without one; after it, only end-of-text."""
    free = decode(name, ours, IDS, LEFT_PADDED, max_new_tokens=12)
    out = decode(name, ours, IDS, LEFT_PADDED, max_new_tokens=12, eos_token_id=eos)
    for row in range(3):
        hits = (free[row] == eos).nonzero()
        if len(hits):
            first = int(hits[0])
            assert torch.equal(out[row, : first + 1], free[row, : first + 1])
            assert (out[row, first:] == eos).all()
        else:
            assert torch.equal(out[row], free[row])


# ---- beam search ---------------------------------------------------------------------------------


def test_one_beam_is_greedy(ours, eos):
    """Without end-of-text, or with length_penalty=0 (raw log-probs), a single beam is greedy decoding."""
    kw = dict(max_new_tokens=15, num_beams=1)
    expected = greedy(ours, IDS, LEFT_PADDED, max_new_tokens=15)
    assert torch.equal(beam_search(ours, IDS, LEFT_PADDED, eos_token_id=None, **kw), expected)
    expected = greedy(ours, IDS, LEFT_PADDED, max_new_tokens=15, eos_token_id=eos)
    assert torch.equal(beam_search(ours, IDS, LEFT_PADDED, eos_token_id=eos, length_penalty=0.0, **kw), expected)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_search_scores_at_least_as_well_as_greedy(ours, eos, alpha):
    """Not a theorem (beam search may prune the greedy path), but what it is for; scored teacher-forced."""
    kw = dict(max_new_tokens=12, eos_token_id=eos)
    beam = beam_search(ours, IDS, LEFT_PADDED, num_beams=4, length_penalty=alpha, **kw)
    beam_score = normalised_log_prob(ours, beam, eos, alpha)
    greedy_score = normalised_log_prob(ours, greedy(ours, IDS, LEFT_PADDED, **kw), eos, alpha)
    assert (beam_score >= greedy_score - 1e-5).all()
    assert (beam_score > greedy_score + 1e-3).any(), "the test should find a row where beam search does better"


def test_beam_as_wide_as_the_vocabulary_finds_the_best_pair(ours):
    """A theorem: with K = V beams, two steps of beam search are an exhaustive search over all V² pairs."""
    ids, mask = repeat(IDS, "b t -> (b v) t", v=VOCAB), repeat(LEFT_PADDED, "b t -> (b v) t", v=VOCAB)
    first = repeat(torch.arange(VOCAB), "v -> (b v) 1", b=3)  # every possible first token, for every prompt
    ids, mask = torch.cat([ids, first], dim=1), torch.cat([mask, torch.ones_like(first)], dim=1)
    log_p1, log_p2 = log_probs(ours, IDS, LEFT_PADDED)[:, -1], log_probs(ours, ids, mask)[:, -1]
    total = rearrange(log_p1, "b v -> b v 1") + rearrange(log_p2, "(b v) w -> b v w", v=VOCAB)  # (B, V, V)
    best = total.flatten(1).argmax(dim=1)
    expected = torch.stack([best // VOCAB, best % VOCAB], dim=1)
    beam = beam_search(ours, IDS, LEFT_PADDED, max_new_tokens=2, eos_token_id=None, num_beams=VOCAB)
    assert torch.equal(beam, expected)


# ---- sampling ------------------------------------------------------------------------------------

PROBS = torch.tensor([0.125, 0.5, 0.0625, 0.25, 0.0625])  # powers of 2: softmax and its sums are exact in float32


def kept(**kwargs) -> set[int]:
    """The tokens filter_logits keeps of PROBS's logits."""
    return set(filter_logits(PROBS.log(), **kwargs).isfinite().nonzero().flatten().tolist())


def test_filter_logits_keeps_exactly_the_right_tokens():
    assert torch.equal(PROBS.log().softmax(-1), PROBS), "the boundary cases below need exact probabilities"
    everything = {0, 1, 2, 3, 4}
    assert kept() == kept(top_k=5) == kept(top_k=99) == kept(top_p=1.0) == everything
    assert kept(top_k=1) == {1} and kept(top_k=2) == {1, 3} and kept(top_k=3) == {0, 1, 3}
    assert kept(top_k=4) == everything, "a tie with the k-th score is kept"
    assert kept(top_p=0.5) == {1}, "token 1 alone reaches p = 0.5"
    assert kept(top_p=0.501) == kept(top_p=0.75) == {1, 3}
    assert kept(top_p=0.76) == kept(top_p=0.875) == {0, 1, 3}
    assert kept(top_p=0.0) == kept(top_p=1e-9) == {1}, "the most likely token is always kept"
    assert kept(top_k=2, top_p=0.6) == {1}, "top-p after top-k: token 1 has 2/3 of what top-k left"
    rows = filter_logits(torch.stack([PROBS.log(), PROBS.flip(0).log()]), top_k=1)  # rows are independent
    assert rows.isfinite().nonzero().tolist() == [[0, 1], [1, 3]]
    assert torch.equal(rows[0, 1], PROBS.log()[1]), "kept scores are unchanged"


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=0.0)])
def test_sampling_only_the_best_token_is_greedy(ours, filters, use_cache, eos):
    kw = dict(max_new_tokens=15, eos_token_id=eos, use_cache=use_cache)
    expected = greedy(ours, IDS, LEFT_PADDED, **kw)
    assert torch.equal(sample(ours, IDS, LEFT_PADDED, temperature=0.7, **filters, **kw), expected)


def test_same_generator_seed_same_samples(ours):
    def draw(seed: int) -> torch.Tensor:
        return sample(ours, IDS, LEFT_PADDED, max_new_tokens=20, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


# ---- one entry point, and errors -----------------------------------------------------------------


def test_generate_dispatches_to_each_strategy(ours, eos):
    assert set(STRATEGIES) == {"greedy", "beam", "sample"}
    kw = dict(max_new_tokens=10, eos_token_id=eos)
    assert torch.equal(generate(ours, IDS, LEFT_PADDED, **kw), greedy(ours, IDS, LEFT_PADDED, **kw))
    assert torch.equal(
        generate(ours, IDS, LEFT_PADDED, strategy="beam", num_beams=3, **kw),
        beam_search(ours, IDS, LEFT_PADDED, num_beams=3, **kw),
    )
    embeds = ours.get_input_embeddings()(IDS)
    assert torch.equal(
        generate(ours, attention_mask=LEFT_PADDED, inputs_embeds=embeds, strategy="sample", top_k=5,
                 generator=torch.Generator().manual_seed(0), **kw),
        sample(ours, IDS, LEFT_PADDED, top_k=5, generator=torch.Generator().manual_seed(0), **kw),
    )  # fmt: skip


def test_bad_arguments_are_named(ours):
    kw = dict(max_new_tokens=3)
    with pytest.raises(ValueError, match=r"temperature must be > 0, got 0.*greedy"):
        sample(ours, IDS, temperature=0, **kw)
    with pytest.raises(ValueError, match=r"top_p is a probability mass in \[0, 1\].*1.5"):
        sample(ours, IDS, top_p=1.5, **kw)
    with pytest.raises(ValueError, match=r"top_k must be >= 0.*-1"):
        filter_logits(PROBS, top_k=-1)
    with pytest.raises(ValueError, match=r"exactly one of input_ids \(B, T\) and inputs_embeds \(B, T, D\); got both"):
        greedy(ours, IDS, inputs_embeds=ours.get_input_embeddings()(IDS), **kw)
    with pytest.raises(ValueError, match="got neither"):
        beam_search(ours, eos_token_id=None, **kw)
    with pytest.raises(ValueError, match=r"inputs_embeds of shape \(B, T, D\), got \(3, 8\)"):
        greedy(ours, inputs_embeds=IDS.float(), **kw)
    with pytest.raises(ValueError, match=r"num_beams must be >= 1.*got 0"):
        beam_search(ours, IDS, eos_token_id=None, num_beams=0, **kw)
    with pytest.raises(ValueError, match=r"unknown decoding strategy 'nucleus'; choose one of \['beam', 'greedy', 's"):
        generate(ours, IDS, strategy="nucleus", **kw)
    with pytest.raises(ValueError, match=r"attention_mask \(3, 7\) must be \(B, T\) = \(3, 8\)"):
        greedy(ours, IDS, LEFT_PADDED[:, 1:], **kw)
    with pytest.raises(ValueError, match="pad prompts on the left"):
        greedy(ours, IDS, LEFT_PADDED.flip(1), **kw)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        greedy(ours, IDS, max_new_tokens=-1)
