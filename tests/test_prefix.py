"""Prefix mappers: (B, F) -> (B, P, D) for every kind, each vector scaled to the LM's embedding length, all weights
learning, and errors for bad sizes and unknown kinds."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from minivlm.gpt2 import GPT2, GPT2Config
from minivlm.prefix import MAPPERS, TransformerMapper, build_mapper, embedding_scale

F_, D, P = 24, 32, 3  # features, LM width, prefix length


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
    mapper = build_mapper(kind, F_, D, P, scale)
    prefix = mapper(10 * torch.randn(5, F_))  # features far from unit scale: the output must not care
    assert prefix.shape == (5, P, D)
    assert_close(torch.linalg.vector_norm(prefix, dim=-1), torch.full((5, P), scale), atol=1e-4, rtol=0)
    assert float(mapper.target_scale) == pytest.approx(scale)
    assert "target_scale" in mapper.state_dict() and not any(p is mapper.target_scale for p in mapper.parameters())


@pytest.mark.parametrize("kind", sorted(MAPPERS))
def test_every_weight_learns_and_images_differ(kind):
    mapper = build_mapper(kind, F_, D, P, 1.0)
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


def test_mlp_hidden_width_defaults_to_half_the_output():
    mapper = build_mapper("mlp", F_, D, P, 1.0)
    assert mapper.mlp[0].out_features == P * D // 2
    assert build_mapper("mlp", F_, D, P, 1.0, hidden=7).mlp[0].out_features == 7


def test_errors():
    with pytest.raises(ValueError, match=r"unknown mapper kind 'conv'; choose one of \['linear', 'mlp', 'transfor"):
        build_mapper("conv", F_, D, P, 1.0)
    with pytest.raises(ValueError, match="prefix_length must be a positive int, got 0"):
        build_mapper("linear", F_, D, 0, 1.0)
    with pytest.raises(ValueError, match="target_scale must be positive"):
        build_mapper("linear", F_, D, P, 0.0)
    with pytest.raises(ValueError, match="embed_dim=32 must be divisible by heads=5"):
        build_mapper("transformer", F_, D, P, 1.0, heads=5)
    with pytest.raises(ValueError, match=r"expected features of shape \(B, 24\), got \(2, 25\)"):
        build_mapper("mlp", F_, D, P, 1.0)(torch.randn(2, 25))
