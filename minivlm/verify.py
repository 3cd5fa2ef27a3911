"""A smoke run of the from-scratch core on this machine: does what we built equal the reference?

`python -m minivlm verify` builds GPT-2 124M's architecture with random weights in `transformers`
(no download), loads those weights into our GPT-2 through the key map, and checks that attention,
logits and greedy decoding agree; it also times decoding with and without the KV cache. It takes
well under a minute on a laptop CPU and is a quick way to see that an installation works.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from minivlm.attention import scaled_dot_product_attention
from minivlm.decoding import greedy
from minivlm.gpt2 import GPT2, GPT2Config

__all__ = ["verify"]


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def verify(preset: str = "gpt2", new_tokens: int = 24, seed: int = 0) -> bool:
    """Print the checks one per line; return True when every check passes."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__} on {device} ({torch.get_num_threads()} CPU threads)")
    results = []

    def check(name: str, ok: bool, detail: str) -> None:
        results.append(ok)
        print(f"  [{'ok' if ok else 'FAIL'}] {name}: {detail}")

    q, k, v = torch.randn(3, 2, 12, 16, 64).unbind(0)  # (B, H, T, K) each
    err = (scaled_dot_product_attention(q, k, v, causal=True) - F.scaled_dot_product_attention(q, k, v, is_causal=True)).abs().max().item()
    check("attention = torch's scaled_dot_product_attention", err <= 1e-5, f"max abs error {err:.1e}")

    config = GPT2Config.from_preset(preset)
    hf, seconds = _timed(lambda: GPT2LMHeadModel(config.to_hf()).eval())
    ours = GPT2.from_hf(hf).eval()
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"GPT-2 preset {preset!r}: {n_params / 1e6:.1f}M parameters, random weights, built in {seconds:.1f} s")
    ids = torch.randint(0, config.vocab_size, (2, 32))  # (B, T)
    with torch.no_grad():
        err = (ours(ids).logits - hf(ids).logits).abs().max().item()
    check("our GPT-2 logits = transformers' GPT2LMHeadModel", err <= 1e-4, f"max abs error {err:.1e}")

    prompt = ids[:1, :8]
    cached, t_cached = _timed(lambda: greedy(ours, prompt, max_new_tokens=new_tokens))
    uncached, t_uncached = _timed(lambda: greedy(ours, prompt, max_new_tokens=new_tokens, use_cache=False))
    check("greedy decoding with the KV cache = without", torch.equal(cached, uncached), f"{new_tokens} tokens")
    print(
        f"  decoding {new_tokens} tokens: {t_cached:.2f} s with the KV cache, {t_uncached:.2f} s without "
        f"({t_uncached / t_cached:.1f}x)"
    )
    ok = all(results)
    print("All checks passed." if ok else "Some checks FAILED.")
    return ok
