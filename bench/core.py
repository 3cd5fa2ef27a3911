"""How fast are minivlm's core pieces next to PyTorch's and Hugging Face's? Three measurements, one run, CPU.

1. Attention. `minivlm.attention.scaled_dot_product_attention` spells softmax(Q Kᵀ / √K) · V out
   step by step: it writes the full (B, H, T, T) score matrix to memory, then a scaled, a masked and a
   softmaxed copy of it, and reads the last back to average the values. PyTorch's fused
   `F.scaled_dot_product_attention` computes the same numbers in tiles that stay in cache, with an
   online softmax (the FlashAttention idea), and skips the tiles the causal mask hides, so it moves far
   less memory and does about half the work. The ratio printed is how many times slower ours is.
2. GPT-2 forward. Our GPT-2 against `transformers.GPT2LMHeadModel` holding the same (random) weights:
   the same maths, so the logits must agree, and attention is a small part of the time — most of it
   goes into the matrix multiplications, which both models hand to the same BLAS library.
3. Generation. `minivlm.decoding.greedy` with and without the KV cache. Without it, step n runs the
   model over all n tokens again; with it, only the newest token goes through the model and reuses
   the stored keys and values, so a step costs O(n) instead of O(n²) — and the tokens are identical.

Each time is the median of several calls after a warm-up call (the first call pays one-off costs:
memory allocation, thread start-up). The numbers depend on the machine and on what else runs on it.

Run from the repository root:
    .venv/bin/python bench/core.py                  # full sizes, GPT-2 124M (about 2 minutes on 2 cores)
    .venv/bin/python bench/core.py --quick          # tiny sizes, a few seconds: proves the script runs
    .venv/bin/python bench/core.py --json out.json  # also write every number as JSON
    .venv/bin/python bench/core.py --threads 1      # one CPU thread: steadier numbers on a busy machine

Axis letters: B batch, H heads, T tokens, K head width, N new tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
import transformers
from transformers import GPT2LMHeadModel

from minivlm.attention import scaled_dot_product_attention
from minivlm.decoding import greedy
from minivlm.gpt2 import GPT2, GPT2Config

LOGITS_ATOL = 1e-4  # largest |ours - HF| logit difference accepted as "the same model" in float32


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the full benchmark and the --quick smoke run."""

    preset: str  # GPT2Config preset for sections 2 and 3
    attn_shape: tuple[int, int, int, int]  # (B, H, T, K) of q, k and v in section 1
    forward_shape: tuple[int, int]  # (B, T) token ids in section 2
    prompt_len: int  # T: prompt tokens in section 3
    new_tokens: int  # N: tokens generated per prompt in section 3
    gen_batches: tuple[int, ...]  # the batch sizes B of section 3
    attn_repeats: int  # timed calls per attention measurement
    model_repeats: int  # timed calls per forward-pass measurement
    gen_repeats: int  # timed calls per generation measurement (the slowest part)


FULL = Sizes("gpt2", (8, 12, 256, 64), (4, 128), 16, 32, (1, 8), attn_repeats=20, model_repeats=5, gen_repeats=3)
QUICK = Sizes("tiny", (2, 4, 32, 16), (2, 16), 8, 8, (1, 4), attn_repeats=3, model_repeats=2, gen_repeats=1)


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ms(seconds: float) -> str:
    """Seconds as milliseconds, for the tables."""
    return f"{seconds * 1e3:.2f} ms"


def show(rows: list[tuple], header: tuple) -> None:
    """Print rows as a table: the first column left-aligned, the others right-aligned."""
    table = [header, *[tuple(str(c) for c in row) for row in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def bench_attention(sizes: Sizes) -> dict:
    """Section 1: our einops attention vs PyTorch's fused kernel, causal, float32, forward only."""
    q, k, v = torch.randn(3, *sizes.attn_shape).unbind(0)  # each (B, H, T, K)
    ours_fn = partial(scaled_dot_product_attention, q, k, v, causal=True)
    torch_fn = partial(F.scaled_dot_product_attention, q, k, v, is_causal=True)
    ours = median_seconds(ours_fn, sizes.attn_repeats, warmup=2)
    fused = median_seconds(torch_fn, sizes.attn_repeats, warmup=2)
    diff = ours_fn() - torch_fn()
    result = dict(shape=sizes.attn_shape, ours_s=ours, torch_s=fused, ours_over_torch=ours / fused,
                  max_abs_diff=diff.abs().max().item())  # fmt: skip
    print(f"\n1. Attention, causal, float32, forward only, (B, H, T, K) = {sizes.attn_shape}")
    show([("ours (minivlm.attention, einops)", ms(ours), f"{ours / fused:.2f}x"),
          ("torch F.scaled_dot_product_attention", ms(fused), "1.00x")],
         ("implementation", "time/call", "ours/torch"))  # fmt: skip
    print(f"  max |ours - torch| = {result['max_abs_diff']:.1e}")
    return result


def bench_forward(hf: GPT2LMHeadModel, models: dict[str, GPT2], sizes: Sizes) -> dict:
    """Section 2: our GPT-2 forward pass vs transformers' on the same weights; the logits must agree."""
    ids = torch.randint(0, hf.config.vocab_size, sizes.forward_shape)  # (B, T)
    hf_s = median_seconds(partial(hf, ids, use_cache=False), sizes.model_repeats)
    hf_logits = hf(ids, use_cache=False).logits
    hf_attn = hf.config._attn_implementation  # which attention transformers picked: "sdpa" on recent torch
    result = dict(shape=sizes.forward_shape, hf_s=hf_s, hf_attn_implementation=hf_attn)
    rows = [(f"transformers GPT2LMHeadModel ({hf_attn})", ms(hf_s), "1.00x", "-")]
    for impl, model in models.items():
        seconds = median_seconds(partial(model, ids), sizes.model_repeats)
        diff = (model(ids).logits - hf_logits).abs().max().item()
        if diff > LOGITS_ATOL:
            raise AssertionError(f"ours (attn_impl={impl!r}) and transformers differ by {diff:.1e} > {LOGITS_ATOL}")
        result[impl] = dict(ours_s=seconds, hf_over_ours=hf_s / seconds, max_abs_logit_diff=diff)
        rows.append((f'ours, attn_impl="{impl}"', ms(seconds), f"{hf_s / seconds:.2f}x", f"{diff:.1e}"))
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"\n2. GPT-2 forward, preset {sizes.preset!r} ({n_params:,} parameters), (B, T) = {sizes.forward_shape}")
    show(rows, ("model", "time/call", "HF/ours", "max |logits - HF|"))
    print("  HF/ours >= 1.00x: ours is not slower")
    return result


def bench_generation(model: GPT2, sizes: Sizes) -> list[dict]:
    """Section 3: greedy decoding with and without the KV cache: tokens per second, and the same tokens."""
    results, rows = [], []
    for b in sizes.gen_batches:
        prompt = torch.randint(0, model.config.vocab_size, (b, sizes.prompt_len))  # (B, T)
        tokens, speed = {}, {}
        for use_cache in (False, True):
            run = partial(greedy, model, prompt, max_new_tokens=sizes.new_tokens, use_cache=use_cache)
            tokens[use_cache] = run()  # (B, N); this call is also the warm-up
            speed[use_cache] = b * sizes.new_tokens / median_seconds(run, sizes.gen_repeats, warmup=0)
        same, gain = torch.equal(tokens[True], tokens[False]), speed[True] / speed[False]
        results.append(dict(batch=b, uncached_tok_s=speed[False], cached_tok_s=speed[True],
                            cached_over_uncached=gain, identical_tokens=same))  # fmt: skip
        rows += [(b, "no", f"{speed[False]:.1f}", "1.00x", "-"),
                 (b, "yes", f"{speed[True]:.1f}", f"{gain:.2f}x", "yes" if same else "NO")]  # fmt: skip
    print(f"\n3. Greedy generation, our GPT-2 ({sizes.preset!r}), {sizes.prompt_len}-token prompt, "
          f"{sizes.new_tokens} new tokens")  # fmt: skip
    show(rows, ("batch", "KV cache", "tokens/s", "cached/uncached", "same tokens"))
    return results


def main() -> None:
    """Parse the arguments, run the three sections, print the tables, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Times are medians after warm-up.")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: a smoke run of a few seconds")
    parser.add_argument("--json", metavar="PATH", help="also write every number to PATH as JSON")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(N) first (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    torch.manual_seed(0)

    env = dict(torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads(),
               cpu=platform.processor() or platform.machine(), python=platform.python_version())  # fmt: skip
    print("minivlm core benchmark (" + ("quick" if args.quick else "full") + "), CPU, float32")
    print("  " + ", ".join(f"{k} {v}" for k, v in env.items()))

    start = time.perf_counter()
    cfg = GPT2Config.from_preset(sizes.preset)
    hf = GPT2LMHeadModel(cfg.to_hf()).eval()  # random weights, no download
    models = {impl: GPT2.from_hf(hf, attn_impl=impl).eval() for impl in ("sdpa", "math")}
    with torch.inference_mode():
        results = dict(env=env, sizes=asdict(sizes), attention=bench_attention(sizes),
                       gpt2_forward=bench_forward(hf, models, sizes),
                       generation=bench_generation(models["sdpa"], sizes))  # fmt: skip
    results["total_s"] = time.perf_counter() - start
    print(f"\ntotal {results['total_s']:.1f} s, building the models included")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
