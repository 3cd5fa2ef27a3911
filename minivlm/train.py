"""Training the captioner: only the vision side learns, and a run can stop and resume exactly where it was.

What it teaches: the training loop of Frozen (Tsimpoukelli et al., 2021, "Multimodal Few-Shot Learning
with Frozen Language Models") and ClipCap (Mokady et al., 2021), and the habits that make a long run
safe to interrupt. The optimiser holds only `captioner.trainable_parameters()`, the encoder's and the
mapper's weights; the LM passes gradients through to the prefix but never takes a step itself. The
recipe is nanoGPT's, as in `minivlm.lm.pretrain`: AdamW with decay on weight matrices only, linear
warm-up then cosine decay (`minivlm.lm.learning_rate`), gradient clipping. On a GPU the forward pass
runs under bfloat16 autocast; on the CPU it stays in float32 (`TrainConfig.precision` can say otherwise).

Batches come from a DataLoader whose batch sampler hands out each step's indices (`StepBatches`):
with `workers`, other processes tokenise and pad the next batches while the GPU computes, into pinned
(page-locked) memory, from which `.to(device, non_blocking=True)` copies without stalling the GPU.
The "gpu" presets add the real GPT-2 124M, larger images and, optionally, `torch.compile`. Under
`torchrun --nproc_per_node W -m minivlm train ...` W processes train together, each on its share of
every batch (`minivlm.distributed` explains how they stay one run).

Two control experiments run through the same loop; compare their loss curves with the main run's:
- `lm_init="random"`: the LM's architecture with random weights, still frozen (the Frozen paper's
  "from scratch" row). The vision side starts from the same weights as in the main run.
- `CaptionerConfig(train_lm=True)`: the LM is fine-tuned as well. Frozen found that this fits the
  captions better but loses what the LM knew from text.

Resuming is exact: on the CPU, a run stopped at step s and resumed ends with bit-identical weights and
losses to a run that never stopped. Three things make it so. (1) The batch of step s is a pure function
of (seed, s) (`batch_indices`), not of how far a data loader had got, and so are the colour words that
`colour_swap` swaps in its captions. (2) The optimiser's state is
saved with the weights: AdamW keeps two running averages for every weight, and restarting them at zero
would change every later step. (3) The learning rate is a function of the step alone.

A checkpoint holds only what training changed (`learned_state`), never the frozen LM, which is rebuilt
from its spec: kilobytes to megabytes, not GPT-2's 500 MB. Each file is written under a temporary name
and renamed into place, so a crash during a save leaves the previous checkpoint as it was:

    out_dir/config.json            the TrainConfig (with the captioner's config and the LM spec)
    out_dir/trainable.safetensors  the learned weights, under the captioner's state-dict names
    out_dir/optimizer.pt           AdamW's state, the step and the random state: what an exact resume needs
    out_dir/history.json           loss, learning rate and gradient norm of every step so far

Axis letters: N training images, B batch, T caption tokens, D the LM's width.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from minivlm import distributed
from minivlm.captioner import CAPTIONER_PRESETS, Captioner, CaptionerConfig
from minivlm.cnn import CNN_PRESETS, CNNConfig
from minivlm.data.captions import IGNORE_INDEX, CaptionCollator, ShapesCaptions, swap_words, word_ids
from minivlm.data.shapes import COLOURS, ShapesWorld
from minivlm.gpt2 import GPT2, GPT2Config
from minivlm.lm import freeze, learning_rate, load_frozen_lm
from minivlm.prefix import word_alignment_loss, word_view_loss

__all__ = [
    "LM_INITS", "PRECISIONS", "TrainConfig", "TRAIN_PRESETS", "batch_indices", "StepBatches", "batch_loader",
    "learned_state", "train", "read_config", "load_captioner", "course_captioner", "keep_in_cache", "native_bf16",
]  # fmt: skip

LM_INITS = ("pretrained", "random")  # the LM as loaded, or its architecture with random weights (a control)
PRECISIONS = ("auto", "bf16", "fp32")  # autocast: bfloat16 on a GPU and float32 on the CPU, or either everywhere
# fields a resumed run may change: they decide how fast and how loudly it runs, not what it learns
BOOKKEEPING = ("sample_every", "checkpoint_every", "threads", "compile", "workers", "prefetch", "length_groups")
# fields younger than the captioner cache: at their defaults they train as before and leave a cache name as it was
ADDED_FIELDS = ("precision", "compile", "workers", "prefetch", "word_alignment", "length_groups", "colour_swap")
CAPTIONER_ADDED_FIELDS = ("prefix_depth", "word_view")  # the same, of CaptionerConfig
CNN_ADDED_FIELDS = ("colour", "colour_pool")  # the same, of CNNConfig
CONFIG, WEIGHTS, OPTIMIZER, HISTORY = "config.json", "trainable.safetensors", "optimizer.pt", "history.json"
PASSED = "passed to train()"  # the LM source recorded when the LM was an argument, not a spec
CAPTIONER_CACHE_VERSION = 2  # bump when training code or data change what a config trains: cached captioners retrain (2: canonical captions)
SAMPLES = 2  # training images whose generated captions are printed every sample_every steps


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a captioner training run: the LM, the vision side, the data and the recipe."""

    # the language model
    lm: str = "course"  # load_frozen_lm spec: "course[:preset]", a hub name, or a save_pretrained directory
    lm_init: str = "pretrained"  # one of LM_INITS; "random" is the control with an untrained, frozen LM
    # the vision side: encoder, mapper, P, the image size S, and train_lm (the fine-tuned-LM control)
    captioner: CaptionerConfig = CAPTIONER_PRESETS["cpu"]
    # the data
    train_images: int = 20_000  # N: the first N images of the shapes world's "train" split
    data_seed: int = 0  # the shapes world's seed: which scenes those N are
    max_length: int = 48  # most tokens in a caption, EOT included; a longer caption is an error, never cut
    # the recipe
    batch_size: int = 64  # B: images per step
    steps: int = 2_800  # optimiser steps; 179,200 images (the cpu preset), 7 to 17 min on 2 CPU cores (the budget is 5)
    lr: float = 1e-3  # peak learning rate, reached after the warm-up
    warmup: int = 100  # steps of linear warm-up from 0; then cosine decay to 10% of lr
    weight_decay: float = 0.01  # AdamW decay, on weight matrices only
    grad_clip: float = 1.0  # the gradients' global norm is clipped to this
    seed: int = 0  # the vision side's init, the batch order, and the random LM of lm_init="random"
    word_alignment: float = 0.0  # weight of prefix.word_alignment_loss beside the caption's (0: captioning alone)
    colour_swap: float = 0.0  # the chance that each colour word of a caption's input is swapped for another colour,
    # its label kept (`minivlm.data.captions.swap_words`): the shape after it must come from the image (0: never)
    # bookkeeping: none of it changes what is learned (see BOOKKEEPING)
    sample_every: int = 250  # print sample captions every this many steps (0: never)
    checkpoint_every: int = 500  # with an out_dir, save a checkpoint every this many steps and at the end
    threads: int | None = None  # CPU threads while training (None: PyTorch's default)
    # speed: how fast the same steps run
    precision: str = "auto"  # one of PRECISIONS; bfloat16 rounds, so it is not bookkeeping
    compile: bool = False  # torch.compile the captioner: about a minute of compiling, then faster steps on a GPU
    workers: int = 0  # DataLoader processes that build the next batches while this one trains (0: none)
    prefetch: int = 2  # batches each worker keeps ready
    length_groups: int = 0  # G > 0: the LM reads each batch in G groups of similar caption length, padded
    # to their own longest (`Captioner.forward`); the same loss, fewer padded positions (0: one padded batch)

    def __post_init__(self):
        if self.lm_init not in LM_INITS:
            raise ValueError(f"lm_init must be one of {LM_INITS}, got {self.lm_init!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.captioner, CaptionerConfig):
            raise ValueError(f"captioner must be a CaptionerConfig, got {type(self.captioner).__name__}")
        for name in ("train_images", "batch_size", "steps", "checkpoint_every", "prefetch"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.batch_size > self.train_images:
            raise ValueError(f"batch_size={self.batch_size} is more than train_images={self.train_images}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be in [0, steps={self.steps}), got {self.warmup}")
        for name in ("lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("weight_decay", "sample_every", "data_seed", "seed", "workers", "word_alignment", "length_groups"):
            if not getattr(self, name) >= 0:  # written so that NaN fails too
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.colour_swap <= 1:
            raise ValueError(f"colour_swap must be a probability in [0, 1], got {self.colour_swap!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 (a token and EOT), got {self.max_length}")

    def bf16(self, device: torch.device) -> bool:
        """Whether the forward pass runs under bfloat16 autocast here ("auto": on a GPU, never on a CPU).

        On a CPU with bfloat16 instructions (`native_bf16`) the cpu preset gained 5% a step under autocast
        and 5-8% of a whole run (`bench/perf.py`, `bench/captioner.py --table precision`): not worth a
        default that trains differently on CPUs with and without them.
        """
        return self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda")

    @property
    def normalize_images(self) -> bool:
        """ImageNet-normalise the images: what a pretrained ResNet expects; a CNN from scratch takes [0, 1]."""
        return self.captioner.encoder_weights is not None

    def to_dict(self) -> dict:
        """The config as plain JSON-able values, the captioner's config nested."""
        return asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> TrainConfig:
        """The inverse of to_dict."""
        return cls(**{**fields, "captioner": CaptionerConfig(**fields["captioner"])})


# "gpu": the real GPT-2 124M from the hub, frozen, on one GPU (or several: batch_size is the global
# batch), 64-pixel images; the mapper and P are the CPU ablation's best. A starting point, not yet
# measured on a GPU. Offline there are no GPT-2 weights; a benchmark of the same compute passes the
# architecture and a tokenizer itself: train(replace(TRAIN_PRESETS["gpu"], lm_init="random"),
# lm=GPT2(GPT2Config.from_preset("gpt2")), tokenizer=...), which trains against random weights.
_GPU = TrainConfig(lm="gpt2", captioner=replace(CAPTIONER_PRESETS["cpu"], image_size=64, mapper="linear",
                                                prefix_length=8),
                   train_images=50_000, batch_size=128, steps=4_000, warmup=200, sample_every=500,
                   checkpoint_every=1_000, workers=4, prefetch=4)  # fmt: skip

# "tiny": a smoke run of seconds with the tiny course LM (its 300-token BPE spells a caption in up to 58
# tokens). "cpu": the course's run, 7 to 17 minutes on 2 CPU cores (the README has the times). Its CNN sees
# shape apart from colour (`CNNConfig.colour` in the cpu CNN preset): one CNN for both rarely named a held-out
# colour–shape pair (`bench/captioner.py --table colour`). Its mapper writes a prefix vector per cell of the
# CNN's 4 x 4 grid, by one linear map (`minivlm.prefix.GridMapper`, P = 16): with one vector for the whole
# image, an MLP, it paired the scene's colours and shapes into pairs seen in training (`bench/captioner.py
# --table mapper`). Its prefix is read by all 4 blocks of the course LM
# (prefix_depth): through its input alone, the small frozen LM rarely said three objects right, even given the
# scenes' true attributes (`bench/diagnose.py --oracle-depth`).
# 30% of its captions' colour words are swapped for another colour in the LM's input (colour_swap; the labels
# stay true): the captioner learns to have the frozen LM name a shape from the image, not from the colour before
# it. Over seeds 0 to 4 it raised the worst held-out exact match from 79.0% to 89.9% (README: "A change that rescues
# the failing seed").
# Every step sees 64 new images (179,200 = 2,800 steps of 64; rendering them takes seconds): with 20,000
# images seen 9 times each, the deep prefix fit the training captions far better than new ones.
# Its LM reads short, middling and long captions apart (length_groups), which skips most of a batch's padding.
# It has a word view of 5 vectors, a one-object caption's tokens (`CaptionerConfig.word_view`), which few-shot
# prompts show images as (`bench/fewshot.py`): through the prefix, images did not bind to names in context.
# "cpu-words": "cpu" with its prefix also written in words (`minivlm.prefix.word_alignment_loss`), for
# few-shot prompting. "gpu-224": "gpu" at ImageNet's 224 pixels; its 20,000 images take 3 GB as uint8,
# rendered once by each process.
_CPU = TrainConfig(captioner=replace(CAPTIONER_PRESETS["cpu"], mapper="grid", prefix_length=16, prefix_depth=4,
                                     word_view=5),
                   train_images=179_200, length_groups=3, colour_swap=0.3)  # fmt: skip
TRAIN_PRESETS: dict[str, TrainConfig] = {
    "tiny": TrainConfig(lm="course:tiny", captioner=CAPTIONER_PRESETS["tiny"], train_images=512, max_length=64,
                        batch_size=16, steps=40, lr=3e-3, warmup=4, sample_every=20, checkpoint_every=20,
                        threads=1),  # fmt: skip
    "cpu": _CPU,
    "cpu-words": replace(_CPU, word_alignment=0.3),
    "gpu": _GPU,
    "gpu-224": replace(_GPU, captioner=replace(_GPU.captioner, image_size=224), train_images=20_000),
}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware: a GPU, or a CPU with AVX-512 BF16 or AMX.

    Without them bfloat16 is emulated. With them it is no sure gain either: on the course's 2-core AMD EPYC
    (AVX-512 BF16) a large bfloat16 matrix product ran 2.4 times as fast as a float32 one, yet the cpu
    preset's training step only 1.05 times (bench/perf.py, section 4, measures both where this returns True).
    """
    if device.type == "cuda":
        return True
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private to torch.cpu: absent means no
    return device.type == "cpu" and any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
    """The B image indices of step `step`: a pure function of (seed, step), so a resumed run sees the same batches.

    Each epoch is a permutation of the N images from `np.random.default_rng([seed, epoch])`; its steps
    take consecutive slices of it, and the last N mod B images of the permutation sit that epoch out.
    """
    epoch, k = divmod(step, n // batch_size)
    return _epoch_order(seed, epoch, n)[k * batch_size : (k + 1) * batch_size]  # (B,)


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The epoch's permutation of range(n), (N,), drawn once (a step's batch is a slice of it), read-only."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.setflags(write=False)
    return order


class StepBatches(Sampler[list[int]]):
    """A DataLoader's batch sampler: step s's `batch_indices`, this rank's share of them, from step `start` on.

    It hands out lists of indices; the loader (and its workers) turn each into a batch. With W ranks,
    each takes its shard of the one global batch of B (`minivlm.distributed.shard`).
    """

    def __init__(self, config: TrainConfig, start: int = 0, rank: int = 0, world: int = 1):
        if config.batch_size % world:
            raise ValueError(f"batch_size={config.batch_size} is the global batch and must split evenly over "
                             f"the {world} processes; choose a multiple of {world}")  # fmt: skip
        self.seed, self.n, self.batch_size = config.seed, config.train_images, config.batch_size
        self.steps = range(start, config.steps)
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self):
        for step in self.steps:
            indices = batch_indices(self.seed, step, self.n, self.batch_size)  # (B,)
            yield distributed.shard(indices, self.rank, self.world).tolist()  # (B / W,)


def batch_loader(config: TrainConfig, dataset: ShapesCaptions, tokenizer, start: int = 0, *, rank: int = 0,
                 world: int = 1, pin_memory: bool = False) -> DataLoader:  # fmt: skip
    """The batches of a run's steps from `start` on, built by `config.workers` processes ahead of the training loop.

    With workers=0 the training process builds each batch when it is asked for. pin_memory: put the
    batches in page-locked memory, from which a copy to the GPU can run while the GPU computes.
    """
    return DataLoader(dataset, batch_sampler=StepBatches(config, start, rank, world),
                      collate_fn=CaptionCollator(tokenizer, config.max_length), num_workers=config.workers,
                      prefetch_factor=config.prefetch if config.workers else None, pin_memory=pin_memory,
                      generator=torch.Generator())  # its own generator: the global random state is left alone


def learned_state(captioner: Captioner) -> dict[str, Tensor]:
    """What training changes, by state-dict name: the trainable parameters, and the vision side's buffers.

    With a frozen LM, nothing of the LM. The buffers are the mapper's target length for prefix vectors
    and, with a ResNet encoder, BatchNorm's running statistics, which training updates without a gradient.
    """
    state = captioner.state_dict()
    names = {name for name, p in captioner.named_parameters() if p.requires_grad}  # tied weights once
    names |= {name for name, _ in captioner.named_buffers() if not name.startswith("lm.")}
    return {name: state[name].detach().cpu().contiguous() for name in sorted(names) if name in state}


def _adamw(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (biases and norm gains keep theirs), as in `minivlm.lm.pretrain`.

    fused=True: one kernel updates every parameter, instead of several passes over memory per step. With a
    prefix read by every block the mapper has millions of weights, and the unfused update was a large
    share of a CPU training step.
    """
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=True)


def _resolve(config: TrainConfig | str) -> TrainConfig:
    if isinstance(config, str):
        if config not in TRAIN_PRESETS:
            raise ValueError(f"unknown training preset {config!r}; choose one of {sorted(TRAIN_PRESETS)}")
        return TRAIN_PRESETS[config]
    return config


def _run_lm(config: TrainConfig, lm: nn.Module, passed: bool) -> nn.Module:
    """The LM this run trains against: `lm`, or a random LM of its architecture, frozen unless train_lm."""
    if config.lm_init == "random":
        arch = lm.config if isinstance(lm, GPT2) else GPT2Config.from_hf(lm.config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            return freeze(GPT2(arch))
    if config.captioner.train_lm and passed:
        return copy.deepcopy(lm)  # the fine-tuning control trains its own copy, never the caller's LM
    return lm


def _build_captioner(config: TrainConfig, lm: nn.Module) -> Captioner:
    """The captioner around `lm`, its vision side drawn from config.seed (the caller's random state is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return Captioner.from_config(lm, config.captioner)


def _lm_record(lm: nn.Module, source: str) -> dict:
    table = lm.get_input_embeddings()
    return {"source": source, "width": table.embedding_dim, "vocab_size": table.num_embeddings}


def _check_lm(record: dict, lm: nn.Module, out_dir: Path) -> None:
    """A clear error, not a shape mismatch deep in load_state_dict, when `lm` is not the kind trained against."""
    ours = _lm_record(lm, "")
    if (ours["width"], ours["vocab_size"]) != (record["width"], record["vocab_size"]):
        raise ValueError(
            f"the checkpoint in {out_dir} was trained against an LM of width D={record['width']} and "
            f"{record['vocab_size']} tokens; this LM has D={ours['width']} and {ours['vocab_size']} tokens. "
            f"A visual prefix only means something to the LM it was trained for ({record['source']})"
        )


# ---- checkpoints ---------------------------------------------------------------------------------


def _write_atomically(out_dir: Path, writers: dict[str, Callable[[Path], object]]) -> None:
    """Write each file to a temporary name and flush it to disk, then rename them all into place.

    A failure while writing leaves only temporary files, removed here, and the old checkpoint intact:
    os.replace swaps a whole file in one step. The renames are not one step together, so every file
    records the step it belongs to, and resuming checks that they agree.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    temps: dict[str, Path] = {}
    try:
        for name, write in writers.items():
            temps[name] = out_dir / f".{name}.{os.getpid()}.partial"
            write(temps[name])
            with open(temps[name], "rb+") as f:  # on disk before the rename: a rename can land before the data
                os.fsync(f.fileno())
        for name, temp in temps.items():
            os.replace(temp, out_dir / name)
    finally:
        for temp in temps.values():
            temp.unlink(missing_ok=True)


def _save_checkpoint(out_dir: Path, step: int, config: TrainConfig, lm_record: dict, captioner: Captioner,
                     optimizer: torch.optim.Optimizer, history: dict) -> None:  # fmt: skip
    weights = learned_state(captioner)
    # The optimiser's moments and the random state: without them a resumed run would take different steps.
    state = {"step": step, "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
    saved = {"train": config.to_dict(), "lm": lm_record}
    _write_atomically(out_dir, {
        CONFIG: lambda path: path.write_text(json.dumps(saved, indent=1)),
        WEIGHTS: lambda path: save_file(weights, path, metadata={"step": str(step)}),
        OPTIMIZER: lambda path: torch.save(state, path),
        HISTORY: lambda path: path.write_text(json.dumps({"step": step, **history})),
    })  # fmt: skip


def _require(out_dir: Path, names: tuple[str, ...]) -> None:
    missing = [name for name in names if not (out_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{out_dir} holds no complete checkpoint: {', '.join(missing)} missing; "
                                f"train(config, out_dir={str(out_dir)!r}) writes one")  # fmt: skip


def read_config(out_dir: str | Path) -> TrainConfig:
    """The TrainConfig a checkpoint directory was trained with."""
    out_dir = Path(out_dir)
    _require(out_dir, (CONFIG,))
    return TrainConfig.from_dict(json.loads((out_dir / CONFIG).read_text())["train"])


def _load_learned(captioner: Captioner, path: Path) -> int:
    """Load trainable.safetensors into the captioner, refusing names or shapes that do not fit; return its step."""
    weights, expected = load_file(path), learned_state(captioner)
    if set(weights) != set(expected):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise ValueError(f"{path} does not fit this captioner: missing {missing[:4]}, unexpected {extra[:4]}")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, the captioner's has "
                             f"{tuple(expected[name].shape)}")  # fmt: skip
    captioner.load_state_dict(weights, strict=False)  # strict=False: the frozen LM's keys are not in the file
    with safe_open(path, "pt") as f:
        return int(f.metadata()["step"])


def load_captioner(out_dir: str | Path, lm: nn.Module | None = None) -> Captioner:
    """A trained captioner (eval mode, CPU) from a checkpoint: its config, the frozen LM, the learned weights.

    The LM comes from the recorded spec (`load_frozen_lm`) unless passed; it must be the one trained
    against, and must be passed when train() was given it. Its tokenizer: `load_frozen_lm(config.lm)`.
    """
    out_dir = Path(out_dir)
    _require(out_dir, (CONFIG, WEIGHTS))
    saved = json.loads((out_dir / CONFIG).read_text())
    config = TrainConfig.from_dict(saved["train"])
    passed = lm is not None
    if lm is None:
        if saved["lm"]["source"] == PASSED:
            raise ValueError(f"the captioner in {out_dir} was trained against an LM passed to train(), not "
                             f"a spec; pass the same LM: load_captioner({str(out_dir)!r}, lm=...)")  # fmt: skip
        lm = load_frozen_lm(config.lm)[0]
    lm = _run_lm(config, lm, passed)
    _check_lm(saved["lm"], lm, out_dir)
    # The ResNet weights file, if any, is not needed: every weight it held is in the checkpoint (but fc, unused).
    captioner = _build_captioner(replace(config, captioner=replace(config.captioner, encoder_weights=None)), lm)
    _load_learned(captioner, out_dir / WEIGHTS)
    return captioner.eval()


def _cache_name(preset: str) -> str:
    """The cache entry of a preset's captioner: the preset and 12 hex digits of a hash of what decides its weights.

    That is its TrainConfig, the shape of its CNN preset (the config names the preset only), the LM's
    identity (for the course LM, its own cache key) and CAPTIONER_CACHE_VERSION. A field that came later
    (ADDED_FIELDS, CAPTIONER_ADDED_FIELDS, CNN_ADDED_FIELDS) counts only where it differs from its default.
    """
    from minivlm.lm import LM_PRESETS, cache_key

    def known(fields: dict, added: tuple[str, ...], default) -> dict:
        return {k: v for k, v in fields.items() if k not in added or v != getattr(default, k)}

    config = _resolve(preset)
    name, _, lm_preset = config.lm.partition(":")
    lm_identity = cache_key(LM_PRESETS[lm_preset or "cpu"]) if name == "course" else config.lm
    fields = known(config.to_dict(), ADDED_FIELDS, TrainConfig)
    fields["captioner"] = known(fields["captioner"], CAPTIONER_ADDED_FIELDS, CaptionerConfig)
    c = config.captioner
    cnn = known(asdict(CNN_PRESETS[c.cnn_preset]), CNN_ADDED_FIELDS, CNNConfig) if c.encoder == "cnn" else None
    text = json.dumps({"version": CAPTIONER_CACHE_VERSION, "lm": lm_identity, "cnn": cnn, "train": fields},
                      sort_keys=True)  # fmt: skip
    return f"{preset}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def course_captioner(preset: str = "cpu", *, retrain: bool = False, progress: bool = True) -> tuple[Captioner, object, dict]:
    """The course's trained captioner of a TRAIN_PRESETS preset, its tokenizer and info: from the cache, or trained once.

    What the lessons after lesson 06 start from, so a learner may open any of them first. The cache
    entry is named by `_cache_name`; training writes to a temporary folder renamed into place at the
    end, so an interrupted run leaves no half-made entry. info: the config, the training history and
    the cache path.
    """
    from minivlm.lm import cache_dir

    config = _resolve(preset)
    lm, tokenizer = load_frozen_lm(config.lm)
    directory = cache_dir() / "captioner" / _cache_name(preset)
    if retrain or not (directory / WEIGHTS).is_file():
        _make_entry(directory, lambda temp: train(config, lm=lm, tokenizer=tokenizer, out_dir=temp, progress=progress))
        print(f"captioner '{preset}' cached in {directory}")
    captioner = load_captioner(directory, lm=lm)
    history = json.loads((directory / HISTORY).read_text())
    history.pop("step")
    return captioner, tokenizer, {"config": config, "history": history, "path": str(directory)}


def keep_in_cache(preset: str, out_dir: str | Path) -> Path | None:
    """Make a finished run of a preset's exact config its `course_captioner` cache entry, if it has none yet.

    The demo trains the cpu preset into its report folder; without this, the lessons and benchmarks
    that call course_captioner("cpu") afterwards would train the same captioner again. The run is
    copied (the report keeps its own checkpoint), into a temporary folder renamed into place. Returns
    the cache entry, or None where the run's config is not the preset's (other steps, say) or an entry
    is already there.
    """
    from minivlm.lm import cache_dir

    directory = cache_dir() / "captioner" / _cache_name(preset)
    if read_config(out_dir).to_dict() != _resolve(preset).to_dict() or (directory / WEIGHTS).is_file():
        return None
    _make_entry(directory, lambda temp: shutil.copytree(out_dir, temp))
    return directory


def _make_entry(directory: Path, fill: Callable[[Path], object]) -> None:
    """Fill a temporary folder beside `directory`, then rename it into place: no half-made cache entry survives."""
    temp = directory.with_name(f".{directory.name}.{os.getpid()}.partial")
    shutil.rmtree(temp, ignore_errors=True)
    try:
        fill(temp)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(temp, directory)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _resume(out_dir: Path, config: TrainConfig, captioner: Captioner,
            optimizer: torch.optim.Optimizer) -> tuple[int, dict]:  # fmt: skip
    """Load a checkpoint into captioner and optimizer; return (its step, its history)."""
    _require(out_dir, (CONFIG, WEIGHTS, OPTIMIZER, HISTORY))
    saved = json.loads((out_dir / CONFIG).read_text())
    ours, theirs = config.to_dict(), TrainConfig.from_dict(saved["train"]).to_dict()  # fields it predates: defaults
    changed = [k for k in ours if k not in BOOKKEEPING and theirs[k] != ours[k]]
    if changed:
        raise ValueError(f"the checkpoint in {out_dir} was trained with other {', '.join(changed)}; resume it with "
                         f"the same config (read_config(out_dir)) or train into another out_dir")  # fmt: skip
    _check_lm(saved["lm"], captioner.lm, out_dir)
    device = next(captioner.parameters()).device
    step = _load_learned(captioner, out_dir / WEIGHTS)
    state = torch.load(out_dir / OPTIMIZER, map_location=device, weights_only=True)
    history = json.loads((out_dir / HISTORY).read_text())
    if not step == state["step"] == history.pop("step") == len(history["loss"]):
        raise ValueError(f"the files in {out_dir} are from different steps (a save was cut off between renames); "
                         f"start again in a fresh out_dir")  # fmt: skip
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"].cpu())
    return step, history


# ---- the loop ------------------------------------------------------------------------------------


def train(config: TrainConfig | str = "cpu", *, lm: nn.Module | None = None, tokenizer=None,
          out_dir: str | Path | None = None, resume: bool = False, progress: bool = True,
          callback: Callable[[int, Captioner, dict], object] | None = None) -> tuple[Captioner, dict]:  # fmt: skip
    """Train a captioner's vision side against a frozen LM; return (captioner in eval mode, history).

    lm and tokenizer: pass both (a model built in a notebook or test), or neither (config.lm is loaded).
    out_dir: where checkpoints go (none without one); resume=True continues the checkpoint there (or
    starts one), and without resume an existing checkpoint is an error rather than overwritten.
    callback(step, captioner, history) runs after each step and its checkpoint, `step` steps done.
    history: per-step "loss" (the caption's), "lr" and "grad_norm", with word_alignment "word_loss", and with a
    word view (`CaptionerConfig.word_view`) "word_view_loss". The word view's head learns from its own loss
    alone, clipped apart, so the rest of the captioner trains exactly as it would without it.
    The caller's random state is left as it was.
    Started by torchrun, every rank calls train() and gets the same result; rank 0 alone prints and
    writes (`minivlm.distributed`), and the callback runs on every rank.
    """
    config = _resolve(config)
    if (lm is None) != (tokenizer is None):
        raise ValueError("pass lm and tokenizer together, or neither to load config.lm")
    if resume and out_dir is None:
        raise ValueError("resume=True needs the out_dir of the run to resume")
    with distributed.process_group():  # under torchrun: join the other ranks, and leave with them at the end
        passed = lm is not None
        if lm is None:
            with distributed.main_first():  # rank 0 pretrains the course LM or downloads GPT-2 alone
                lm, tokenizer = load_frozen_lm(config.lm)
        lm_record = _lm_record(lm, PASSED if passed else config.lm)
        threads = torch.get_num_threads()
        if config.threads:
            torch.set_num_threads(config.threads)
        try:
            with torch.random.fork_rng(devices=[]):
                return _train(config, _run_lm(config, lm, passed), tokenizer, lm_record,
                              None if out_dir is None else Path(out_dir), resume, progress, callback)  # fmt: skip
        finally:
            torch.set_num_threads(threads)


def _train(config: TrainConfig, lm: nn.Module, tokenizer, lm_record: dict, out_dir: Path | None, resume: bool,
           progress: bool, callback) -> tuple[Captioner, dict]:  # fmt: skip
    device = distributed.device()  # this rank's GPU, a GPU, or the CPU
    main = distributed.is_main()  # rank 0 (or the only process): the one that prints and writes
    colours = word_ids(tokenizer, COLOURS) if config.colour_swap else None  # (K,) the colour words' token ids; first,
    # as a tokenizer that spells a colour in several tokens is an error
    captioner = _build_captioner(config, lm).to(device).train()
    params = captioner.trainable_parameters()
    optimizer = _adamw(params, config)
    head = set(captioner.word_mapper.parameters()) if captioner.word_mapper is not None else set()
    clipped = [[p for p in params if p not in head], [p for p in params if p in head]]  # clipped apart
    start, history = 0, {"loss": [], "lr": [], "grad_norm": [], **({"word_loss": []} if config.word_alignment else {}),
                         **({"word_view_loss": []} if head else {})}  # fmt: skip
    if out_dir is not None and (out_dir / WEIGHTS).exists():  # every rank reads; none has written yet
        if not resume:
            raise FileExistsError(f"{out_dir} already holds a checkpoint; pass resume=True to continue it, "
                                  f"or choose another out_dir")  # fmt: skip
        start, history = _resume(out_dir, config, captioner, optimizer)
    world = ShapesWorld("train", config.captioner.image_size, config.data_seed, config.train_images)
    dataset = ShapesCaptions(world, normalize=config.normalize_images)  # rendered once, N images
    loader = batch_loader(config, dataset, tokenizer, start, rank=distributed.rank(),
                          world=distributed.world_size(), pin_memory=device.type == "cuda")  # fmt: skip
    model = distributed.wrap(captioner)  # with W ranks, DDP: it averages the trainable weights' gradients
    if config.compile:
        model = torch.compile(model)  # the same weights as captioner, which checkpoints and samples use
    samples = torch.stack([dataset[i][0] for i in range(SAMPLES)]).to(device)  # (SAMPLES, 3, S, S)
    bar = tqdm(loader, initial=start, total=config.steps, desc="training the captioner",
               disable=not (progress and main))  # fmt: skip
    for step, batch in enumerate(bar, start):
        lr = learning_rate(step, peak=config.lr, warmup=config.warmup, steps=config.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if colours is not None:  # the inputs' colour words swapped at random, the labels not; the same draws for a
            # step and rank whenever it runs, so a resumed run swaps as the whole run did (with W ranks, each draws
            # for its share of the batch: other words than one process would swap)
            entropy = np.random.SeedSequence([config.seed, step, distributed.rank()]).generate_state(1, np.uint64)[0]
            draws = torch.Generator().manual_seed(int(entropy))
            batch["input_ids"] = swap_words(batch["input_ids"], colours, config.colour_swap, draws)
        images, ids, mask, labels = (batch[k].to(device, non_blocking=True)
                                     for k in ("images", "input_ids", "attention_mask", "labels"))  # fmt: skip
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16(device)):
            out = model(images, ids, mask, labels, length_groups=config.length_groups)  # out.loss: the mean
            # over this rank's labelled tokens
        # With W ranks: what to backpropagate so that DDP's average is the global batch's gradient, and that mean.
        loss, mean = distributed.token_mean(out.loss, (labels != IGNORE_INDEX).sum())
        if config.word_alignment:  # a mean over this rank's prefix vectors; DDP averages it over the ranks
            table = captioner.lm.get_input_embeddings().weight  # (V, D)
            words = word_alignment_loss(out.prefix[..., : table.shape[1]], table, labels)  # the input slot
            loss = loss + config.word_alignment * words
            history["word_loss"].append(words.item())  # this rank's (rank 0's in the log)
        if head:  # a mean over this rank's word vectors; its gradient reaches the word view's head alone
            view = word_view_loss(out.words, captioner.language_model.get_input_embeddings().weight, labels)
            loss = loss + view
            history["word_view_loss"].append(view.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # with DDP, the gradients are all-reduced as they are computed
        norm = nn.utils.clip_grad_norm_(clipped[0], config.grad_clip)  # the norm before clipping
        if head:
            nn.utils.clip_grad_norm_(clipped[1], config.grad_clip)
        optimizer.step()
        history["loss"].append(mean.item())
        history["lr"].append(lr)
        history["grad_norm"].append(norm.item())
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", refresh=False)
        done = step + 1
        if main and config.sample_every and done % config.sample_every == 0:
            texts = captioner.generate(samples, tokenizer, max_new_tokens=config.max_length)  # greedy
            for text, truth in zip(texts, dataset.captions):
                tqdm.write(f"step {done}: {text!r}\n{'truth':>{len(str(done)) + 5}}: {truth!r}")
        if main and out_dir is not None and (done % config.checkpoint_every == 0 or done == config.steps):
            _save_checkpoint(out_dir, done, config, lm_record, captioner, optimizer, history)
        if callback is not None:
            callback(done, captioner, history)
    optimizer.zero_grad(set_to_none=True)  # the last step's gradients are spent: none left on the weights
    return captioner.eval(), history
