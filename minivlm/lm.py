"""The frozen language model: pretrain the course's small GPT-2 on text, cache it, freeze it, load it.

Frozen (Tsimpoukelli et al., 2021) and ClipCap (Mokady et al., 2021) caption images with a language
model that was pretrained on text alone and is then *frozen*: only the vision side learns. This module
makes that language model. Offline, it pretrains a small GPT-2 (the architecture of Radford et al.,
2019, from `minivlm.gpt2`) on the course corpus (`minivlm.corpus`) with nanoGPT's recipe: packed
documents (in windows that start where a document starts: see `document_starts`), AdamW with decay on
the blocks' weight matrices only, linear warm-up then cosine decay, gradient clipping; one change: its
learned position embeddings start as sinusoids (`sinusoidal_positions`). With internet,
`load_frozen_lm("gpt2")` gives the real GPT-2 instead, behind the same call.

The corpus is split by document index, so evaluation text is never trained on:
held-out [0, H) | tokenizer [H, H + K) | training [H + K, H + K + N)   (see `document_ranges`).

A pretrained model is cached under `<cache>/lm/<preset>-<key>/` as a `save_pretrained` directory, so
any GPT-2 loader can read it; the key is a hash of the whole configuration, so changing anything
retrains. Axis letters: B batch, T tokens, V vocabulary, N tokens in the training stream.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from minivlm import hub
from minivlm.corpus import CorpusConfig, documents
from minivlm.gpt2 import GPT2, GPT2Config
from minivlm.tokenizer import load_tokenizer, tokenizer_for_hub_model, train_tokenizer

__all__ = [
    "CourseLMConfig", "LM_PRESETS", "CACHE_VERSION", "BACKENDS", "cache_key", "cache_dir", "document_ranges",
    "heldout_texts", "course_tokenizer", "token_stream", "document_starts", "learning_rate", "next_token_loss",
    "pretrain", "evaluate_perplexity", "course_lm", "freeze", "load_frozen_lm", "POSITION_INITS", "sinusoidal_positions",
]  # fmt: skip

# Bump when the corpus generator, the tokenizer or the training code change what a configuration
# produces: every cached model then retrains once.
CACHE_VERSION = 8  # 2: windows start at document starts; 3: embeddings not decayed; 4: "fact" documents;
# 5: canonical captions; 6: drills of whole words; 7: "recall" documents, sinusoidal position init;
# 8: binding documents name colours, whatever the number of names
POSITION_INITS = ("sinusoidal", "normal")
BACKENDS = ("minivlm", "transformers")  # our GPT2, or transformers' GPT2LMHeadModel
RECORD = "minivlm.json"  # the configuration and training statistics, next to the weights
M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class CourseLMConfig:
    """Everything that decides the course LM's weights; its hash names the cache directory."""

    # the model: a small GPT-2
    vocab_size: int = 512  # V: BPE tokens, 256 bytes + <|endoftext|> + <|pad|> + merges
    n_positions: int = 256  # context length the model can ever see (captioning needs prefix + caption)
    n_embd: int = 128  # D: width
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    position_init: str = "sinusoidal"  # how the learned position embeddings start: "sinusoidal" (see
    # `sinusoidal_positions`) or "normal" (GPT-2's N(0, 0.02), like every other weight)
    # the text
    corpus: CorpusConfig = CorpusConfig()  # which documents, in what mix
    heldout_documents: int = 2_000  # documents 0.. never trained on: perplexity is measured on them
    tokenizer_documents: int = 20_000  # the next documents: what the BPE merges are learned from
    train_documents: int = 60_000  # the documents after those: the training token stream
    # the training
    block_size: int = 128  # T: tokens per training sequence, a window of the packed stream, from a document start
    batch_size: int = 8  # B: sequences per step. Small, so that the same tokens make many steps: copying
    # (induction heads) forms after a plateau that is counted in optimiser steps more than in tokens. With
    # B = 32 and 1,000 steps the course LM copied captions by their grammar and never a list of words
    # (`bench/lm.py`, "list copy"); with B = 8 and 4,000 steps, the same tokens, and drills of whole
    # words (`minivlm.corpus`), it copies both.
    short_steps: int = 2_400  # the first steps train on short windows: copying (induction heads) forms
    # far sooner in short contexts, its onset time growing about quadratically with context length
    # (Musat et al., 2025, "On the Emergence of Induction Heads for In-Context Learning")
    short_block_size: int = 32  # T of those first steps; B grows so that a step sees as many tokens
    steps: int = 6_000  # optimiser steps; tokens seen = steps * B * T (about 4 minutes on 2 CPU cores).
    # Name binding is learned last: in scratch runs with 4,000 steps it bound names in 2-way text episodes
    # far less often than with 6,000 (`bench/lm.py` measures it; the README has the figures)
    lr: float = 2e-3  # peak learning rate, reached after the warm-up
    warmup: int = 600  # steps of linear warm-up from 0; then cosine decay to 10% of lr
    weight_decay: float = 0.1  # AdamW decay, on the blocks' weight matrices only (not embeddings, as in minGPT)
    grad_clip: float = 1.0  # the gradient's global norm is clipped to this
    seed: int = 0  # model init and batch order
    threads: int | None = None  # CPU threads while training (None: PyTorch's default); not part of the key

    def __post_init__(self):
        if self.block_size > self.n_positions:
            raise ValueError(f"block_size={self.block_size} is longer than the context n_positions={self.n_positions}")
        if not 0 < self.short_block_size <= self.block_size or self.short_steps < 0:
            raise ValueError(f"need 0 < short_block_size <= block_size and short_steps >= 0, got "
                             f"short_block_size={self.short_block_size}, short_steps={self.short_steps}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be in [0, steps={self.steps}), got {self.warmup}")
        if self.position_init not in POSITION_INITS:
            raise ValueError(f"unknown position_init {self.position_init!r}; choose one of {POSITION_INITS}")

    @property
    def gpt2(self) -> GPT2Config:
        """The model's configuration. No dropout: a small model barely overfits a stream this large."""
        shape = dict(vocab_size=self.vocab_size, n_positions=self.n_positions, n_embd=self.n_embd,
                     n_layer=self.n_layer, n_head=self.n_head)  # fmt: skip
        return GPT2Config(**shape, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


# "cpu": the course's LM, pretrained once on a laptop CPU. "tiny": for tests, trains in about a second.
LM_PRESETS: dict[str, CourseLMConfig] = {
    "cpu": CourseLMConfig(),
    "tiny": CourseLMConfig(
        vocab_size=300, n_positions=256, n_embd=32, n_layer=2, n_head=2, heldout_documents=50,
        tokenizer_documents=200, train_documents=400, block_size=32, batch_size=16, steps=30, lr=1e-2, warmup=5,
        short_steps=10, short_block_size=16,
        threads=1,  # a model this small only loses time to thread synchronisation
    ),  # fmt: skip
}


def _resolve(config_or_preset: CourseLMConfig | str) -> tuple[str, CourseLMConfig]:
    """(preset name or 'custom', configuration)."""
    if isinstance(config_or_preset, str):
        if config_or_preset not in LM_PRESETS:
            raise ValueError(f"unknown course LM preset {config_or_preset!r}; choose one of {sorted(LM_PRESETS)}")
        return config_or_preset, LM_PRESETS[config_or_preset]
    key = cache_key(config_or_preset)  # a preset with other `threads` is still that preset
    name = next((n for n, c in LM_PRESETS.items() if cache_key(c) == key), "custom")
    return name, config_or_preset


def cache_key(config: CourseLMConfig) -> str:
    """12 hex digits of a hash of the configuration (all but `threads`) and CACHE_VERSION."""
    fields = asdict(replace(config, threads=None))
    text = json.dumps({"cache_version": CACHE_VERSION, "config": fields}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_dir() -> Path:
    """Where minivlm keeps what it builds once: $MINIVLM_CACHE, or ~/.cache/minivlm."""
    return Path(os.environ.get("MINIVLM_CACHE") or "~/.cache/minivlm").expanduser()


def document_ranges(config: CourseLMConfig) -> dict[str, range]:
    """The corpus indices of the held-out, tokenizer and training documents: three disjoint ranges."""
    h, k, n = config.heldout_documents, config.tokenizer_documents, config.train_documents
    return {"heldout": range(0, h), "tokenizer": range(h, h + k), "train": range(h + k, h + k + n)}


def _texts(config: CourseLMConfig, part: str):
    r = document_ranges(config)[part]
    return documents(config.corpus, len(r), start=r.start)


def heldout_texts(config: CourseLMConfig | str = "cpu") -> list[str]:
    """The documents perplexity is measured on; the same for every config with the same corpus."""
    return list(_texts(_resolve(config)[1], "heldout"))


def token_stream(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> Tensor:
    """(N,) token ids: <|endoftext|>, then each document followed by <|endoftext|>, as GPT-2 packs text."""
    eot = tokenizer.eos_token_id
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]  # one batched call, in Rust
    return torch.tensor([eot, *(t for doc in ids for t in (*doc, eot))], dtype=torch.long)


def document_starts(stream: Tensor, eot: int, t: int) -> Tensor:
    """(S,) offsets of the stream's <|endoftext|> tokens that leave a whole window of t tokens after them.

    Training windows start there, so that the first document of every window sits at positions 1, 2, ...
    as a caption does after its prefix. Windows at *any* offset hide what copying needs: in a measured
    toy (repeated one-object captions, GPT-2 of width 64, 2 layers, 64-token windows) a model copied the
    colour after 300 steps with windows at document starts, and never in 800 steps with windows at
    random offsets; the course LM trained at random offsets copied a sentence's shape but not its words.
    The documents later in a window still fall at every position, and the model copies there too.
    """
    starts = (stream[: len(stream) - t + 1] == eot).nonzero()[:, 0]  # (S,)
    if len(starts) == 0:
        raise ValueError(f"no document starts a window of {t} tokens in a stream of {len(stream)}")
    return starts


def sinusoidal_positions(n_positions: int, n_embd: int, rms: float = 0.02) -> Tensor:
    """Vaswani et al.'s (2017) sinusoids, (n_positions, n_embd), scaled to root-mean-square `rms`.

    Row t holds sin(t w_i) and cos(t w_i) for frequencies w_i = 10000^(-2i/D), so the row of t + k is
    row t rotated pair by pair, by angles that depend on k alone: "the position k tokens back" is one
    linear map for every t. A head that looks a fixed number of tokens back then needs only the right
    query and key weights. The course LM starts its learned position embeddings here (`position_init`),
    at the scale of GPT-2's normal init (std 0.02), and trains them like any other weight. Started from
    noise, it learned heads that look one token back (copying needs them) but never one that looks past
    "this is a" to the description a name is bound to (`minivlm.corpus`, "recall").
    """
    if n_embd % 2:
        raise ValueError(f"sinusoidal positions need an even width, got n_embd={n_embd}")
    t = torch.arange(n_positions, dtype=torch.float32)[:, None]  # (T, 1)
    w = torch.exp(-math.log(10000.0) * torch.arange(0, n_embd, 2, dtype=torch.float32) / n_embd)  # (D/2,)
    table = torch.zeros(n_positions, n_embd)
    table[:, 0::2], table[:, 1::2] = torch.sin(t * w), torch.cos(t * w)
    return table * (rms / table.pow(2).mean().sqrt())


def learning_rate(step: int, *, peak: float, warmup: int, steps: int, floor: float = 0.1) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to floor * peak at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)  # 0 -> 1
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def next_token_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of predicting token t + 1 at position t; labels (B, T) are the inputs, -100 where ignored."""
    return F.cross_entropy(
        rearrange(logits[:, :-1], "b t v -> (b t) v"),  # position t predicts ...
        rearrange(labels[:, 1:], "b t -> (b t)"),  # ... token t + 1
        ignore_index=-100,
        reduction=reduction,
    )


def pretrain(config: CourseLMConfig | str = "cpu", *, progress: bool = True) -> tuple[GPT2, PreTrainedTokenizerBase, dict]:
    """Train the BPE tokenizer and a small GPT-2 on the corpus: (model in eval mode, tokenizer, stats).

    Deterministic: the same config gives bit-identical weights on CPU. The caller's random state is
    left as it was (training draws from a forked generator).
    """
    _, config = _resolve(config)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            return _pretrain(config, progress)
    finally:
        torch.set_num_threads(threads)


def course_tokenizer(config: CourseLMConfig | str = "cpu") -> PreTrainedTokenizerBase:
    """The BPE tokenizer a course LM's pretraining trains first, from its corpus alone (seconds; no LM needed)."""
    config = _resolve(config)[1]
    return train_tokenizer(_texts(config, "tokenizer"), config.vocab_size)


def _pretrain(config: CourseLMConfig, progress: bool) -> tuple[GPT2, PreTrainedTokenizerBase, dict]:
    tokenizer = course_tokenizer(config)
    stream = token_stream(tokenizer, list(_texts(config, "train")))  # (N,)
    if len(stream) < config.block_size:
        raise ValueError(f"the training stream has {len(stream)} tokens, fewer than block_size={config.block_size}")
    model = GPT2(config.gpt2).train()
    if config.position_init == "sinusoidal":
        with torch.no_grad():
            model.transformer.wpe.weight.copy_(sinusoidal_positions(config.n_positions, config.n_embd))
    params = list(model.parameters())  # the tied lm_head / wte weight once
    # No decay on the token and position embeddings (minGPT's rule): the differences between " small"
    # and " large" are small at first and useful only once the LM copies; decay wears them away before
    # then (in a trial run, copying of made-up words began by step 1000 without it, and not with it).
    embeddings = {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)}
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2 and id(p) not in embeddings], "weight_decay": config.weight_decay},
            {"params": [p for p in params if p.ndim < 2 or id(p) in embeddings], "weight_decay": 0.0},
        ],
        lr=config.lr,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(config.seed)  # batch offsets
    eot = tokenizer.eos_token_id
    starts = {t: document_starts(stream, eot, t) for t in {config.short_block_size, config.block_size}}
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="pretraining the course LM", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, peak=config.lr, warmup=config.warmup, steps=config.steps)
        t = config.short_block_size if step < config.short_steps else config.block_size
        b = config.batch_size * config.block_size // t  # the same number of tokens in every step
        offsets = starts[t][torch.randint(len(starts[t]), (b,), generator=generator)]  # (B,)
        tokens = stream[offsets[:, None] + torch.arange(t)]  # (B, T) windows from random document starts
        loss = next_token_loss(model(tokens).logits, tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    stats = dict(
        train_seconds=round(time.perf_counter() - start, 2),
        tokens_seen=config.steps * (config.batch_size * config.block_size),
        stream_tokens=len(stream),
        params=sum(p.numel() for p in params),
        first_loss=losses[0],
        final_loss=losses[-1],
        losses=losses,
    )
    optimizer.zero_grad(set_to_none=True)  # no gradients left on the weights: the model as the cache gives it back
    return model.eval(), tokenizer, stats


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], block_size: int, batch_size: int = 64
) -> float:
    """exp(mean next-token loss) over every token of `texts` and their ends: how surprised the LM is.

    Each text is read as in training, <|endoftext|> text <|endoftext|>, cut to block_size tokens.
    Works with our GPT2 and with transformers' GPT2LMHeadModel.
    """
    eot, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [[eot, *ids, eot][:block_size] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        ids = torch.full((len(chunk), max(map(len, chunk))), pad, dtype=torch.long)  # (B, T), right-padded
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = torch.tensor(seq)
        mask = (torch.arange(ids.shape[1]) < torch.tensor([len(s) for s in chunk])[:, None]).long()  # (B, T)
        ids, mask = ids.to(device), mask.to(device)
        logits = model(ids, attention_mask=mask).logits
        total += next_token_loss(logits.float(), ids.masked_fill(mask == 0, -100), reduction="sum").item()
        count += int(mask[:, 1:].sum())
    model.train(was_training)
    return math.exp(total / count)


# ---- the cache -------------------------------------------------------------------------------------


def _to_hf(model: GPT2, tokenizer: PreTrainedTokenizerBase):
    """transformers' GPT2LMHeadModel with the course tokenizer's special tokens (EOT 0, PAD 1, not GPT-2's)."""
    hf = model.to_hf().eval()
    for config in (hf.config, hf.generation_config):
        config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    return hf


@contextmanager
def _quiet() -> Iterator[None]:
    """No transformers progress bars: it draws one for every save and load, even of a 150 kB model."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _save(directory: Path, model: GPT2, tokenizer: PreTrainedTokenizerBase, record: dict) -> None:
    """Write everything into a temporary sibling, then rename it into place: never a half-written model."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        with _quiet():
            _to_hf(model, tokenizer).save_pretrained(partial)  # config.json + model.safetensors
        tokenizer.save_pretrained(partial)
        (partial / RECORD).write_text(json.dumps(record, indent=1))
        old = partial.with_name(partial.name.replace(".partial-", ".old-"))
        if directory.exists():  # retraining: the old model goes only once the new one is complete
            os.replace(directory, old)
        os.replace(partial, directory)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def course_lm(
    config_or_preset: CourseLMConfig | str = "cpu", *, retrain: bool = False, progress: bool = True
) -> tuple[GPT2, PreTrainedTokenizerBase, dict]:
    """The course's pretrained GPT-2 (eval mode), its tokenizer and info: from the cache, or trained once.

    info holds the preset name, cache key, config, training stats and the cache path.
    """
    name, config = _resolve(config_or_preset)
    key = cache_key(config)
    directory = cache_dir() / "lm" / f"{name}-{key}"
    if directory.is_dir() and not retrain:
        record = json.loads((directory / RECORD).read_text())
        with _quiet():
            model = GPT2.from_pretrained(directory).eval()
        return model, load_tokenizer(directory), {**record, "path": str(directory)}
    model, tokenizer, stats = pretrain(config, progress=progress)
    record = {"preset": name, "key": key, "config": asdict(config), "stats": stats}
    _save(directory, model, tokenizer, record)
    print(f"course LM '{name}' ({stats['params']:,} parameters) cached in {directory}")
    record = json.loads(json.dumps(record))  # as the cache gives it back: the same info, trained or loaded
    return model, tokenizer, {**record, "path": str(directory)}


# ---- freezing and loading ------------------------------------------------------------------------


def freeze(model: M) -> M:
    """Freeze a language model for vision training: no weight gets a gradient, dropout is off. Returns it.

    Three switches that are easy to confuse:
    - `p.requires_grad = False` (set here): autograd computes no gradient *for these weights*, so no
      optimiser can change them; gradients still flow *through* the model to whatever feeds it, the
      visual prefix, which is exactly what Frozen trains.
    - `model.eval()` (set here): layers that act differently in training, dropout, switch to inference,
      so the LM computes the function it was pretrained to compute. It freezes nothing by itself; and a
      parent module's `.train()` switches it back, so a captioner must keep its LM in eval mode.
    - `torch.no_grad()` (not used here): records no graph at all, so nothing *before* the LM gets a
      gradient either: right for evaluation and decoding, wrong while training the prefix.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _looks_like_path(spec: str) -> bool:
    return "/" in spec or os.sep in spec or spec.startswith((".", "~")) or bool(Path(spec).suffix)


def load_frozen_lm(spec: str | Path = "course", *, backend: str = "minivlm") -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The frozen LM of a Frozen-style captioner and its tokenizer, from one of three places.

    spec: "course" or "course:<preset>" (the course's own GPT-2, pretrained on first use), a hub name
    in hub.HUB_NAMES ("gpt2", ...: the cache, else the network), or a save_pretrained directory holding
    a GPT-2 and its tokenizer. backend: "minivlm" gives our GPT2, "transformers" a GPT2LMHeadModel.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    spec = str(spec)
    if spec == "course" or spec.startswith("course:"):
        model, tokenizer, _ = course_lm(spec.partition(":")[2] or "cpu")
        return freeze(model if backend == "minivlm" else _to_hf(model, tokenizer)), tokenizer
    path = Path(spec).expanduser()
    if spec not in hub.HUB_NAMES:
        if not path.is_dir():
            if _looks_like_path(spec):
                raise FileNotFoundError(f"no language model directory at {path}")
            raise ValueError(
                f"unknown language model {spec!r}; expected 'course' or 'course:<preset>' with a preset in "
                f"{sorted(LM_PRESETS)}, a hub name in {list(hub.HUB_NAMES)}, or a directory written by save_pretrained()"
            )
        if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            raise FileNotFoundError(
                f"{path} holds no tokenizer (tokenizer.json, or vocab.json + merges.txt): save it next to the "
                f"model with tokenizer.save_pretrained({str(path)!r})"
            )
    source = path if path.is_dir() else spec
    hf = hub.load_hf_gpt2(source)  # the model first: offline, this fails at once with OfflineError
    tokenizer = tokenizer_for_hub_model(source)
    return freeze(GPT2.from_hf(hf) if backend == "minivlm" else hf), tokenizer
