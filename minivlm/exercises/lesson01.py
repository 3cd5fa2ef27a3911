"""Self-checks for lesson 01, self-attention from scratch (solutions/01_attention.ipynb).

Each check runs the learner's function on seeded random inputs whose sizes differ on purpose (T
queries ≠ S keys, value width ≠ head width K, several head counts) so that a transposed or
hard-coded axis shows, and compares the result with `minivlm.attention`. When the answer is wrong,
the check recomputes the usual mistakes (no √K, softmax over the queries, a mask that hides the
diagonal, heads split with a plain reshape, ...) and names the one the answer matches.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from einops import rearrange

from minivlm.attention import MultiHeadSelfAttention, causal_mask, scaled_dot_product_attention
from minivlm.exercises import fail
from minivlm.exercises.tools import Mistakes, call, diagnose, randn, same, tensor

__all__ = ["CHECKS"]


def _answer(answer: Callable, *args, what: str, hint: str = "") -> torch.Tensor:
    """The tensor the answer returns, or a hint."""
    return tensor(call(answer, *args, what=what, hint=hint), what)


ADVICE = "compare your steps with softmax(Q Kᵀ / √K) · V"


# Exercise 1.1: softmax(Q Kᵀ / √K) · V ------------------------------------------------------------------


def _scores(q, k, scale):
    return q @ k.transpose(-2, -1) / scale


ATTENTION_MISTAKES: Mistakes = {
    "no scaling": (lambda q, k, v: _scores(q, k, 1).softmax(-1) @ v,
                   "you forgot to divide the scores by √K, the square root of the head width K = q.shape[-1]"),
    "divided by K": (lambda q, k, v: _scores(q, k, q.shape[-1]).softmax(-1) @ v,
                     "you divided the scores by K, the head width; divide by its square root, √K"),
    "divided by √S": (lambda q, k, v: _scores(q, k, math.sqrt(k.shape[-2])).softmax(-1) @ v,
                      "you divided by the square root of the number of keys; divide by √K, K = q.shape[-1], "
                      "the width of a query"),
    "softmax over queries": (lambda q, k, v: _scores(q, k, math.sqrt(q.shape[-1])).softmax(-2) @ v,
                             "your attention weights do not sum to 1 over the keys: did you apply softmax on the "
                             "last axis (dim=-1)? Each query (a row of the scores) gets its own distribution"),
    "no softmax": (lambda q, k, v: _scores(q, k, math.sqrt(q.shape[-1])) @ v,
                   "you multiplied the raw scores by V: turn them into weights first, with a softmax over the keys"),
    "exp, not normalised": (lambda q, k, v: _scores(q, k, math.sqrt(q.shape[-1])).exp() @ v,
                            "you exponentiated the scores but did not divide by their sum over the keys: that sum "
                            "is what makes softmax (not KᵀKᵀ + ε, a formula you may have seen elsewhere)"),
}  # fmt: skip


def check_attention(attention: Callable) -> str:
    """Exercise 1.1: attention(q, k, v) = softmax(q kᵀ / √K) v on batched and unbatched inputs."""
    cases = [
        (randn(2, 3, 5, 8, seed=1), randn(2, 3, 6, 8, seed=2), randn(2, 3, 6, 4, seed=3)),  # (B, H, T|S, K|Kv)
        (randn(4, 16, seed=4) * 2, randn(7, 16, seed=5) * 2, randn(7, 3, seed=6)),  # unbatched, larger scores
    ]
    for n, (q, k, v) in enumerate(cases):
        shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        out = _answer(attention, q, k, v, what=f"attention({shapes})",
                    hint="Scores are q @ k.transpose(-2, -1): (..., T, K) @ (..., K, S) -> (..., T, S)")  # fmt: skip
        expected = scaled_dot_product_attention(q, k, v)
        if out.shape != expected.shape:
            weights = (*q.shape[:-1], k.shape[-2])
            extra = " (that is (..., T, S), the weights: multiply them by v)" if tuple(out.shape) == weights else ""
            fail(f"for {shapes} the output should have shape {tuple(expected.shape)} = (..., T, Kv), "
                 f"got {tuple(out.shape)}{extra}")  # fmt: skip
        if not same(out, expected):
            first = _answer(attention, *cases[0], what="attention")
            if n == 1 and same(first, scaled_dot_product_attention(*cases[0])):
                fail(f"right on 4-d inputs but wrong on unbatched ones ({shapes}): index the axes from the end "
                     "(-1, -2), not from the start")  # fmt: skip
            diagnose(out, (q, k, v), ATTENTION_MISTAKES, f"attention({shapes})", expected, ADVICE)
    return ("equals softmax(Q Kᵀ / √K) · V (minivlm.attention) on (B, H, T, K) and unbatched inputs, "
            "with T ≠ S and a value width ≠ K")  # fmt: skip


# Exercise 1.2: causal attention -----------------------------------------------------------------------


def _masked(q, k, v, keep, fill=-math.inf, scale=True):
    """Attention with the scores outside `keep` set to `fill` before the softmax."""
    scores = _scores(q, k, math.sqrt(q.shape[-1]) if scale else 1).masked_fill(~keep, fill)
    return scores.softmax(-1) @ v


def _tri(q, diagonal=0, upper=False):
    ones = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool)
    return ones.triu(diagonal) if upper else ones.tril(diagonal)


CAUSAL_MISTAKES: Mistakes = {
    "no mask": (lambda q, k, v: _masked(q, k, v, _tri(q, q.shape[-2])),
                "the future is not hidden: query i should only see keys j ≤ i. Hide the others with "
                "scores.masked_fill(~mask, float('-inf')) before the softmax, mask = torch.ones(T, T).tril().bool()"),
    "upper triangle": (lambda q, k, v: _masked(q, k, v, _tri(q, upper=True)),
                       "you hid the past and kept the future: the keys a query may see form the *lower* "
                       "triangle, j ≤ i (torch.tril), True where attending is allowed"),
    "diagonal hidden (finite)": (lambda q, k, v: _masked(q, k, v, _tri(q, -1), fill=torch.finfo(q.dtype).min),
                                 "your mask hides the diagonal: a token may attend to itself (key j = i). Use "
                                 "tril(diagonal=0), the default, not diagonal=-1"),
    "diagonal + 1": (lambda q, k, v: _masked(q, k, v, _tri(q, 1)),
                     "your mask lets each query see one key into the future too (j = i + 1): use tril(diagonal=0), "
                     "the default"),
    "filled with 0": (lambda q, k, v: _masked(q, k, v, _tri(q), fill=0.0),
                      "masked scores set to 0 still get weight exp(0) > 0 in the softmax: fill them with "
                      "float('-inf') (or a very negative number) so their weight is exactly 0"),
    "masked after softmax": (lambda q, k, v: (_scores(q, k, math.sqrt(q.shape[-1])).softmax(-1) * _tri(q)) @ v,
                             "you masked the weights after the softmax, so each row no longer sums to 1: mask the "
                             "scores *before* the softmax"),
    "no scaling": (lambda q, k, v: _masked(q, k, v, _tri(q), scale=False),
                   "the mask is right, but the scores are not divided by √K (K = q.shape[-1])"),
}  # fmt: skip


def check_causal_attention(causal_attention: Callable) -> str:
    """Exercise 1.2: causal_attention(q, k, v) hides keys j > i from query i."""
    for shape in ((2, 3, 6, 8), (5, 4)):
        q, k, v = (randn(*shape, seed=10 + i) for i in range(3))
        v = v[..., :3]  # a value width other than K
        shapes = f"q, k {tuple(q.shape)}, v {tuple(v.shape)}"
        out = _answer(causal_attention, q, k, v, what=f"causal_attention({shapes})",
                    hint="Make the (T, T) mask from T = q.shape[-2]; it broadcasts over the leading axes")  # fmt: skip
        expected = scaled_dot_product_attention(q, k, v, causal=True)
        if out.shape != expected.shape:
            fail(f"for {shapes} the output should have shape {tuple(expected.shape)} = (..., T, Kv), "
                 f"got {tuple(out.shape)}")  # fmt: skip
        if torch.isnan(out).any():
            fail("your output has NaN: some query had every key hidden, and softmax of a row of -inf is 0/0. "
                 "Usually the mask hides the diagonal too: query i may attend to key i (use tril(), diagonal=0)")
        if not same(out, expected):
            diagnose(out, (q, k, v), CAUSAL_MISTAKES, f"causal_attention({shapes})", expected, ADVICE)
    # Behaviour, not only numbers: changing the last token must not change any earlier output.
    q, k, v = (randn(6, 8, seed=20 + i) for i in range(3))
    later = [t.clone() for t in (q, k, v)]
    for t in later:
        t[-1] = 10.0
    before, after = causal_attention(q, k, v), causal_attention(*later)
    if not torch.allclose(before[:-1], after[:-1], atol=1e-6):
        fail("changing the last token changed the outputs of earlier tokens: the future leaks in")
    return (f"equals minivlm.attention's causal attention; the mask is {causal_mask(3).int().tolist()} for T = 3, "
            "and changing a later token leaves every earlier output unchanged")  # fmt: skip


# Exercise 1.3: splitting and merging heads -----------------------------------------------------------

SPLIT_MISTAKES: Mistakes = {
    "reshape": (lambda x, h: x.reshape(x.shape[0], h, x.shape[1], -1),
                "a plain reshape to (B, H, T, K) mixes tokens into heads: split the last axis into (h k) first, "
                "then move h before t: rearrange(x, 'b t (h k) -> b h t k', h=n_heads)"),
    "(k h)": (lambda x, h: rearrange(x, "b t (k h) -> b h t k", h=h),
              "head i must own features i·K to (i+1)·K - 1, a block of K neighbours, as GPT-2's weights are laid "
              "out: split D as (h k), not (k h)"),
}  # fmt: skip

HEADS_ADVICE = "split with rearrange(x, 'b t (h k) -> b h t k', h=n_heads) and merge with the reverse pattern"

MERGE_MISTAKES: Mistakes = {
    "reshape": (lambda x: x.reshape(x.shape[0], x.shape[2], -1),
                "a plain reshape of (B, H, T, K) to (B, T, H·K) mixes tokens into heads: move h next to k "
                "first: rearrange(x, 'b h t k -> b t (h k)')"),
    "(k h)": (lambda x: rearrange(x, "b h t k -> b t (k h)"),
              "merge the heads as (h k), head 0's K features first, then head 1's: not (k h)"),
}  # fmt: skip


def check_heads(split_heads: Callable, merge_heads: Callable) -> str:
    """Exercise 1.3: split_heads(x, n_heads) (B, T, H·K) -> (B, H, T, K) and merge_heads back."""
    for h in (3, 2):
        x = randn(2, 5, 12, seed=30 + h)  # (B, T, D) with T = 5, D = 12
        expected = rearrange(x, "b t (h k) -> b h t k", h=h)
        out = _answer(split_heads, x, h, what=f"split_heads(x of shape {tuple(x.shape)}, n_heads={h})")
        if out.shape != expected.shape:
            order = ""
            if tuple(out.shape) == (2, 5, h, 12 // h):
                order = " (put the heads before the tokens, so attention runs over T within each head)"
            elif out.ndim == 4 and out.shape[1] != h:
                order = " (use the n_heads argument rather than a fixed number of heads)"
            fail(f"split_heads(x of shape {tuple(x.shape)}, n_heads={h}) should have shape {tuple(expected.shape)} "
                 f"= (B, H, T, K), got {tuple(out.shape)}{order}")  # fmt: skip
        if not same(out, expected):
            diagnose(out, (x, h), SPLIT_MISTAKES, f"split_heads(x, n_heads={h})", expected, HEADS_ADVICE)
        merged = _answer(merge_heads, expected, what=f"merge_heads(x of shape {tuple(expected.shape)})")
        if merged.shape != x.shape:
            fail(f"merge_heads of a {tuple(expected.shape)} tensor should give {tuple(x.shape)} = (B, T, H·K), "
                 f"got {tuple(merged.shape)}")  # fmt: skip
        if not same(merged, x):
            diagnose(merged, (expected,), MERGE_MISTAKES, "merge_heads", x, HEADS_ADVICE)
    # Put together with the package's attention, they must rebuild GPT-2's multi-head self-attention.
    with torch.random.fork_rng():  # seeded weights, the learner's global RNG left as it was
        torch.manual_seed(0)
        module = MultiHeadSelfAttention(12, 3, impl="math").eval()
    x = randn(2, 5, 12, seed=40)
    with torch.no_grad():
        q, k, v = module.c_attn(x).split(12, dim=-1)  # (B, T, D) each
        heads = [split_heads(t, 3) for t in (q, k, v)]  # (B, H, T, K) each
        ours = module.c_proj(merge_heads(scaled_dot_product_attention(*heads, causal=True)))
        if not same(ours, module(x)[0]):
            fail("split_heads and merge_heads invert each other but do not rebuild MultiHeadSelfAttention: "
                 "split as 'b t (h k) -> b h t k'")
    return ("split and merge equal einops' 'b t (h k) <-> b h t k' for 2 and 3 heads, and with attention in "
            "between rebuild minivlm's MultiHeadSelfAttention")  # fmt: skip


CHECKS: dict[str, Callable[..., str]] = {
    "1.1": check_attention,
    "1.2": check_causal_attention,
    "1.3": check_heads,
}
