"""Performance targets (issue 7): every ratio measured side by side in one run, on the CPU or a GPU.

1. GPT-2 forward: our `minivlm.gpt2.GPT2` against transformers' `GPT2LMHeadModel` holding the same
   weights; the logits must agree. Target: HF/ours >= 1.0 (ours is not slower).
2. Greedy generation from a visual prefix: our cached `minivlm.decoding.greedy` against
   `GPT2LMHeadModel.generate()` (same weights, same P prefix vectors as `inputs_embeds`, same number of
   new tokens, no end-of-text so both run the full length; the tokens must agree), and against our own
   decoding without the KV cache. Targets: ours/HF tokens/s >= 1.0; cached/uncached >= 5 at batch 64.
3. Beam search with the KV cache against the same search re-running the whole sequence every step
   (`use_cache=False`, which is how ClipCap's published `generate_beam` works); the beams must agree.
4. Training the captioner for a few steps (forward, backward, gradient clipping, AdamW) with the LM
   frozen, and with it fine-tuned (`train_lm=True`), the two taking turns: images/s, the memory a step
   needs on top of the weights, and the model FLOPs a step performs, counted by
   `torch.utils.flop_counter.FlopCounterMode` (matrix products and convolutions, forward and backward);
   FLOPs/s divided by the device's peak is the model FLOP utilisation (MFU). On the CPU this is the
   course's configuration (`TRAIN_PRESETS["cpu"]`: the course LM, 32 px, batch 64); on a GPU the 224 px
   one (GPT-2 124M with random weights, bfloat16, torch.compile), where the target is MFU >= 40% on an
   H100. On a CPU with bfloat16 instructions (`minivlm.train.native_bf16`) the frozen step also runs under
   bfloat16 autocast, beside a bfloat16 matrix product.

Each time is the fastest of several calls, taken in turns with its rivals after warm-up calls (see
`best_seconds`). Run from the repository root:
    .venv/bin/python bench/perf.py                  # the full run: a few minutes on 2 CPU cores
    .venv/bin/python bench/perf.py --quick          # tiny sizes, seconds: proves every section runs
    .venv/bin/python bench/perf.py --json out.json  # also write every number as JSON
    .venv/bin/python bench/perf.py --device cpu     # the CPU run on a machine with a GPU
docs/performance.md explains each number and holds the measured tables.

Axis letters: B batch, T tokens, P prefix vectors, D model width, N new tokens, K beams.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import GenerationConfig, GPT2LMHeadModel

from core import LOGITS_ATOL, ms, show
from minivlm.attention import MultiHeadSelfAttention
from minivlm.captioner import Captioner, CaptionerConfig
from minivlm.decoding import beam_search, greedy
from minivlm.gpt2 import GPT2, GPT2Config
from minivlm.prefix import DeepPrefixLM, embedding_scale
from minivlm.train import TRAIN_PRESETS, native_bf16

# Dense bfloat16 peak of each GPU, TFLOP/s, from the vendor's data sheet; the first name found in
# torch.cuda.get_device_name() wins, so the more specific names come first. No entry: MFU is "n/a".
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1,
               "L4": 121.0, "A10G": 70.0}  # fmt: skip


@dataclass(frozen=True)
class Setup:
    """A captioner to train in section 4: its LM, its vision side, its batches and its numerics."""

    lm: str  # "course[:<preset>]" (the course LM and its tokenizer) or "random:<GPT2Config preset>"
    captioner: CaptionerConfig  # the vision side; image_size fixes the images' size
    batch_size: int  # B images per step
    max_length: int = 48  # shapes-world captions: the longest a caption may be, as in training
    caption_tokens: int = 0  # T of random captions of fixed length; 0: shapes-world captions, right-padded
    bf16: bool = False  # bfloat16 autocast (a GPU's fast path; slow on most CPUs)
    compile: bool = False  # torch.compile the captioner first
    length_groups: int = 0  # the LM reads the batch in this many groups of similar caption length (0: one)
    prefix_cache: bool = True  # a prefix read by every block goes to the LM as keys and values (False: run whole)


def preset_setup(name: str, **changes) -> Setup:
    """The setup of a TRAIN_PRESETS entry (its LM, captioner, batch size and captions), with any field changed."""
    config = TRAIN_PRESETS[name]
    setup = Setup(config.lm, config.captioner, config.batch_size, config.max_length,
                  length_groups=config.length_groups)  # fmt: skip
    return replace(setup, **changes)


SETUPS = {
    "cpu": preset_setup("cpu"),  # the course's CPU configuration: course LM, 32 px, batch 64
    # The GPU configuration "gpu-224" (224 px, batch 128), but with GPT-2 124M's architecture from random
    # weights instead of the hub's (speed does not depend on them; nothing to download), and captions of
    # 24 random tokens (COCO's average caption is about 12 words, 14 GPT-2 tokens).
    "gpu-224": preset_setup("gpu-224", lm="random:gpt2", caption_tokens=24, bf16=True, compile=True),
    # Tiny versions of both, for --quick.
    "tiny": preset_setup("tiny", length_groups=2, captioner=replace(TRAIN_PRESETS["tiny"].captioner, prefix_depth=2)),
    "gpu-tiny": preset_setup("tiny", lm="random:tiny", caption_tokens=12),
}
PADDED = "frozen, one padded batch"  # section 4's extra row for a setup with length groups
WHOLE = "frozen, prefix run whole"  # and for a prefix read by every block, without `DeepPrefixLM.prefix_cache`
BF16 = "frozen, bf16 autocast"  # and for a float32 setup on a CPU with bfloat16 instructions (`native_bf16`)


class WholePrefixLM(DeepPrefixLM):
    """A DeepPrefixLM whose training loss runs every prefix position through every block, as before prefix_cache."""

    reads_every_block = False  # what Captioner's grouped loss asks before it takes the cache


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the full run, the quick run and the GPU run."""

    forward_preset: str  # GPT2Config preset compared with transformers in section 1
    forward_shape: tuple[int, int]  # (B, T) token ids in section 1
    lm: str  # the LM of sections 2 and 3, as Setup.lm
    prefix_length: int  # P prefix vectors every generation starts from
    new_tokens: int  # N tokens generated per row
    gen_batches: tuple[int, ...]  # B of section 2
    beam_shape: tuple[int, int]  # (B, K) of section 3
    train_setups: tuple[str, ...]  # SETUPS of section 4, each trained frozen and fine-tuned
    train_steps: tuple[int, int]  # (warm-up steps, timed steps) per training row
    matmul_size: int  # n of the n x n matrix product that shows what the device reaches in practice
    repeats: int  # timed rounds in sections 1 to 3


CPU = Sizes("gpt2", (4, 128), "course:cpu", 4, 20, (1, 64), (8, 5), ("cpu",), (3, 20), 2048, repeats=7)
GPU = Sizes("gpt2", (16, 512), "random:gpt2", 4, 20, (1, 64), (8, 5), ("gpu-224",), (10, 20), 8192, repeats=10)
QUICK = Sizes("tiny", (2, 16), "random:tiny", 2, 8, (1, 4), (2, 3), ("tiny", "gpu-tiny"), (1, 2), 256, repeats=1)


def best_seconds(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                 device: torch.device | None = None) -> dict[str, float]:  # fmt: skip
    """Each function's fastest call, in seconds, over `rounds` rounds that call every function once in turn.

    Side by side: the functions take turns, so a burst of load from another process slows all of them
    alike rather than whichever happened to be running. The fastest call (as `timeit` reports it) is the
    one least disturbed; the warm-up calls first pay the one-off costs (allocation, thread start-up,
    compilation). On a GPU a call returns once its kernels are queued: the clock waits for them.
    """

    def wait() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            wait()
            start = time.perf_counter()
            fn()
            wait()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def load_lm(spec: str, device: torch.device) -> tuple[GPT2, object]:
    """(our GPT-2 in eval mode on `device`, its tokenizer or None) from a Setup.lm spec."""
    kind, _, name = spec.partition(":")
    if kind == "course":
        from minivlm.lm import course_lm

        lm, tokenizer, _ = course_lm(name or "cpu", progress=False)  # from the cache; trained once if missing
        return lm.to(device).eval(), tokenizer
    torch.manual_seed(0)
    return GPT2(GPT2Config.from_preset(name, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)).to(device).eval(), None


def cast(model: nn.Module, device: torch.device) -> nn.Module:
    """The model as sections 1 to 3 run it: float32 on the CPU, bfloat16 on a GPU."""
    return model.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)


# ---- 1. forward ---------------------------------------------------------------------------------


def bench_forward(sizes: Sizes, device: torch.device) -> dict:
    """Section 1: one forward pass of ours and of transformers' GPT-2 on the same weights."""
    cfg = GPT2Config.from_preset(sizes.forward_preset)
    torch.manual_seed(0)
    hf = cast(GPT2LMHeadModel(cfg.to_hf()).eval(), device)  # random weights, no download
    ours = cast(GPT2.from_hf(hf).eval(), device)
    ids = torch.randint(0, cfg.vocab_size, sizes.forward_shape, device=device)  # (B, T)
    times = best_seconds({"hf": partial(hf, ids, use_cache=False), "ours": partial(ours, ids)}, sizes.repeats,
                         warmup=2, device=device)  # fmt: skip
    hf_s, ours_s = times["hf"], times["ours"]
    diff = (ours(ids).logits.float() - hf(ids, use_cache=False).logits.float()).abs().max().item()
    if device.type == "cpu" and diff > LOGITS_ATOL:
        raise AssertionError(f"ours and transformers differ by {diff:.1e} > {LOGITS_ATOL}: not the same model")
    dtype = str(next(ours.parameters()).dtype).removeprefix("torch.")
    print(f"\n1. GPT-2 forward, preset {sizes.forward_preset!r}, {dtype}, (B, T) = {sizes.forward_shape}, "
          f"{device.type}")
    hf_attn = hf.config._attn_implementation  # the attention transformers picked: "sdpa" on recent torch
    show([(f"transformers GPT2LMHeadModel ({hf_attn})", ms(hf_s), "1.00x", "-"),
          ("ours (minivlm.gpt2.GPT2)", ms(ours_s), f"{hf_s / ours_s:.2f}x", f"{diff:.1e}")],
         ("model", "time/call", "HF/ours", "max |logits - HF|"))  # fmt: skip
    print("  target: HF/ours >= 1.00x (ours not slower)")
    return dict(shape=sizes.forward_shape, dtype=dtype, hf_s=hf_s, ours_s=ours_s, hf_over_ours=hf_s / ours_s,
                max_abs_logit_diff=diff, hf_attn_implementation=hf_attn)  # fmt: skip


# ---- 2 and 3. generation ------------------------------------------------------------------------


def prefix_embeds(lm: GPT2, b: int, p: int) -> torch.Tensor:
    """(B, P, D) random vectors at the length of the LM's token embeddings: the shape of a visual prefix."""
    x = torch.randn(b, p, lm.config.n_embd, generator=torch.Generator().manual_seed(b))
    x = x / x.norm(dim=-1, keepdim=True) * embedding_scale(lm)
    return x.to(lm.lm_head.weight)


def hf_greedy(hf: GPT2LMHeadModel, embeds: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' generate(), greedy, from the prefix, exactly n new tokens: (B, N)."""
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return hf.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config)  # new tokens only


def bench_generation(lm: GPT2, hf: GPT2LMHeadModel, sizes: Sizes, device: torch.device) -> list[dict]:
    """Section 2: greedy tokens/s of ours with and without the cache, and of transformers' generate()."""
    results, rows, n = [], [], sizes.new_tokens
    for b in sizes.gen_batches:
        embeds = prefix_embeds(lm, b, sizes.prefix_length)  # (B, P, D)
        runs = {"ours, KV cache": partial(greedy, lm, inputs_embeds=embeds, max_new_tokens=n),
                "ours, no cache": partial(greedy, lm, inputs_embeds=embeds, max_new_tokens=n, use_cache=False),
                "transformers generate()": partial(hf_greedy, hf, embeds, n)}  # fmt: skip
        tokens = {name: run() for name, run in runs.items()}  # (B, N) each; this call is also the warm-up
        seconds = best_seconds(runs, sizes.repeats, warmup=0, device=device)
        speed = {name: b * n / s for name, s in seconds.items()}  # tokens/s
        cached, uncached, theirs = speed.values()
        same = all(torch.equal(t, tokens["ours, KV cache"]) for t in tokens.values())
        results.append(dict(batch=b, tokens_per_s=speed, ours_over_hf=cached / theirs,
                            cached_over_uncached=cached / uncached, identical_tokens=same))  # fmt: skip
        rows += [(b, name, f"{s:.0f}", f"{cached / s:.2f}x", "yes" if same else "NO") for name, s in speed.items()]
    print(f"\n2. Greedy generation from a {sizes.prefix_length}-vector prefix, {n} new tokens, LM {sizes.lm!r}")
    show(rows, ("batch", "decoder", "tokens/s", "cached ours/this", "same tokens"))
    print("  targets: ours (cached) / transformers >= 1.00x; cached / uncached >= 5x at batch 64")
    return results


def bench_beam(lm: GPT2, sizes: Sizes, device: torch.device) -> dict:
    """Section 3: beam search with the KV cache vs re-running every beam's whole sequence each step."""
    (b, k), n = sizes.beam_shape, sizes.new_tokens
    embeds = prefix_embeds(lm, b, sizes.prefix_length)
    run = partial(beam_search, lm, inputs_embeds=embeds, max_new_tokens=n, eos_token_id=None, num_beams=k)
    beams = {cache: run(use_cache=cache) for cache in (True, False)}  # (B, N); also the warm-up
    seconds = best_seconds({cache: partial(run, use_cache=cache) for cache in (True, False)}, sizes.repeats,
                           warmup=0, device=device)  # fmt: skip
    same, gain = torch.equal(beams[True], beams[False]), seconds[False] / seconds[True]
    print(f"\n3. Beam search, {k} beams, batch {b}, {n} new tokens, LM {sizes.lm!r}")
    show([("re-run the whole sequence each step (ClipCap)", ms(seconds[False]), "1.00x", "-"),
          ("KV cache, reordered each step", ms(seconds[True]), f"{gain:.2f}x", "yes" if same else "NO")],
         ("beam search", "time/call", "speed-up", "same beams"))  # fmt: skip
    return dict(batch=b, beams=k, cached_s=seconds[True], uncached_s=seconds[False], cached_over_uncached=gain,
                identical_beams=same)  # fmt: skip


# ---- 4. training --------------------------------------------------------------------------------


def training_batch(setup: Setup, lm: GPT2, tokenizer, device: torch.device) -> dict:
    """One batch: shapes-world images and captions as training collates them, or random ones of fixed length."""
    b, size = setup.batch_size, setup.captioner.image_size
    if setup.caption_tokens == 0:
        from minivlm.data.captions import CaptionCollator, ShapesCaptions
        from minivlm.data.shapes import ShapesWorld

        data = ShapesCaptions(ShapesWorld("train", size, seed=0, length=b))
        batch = CaptionCollator(tokenizer, setup.max_length)([data[i] for i in range(b)])
        batch = {k: batch[k] for k in ("images", "input_ids", "attention_mask", "labels")}
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, lm.config.vocab_size, (b, setup.caption_tokens), generator=g)  # (B, T)
        batch = dict(images=torch.rand(b, 3, size, size, generator=g), input_ids=ids,
                     attention_mask=torch.ones_like(ids), labels=ids)  # fmt: skip
    return {k: v.to(device) for k, v in batch.items()}


def train_step(model: nn.Module, params: list[nn.Parameter], optimizer, batch: dict, bf16: bool,
               length_groups: int) -> None:  # fmt: skip
    """One optimiser step, as minivlm.train takes it: forward (bf16 autocast on a GPU), backward, clip, AdamW."""
    with torch.autocast(batch["images"].device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch, length_groups=length_groups).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()


def count_flops(captioner: Captioner, batch: dict, bf16: bool, length_groups: int) -> tuple[int, dict[str, int]]:
    """(forward + backward FLOPs of one step, forward FLOPs per part): matrix products and convolutions.

    Counted with the from-scratch attention (impl="math"), whose matrix products the counter sees:
    PyTorch's fused CPU attention kernel is invisible to it. Frozen weights get no weight gradient, so
    the backward pass of a frozen LM costs about one forward pass, not two.
    """
    attention = [m for m in captioner.modules() if isinstance(m, MultiHeadSelfAttention)]
    impls = [m.impl for m in attention]
    for m in attention:
        m.impl = "math"
    try:
        with torch.autocast(batch["images"].device.type, dtype=torch.bfloat16, enabled=bf16):
            with FlopCounterMode(display=False) as forward:
                loss = captioner(**batch, length_groups=length_groups).loss
        with FlopCounterMode(display=False) as backward:
            loss.backward()
    finally:
        for m, impl in zip(attention, impls):
            m.impl = impl
        captioner.zero_grad(set_to_none=True)
    parts = {name: sum(forward.get_flop_counts().get(f"Captioner.{name}", {}).values())
             for name in ("encoder", "mapper", "lm")}  # fmt: skip
    return forward.get_total_flops() + backward.get_total_flops(), parts


def peak_tflops(device: torch.device) -> float | None:
    """The device's dense bf16 peak from PEAK_TFLOPS; None for a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


@contextmanager
def native_stderr_muted():
    """Silence what native code writes to stderr meanwhile: the profiler logs its start and stop there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def step_memory(step: Callable[[], None], device: torch.device) -> int:
    """Bytes of tensors a call of `step` adds, at its peak, to those alive before it.

    For the first training step: the activations kept for the backward pass, the gradients, and AdamW's
    two running averages per trained weight, created by that step. On a GPU, from the caching
    allocator's statistics; on the CPU, from the profiler's record of every allocation and free.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with native_stderr_muted(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                      profile_memory=True) as prof:  # fmt: skip
        step()
    events = (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")  # +bytes allocated, -freed
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def matmul_speed(n: int, device: torch.device, bf16: bool | None = None) -> dict:
    """The speed of one large matrix product, n x n by n x n: what this device's FLOPs can reach in practice.

    In bfloat16 on a GPU and in float32 on a CPU, unless `bf16` says which.
    """
    dtype = torch.bfloat16 if (device.type == "cuda" if bf16 is None else bf16) else torch.float32
    a, b = torch.randn(2, n, n, device=device, dtype=dtype).unbind(0)
    seconds = best_seconds({"mm": lambda: a @ b}, rounds=5, warmup=2, device=device)["mm"]
    return dict(n=n, dtype=str(dtype).removeprefix("torch."), tflops=2 * n**3 / seconds / 1e12)


def prepare_training(setup: Setup, train_lm: bool, device: torch.device) -> tuple[Callable[[], None], dict]:
    """(one training step, ready to call; what it is made of): the captioner, its optimiser and a batch.

    The FLOPs are counted and the memory measured here, on the step's first call, before any timing.
    """
    lm, tokenizer = load_lm(setup.lm, device)
    torch.manual_seed(0)
    captioner = Captioner.from_config(lm, replace(setup.captioner, train_lm=train_lm)).to(device).train()
    if not setup.prefix_cache and isinstance(captioner.lm, DeepPrefixLM):
        captioner.lm.__class__ = WholePrefixLM  # the same module and weights; only the grouped loss's path differs
    batch = training_batch(setup, lm, tokenizer, device)
    flops, parts = count_flops(captioner, batch, setup.bf16, setup.length_groups)
    params = captioner.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    model = torch.compile(captioner) if setup.compile else captioner
    step = partial(train_step, model, params, optimizer, batch, setup.bf16, setup.length_groups)
    info = dict(train_lm=train_lm, trained_parameters=sum(p.numel() for p in params),
                weights_mb=sum(p.numel() * p.element_size() for p in captioner.parameters()) / 2**20,
                step_memory_mb=step_memory(step, device) / 2**20, flops_per_image=flops / setup.batch_size,
                forward_flops_per_image=({k: v / setup.batch_size for k, v in parts.items()}))  # fmt: skip
    return step, info


def bench_training(sizes: Sizes, device: torch.device) -> list[dict]:
    """Section 4: each setup trained with the LM frozen and with it fine-tuned, in turns; what freezing saves."""
    results = []
    for name in sizes.train_setups:
        setup = SETUPS[name]
        steps, rows = {}, {}
        variants = [("frozen", False, setup), ("fine-tuned", True, setup)]
        if setup.length_groups:  # what grouping the captions by length saves: the frozen LM on one padded batch
            variants.append((PADDED, False, replace(setup, length_groups=0)))
            if setup.captioner.prefix_depth > 1:  # and what the prefix as keys and values saves, where it applies
                variants.append((WHOLE, False, replace(setup, prefix_cache=False)))
        if device.type == "cpu" and not setup.bf16 and native_bf16(device):  # what the CPU's bf16 instructions buy
            variants.append((BF16, False, replace(setup, bf16=True)))
        for label, train_lm, variant in variants:
            steps[label], rows[label] = prepare_training(variant, train_lm, device)
        warmup, rounds = sizes.train_steps
        seconds = best_seconds(steps, rounds, warmup, device)  # one step of each in turn
        matmul, peak = matmul_speed(sizes.matmul_size, device), peak_tflops(device)
        matmul_bf16 = matmul_speed(sizes.matmul_size, device, bf16=True) if BF16 in rows else None
        for label, row in rows.items():
            row.update(step_s=seconds[label], images_per_s=setup.batch_size / seconds[label])
            row["achieved_tflops"] = row["flops_per_image"] * row["images_per_s"] / 1e12
            row["mfu"] = row["achieved_tflops"] / peak if peak else None
            row["of_matmul"] = row["achieved_tflops"] / (matmul_bf16 if label == BF16 else matmul)["tflops"]
        frozen, tuned = rows["frozen"], rows["fine-tuned"]
        saved = dict(speed=frozen["images_per_s"] / tuned["images_per_s"],
                     memory_mb=tuned["step_memory_mb"] - frozen["step_memory_mb"])  # fmt: skip
        print(f"\n4. Captioner training, setup {name!r}: LM {setup.lm!r}, {setup.captioner.image_size} px, "
              f"batch {setup.batch_size}, {'bf16' if setup.bf16 else 'float32'}{', compiled' if setup.compile else ''}"
              f"{f', captions in {setup.length_groups} length groups' if setup.length_groups else ''}"
              f", fastest of {rounds} steps each, in turns")  # fmt: skip
        show([(label, f"{r['images_per_s']:.0f}", f"{r['trained_parameters']:,}", f"{r['step_memory_mb']:.0f}",
               f"{r['flops_per_image'] / 1e9:.3f}", f"{r['achieved_tflops']:.3f}", f"{r['of_matmul']:.0%}",
               f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a") for label, r in rows.items()],
             ("LM", "images/s", "trained params", "step MB", "GFLOP/image", "TFLOP/s", "of matmul", "MFU"))  # fmt: skip
        print(f"  freezing: {saved['speed']:.2f}x the images/s, {saved['memory_mb']:.0f} MB less memory per step "
              f"(weights: {frozen['weights_mb']:.0f} MB either way)")  # fmt: skip
        if PADDED in rows:
            saved["length_groups_speed"] = frozen["images_per_s"] / rows[PADDED]["images_per_s"]
            print(f"  length groups: {saved['length_groups_speed']:.2f}x the images/s of one batch padded to its "
                  f"longest caption ({PADDED!r})")  # fmt: skip
        if WHOLE in rows:
            saved["prefix_cache_speed"] = frozen["images_per_s"] / rows[WHOLE]["images_per_s"]
            print(f"  prefix as keys and values: {saved['prefix_cache_speed']:.2f}x the images/s of running the "
                  f"prefix positions through every block ({WHOLE!r})")  # fmt: skip
        if BF16 in rows:
            saved["bf16_speed"] = rows[BF16]["images_per_s"] / frozen["images_per_s"]
            print(f"  bf16 autocast: {saved['bf16_speed']:.2f}x the images/s of float32 ({BF16!r}; a bfloat16 "
                  f"{matmul_bf16['n']}^3 matrix product: {matmul_bf16['tflops']:.3f} TFLOP/s, "
                  f"{matmul_bf16['tflops'] / matmul['tflops']:.2f}x the float32 one)")  # fmt: skip
        print("  step MB: tensor memory the first step adds (kept activations, gradients, AdamW state)")
        print("  GFLOP/image: matrix products and convolutions, forward + backward, counted; forward by part: "
              + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in frozen["forward_flops_per_image"].items()))
        print(f"  of matmul: share of the {matmul['tflops']:.3f} TFLOP/s a {matmul['dtype']} {matmul['n']}^3 matrix "
              f"product reaches here{' (for the bf16 row: the bfloat16 one)' if matmul_bf16 else ''}; "
              f"MFU: share of the datasheet's dense bf16 peak, "
              f"{f'{peak} TFLOP/s' if peak else 'not known for this device'}")  # fmt: skip
        if name == "gpu-224":
            print("  target: MFU >= 40% on an H100, LM frozen")
        results.append(dict(setup=name, batch_size=setup.batch_size, image_size=setup.captioner.image_size,
                            bf16=setup.bf16, compiled=setup.compile, matmul=matmul, peak_tflops=peak,
                            frozen=frozen, fine_tuned=tuned, padded=rows.get(PADDED), whole_prefix=rows.get(WHOLE),
                            bf16_autocast=rows.get(BF16), matmul_bf16=matmul_bf16, saves=saved))  # fmt: skip
    return results


# ---- the run ------------------------------------------------------------------------------------


def main() -> None:
    """Parse the arguments, run the four sections, print the tables, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: a smoke run of seconds")
    parser.add_argument("--json", metavar="PATH", help="also write every number to PATH as JSON")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when there is a GPU, else cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(N) first (default: torch's, one per core)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None or args.quick:
        torch.set_num_threads(args.threads or 1)  # --quick: tiny models only lose time to synchronising threads
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what stays in float32
    sizes = QUICK if args.quick else GPU if device.type == "cuda" else CPU
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    env = dict(device=gpu or "cpu", torch=torch.__version__, transformers=transformers.__version__,
               threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
               python=platform.python_version())  # fmt: skip
    print(f"minivlm performance benchmark ({'quick' if args.quick else 'full'})")
    print("  " + ", ".join(f"{k} {v}" for k, v in env.items()))
    start = time.perf_counter()
    with torch.inference_mode():
        forward = bench_forward(sizes, device)
        lm = cast(load_lm(sizes.lm, device)[0], device)
        hf = cast(lm.to_hf().eval(), device)
        generation, beam = bench_generation(lm, hf, sizes, device), bench_beam(lm, sizes, device)
    training = bench_training(sizes, device)
    results = dict(env=env, sizes=asdict(sizes), forward=forward, generation=generation, beam=beam,
                   training=training, total_s=time.perf_counter() - start)  # fmt: skip
    print(f"\ntotal {results['total_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
