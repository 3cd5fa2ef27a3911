"""Prefix mappers: from an image's features (B, F) to P vectors (B, P, D) that a frozen language model reads as words.

What it teaches: the bridge between vision and language. A frozen GPT-2 only understands vectors that
look like its token embeddings, so a visual prefix must be written *in the LM's embedding space*: P
vectors of width D, placed before the caption's own token embeddings. Three mappers, in order of power:

- `LinearMapper`: one linear layer to P * D numbers, cut into P vectors. Frozen (Tsimpoukelli et al.,
  2021, "Multimodal Few-Shot Learning with Frozen Language Models") and LiMBeR (Merullo et al., 2023,
  "Linearly Mapping from Image to Text Space") show that this alone can make a frozen LM caption.
- `MLPMapper`: ClipCap's MLP (Mokady et al., 2021, "ClipCap: CLIP Prefix for Image Captioning"),
  F -> (P * D) / 2 -> P * D with a tanh between.
- `TransformerMapper`: ClipCap's mapper for a *frozen* LM. The features become a few tokens; P learned
  constant vectors are appended; a small transformer lets the constants read the features (and each
  other); its outputs at the P constant positions are the prefix.

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

Axis letters: B batch, F features, P prefix tokens, D the LM's embedding width, K feature tokens, T
caption tokens, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from minivlm.data.captions import IGNORE_INDEX

__all__ = [
    "embedding_scale", "PrefixMapper", "LinearMapper", "MLPMapper", "TransformerMapper", "MAPPERS", "build_mapper",
    "WORD_TEMPERATURE", "word_targets", "word_alignment_loss",
]  # fmt: skip

WORD_TEMPERATURE = 0.1  # cosine similarities / this are the logits of the word-alignment loss


@torch.no_grad()
def embedding_scale(lm: nn.Module) -> float:
    """The typical length of the LM's token embeddings: sqrt(mean over the vocabulary of |e_v|²)."""
    table = lm.get_input_embeddings().weight.float()  # (V, D)
    return table.square().sum(dim=-1).mean().sqrt().item()


class PrefixMapper(nn.Module):
    """The part all mappers share: checks, and scaling each of the P output vectors to the embeddings' length.

    target_scale: the length every prefix vector gets (`embedding_scale(lm)`); None leaves the mapper's raw
    output as it is, for the experiment that shows why normalising matters.
    """

    def __init__(self, in_dim: int, embed_dim: int, prefix_length: int, target_scale: float | None):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("embed_dim", embed_dim), ("prefix_length", prefix_length)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if target_scale is not None and not target_scale > 0:
            raise ValueError(f"target_scale must be positive (or None for no normalisation), got {target_scale!r}")
        self.in_dim = in_dim  # F
        self.embed_dim = embed_dim  # D
        self.prefix_length = prefix_length  # P
        self.normalize = target_scale is not None
        self.register_buffer("target_scale", torch.tensor(float(target_scale or 1.0)))

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

    def __init__(self, in_dim: int, embed_dim: int, prefix_length: int, target_scale: float | None):
        super().__init__(in_dim, embed_dim, prefix_length, target_scale)
        self.linear = nn.Linear(in_dim, prefix_length * embed_dim)

    def project(self, features: Tensor) -> Tensor:
        """(B, F) -> (B, P, D)."""
        return rearrange(self.linear(features), "b (p d) -> b p d", p=self.prefix_length)


class MLPMapper(PrefixMapper):
    """ClipCap's MLP mapper: F -> hidden -> P * D with tanh; hidden defaults to P * D / 2 as in ClipCap."""

    def __init__(self, in_dim: int, embed_dim: int, prefix_length: int, target_scale: float | None,
                 hidden: int | None = None):  # fmt: skip
        super().__init__(in_dim, embed_dim, prefix_length, target_scale)
        hidden = hidden or prefix_length * embed_dim // 2
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, prefix_length * embed_dim))

    def project(self, features: Tensor) -> Tensor:
        """(B, F) -> (B, P, D)."""
        return rearrange(self.mlp(features), "b (p d) -> b p d", p=self.prefix_length)


class TransformerMapper(PrefixMapper):
    """ClipCap's transformer mapper: K feature tokens + P learned constants -> transformer -> the constants' outputs."""

    def __init__(self, in_dim: int, embed_dim: int, prefix_length: int, target_scale: float | None, *,
                 feature_tokens: int = 4, layers: int = 2, heads: int = 4):  # fmt: skip
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


MAPPERS: dict[str, type[PrefixMapper]] = {"linear": LinearMapper, "mlp": MLPMapper, "transformer": TransformerMapper}


def build_mapper(kind: str, in_dim: int, embed_dim: int, prefix_length: int, target_scale: float | None,
                 **options) -> PrefixMapper:  # fmt: skip
    """A mapper by name ("linear", "mlp", "transformer"); options go to its constructor (hidden, layers, ...)."""
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
