"""Self-checks for lesson 02, GPT-2 from scratch (solutions/02_gpt2.ipynb).

Each check runs the learner's function on seeded random inputs and compares the result with the
package: a block with `minivlm.gpt2.Block`, the loss with `minivlm.lm.next_token_loss`, the sampling
filter with `minivlm.decoding.filter_logits`, the cache step with `minivlm.attention.KVCache` and
`scaled_dot_product_attention`. When the answer is wrong, the check recomputes the usual mistakes
(post-norm, a missing residual, unshifted labels, k - 1 tokens kept, temperature after the softmax, a
mask aligned to the first key, ...) and names the one the answer matches.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

from minivlm.attention import KVCache, scaled_dot_product_attention
from minivlm.decoding import filter_logits
from minivlm.exercises import fail
from minivlm.exercises.tools import Mistakes, call, diagnose, randn, same, tensor
from minivlm.gpt2 import Block, GPT2Config
from minivlm.lm import next_token_loss

__all__ = ["CHECKS"]

# Exercise 2.1: one GPT-2 block ---------------------------------------------------------------------------


def _test_block() -> Block:
    """A tiny block (D = 32, H = 4) whose LayerNorm gains and biases are not 1 and 0, so ln_1 ≠ ln_2 shows."""
    with torch.random.fork_rng():  # seeded weights, the learner's global RNG left as it was
        torch.manual_seed(0)
        config = GPT2Config.from_preset("tiny", embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
        block = Block(config).eval()
        with torch.no_grad():
            for name, p in block.named_parameters():
                if name.startswith("ln_"):
                    p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.5 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 0.3)  # large enough weights that every branch changes the output
    return block


def _attn(block, h, causal=True):
    return block.attn(h, causal=causal)[0]


def _mlp(block, h, act=lambda z: F.gelu(z, approximate="tanh")):
    return block.mlp.c_proj(act(block.mlp.c_fc(h)))


BLOCK_MISTAKES: Mistakes = {
    "post-norm": (lambda x, b: (lambda h: b.ln_2(h + _mlp(b, h)))(b.ln_1(x + _attn(b, x))),
                  "that is the original Transformer's *post*-norm block, LayerNorm(x + sublayer(x)). GPT-2 is "
                  "pre-norm: normalise the sub-layer's input and add its output to the un-normalised x: "
                  "x = x + attn(ln_1(x)), then x = x + mlp(ln_2(x))"),
    "no residuals": (lambda x, b: _mlp(b, b.ln_2(_attn(b, b.ln_1(x)))),
                     "there are no residual connections: each sub-layer's output is *added* to its input, "
                     "x = x + attn(ln_1(x)), then x = x + mlp(ln_2(x))"),
    "no attention residual": (lambda x, b: (lambda h: h + _mlp(b, b.ln_2(h)))(_attn(b, b.ln_1(x))),
                              "the attention's residual is missing: x = x + attn(ln_1(x)), not attn(ln_1(x))"),
    "no MLP residual": (lambda x, b: _mlp(b, b.ln_2(x + _attn(b, b.ln_1(x)))),
                        "the MLP's residual is missing: return h + mlp(ln_2(h)), not mlp(ln_2(h))"),
    "ln_1 twice": (lambda x, b: (lambda h: h + _mlp(b, b.ln_1(h)))(x + _attn(b, b.ln_1(x))),
                   "each sub-layer has its own LayerNorm: ln_1 before the attention, ln_2 before the MLP"),
    "exact GELU": (lambda x, b: (lambda h: h + _mlp(b, b.ln_2(h), F.gelu))(x + _attn(b, b.ln_1(x))),
                   "GPT-2's GELU is the tanh approximation (it was trained with it): "
                   "F.gelu(h, approximate='tanh'), not the exact F.gelu(h)"),
    "ReLU": (lambda x, b: (lambda h: h + _mlp(b, b.ln_2(h), F.relu))(x + _attn(b, b.ln_1(x))),
             "GPT-2's MLP uses GELU, not ReLU: F.gelu(h, approximate='tanh')"),
    "no activation": (lambda x, b: (lambda h: h + _mlp(b, b.ln_2(h), lambda z: z))(x + _attn(b, b.ln_1(x))),
                      "the MLP needs its nonlinearity between c_fc and c_proj: F.gelu(h, approximate='tanh'); "
                      "without it, the two linear layers are just one linear layer"),
    "not causal": (lambda x, b: (lambda h: h + _mlp(b, b.ln_2(h)))(x + _attn(b, b.ln_1(x), causal=False)),
                   "the attention must be causal, or each token sees the ones after it: call block.attn(h) "
                   "(causal=True is its default)"),
}  # fmt: skip


def check_block(gpt2_block: Callable) -> str:
    """Exercise 2.1: gpt2_block(x, block) = the pre-norm block: x + attn(ln_1(x)), then + mlp(ln_2(·))."""
    block = _test_block()
    for shape, seed in (((2, 7, 32), 1), ((1, 3, 32), 2)):
        x = randn(*shape, seed=seed)
        what = f"gpt2_block(x of shape {shape}, block)"
        with torch.no_grad():
            expected = block(x, None, None, 0, False)[0]
            out = call(gpt2_block, x.clone(), block, what=what,
                        hint="block.attn(h) returns a pair (output, weights): take its [0]")  # fmt: skip
        if isinstance(out, tuple):
            fail(f"{what} returned a tuple: block.attn(h) returns (output, weights); use its [0], and return "
                 "one tensor of shape (B, T, D)")  # fmt: skip
        out = tensor(out, what)
        if out.shape != expected.shape:
            fail(f"{what} should keep the shape (B, T, D) = {shape}, got {tuple(out.shape)}")
        if not same(out, expected):
            diagnose(out, (x, block), BLOCK_MISTAKES, what, expected,
                      "compare your steps with x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))")  # fmt: skip
    return "equals minivlm.gpt2.Block: pre-norm, causal attention, tanh-GELU MLP, two residual additions"


# Exercise 2.2: the causal language-model loss --------------------------------------------------------------


def _ce(logits, labels, reduction="mean"):
    return F.cross_entropy(rearrange(logits, "b t v -> (b t) v"), rearrange(labels, "b t -> (b t)"),
                           ignore_index=-100, reduction=reduction)  # fmt: skip


LOSS_MISTAKES: Mistakes = {
    "not shifted": (lambda lo, la: _ce(lo, la),
                    "you scored each position against its *own* token. Position t predicts token t + 1: compare "
                    "logits[:, :-1] with labels[:, 1:] (a model scored this way would learn to copy its input)"),
    "shifted the wrong way": (lambda lo, la: _ce(lo[:, 1:], la[:, :-1]),
                              "you shifted the wrong way: position t's scores predict the token *after* it, so "
                              "pair logits[:, :-1] with labels[:, 1:], not logits[:, 1:] with labels[:, :-1]"),
    "softmax first": (lambda lo, la: _ce(lo[:, :-1].softmax(-1), la[:, 1:]),
                      "F.cross_entropy takes raw logits (it applies log-softmax itself): do not softmax first"),
    "sum": (lambda lo, la: _ce(lo[:, :-1], la[:, 1:], "sum"),
            "that is the sum over the tokens; the loss is their mean (F.cross_entropy's default reduction)"),
    "mean over ignored too": (lambda lo, la: _ce(lo[:, :-1], la[:, 1:], "sum") / la[:, 1:].numel(),
                              "you divided by every position, padding included: average over the tokens whose "
                              "label is not -100 only"),
}  # fmt: skip


def check_loss(causal_lm_loss: Callable) -> str:
    """Exercise 2.2: causal_lm_loss(logits, labels) = mean cross-entropy of token t + 1 given position t."""
    v = 11
    logits = 2 * randn(2, 6, v, seed=3)  # (B, T, V)
    labels = torch.randint(0, v, (2, 6), generator=torch.Generator().manual_seed(4))  # (B, T)
    padded = labels.clone()
    padded[1, 4:] = -100  # the second text is two tokens shorter: its padding is ignored
    for lab, name in ((labels, "labels"), (padded, "labels with -100 (padding) at the end of row 1")):
        what = f"causal_lm_loss(logits {tuple(logits.shape)}, {name})"
        hint = ("F.cross_entropy wants logits (N, V) and labels (N,): flatten batch and time first, "
                "e.g. rearrange(logits, 'b t v -> (b t) v')")
        if lab is padded:
            hint = "labels of -100 mark padding: F.cross_entropy skips them (ignore_index=-100, its default)"
        leaf = logits.clone().requires_grad_()
        out = call(causal_lm_loss, leaf, lab.clone(), what=what, hint=hint)
        if isinstance(out, float):
            fail(f"{what} returned a Python float: return the loss tensor itself (no .item()), training calls "
                 "loss.backward() on it")  # fmt: skip
        out = tensor(out, what)
        if out.numel() != 1:
            fail(f"{what} should be a single number (the mean over tokens), got a tensor of shape {tuple(out.shape)}")
        if not out.requires_grad:
            fail(f"{what} is cut off from the logits' gradient: return the loss tensor itself (no .item(), "
                 "no .detach(), no torch.tensor(...)), training calls loss.backward() on it")  # fmt: skip
        out = out.detach().reshape(())
        expected = next_token_loss(logits, lab)
        if not same(out, expected):
            diagnose(out, (logits, lab), LOSS_MISTAKES, what, expected,
                      "compare with F.cross_entropy over logits[:, :-1] and labels[:, 1:], flattened")  # fmt: skip
    return "equals minivlm.lm.next_token_loss: position t predicts token t + 1, mean over the tokens, -100 ignored"


# Exercise 2.3: temperature and top-k -----------------------------------------------------------------------


def _probs(logits, temperature, top_k):
    return filter_logits(logits / temperature, top_k).softmax(-1)


def _keep_k_minus_1(logits, temperature, top_k):
    if top_k == 0:
        return _probs(logits, temperature, 0)
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    return (logits / temperature).masked_fill(logits <= kth, float("-inf")).softmax(-1)


def _zero_filled(logits, temperature, top_k):
    if top_k == 0:
        return _probs(logits, temperature, 0)
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    return (logits / temperature).masked_fill(logits < kth, 0.0).softmax(-1)


FILTER_MISTAKES: Mistakes = {
    "k - 1 kept": (_keep_k_minus_1,
                   "you kept k - 1 tokens: the k-th best itself must stay. Drop the scores *below* the k-th "
                   "best (logits < kth), not those at or below it (<=)"),
    "temperature ignored": (lambda lo, t, k: _probs(lo, 1.0, k),
                            "the temperature has no effect in your answer: divide the logits by it before the "
                            "softmax"),
    "temperature multiplied": (lambda lo, t, k: _probs(lo * t, 1.0, k),
                               "you multiplied the logits by the temperature: divide them by it "
                               "(T < 1 sharpens the distribution, T > 1 flattens it)"),
    "zero, not -inf": (_zero_filled,
                       "the dropped tokens still have probability > 0: set their logits to float('-inf') (not 0) "
                       "before the softmax, so exp gives them exactly 0"),
}  # fmt: skip


def check_probs(next_token_probs: Callable) -> str:
    """Exercise 2.3: next_token_probs(logits, temperature, top_k) = softmax(top-k filtered logits / T)."""
    logits = 2 * randn(3, 10, seed=5)  # (B, V): B ≠ V, so a wrong axis shows
    for temperature, top_k in ((1.0, 0), (0.5, 3), (2.0, 5), (1.0, 1)):
        what = f"next_token_probs(logits (3, 10), temperature={temperature}, top_k={top_k})"
        hint = ("top_k=0 means no limit: keep every token" if top_k == 0
                else "take the top k along the vocabulary axis: logits.topk(k, dim=-1)")
        out = tensor(call(next_token_probs, logits.clone(), temperature, top_k, what=what, hint=hint), what)
        expected = _probs(logits, temperature, top_k)
        if out.shape != expected.shape:
            fail(f"{what} should have shape (B, V) = (3, 10), got {tuple(out.shape)}")
        if not torch.allclose(out.sum(-1), torch.ones(3), atol=1e-5):
            if torch.allclose(out.sum(0), torch.ones(10), atol=1e-5):
                fail("your probabilities sum to 1 over the batch (dim=0): each row is one sequence's "
                     "distribution over the vocabulary, so softmax over the last axis (dim=-1)")
            if same(out * temperature, _probs(logits, 1.0, top_k)):
                fail("you divided the *probabilities* by the temperature, after the softmax, so they no longer "
                     "sum to 1: the temperature divides the *logits*, before the softmax")
            fail(f"{what}: each row should sum to 1 (a distribution over the vocabulary), yours sum to "
                 f"{[round(s, 3) for s in out.sum(-1).tolist()]}")  # fmt: skip
        if same(out, expected):
            continue
        for mistake, mistake_hint in FILTER_MISTAKES.values():
            if same(out, mistake(logits, temperature, top_k)):
                fail(mistake_hint)
        kept = (out > 0).sum(-1)  # (B,) tokens left in each row
        if top_k and ((kept != top_k).any() or not torch.equal(out > 0, expected > 0)):
            which = "the right number, but not the best ones" if (kept == top_k).all() else f"{kept.tolist()} per row"
            fail(f"with top_k={top_k} each row should keep exactly its {top_k} best tokens; yours keeps {which}: "
                 "take the top k along the vocabulary axis, logits.topk(k, dim=-1), and set the rest to -inf")
        error = (out - expected).abs().max().item()
        fail(f"{what} differs from the reference by up to {error:.3g}; divide the logits by the temperature, "
             "set all but the k best to -inf, then softmax")  # fmt: skip
    return ("equals softmax(filter_logits(logits / T, top_k)) from minivlm.decoding for T = 0.5, 1, 2 and "
            "k = 0 (no limit), 1 (greedy), 3, 5")  # fmt: skip


# Exercise 2.4: one step with a KV cache --------------------------------------------------------------------


def _step_reference(q, k, v, past_k, past_v):
    cache = KVCache()
    cache.update(past_k, past_v, layer=0)
    keys, values = cache.update(k, v, layer=0)  # (B, H, S, K)
    return scaled_dot_product_attention(q, keys, values, causal=True), keys, values


def _sdpa(q, keys, values, scale=True, dim=-1):
    scores = q @ keys.transpose(-2, -1) / (math.sqrt(q.shape[-1]) if scale else 1.0)
    return scores.softmax(dim) @ values


STEP_MISTAKES: Mistakes = {
    "past ignored": (lambda q, k, v, pk, pv: _sdpa(q, k, v),
                     "the new token attended only to itself: its query must score every cached key too. "
                     "Attend over torch.cat([past_k, k], dim=-2) and the same for the values"),
    "mask aligned to the first key": (lambda q, k, v, pk, pv: torch.cat([pv, v], dim=-2)[..., :1, :],
                                      "the new token only saw the first key: a causal mask aligned top-left "
                                      "(F.scaled_dot_product_attention(..., is_causal=True) with 1 query and S "
                                      "keys) hides everything but key 0. The new token is the *last* position "
                                      "and may see every key: use no mask for one new query (or minivlm's "
                                      "scaled_dot_product_attention(..., causal=True), which aligns to the last key)"),
    "no scaling": (lambda q, k, v, pk, pv: _sdpa(q, torch.cat([pk, k], -2), torch.cat([pv, v], -2), scale=False),
                   "the scores are not divided by √K (K = q.shape[-1])"),
    "softmax over queries": (lambda q, k, v, pk, pv: _sdpa(q, torch.cat([pk, k], -2), torch.cat([pv, v], -2), dim=-2),
                             "softmax over the keys (the last axis, dim=-1): with one query, a softmax over the "
                             "queries gives every key weight 1"),
}  # fmt: skip


def check_kv_step(kv_cache_step: Callable) -> str:
    """Exercise 2.4: kv_cache_step(q, k, v, past_k, past_v) -> (output, all keys, all values) for one new token."""
    b, h, d = 2, 3, 4
    for past in (5, 0):
        q, k, v = (randn(b, h, 1, d, seed=6 + i) for i in range(3))  # (B, H, 1, K): the new token
        past_k, past_v = randn(b, h, past, d, seed=9), randn(b, h, past, d, seed=10)  # (B, H, S - 1, K)
        what = f"kv_cache_step with {past} cached tokens"
        result = call(kv_cache_step, q.clone(), k.clone(), v.clone(), past_k.clone(), past_v.clone(), what=what,
                       hint="keys and values are (B, H, S, K): append along the token axis, torch.cat(..., dim=-2)")
        if not (isinstance(result, tuple) and len(result) == 3):
            fail(f"{what} should return three tensors (output, keys, values), got {type(result).__name__}")
        out, keys, values = (tensor(t, what) for t in result)
        expected, exp_keys, exp_values = _step_reference(q, k, v, past_k, past_v)
        for name, got, want in (("keys", keys, exp_keys), ("values", values, exp_values)):
            if got.shape != want.shape:
                fail(f"{what}: the {name} should have shape (B, H, S, K) = {tuple(want.shape)}, got "
                     f"{tuple(got.shape)}: append the new token along the token axis, dim=-2")  # fmt: skip
            if past and same(got, torch.cat([want[..., -1:, :], want[..., :-1, :]], dim=-2)):
                fail(f"your {name} put the new token first: it is the latest, so append it *after* the cached "
                     f"ones, torch.cat([past, new], dim=-2)")  # fmt: skip
            if not same(got, want):
                fail(f"{what}: the {name} should be the cached ones followed by the new one, torch.cat([past, new], dim=-2)")
        if out.shape != expected.shape:
            fail(f"{what}: the output should have shape (B, H, 1, K) = {tuple(expected.shape)}, one row for the "
                 f"one new query, got {tuple(out.shape)}")  # fmt: skip
        if not same(out, expected):
            diagnose(out, (q, k, v, past_k, past_v), STEP_MISTAKES, what, expected,
                      "the new query attends to all S keys: softmax(q Kᵀ / √K) · V, no mask needed")  # fmt: skip
    # And the point of it all: the cached step equals the last row of full causal attention over S tokens.
    qs, ks, vs = (randn(b, h, 6, d, seed=20 + i) for i in range(3))
    out, _, _ = kv_cache_step(qs[..., -1:, :], ks[..., -1:, :], vs[..., -1:, :], ks[..., :-1, :], vs[..., :-1, :])
    full = scaled_dot_product_attention(qs, ks, vs, causal=True)  # (B, H, 6, K)
    if not same(out, full[..., -1:, :]):
        fail("your step does not reproduce the last row of full causal attention over the whole sequence")
    return ("appends the new key and value after the cache (as minivlm.attention.KVCache does) and gives the "
            "same output as the last row of full causal attention, with and without earlier tokens")


CHECKS: dict[str, Callable[..., str]] = {
    "2.1": check_block,
    "2.2": check_loss,
    "2.3": check_probs,
    "2.4": check_kv_step,
}
