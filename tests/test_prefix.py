"""Prefix mappers: (B, F) -> (B, P, D) for every kind, each vector scaled to the LM's embedding length, all weights
learning, and errors for bad sizes and unknown kinds; the word-alignment loss and its targets."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from minivlm.gpt2 import GPT2, GPT2Config
from minivlm.prefix import (
    MAPPERS, WORD_TEMPERATURE, GridMapper, TransformerMapper, build_mapper, embedding_scale, word_alignment_loss,
    word_targets, word_view_loss,
)  # fmt: skip

F_, D, P = 24, 32, 3  # features, LM width, prefix length
OPTIONS = {"grid": {"cells": 3}}  # what a kind needs beyond the sizes: the grid mapper, the cells F holds


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return GPT2(GPT2Config(vocab_size=64, n_positions=16, n_embd=D, n_layer=1, n_head=2))


def test_embedding_scale_is_the_rms_length_of_the_token_embeddings(lm):
    table = lm.get_input_embeddings().weight
    expected = torch.sqrt(torch.mean(torch.linalg.vector_norm(table, dim=1) ** 2))
    assert embedding_scale(lm) == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("kind", sorted(MAPPERS))
def test_every_prefix_vector_has_the_embeddings_length(lm, kind):
    scale = embedding_scale(lm)
    mapper = build_mapper(kind, F_, D, P, scale, **OPTIONS.get(kind, {}))
    prefix = mapper(10 * torch.randn(5, F_))  # features far from unit scale: the output must not care
    assert prefix.shape == (5, P, D)
    assert_close(torch.linalg.vector_norm(prefix, dim=-1), torch.full((5, P), scale), atol=1e-4, rtol=0)
    assert float(mapper.target_scale) == pytest.approx(scale)
    assert "target_scale" in mapper.state_dict() and not any(p is mapper.target_scale for p in mapper.parameters())


@pytest.mark.parametrize("kind", sorted(MAPPERS))
def test_every_weight_learns_and_images_differ(kind):
    mapper = build_mapper(kind, F_, D, P, 1.0, **OPTIONS.get(kind, {}))
    features = torch.randn(4, F_)
    prefix = mapper(features)
    assert (prefix[0] - prefix[1]).abs().max() > 1e-3  # different features, different prefixes
    prefix.pow(3).sum().backward()
    for name, p in mapper.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{kind} mapper's {name} gets no gradient"


def test_without_target_scale_the_output_is_raw():
    torch.manual_seed(0)
    raw = build_mapper("linear", F_, D, P, None)
    features = torch.randn(2, F_)
    expected = raw.linear(features).reshape(2, P, D)
    assert_close(raw(features), expected)


def test_transformer_mapper_reads_the_constants_outputs():
    mapper = TransformerMapper(F_, D, P, None, feature_tokens=2, layers=1, heads=4)
    assert mapper.queries.shape == (P, D)
    features = torch.randn(3, F_)
    tokens = mapper.to_tokens(features).reshape(3, 2, D)
    queries = mapper.queries.expand(3, P, D)
    expected = mapper.transformer(torch.cat([tokens, queries], dim=1))[:, 2:]
    assert_close(mapper(features), expected)


def test_grid_mapper_writes_each_cell_by_one_shared_linear_map_plus_its_place():
    torch.manual_seed(0)
    cells, c, sets = 4, 6, 2  # F = 4 cells of 6 features; a prefix read by 2 blocks: 2 sets of 4 vectors
    mapper = GridMapper(cells * c, D, sets * cells, None, cells=cells)
    features = torch.randn(3, cells * c)
    out = mapper(features)  # (B, S * N, D), set-major
    assert out.shape == (3, sets * cells, D) and mapper.position.shape == (sets, cells, D)
    w, b = mapper.linear.weight, mapper.linear.bias  # (S * D, C): the same for every cell
    for s in range(sets):
        for n in range(cells):
            by_hand = features[:, n * c : (n + 1) * c] @ w[s * D : (s + 1) * D].T + b[s * D : (s + 1) * D]
            assert_close(out[:, s * cells + n], by_hand + mapper.position[s, n])
    changed = features.clone()
    changed[:, 2 * c : 3 * c] += 1.0  # one cell's features change: only that cell's vectors move, in every set
    moved = (mapper(changed) - out).abs().amax(dim=(0, 2)).reshape(sets, cells)
    assert (moved[:, 2] > 1e-3).all() and (moved[:, [0, 1, 3]] == 0).all()


def test_grid_mapper_errors():
    with pytest.raises(ValueError, match="reads F = 24 features as cells; they do not divide into 5 cells"):
        GridMapper(24, D, 5, 1.0, cells=5)
    with pytest.raises(ValueError, match="prefix_length=5 is not a multiple of the 4 cells"):
        GridMapper(24, D, 5, 1.0, cells=4)


def test_mlp_hidden_width_defaults_to_half_the_output():
    mapper = build_mapper("mlp", F_, D, P, 1.0)
    assert mapper.mlp[0].out_features == P * D // 2
    assert build_mapper("mlp", F_, D, P, 1.0, hidden=7).mlp[0].out_features == 7


def test_errors():
    with pytest.raises(ValueError, match=r"unknown mapper kind 'conv'; choose one of \['grid', 'linear', 'mlp', 'tr"):
        build_mapper("conv", F_, D, P, 1.0)
    with pytest.raises(ValueError, match="prefix_length must be a positive int, got 0"):
        build_mapper("linear", F_, D, 0, 1.0)
    with pytest.raises(ValueError, match="target_scale must be positive"):
        build_mapper("linear", F_, D, P, 0.0)
    with pytest.raises(ValueError, match="embed_dim=32 must be divisible by heads=5"):
        build_mapper("transformer", F_, D, P, 1.0, heads=5)
    with pytest.raises(ValueError, match=r"expected features of shape \(B, 24\), got \(2, 25\)"):
        build_mapper("mlp", F_, D, P, 1.0)(torch.randn(2, 25))


def test_word_targets_are_the_captions_last_tokens_before_end_of_text():
    eot, pad = 0, -100
    labels = torch.tensor([[5, 6, 7, 8, 9, eot], [5, 6, eot, pad, pad, pad], [4, eot, pad, pad, pad, pad]])
    assert word_targets(labels, 3).tolist() == [[7, 8, 9], [pad, 5, 6], [pad, pad, 4]]  # short captions: no target
    assert word_targets(labels, 1).tolist() == [[9], [6], [4]]
    with pytest.raises(ValueError, match="at least one token"):
        word_targets(torch.tensor([[eot, pad]]), 2)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        word_targets(torch.tensor([5, eot]), 1)


def test_word_alignment_loss_is_low_on_the_right_words_and_reaches_only_the_prefix(lm):
    table = lm.get_input_embeddings().weight  # (V, D)
    labels = torch.tensor([[5, 6, 7, 0], [9, 10, 0, -100]])  # P = 2: targets (6, 7) and (9, 10)
    right = table[torch.tensor([[6, 7], [9, 10]])].detach().clone().requires_grad_(True)  # (B, P, D)
    wrong = table[torch.tensor([[7, 6], [10, 9]])].detach().clone()
    low, high = word_alignment_loss(right, table, labels), word_alignment_loss(wrong, table, labels)
    assert low < high
    # by hand: -log softmax(cos / T) at the target, averaged over the four slots
    cos = torch.nn.functional.cosine_similarity(right.detach()[:, :, None], table.detach()[None, None], dim=-1)
    expected = -(cos / WORD_TEMPERATURE).log_softmax(-1)[[0, 0, 1, 1], [0, 1, 0, 1], [6, 7, 9, 10]].mean()
    assert_close(low.detach(), expected, atol=1e-5, rtol=1e-5)
    assert_close(word_alignment_loss(3 * right.detach(), table, labels), low.detach())  # only the direction counts
    low.backward()
    assert right.grad is not None and table.grad is None  # the LM's embeddings get no gradient
    with pytest.raises(ValueError, match="prefix"):
        word_alignment_loss(right.detach()[..., :-1], table, labels)


def test_word_view_loss_is_zero_on_the_exact_embeddings_and_reaches_only_the_word_vectors(lm):
    """Squared distance to the target's embedding, over the mean squared embedding length; slots without one skipped."""
    table = lm.get_input_embeddings().weight  # (V, D)
    labels = torch.tensor([[5, 6, 7, 0], [9, 0, -100, -100]])  # W = 2: targets (6, 7) and (none, 9)
    exact = table[torch.tensor([[6, 7], [3, 9]])].detach().clone()  # slot (1, 0) has no target: anything goes
    assert word_view_loss(exact, table, labels).item() == 0.0
    words = exact.clone()
    words[1, 0] = 100.0  # no target: changes nothing
    words[0, 1] = 0.0  # the zero vector: one embedding's squared length away from " 7"
    words.requires_grad_(True)
    loss = word_view_loss(words, table, labels)
    scale = table.detach().square().sum(-1).mean()
    assert_close(loss.detach(), table.detach()[7].square().sum() / scale / 3)  # the mean over the 3 targeted slots
    loss.backward()
    assert words.grad is not None and table.grad is None  # the LM's embeddings get no gradient
    assert words.grad[1, 0].abs().sum() == 0  # nor does a slot without a target
    with pytest.raises(ValueError, match="word vectors"):
        word_view_loss(words.detach()[..., :-1], table, labels)
