"""minivlm.attention equals PyTorch's scaled_dot_product_attention, and rejects bad input clearly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from minivlm.attention import (
    KVCache,
    MultiHeadSelfAttention,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
)

TOL = dict(atol=1e-5, rtol=0)  # max abs error <= 1e-5 in float32

SHAPES = [(1, 1, 1, 1, 4), (2, 3, 5, 5, 8), (3, 2, 7, 11, 16), (2, 4, 16, 16, 32), (1, 12, 9, 33, 64)]


def qkv(b, h, t, s, k):
    return torch.randn(b, h, t, k), torch.randn(b, h, s, k), torch.randn(b, h, s, k)


@pytest.mark.parametrize("shape", SHAPES)
def test_no_mask_equals_sdpa(shape):
    q, k, v = qkv(*shape)
    assert_close(scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), **TOL)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[2] == s[3]])
def test_causal_equals_sdpa(shape):
    q, k, v = qkv(*shape)
    ours = scaled_dot_product_attention(q, k, v, causal=True)
    assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True), **TOL)


@pytest.mark.parametrize("kind", ["boolean", "float"])
@pytest.mark.parametrize("shape", SHAPES)
def test_explicit_mask_equals_sdpa(shape, kind):
    """A boolean mask (True = may attend) or a float mask added to the scores, as PyTorch takes them."""
    b, h, t, s, _ = shape
    q, k, v = qkv(*shape)
    if kind == "boolean":
        mask = torch.rand(b, 1, t, s) > 0.5
        mask[..., torch.randint(s, ())] = True  # every query keeps at least one key
    else:
        mask = torch.randn(b, h, t, s)
    assert_close(
        scaled_dot_product_attention(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **TOL
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_padding_mask_equals_sdpa(shape):
    b, h, t, s, _ = shape
    q, k, v = qkv(*shape)
    attention_mask = torch.ones(b, s, dtype=torch.long)
    attention_mask[0, : s // 2] = 0  # row 0 is left-padded
    mask = padding_mask(attention_mask)
    assert mask.shape == (b, 1, 1, s)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert_close(scaled_dot_product_attention(q, k, v, mask), expected, **TOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_rows_that_keep_a_single_key(shape):
    """A query that may see only key j must return exactly v_j."""
    b, h, t, s, _ = shape
    q, k, v = qkv(*shape)
    only = torch.randint(s, (t,))
    mask = torch.zeros(t, s, dtype=torch.bool)
    mask[torch.arange(t), only] = True
    ours, weights = scaled_dot_product_attention(q, k, v, mask, return_weights=True)
    assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **TOL)
    assert_close(ours, v[:, :, only], **TOL)
    assert_close(weights, mask.float().expand_as(weights), **TOL)


def test_causal_and_padding_together_equal_sdpa():
    q, k, v = qkv(2, 3, 6, 6, 8)
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    mask = padding_mask(attention_mask) & causal_mask(6)
    ours = scaled_dot_product_attention(q, k, v, padding_mask(attention_mask), causal=True)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    keep = attention_mask.bool()  # the padding queries of row 1 see nothing; only real queries are compared
    assert_close(ours.transpose(1, 2)[keep], expected.transpose(1, 2)[keep], **TOL)
    assert torch.isfinite(ours).all(), "fully masked (padding) queries must not produce NaN"


def test_weights_are_a_softmax_over_keys():
    q, k, v = qkv(2, 3, 5, 7, 8)
    _, weights = scaled_dot_product_attention(q, k, v, causal=False, return_weights=True)
    assert weights.shape == (2, 3, 5, 7)
    assert (weights >= 0).all()
    assert_close(weights.sum(-1), torch.ones(2, 3, 5), **TOL)


def test_causal_mask_is_aligned_to_the_last_key():
    """With a KV cache the T new queries are the last T of S positions."""
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    q, k, v = qkv(1, 2, 6, 6, 8)
    full = scaled_dot_product_attention(q, k, v, causal=True)
    last_two = scaled_dot_product_attention(q[:, :, -2:], k, v, causal=True)
    assert_close(last_two, full[:, :, -2:], **TOL)


def test_mismatched_head_widths_name_both_shapes():
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 8\).*\(1, 2, 3, 4\)"):
        scaled_dot_product_attention(q, k, v)


def test_mismatched_key_and_value_lengths():
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"\(1, 2, 5, 8\).*\(1, 2, 4, 8\)"):
        scaled_dot_product_attention(q, k, v)


def test_mask_of_wrong_shape_names_both_shapes():
    q, k, v = qkv(2, 3, 5, 7, 8)
    with pytest.raises(ValueError, match=r"\(2, 1, 1, 6\).*\(2, 3, 5, 7\)"):
        scaled_dot_product_attention(q, k, v, torch.ones(2, 1, 1, 6, dtype=torch.bool))


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_module_equals_per_head_reference(impl):
    """Multi-head self-attention = each head attends on its own K-wide slice, then c_proj mixes them."""
    torch.manual_seed(1)
    mha = MultiHeadSelfAttention(32, 4, impl=impl).eval()
    x = torch.randn(2, 9, 32)
    y, _ = mha(x, causal=True)
    q, k, v = mha.c_attn(x).split(32, dim=-1)
    heads = [
        F.scaled_dot_product_attention(q[..., i * 8 : (i + 1) * 8], k[..., i * 8 : (i + 1) * 8], v[..., i * 8 : (i + 1) * 8], is_causal=True)
        for i in range(4)
    ]
    assert_close(y, mha.c_proj(torch.cat(heads, dim=-1)), **TOL)


def test_module_impls_agree_with_padding_and_cache():
    torch.manual_seed(2)
    math_attn = MultiHeadSelfAttention(32, 4, impl="math").eval()
    sdpa_attn = MultiHeadSelfAttention(32, 4, impl="sdpa").eval()
    sdpa_attn.load_state_dict(math_attn.state_dict())
    x = torch.randn(2, 7, 32)
    attention_mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    real = attention_mask.bool()  # outputs at padding queries are meaningless and not compared
    mask = padding_mask(attention_mask)
    full, weights = math_attn(x, mask, return_weights=True)
    assert weights.shape == (2, 4, 7, 7)
    assert_close(sdpa_attn(x, mask)[0], full, **TOL)
    for attn in (math_attn, sdpa_attn):  # the prompt, then one token at a time through a cache
        cache = KVCache()
        steps = [attn(x[:, :4], mask[..., :4], cache=cache)[0]]
        steps += [attn(x[:, i : i + 1], mask[..., : i + 1], cache=cache)[0] for i in range(4, 7)]
        assert cache.get_seq_length() == 7
        assert_close(torch.cat(steps, dim=1)[real], full[real], **TOL)


def test_cache_reorder_copies_rows_like_transformers():
    """Beam search's reorder: row i becomes old row index[i] in every layer, exactly as DynamicCache.reorder_cache."""
    from transformers import DynamicCache

    ours, theirs = KVCache(), DynamicCache()
    for layer in range(2):
        k, v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)  # (B, H, S, K)
        ours.update(k, v, layer)
        theirs.update(k, v, layer)
    index = torch.tensor([2, 0, 0])  # beam 2 survives once, beam 0 twice, beam 1 not at all
    ours.reorder(index)
    theirs.reorder_cache(index)
    for layer in range(2):
        assert torch.equal(ours.keys[layer], theirs.layers[layer].keys)
        assert torch.equal(ours.values[layer], theirs.layers[layer].values)
    assert torch.equal(ours.keys[0][1], ours.keys[0][2]) and ours.get_seq_length() == 5


def test_module_rejects_bad_configuration_and_input():
    with pytest.raises(ValueError, match="not divisible"):
        MultiHeadSelfAttention(30, 4)
    with pytest.raises(ValueError, match="unknown attention impl"):
        MultiHeadSelfAttention(32, 4, impl="flash")
    with pytest.raises(ValueError, match=r"\(B, T, D\).*\(9, 32\)"):
        MultiHeadSelfAttention(32, 4)(torch.randn(9, 32))
