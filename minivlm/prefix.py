"""Prefix mappers: from an image's features (B, F) to P vectors (B, P, D) that a frozen language model reads as words.

What it teaches: the bridge between vision and language. A frozen GPT-2 only understands vectors that
look like its token embeddings, so a visual prefix must be written *in the LM's embedding space*: P
vectors of width D, placed before the caption's own token embeddings. Three mappers of the whole image,
in order of power, and one of its places:

- `LinearMapper`: one linear layer to P * D numbers, cut into P vectors. Frozen (Tsimpoukelli et al.,
  2021, "Multimodal Few-Shot Learning with Frozen Language Models") and LiMBeR (Merullo et al., 2023,
  "Linearly Mapping from Image to Text Space") show that this alone can make a frozen LM caption.
- `MLPMapper`: ClipCap's MLP (Mokady et al., 2021, "ClipCap: CLIP Prefix for Image Captioning"),
  F -> (P * D) / 2 -> P * D with a tanh between.
- `TransformerMapper`: ClipCap's mapper for a *frozen* LM. The features become a few tokens; P learned
  constant vectors are appended; a small transformer lets the constants read the features (and each
  other); its outputs at the P constant positions are the prefix.
- `GridMapper`: LLaVA's way (Liu et al., 2023, "Visual Instruction Tuning"): one vector per grid cell of
  the encoder, each written by the same linear layer from that cell's features alone, plus a learned
  vector for its place. The course's `cpu` preset uses it: a cell's colour and shape reach the LM in one
  vector, and a linear map writes a colour–shape pair it never saw as the sum of parts it did.

**Scale matters.** Every mapper ends with the same normalisation: each prefix vector is set to the length
of a typical token embedding. A freshly initialised mapper writes vectors far shorter or longer than the
LM's embeddings; too short and the LM barely notices the prefix, too long and the prefix drowns the
caption and sits where the LM has never been (the course's first captioner learned nothing until its
prefix was normalised). We use RMSNorm without a gain (Zhang & Sennrich, 2019, "Root Mean Square Layer
Normalization"): it divides a vector by its root mean square, which fixes its length and, unlike
LayerNorm, removes no direction (LayerNorm also subtracts the mean of the D numbers). Then it multiplies
by a fixed target length, `embedding_scale(lm)`: the root mean square of the lengths of the LM's token
embedding vectors, computed once and stored as a buffer (saved with the mapper, never trained). The
mapper still chooses each vector's direction, which is all that a vector of known length can say.

**Written in words** (`word_alignment_loss`, optional). Captioning alone lets the mapper write any
vectors that make the LM say the caption; they need not look like any of the LM's words (the course
captioner's are not nearest the words of their captions). Then the LM can caption an image but not
*reason* about it in context: its in-context look-ups (name binding, lesson 08) match words, and an
image that matches no word is found by none of them. The alignment loss asks each prefix vector to be,
of all the LM's token embeddings, nearest the caption word it stands for: the P vectors are read as the
caption's last P tokens ("small red circle ." for "a small red circle."). It is a cross-entropy over the
vocabulary of cosine similarities, so only the direction is trained, as the normalisation leaves it.

**A second view, in the LM's own words** (`word_view_loss`, optional: `CaptionerConfig.word_view`). The
alignment loss above pulls the caption prefix's *direction* towards words while captioning pulls it
elsewhere, and the course measured that the LM's look-ups still miss it. The word view is a separate, small
head (an MLP, as ClipCap's) that writes W vectors regressed onto the *exact* token embeddings of the
caption's last W tokens ("a small red circle ." for W = 5), direction and length, from the encoder's
features, which it reads without changing them (the captioner learns exactly as without it). An image
shown to the LM this way reads almost as its caption would: images that should match, match. It is how
few-shot prompts show images when asked to (`minivlm.fewshot`, view="words"); it is the same idea as
mapping images onto the LM's vocabulary to prompt a frozen LM in context (LQAE, Liu et al., 2023;
SPAE, Yu et al., 2023), softened: the vectors are not snapped to the nearest word.

**Read at every block** (`DeepPrefixLM`, optional: `CaptionerConfig.prefix_depth`). Frozen and ClipCap
put the prefix at the LM's *input* only, and everything the LM says about the image must then be computed
from P input vectors by weights that never learned to read them. That works for large LMs, and far less
well for small ones: Lester et al. (2021, "The Power of Scale for Parameter-Efficient Prompt Tuning")
found input prompts lag fine-tuning badly below billions of parameters. Prefix-tuning (Li & Liang,
2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation") and P-tuning v2 (Liu et al., 2022)
give the prompt a say at every layer instead, and close most of that gap on small models. Here, with
depth K > 1, the mapper writes K sets of P vectors: the first is the input prefix as before, and set k
*replaces* the residual stream at the prefix positions as block k reads it, so block k's keys and values
there are the image's own. The LM's weights are untouched and still frozen; only where the image enters
is deeper. `block_input_scales` gives each set
the length of what its block reads (the residual stream grows from block to block).

When *every* block reads the prefix (K = n_layer), what a block computes at a prefix position is never
read: the next block reads the image's next set there instead, and the loss starts at the last prefix
position. All the caption's tokens ever take from prefix positions 0 .. P-2 is each block's keys and
values there, which depend on the image's vectors alone. `DeepPrefixLM.prefix_cache` computes just those
(a LayerNorm and one linear layer per block) and hands them to the LM as a KV cache, as prefix-tuning's own
code passes its prefix (`past_key_values`); the LM then runs only the last prefix position and the caption.
Training takes this path (`Captioner.forward` with length groups): the same loss up to rounding, and the
LM's attention, MLP and output layer skip the P - 1 positions whose results were thrown away.

Axis letters: B batch, F features, P prefix tokens, D the LM's embedding width, K feature tokens (in
`TransformerMapper`) or blocks that read the prefix (in `DeepPrefixLM`), N grid cells, C features per cell and
S sets of N vectors (in `GridMapper`), T caption tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from minivlm.attention import KVCache
from minivlm.data.captions import IGNORE_INDEX
from minivlm.gpt2 import GPT2

__all__ = [
    "embedding_scale", "PrefixMapper", "LinearMapper", "MLPMapper", "TransformerMapper", "GridMapper", "MAPPERS",
    "build_mapper", "WORD_TEMPERATURE", "word_targets", "word_alignment_loss", "word_view_loss", "blocks_of",
    "block_input_scales", "WideEmbedding", "DeepPrefixLM",
]  # fmt: skip

WORD_TEMPERATURE = 0.1  # cosine similarities / this are the logits of the word-alignment loss


@torch.no_grad()
def embedding_scale(lm: nn.Module) -> float:
    """The typical length of the LM's token embeddings: sqrt(mean over the vocabulary of |e_v|²)."""
    table = lm.get_input_embeddings().weight.float()  # (V, D)
    return table.square().sum(dim=-1).mean().sqrt().item()


class PrefixMapper(nn.Module):
    """The part all mappers share: checks, and scaling each of the P output vectors to the embeddings' length.

    target_scale: the length every prefix vector gets (`embedding_scale(lm)`), or one length per vector (P
    of them: a deep prefix's sets are read by different blocks); None leaves the mapper's raw output as it
    is, for the experiment that shows why normalising matters.
    """

    def __init__(self, in_dim: int, embed_dim: int, prefix_length: int,
                 target_scale: float | Sequence[float] | None):  # fmt: skip
        super().__init__()
        for name, value in (("in_dim", in_dim), ("embed_dim", embed_dim), ("prefix_length", prefix_length)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        scale = torch.tensor(1.0 if target_scale is None else target_scale, dtype=torch.float32)
        if scale.ndim == 1:  # one length per vector, applied to (B, P, D) as (P, 1)
            if len(scale) != prefix_length:
                raise ValueError(f"target_scale has {len(scale)} lengths for {prefix_length} prefix vectors")
            scale = scale[:, None]
        if scale.ndim > 2 or not bool((scale > 0).all()):
            raise ValueError(f"target_scale must be positive, a number or one per prefix vector (or None for no "
                             f"normalisation), got {target_scale!r}")  # fmt: skip
        self.in_dim = in_dim  # F
        self.embed_dim = embed_dim  # D
        self.prefix_length = prefix_length  # P
        self.normalize = target_scale is not None
        self.register_buffer("target_scale", scale)  # () or (P, 1)

    def project(self, features: Tensor) -> Tensor:
        """(B, F) -> (B, P, D) before normalisation; each mapper defines it."""
        raise NotImplementedError

    def forward(self, features: Tensor) -> Tensor:
        """features (B, F) -> prefix (B, P, D), each vector of length target_scale."""
        if features.ndim != 2 or features.shape[1] != self.in_dim:
            raise ValueError(f"expected features of shape (B, {self.in_dim}), got {tuple(features.shape)}")
        prefix = self.project(features)  # (B, P, D)
        if not self.normalize:
            return prefix
        # RMS = |x| / sqrt(D), so x / RMS has length sqrt(D); rescale that to target_scale.
        return F.rms_norm(prefix, (self.embed_dim,), eps=1e-6) * (self.target_scale / self.embed_dim**0.5)


class LinearMapper(PrefixMapper):
    """Frozen's and LiMBeR's mapper: a single linear layer F -> P * D."""

    def __init__(self, in_dim: int, embed_dim: int, prefix_length: int, target_scale: float | Sequence[float] | None):
        super().__init__(in_dim, embed_dim, prefix_length, target_scale)
        self.linear = nn.Linear(in_dim, prefix_length * embed_dim)

    def project(self, features: Tensor) -> Tensor:
        """(B, F) -> (B, P, D)."""
        return rearrange(self.linear(features), "b (p d) -> b p d", p=self.prefix_length)


class MLPMapper(PrefixMapper):
    """ClipCap's MLP mapper: F -> hidden -> P * D with tanh; hidden defaults to P * D / 2 as in ClipCap."""

    def __init__(self, in_dim: int, embed_dim: int, prefix_length: int,
                 target_scale: float | Sequence[float] | None, hidden: int | None = None):  # fmt: skip
        super().__init__(in_dim, embed_dim, prefix_length, target_scale)
        hidden = hidden or prefix_length * embed_dim // 2
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, prefix_length * embed_dim))

    def project(self, features: Tensor) -> Tensor:
        """(B, F) -> (B, P, D)."""
        return rearrange(self.mlp(features), "b (p d) -> b p d", p=self.prefix_length)


class TransformerMapper(PrefixMapper):
    """ClipCap's transformer mapper: K feature tokens + P learned constants -> transformer -> the constants' outputs."""

    def __init__(self, in_dim: int, embed_dim: int, prefix_length: int,
                 target_scale: float | Sequence[float] | None, *, feature_tokens: int = 4, layers: int = 2,
                 heads: int = 4):  # fmt: skip
        super().__init__(in_dim, embed_dim, prefix_length, target_scale)
        if embed_dim % heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by heads={heads}")
        self.feature_tokens = feature_tokens  # K: how many tokens the features are projected to
        self.to_tokens = nn.Linear(in_dim, feature_tokens * embed_dim)
        self.queries = nn.Parameter(torch.randn(prefix_length, embed_dim))  # (P, D): the learned constants
        layer = nn.TransformerEncoderLayer(
            embed_dim, heads, dim_feedforward=4 * embed_dim, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def project(self, features: Tensor) -> Tensor:
        """(B, F) -> (B, P, D): no mask, every token attends to every other."""
        tokens = rearrange(self.to_tokens(features), "b (k d) -> b k d", k=self.feature_tokens)  # (B, K, D)
        queries = repeat(self.queries, "p d -> b p d", b=features.shape[0])  # (B, P, D)
        out = self.transformer(torch.cat([tokens, queries], dim=1))  # (B, K + P, D)
        return out[:, self.feature_tokens :]  # (B, P, D)


class GridMapper(PrefixMapper):
    """LLaVA's mapper: one linear map applied to each grid cell's features gives that cell's prefix vector.

    The features are read as N cells of C = F / N numbers each, in the encoder's order (`SmallCNN`: cell
    row, cell column, channel), and every cell goes through the *same* linear layer C -> S * D, plus a
    learned vector for its place: S = P / N sets of N vectors (S = K for a prefix read by K blocks, set-major
    as `DeepPrefixLM` reads it). So one prefix vector holds one place's colour and shape together, and it
    is the same sum of a colour's part and a shape's part at every place: a pair of them never seen together
    is written the way its parts are.
    """

    def __init__(self, in_dim: int, embed_dim: int, prefix_length: int,
                 target_scale: float | Sequence[float] | None, *, cells: int):  # fmt: skip
        super().__init__(in_dim, embed_dim, prefix_length, target_scale)
        if not isinstance(cells, int) or cells < 1 or in_dim % cells:
            raise ValueError(f"the grid mapper reads F = {in_dim} features as cells; they do not divide into "
                             f"{cells!r} cells")  # fmt: skip
        if prefix_length % cells:
            raise ValueError(f"the grid mapper writes one vector per cell and set: prefix_length={prefix_length} "
                             f"is not a multiple of the {cells} cells")  # fmt: skip
        self.cells = cells  # N
        self.sets = prefix_length // cells  # S
        self.linear = nn.Linear(in_dim // cells, self.sets * embed_dim)  # C -> S * D, shared by every cell
        self.position = nn.Parameter(torch.randn(self.sets, cells, embed_dim) * 0.02)  # (S, N, D): each place's own

    def project(self, features: Tensor) -> Tensor:
        """(B, F) = (B, N * C) -> (B, S * N, D): set 0's N vectors, then set 1's, ..."""
        x = self.linear(rearrange(features, "b (n c) -> b n c", n=self.cells))  # (B, N, S * D)
        x = rearrange(x, "b n (s d) -> b s n d", s=self.sets) + self.position  # (B, S, N, D)
        return rearrange(x, "b s n d -> b (s n) d")


MAPPERS: dict[str, type[PrefixMapper]] = {"linear": LinearMapper, "mlp": MLPMapper, "transformer": TransformerMapper,
                                          "grid": GridMapper}  # fmt: skip


def build_mapper(kind: str, in_dim: int, embed_dim: int, prefix_length: int,
                 target_scale: float | Sequence[float] | None, **options) -> PrefixMapper:  # fmt: skip
    """A mapper by name ("linear", "mlp", "transformer", "grid"); options go to its constructor (hidden, cells, ...)."""
    if kind not in MAPPERS:
        raise ValueError(f"unknown mapper kind {kind!r}; choose one of {sorted(MAPPERS)}")
    return MAPPERS[kind](in_dim, embed_dim, prefix_length, target_scale, **options)


def word_targets(labels: Tensor, prefix_length: int) -> Tensor:
    """(B, P) the token each prefix vector should be nearest: the caption's last P tokens before its end-of-text.

    labels: (B, T) the captions' token ids, right-padded with -100, each ending with its end-of-text
    token (as `CaptionCollator` makes them). A caption of fewer than P tokens leaves the first slots
    -100 (no target).
    """
    if labels.ndim != 2:
        raise ValueError(f"expected labels of shape (B, T), got {tuple(labels.shape)}")
    words = (labels != IGNORE_INDEX).sum(dim=1) - 1  # (B,) caption tokens, end-of-text not counted
    if (words < 1).any():
        raise ValueError("every caption needs at least one token before its end-of-text")
    index = words[:, None] - prefix_length + torch.arange(prefix_length, device=labels.device)  # (B, P)
    targets = labels.gather(1, index.clamp(min=0))
    return targets.masked_fill(index < 0, IGNORE_INDEX)


def word_alignment_loss(prefix: Tensor, table: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of reading each prefix vector as the caption word `word_targets` assigns it.

    prefix: (B, P, D); table: (V, D) the LM's token embeddings (frozen: no gradient reaches them);
    labels: (B, T) as in `word_targets`. The logits are cosine similarities / WORD_TEMPERATURE.
    """
    if prefix.ndim != 3 or prefix.shape[-1] != table.shape[-1]:
        raise ValueError(f"expected a prefix (B, P, {table.shape[-1]}), got {tuple(prefix.shape)}")
    targets = word_targets(labels, prefix.shape[1])  # (B, P)
    words = F.normalize(table.detach().float(), dim=-1)  # (V, D)
    logits = F.normalize(prefix.float(), dim=-1) @ words.T / WORD_TEMPERATURE  # (B, P, V)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def word_view_loss(words: Tensor, table: Tensor, labels: Tensor) -> Tensor:
    """How far each word-view vector is from the token embedding it should be: 0 when it is that embedding.

    words: (B, W, D); table: (V, D) the LM's token embeddings (frozen: no gradient reaches them); labels:
    (B, T) as in `word_targets`, which gives each vector its token (the caption's last W). The squared
    distance, over the mean squared length of a token embedding: 1 is as far as a typical embedding is
    from zero, whatever the LM. The mean over every vector with a target.
    """
    if words.ndim != 3 or words.shape[-1] != table.shape[-1]:
        raise ValueError(f"expected word vectors (B, W, {table.shape[-1]}), got {tuple(words.shape)}")
    targets = word_targets(labels, words.shape[1])  # (B, W)
    given = targets != IGNORE_INDEX  # (B, W)
    table = table.detach().float()
    scale = table.square().sum(dim=-1).mean()  # mean |e_v|², a number
    return (words.float()[given] - table[targets[given]]).square().sum(dim=-1).mean() / scale


# ---- a prefix read at every block ----------------------------------------------------------------


def blocks_of(lm: nn.Module) -> nn.ModuleList:
    """The LM's transformer blocks, in order: `lm.transformer.h` in our GPT-2 and in transformers' GPT2LMHeadModel."""
    try:
        return lm.transformer.h
    except AttributeError:
        raise TypeError(f"a {type(lm).__name__} has no GPT-2 blocks at .transformer.h; a prefix read at every "
                        f"block needs a GPT-2 (minivlm.gpt2.GPT2 or transformers' GPT2LMHeadModel)"
                        ) from None  # fmt: skip


@torch.no_grad()
def block_input_scales(lm: nn.Module, depth: int, tokens: int = 64, seed: int = 0) -> list[float]:
    """The typical length of what the first `depth` blocks read: [embedding_scale(lm), then one per block 1 .. depth-1].

    Block k > 0 reads the residual stream, whose vectors grow much longer than a token embedding from
    block to block (in the course LM, about 20 against 3.6). Measured on a fixed row of `tokens` random
    token ids, as the median length over its positions after the first (the first position's vectors
    are often far longer than the rest: it is where attention with nowhere else to go lands).
    """
    blocks = blocks_of(lm)
    if not 1 <= depth <= len(blocks):
        raise ValueError(f"a prefix can be read by 1 to {len(blocks)} blocks of this LM, got depth={depth}")
    table = lm.get_input_embeddings()
    n = min(tokens, lm.config.n_positions)
    ids = torch.randint(table.num_embeddings, (1, n), generator=torch.Generator().manual_seed(seed))
    lengths: list[float] = []

    def measure(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["hidden_states"]  # (1, n, D), what the block reads
        lengths.append(x[0, 1:].float().norm(dim=-1).median().item())

    handles = [block.register_forward_pre_hook(measure, with_kwargs=True) for block in blocks[1:depth]]
    was_training = lm.training
    lm.eval()  # no dropout: the same LM always gives the same lengths
    try:
        lm(input_ids=ids.to(table.weight.device))
    finally:
        lm.train(was_training)
        for handle in handles:
            handle.remove()
    return [embedding_scale(lm), *lengths]


class WideEmbedding:
    """A token embedding for `DeepPrefixLM`: each token's (D,) embedding, then zeros for the K - 1 deeper slots.

    Text gives the deeper blocks nothing of its own, so its deeper slots are zero ("keep"). Not a module: it only reads
    the LM's own table (`weight`), which belongs to the LM.
    """

    def __init__(self, table: nn.Embedding, depth: int):
        self.table, self.depth = table, depth
        self.weight = table.weight  # (V, D): the LM's table, what callers read the device, dtype and the words from
        self.embedding_dim = depth * table.embedding_dim  # K * D: the width of the vectors it gives
        self.num_embeddings = table.num_embeddings  # V

    def __call__(self, ids: Tensor) -> Tensor:
        """ids (...) -> (..., K * D)."""
        return self.widen(self.table(ids))

    def widen(self, vectors: Tensor) -> Tensor:
        """(..., D) input vectors -> (..., K * D), zeros in the deeper slots: read as a token is read."""
        return F.pad(vectors, (0, (self.depth - 1) * self.table.embedding_dim))


class DeepPrefixLM(nn.Module):
    """A frozen LM whose first `depth` blocks each read the prefix: inputs_embeds (B, T, K * D) instead of (B, T, D).

    Each input vector is K slots of D numbers. Slot 0 is the ordinary input embedding; where slot k > 0
    is not all zeros, it *replaces* the residual stream at that position as block k reads it (by a
    forward pre-hook, for the duration of one call), so each block's keys and values at the prefix are
    the image's own, as in prefix-tuning. Text tokens have zeros there (`WideEmbedding`) and keep what
    the blocks before computed; a visual prefix fills every slot (its vectors are normalised to a fixed
    length, so never all zeros). Called with input_ids (a token at a time, after the prompt is in the
    KV cache), it is the LM itself. Attribute look-ups it does not answer go to the LM (`config`,
    `transformer`, ...), so code written for the LM works on it.
    """

    def __init__(self, lm: nn.Module, depth: int):
        super().__init__()
        if isinstance(lm, DeepPrefixLM):
            raise TypeError("this LM already reads a prefix at several blocks; pass the LM inside it "
                            "(`captioner.language_model`, or `.lm` of the DeepPrefixLM)")  # fmt: skip
        n = len(blocks_of(lm))
        if not 2 <= depth <= n:
            raise ValueError(f"a DeepPrefixLM's prefix is read by 2 to {n} blocks (n_layer) of this LM, got "
                             f"depth={depth}; depth 1 is the LM itself")  # fmt: skip
        self.lm, self.depth = lm, depth
        self.width = lm.get_input_embeddings().embedding_dim  # D
        self._embedding = WideEmbedding(lm.get_input_embeddings(), depth)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules (self.lm)
        except AttributeError:
            return getattr(super().__getattr__("lm"), name)

    def get_input_embeddings(self) -> WideEmbedding:
        return self._embedding

    def forward(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None, **kwargs):
        """The LM's output; wide inputs_embeds (B, T, K * D) are split between the input and blocks 1 .. K-1."""
        if inputs_embeds is None:
            return self.lm(input_ids=input_ids, **kwargs)
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.depth * self.width:
            raise ValueError(f"expected inputs_embeds of shape (B, T, {self.depth} * {self.width}) for a prefix read "
                             f"by {self.depth} blocks, got {tuple(inputs_embeds.shape)}")  # fmt: skip
        slots = rearrange(inputs_embeds, "b t (k d) -> k b t d", k=self.depth)  # (K, B, T, D)

        def replace(slot: Tensor):
            given = slot.ne(0).any(dim=-1, keepdim=True)  # (B, T, 1): the prefix's positions, not text's zeros

            def hook(module: nn.Module, args: tuple, kwargs: dict):
                if args:  # our Block takes x first; GPT2Block takes hidden_states first
                    return (torch.where(given, slot.to(args[0].dtype), args[0]), *args[1:]), kwargs
                x = kwargs["hidden_states"]
                return args, {**kwargs, "hidden_states": torch.where(given, slot.to(x.dtype), x)}

            return hook

        blocks = blocks_of(self.lm)
        handles = [blocks[k].register_forward_pre_hook(replace(slots[k]), with_kwargs=True)
                   for k in range(1, self.depth)]  # fmt: skip
        try:
            return self.lm(inputs_embeds=slots[0], **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    @property
    def reads_every_block(self) -> bool:
        """Whether every block of the LM reads the prefix (K = n_layer): then `prefix_cache` can stand for it."""
        return self.depth == len(blocks_of(self.lm))

    def prefix_cache(self, prefix: Tensor):
        """The keys and values every block has at the prefix positions, as a KV cache to continue from.

        prefix: (B, P', K * D), the first P' prefix vectors, from position 0, of an LM that every block of
        which reads the prefix (`reads_every_block`). Block k's keys and values there are its key and value
        projections of LayerNorm(set k), set 0 with the position embeddings added as at the input: what a
        forward pass over the prefix would store (see the module's notes). The cache is the LM's own kind
        (`minivlm.attention.KVCache`, or transformers' `DynamicCache`); pass it as past_key_values, with
        position_ids from P' on, and the LM continues after position P' - 1.
        """
        if not self.reads_every_block:
            raise ValueError(f"prefix_cache needs a prefix read by every block ({len(blocks_of(self.lm))}); "
                             f"this one is read by {self.depth}, and the blocks after it compute the prefix "
                             f"positions from what came before")  # fmt: skip
        if prefix.ndim != 3 or prefix.shape[-1] != self.depth * self.width:
            raise ValueError(f"expected a prefix of shape (B, P, {self.depth} * {self.width}), got "
                             f"{tuple(prefix.shape)}")  # fmt: skip
        slots = list(rearrange(prefix, "b p (k d) -> k b p d", k=self.depth))  # K of (B, P', D)
        transformer = self.lm.transformer
        positions = torch.arange(prefix.shape[1], device=prefix.device)
        slots[0] = transformer.drop(slots[0] + transformer.wpe(positions))  # the input, as the LM makes it
        if isinstance(self.lm, GPT2):
            cache = KVCache()
        else:  # transformers' GPT2LMHeadModel
            from transformers import DynamicCache

            cache = DynamicCache()
        for layer, (block, x) in enumerate(zip(blocks_of(self.lm), slots)):
            qkv = block.attn.c_attn(block.ln_1(x))  # (B, P', 3D): the queries are not needed, but cost little
            _, k, v = rearrange(qkv, "b p (three h e) -> three b h p e", three=3, h=self.lm.config.n_head)
            cache.update(k, v, layer)  # (B, H, P', E) each
        return cache
