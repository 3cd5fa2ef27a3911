"""Self-attention from scratch: scaled dot-product attention, masks, multi-head self-attention, KV cache.

Attention is `softmax(Q Kᵀ / √K) · V` (Vaswani et al., 2017, "Attention Is All You Need", eq. 1):
every query scores every key, the scores are divided by √K so that their spread does not grow with the
head width, a softmax over the *keys* turns each query's scores into weights that sum to 1, and the
output is the weighted average of the values. Masks decide which keys a query may look at: a causal
mask hides the future, a padding mask hides padding tokens.

The functions here are written out with einops so that every step can be read; the tests prove they
equal PyTorch's fused `torch.nn.functional.scaled_dot_product_attention`, which the model can use
instead for speed (`impl="sdpa"`).

Axis letters used throughout minivlm: B batch, T query tokens, S key tokens (past + new when a KV
cache is used), D model width, H heads, K head width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

__all__ = [
    "scaled_dot_product_attention",
    "causal_mask",
    "padding_mask",
    "attention_bias",
    "KVCache",
    "MultiHeadSelfAttention",
]


def _check_broadcast(mask: Tensor, target: Sequence[int]) -> None:
    """Raise a ValueError naming both shapes unless `mask` broadcasts to `target` (..., T, S)."""
    try:
        shape = torch.broadcast_shapes(mask.shape, tuple(target))
    except RuntimeError:
        shape = None
    if shape != tuple(target):
        raise ValueError(
            f"attention mask of shape {tuple(mask.shape)} does not broadcast to the attention "
            f"scores of shape {tuple(target)} (batch..., T queries, S keys)"
        )


def causal_mask(t: int, s: int | None = None, device: torch.device | str | None = None) -> Tensor:
    """Boolean (T, S) mask, True where query i may attend key j: j <= i, aligned to the *last* key.

    With T == S this is the usual lower triangle. With a KV cache there are S - T earlier keys and the
    T new queries are the last T positions, so query i sits at position S - T + i.
    """
    s = t if s is None else s
    if s < t:
        raise ValueError(f"a causal mask needs at least as many keys as queries, got T={t} queries and S={s} keys")
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)


def padding_mask(attention_mask: Tensor) -> Tensor:
    """Turn a (B, S) mask of 1 = real token, 0 = padding (Hugging Face's convention) into (B, 1, 1, S) booleans.

    The two singleton axes broadcast over heads and queries: a padding key is hidden from every query.
    """
    if attention_mask.ndim != 2:
        raise ValueError(f"expected an attention_mask of shape (B, S), got {tuple(attention_mask.shape)}")
    return rearrange(attention_mask.bool(), "b s -> b 1 1 s")


def attention_bias(
    mask: Tensor | None, *, causal: bool, shape: Sequence[int], dtype: torch.dtype, device: torch.device
) -> Tensor | None:
    """Fold a boolean or float mask and the causal mask into one float mask that is added to the scores.

    Hidden positions get the most negative finite float rather than -inf, so a row with every key
    hidden stays finite (PyTorch's fused kernel returns NaN for such rows under a boolean mask).
    """
    t, s = shape[-2], shape[-1]  # shape: the scores' (..., T, S)
    hidden = torch.finfo(dtype).min
    bias = None
    if mask is not None:
        _check_broadcast(mask, shape)
        if mask.dtype == torch.bool:
            bias = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, hidden)
        else:
            bias = mask.to(dtype)
    if causal:
        keep = causal_mask(t, s, device=device)
        bias = (bias if bias is not None else torch.zeros(t, s, dtype=dtype, device=device)).masked_fill(~keep, hidden)
    return bias


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    *,
    causal: bool = False,
    dropout_p: float = 0.0,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """softmax(Q Kᵀ / √K) · V, written out step by step.

    q: (..., T, K), k: (..., S, K), v: (..., S, Kv) — usually (B, H, T, K).
    mask: broadcastable to (..., T, S); boolean (True = may attend, as in PyTorch) or float (added to
      the scores, 0 = attend, a large negative number = do not).
    causal: hide future keys (see `causal_mask` for how T != S is aligned).
    Returns the output (..., T, Kv), and the attention weights (..., T, S) if `return_weights`.

    A query whose keys are *all* masked (a padding query) gets an even average instead of NaN:
    masked scores are set to the most negative finite float, not -inf. Such rows belong to padding,
    whose outputs are never used.
    """
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"queries and keys must have the same head width: q has shape {tuple(q.shape)} "
            f"(width {q.shape[-1]}), k has shape {tuple(k.shape)} (width {k.shape[-1]})"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"keys and values must have the same number of tokens: k has shape {tuple(k.shape)}, "
            f"v has shape {tuple(v.shape)}"
        )
    t, s = q.shape[-2], k.shape[-2]

    # scores[..., i, j] = <q_i, k_j> / √K : how well query i matches key j.
    scores = einsum(q, k, "... t k, ... s k -> ... t s") / math.sqrt(q.shape[-1])

    hidden = torch.finfo(scores.dtype).min
    if causal:
        scores = scores.masked_fill(~causal_mask(t, s, device=q.device), hidden)
    if mask is not None:
        _check_broadcast(mask, scores.shape)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, hidden)
        else:
            scores = (scores + mask).clamp_min(hidden)

    # Softmax over the keys (the last axis): each query's weights are positive and sum to 1.
    weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    out = einsum(weights, v, "... t s, ... s k -> ... t k")
    return (out, weights) if return_weights else out


class KVCache:
    """The keys and values every layer has already computed, so that each new token costs O(S), not O(S²).

    Without a cache, generating token n re-runs the whole model over all n tokens; with it, only the
    new token goes through the model and attends to the stored keys and values. Its method names follow
    Hugging Face's `DynamicCache`, so the same decoding code drives our GPT-2 and `transformers`' one.

    How it stores them: per layer, one preallocated buffer for the keys and one for the values, each
    (B, H, capacity, K), of which the first S positions are filled; `update` writes the new positions in
    place after them. Appending with `torch.cat([past, new])` instead would copy all S stored positions
    at every step: O(N²) copying over a generation of N tokens, which grows into a real share of the time
    on long generations. Like a Python list, a full buffer is replaced by one twice as long, so appending
    N tokens one at a time copies O(N) in total. `keys` and `values` give the filled part, (B, H, S, K).
    """

    def __init__(self) -> None:
        self._keys: list[Tensor] = []  # per layer (B, H, capacity, K); positions >= S are unused
        self._values: list[Tensor] = []
        self._lengths: list[int] = []  # per layer S, the positions filled so far

    @property
    def keys(self) -> list[Tensor]:
        """Per layer, the stored keys (B, H, S, K): views of the filled part of each buffer."""
        return [k.narrow(2, 0, s) for k, s in zip(self._keys, self._lengths)]

    @property
    def values(self) -> list[Tensor]:
        """Per layer, the stored values (B, H, S, K)."""
        return [v.narrow(2, 0, s) for v, s in zip(self._values, self._lengths)]

    def get_seq_length(self, layer: int = 0) -> int:
        """S, the number of positions stored so far."""
        return self._lengths[layer] if layer < len(self._lengths) else 0

    def update(self, k: Tensor, v: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """Append this step's (B, H, T, K) keys and values for `layer`; return all of them (B, H, S, K)."""
        if layer == len(self._keys):  # the layer's first tokens: a buffer of twice their length
            self._keys.append(self._grow(k, capacity=2 * k.shape[-2]))
            self._values.append(self._grow(v, capacity=2 * v.shape[-2]))
            self._lengths.append(0)
        elif layer > len(self._keys):
            raise ValueError(f"layers must fill the cache in order: got layer {layer}, cache has {len(self._keys)}")
        past, t = self._lengths[layer], k.shape[-2]
        s = past + t
        if s > self._keys[layer].shape[-2]:  # full: move to a buffer twice as long (or long enough)
            capacity = max(2 * self._keys[layer].shape[-2], s)
            self._keys[layer] = self._grow(self._keys[layer].narrow(2, 0, past), capacity)
            self._values[layer] = self._grow(self._values[layer].narrow(2, 0, past), capacity)
        self._keys[layer].narrow(2, past, t).copy_(k)  # write in place: the stored positions are not copied
        self._values[layer].narrow(2, past, t).copy_(v)
        self._lengths[layer] = s
        return self._keys[layer].narrow(2, 0, s), self._values[layer].narrow(2, 0, s)  # (B, H, S, K) views

    @staticmethod
    def _grow(filled: Tensor, capacity: int) -> Tensor:
        """A (B, H, capacity, K) buffer that starts with `filled`'s positions (the rest is unwritten)."""
        b, h, s, k = filled.shape
        buffer = filled.new_empty(b, h, capacity, k)
        buffer.narrow(2, 0, s).copy_(filled)
        return buffer

    def reorder(self, index: Tensor) -> None:
        """Make row i of every layer a copy of row index[i]: beam search keeps each surviving beam's parent.

        index: (B',) row numbers, in the new order; a row may appear several times (a beam with two
        surviving children) or not at all (a beam that was dropped). transformers' `Cache.reorder_cache`
        does the same.
        """
        self._keys = [k.index_select(0, index) for k in self._keys]
        self._values = [v.index_select(0, index) for v in self._values]


class MultiHeadSelfAttention(nn.Module):
    """H attention heads side by side, each looking at the sequence through its own K-wide projection.

    One linear layer `c_attn` makes queries, keys and values for all heads at once, `c_proj` mixes the
    heads' outputs back to width D. The names are GPT-2's, so its weights load without renaming.
    impl="math" uses `scaled_dot_product_attention` above; impl="sdpa" uses PyTorch's fused kernel
    (same result, faster); the attention weights can only be returned by "math".
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        attn_pdrop: float = 0.0,
        resid_pdrop: float = 0.0,
        bias: bool = True,
        impl: str = "sdpa",
    ):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"model width {d_model} is not divisible by the number of heads {n_heads}")
        if impl not in ("math", "sdpa"):
            raise ValueError(f"unknown attention impl {impl!r}; expected 'math' or 'sdpa'")
        self.n_heads = n_heads
        self.impl = impl
        self.attn_pdrop = attn_pdrop  # dropout on the attention weights (training only)
        self.c_attn = nn.Linear(d_model, 3 * d_model, bias=bias)  # D -> queries, keys, values of all heads
        self.c_proj = nn.Linear(d_model, d_model, bias=bias)  # heads' outputs -> D
        self.resid_dropout = nn.Dropout(resid_pdrop)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        causal: bool = True,
        cache: KVCache | None = None,
        layer: int = 0,
        return_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """x: (B, T, D) -> (B, T, D), and the weights (B, H, T, S) if `return_weights`.

        mask: broadcastable to (B, H, T, S), e.g. `padding_mask(attention_mask)`. With a `cache`, the
        new keys and values are appended to it and the queries attend to all S stored positions.
        """
        if x.ndim != 3:
            raise ValueError(f"expected input of shape (B, T, D), got {tuple(x.shape)}")
        qkv = self.c_attn(x)  # (B, T, 3D)
        q, k, v = rearrange(qkv, "b t (three h k) -> three b h t k", three=3, h=self.n_heads)
        if cache is not None:
            k, v = cache.update(k, v, layer)  # (B, H, S, K), S = past + T
        dropout_p = self.attn_pdrop if self.training else 0.0

        weights = None
        if self.impl == "math" or return_weights:
            out = scaled_dot_product_attention(
                q, k, v, mask, causal=causal, dropout_p=dropout_p, return_weights=return_weights
            )
            if return_weights:
                out, weights = out
        else:
            t, s = q.shape[-2], k.shape[-2]
            if mask is None and (not causal or t == 1):  # one new query may see every key: no mask at all
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            elif causal and mask is None and t == s:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
            else:
                shape = (*q.shape[:-1], s)  # (B, H, T, S)
                bias = attention_bias(mask, causal=causal, shape=shape, dtype=q.dtype, device=q.device)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)

        y = rearrange(out, "b h t k -> b t (h k)")  # concatenate the heads
        return self.resid_dropout(self.c_proj(y)), weights
