"""The Frozen captioner: image encoder -> prefix mapper -> P visual "words" ahead of the caption, into a frozen GPT-2.

What it teaches: how a language model that has only ever read text learns to describe images without
changing a single one of its weights. Frozen (Tsimpoukelli et al., 2021, "Multimodal Few-Shot Learning
with Frozen Language Models") and ClipCap (Mokady et al., 2021, "ClipCap: CLIP Prefix for Image
Captioning") train only the vision side. The image becomes P vectors in the LM's embedding space
(`minivlm.cnn` then `minivlm.prefix`); they are placed before the caption's token embeddings, and the
LM is asked to predict the caption, token by token:

    position:  0 .. P-1            P        P+1   ...  P+T-1
    input:     prefix vectors      "a"      "small" ... <|endoftext|>
    predicts:  -  ..  "a"          "small"  "blue"  ...  -

The labels over the prefix are -100 (ignored): the prefix is given, not predicted. The last prefix
position predicts the first word, so the caption needs no start token, and the EOT after each caption
is a label like any other, so the model learns where to stop. Gradients flow *through* the frozen LM
into the prefix (see `minivlm.lm.freeze`); the optimiser holds only the encoder's and mapper's weights.

Two switches keep the LM frozen: `freeze` sets requires_grad False on every LM weight, and
`Captioner.train` keeps the LM in eval mode (no dropout) however often the captioner is put in training
mode. `train_lm=True` is the control experiment: the LM's weights are trained as well (still without
dropout, so the only difference is which weights learn).

The LM is either our `minivlm.gpt2.GPT2` or transformers' `GPT2LMHeadModel`: both take `inputs_embeds`,
`attention_mask` and `position_ids` and return `.logits`.

`CaptionerConfig.prefix_depth` K > 1 lets the image speak to the first K blocks, not only to the input:
the mapper writes K sets of P vectors, and `self.lm` becomes a `minivlm.prefix.DeepPrefixLM` around the
frozen LM, which takes each position's K vectors side by side, (B, T, K * D). Everything else (the loss,
decoding, few-shot prompts) is the same code. A small frozen LM is far easier to steer that way
(`bench/diagnose.py --oracle-depth` measures it).

Axis letters: B batch, P prefix tokens, T caption tokens, D the LM's width (K * D with a prefix read by K
blocks), V vocabulary, N new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from minivlm.cnn import CNN_PRESETS, ENCODERS, build_encoder
from minivlm.data.captions import IGNORE_INDEX
from minivlm.lm import freeze, next_token_loss
from minivlm.prefix import MAPPERS, DeepPrefixLM, PrefixMapper, block_input_scales, build_mapper, embedding_scale

__all__ = ["CaptionerConfig", "CAPTIONER_PRESETS", "CaptionerOutput", "Captioner"]


@dataclass(frozen=True)
class CaptionerConfig:
    """The vision side of a captioner and how it meets the LM; the LM itself is passed in."""

    encoder: str = "cnn"  # "cnn": a SmallCNN learned from scratch; "resnet18": torchvision's ResNet-18
    cnn_preset: str = "cpu"  # the CNN_PRESETS entry, when encoder is "cnn"
    encoder_weights: str | None = None  # a ResNet-18 state dict file, when encoder is "resnet18" (None: random init)
    image_size: int = 32  # S: images are (B, 3, S, S)
    mapper: str = "mlp"  # "linear" (Frozen), "mlp" (ClipCap), "transformer" (ClipCap, for a frozen LM) or "grid"
    # (LLaVA: a vector per cell of the encoder's grid; P must be the cells)
    prefix_length: int = 4  # P: visual tokens ahead of the caption
    normalize_prefix: bool = True  # scale each prefix vector to the LM's embedding length (False: the ablation)
    train_lm: bool = False  # the control experiment: fine-tune the LM too, instead of freezing it
    prefix_depth: int = 1  # K: blocks of the LM that read the prefix. 1: its input only (Frozen, ClipCap);
    # K > 1: blocks 1 .. K-1 read P vectors of their own at the prefix positions (prefix-tuning; see
    # `minivlm.prefix.DeepPrefixLM`). The LM stays frozen either way.
    word_view: int = 0  # W > 0: a second head writes W vectors regressed onto the token embeddings of the caption's
    # last W tokens, from the encoder's features it reads without changing them (`minivlm.prefix.word_view_loss`);
    # few-shot prompts can show images this way (`minivlm.fewshot`, view="words"). 0: no such head.

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; choose one of {ENCODERS}")
        if self.cnn_preset not in CNN_PRESETS:
            raise ValueError(f"unknown CNN preset {self.cnn_preset!r}; choose one of {sorted(CNN_PRESETS)}")
        if self.mapper not in MAPPERS:
            raise ValueError(f"unknown mapper kind {self.mapper!r}; choose one of {sorted(MAPPERS)}")
        if self.prefix_length < 1:
            raise ValueError(f"prefix_length must be at least 1, got {self.prefix_length}")
        if not isinstance(self.prefix_depth, int) or self.prefix_depth < 1:
            raise ValueError(f"prefix_depth must be an int of at least 1 (the LM's input), got {self.prefix_depth!r}")
        if not isinstance(self.word_view, int) or self.word_view < 0:
            raise ValueError(f"word_view must be an int >= 0 (0: no word view), got {self.word_view!r}")
        cells = CNN_PRESETS[self.cnn_preset].cells if self.encoder == "cnn" else 1
        if self.mapper == "grid" and self.prefix_length != cells:
            raise ValueError(f"the grid mapper writes one prefix vector per cell of the encoder: prefix_length must "
                             f"be its {cells} cells, got {self.prefix_length}")  # fmt: skip


# "tiny": for tests, with any tiny LM. "cpu": the course's captioner for the course LM on a laptop.
CAPTIONER_PRESETS: dict[str, CaptionerConfig] = {
    "tiny": CaptionerConfig(cnn_preset="tiny", mapper="linear", prefix_length=2),
    "cpu": CaptionerConfig(),
}


@dataclass
class CaptionerOutput:
    """What a forward pass returns: the LM's logits over prefix and caption, and the loss when labels were given."""

    logits: Tensor | None  # (B, P + T, V); None when forward grouped the captions by length
    loss: Tensor | None = None  # mean next-token cross-entropy over the caption's labelled tokens
    prefix: Tensor | None = None  # (B, P, D) the visual prefix the logits were computed from; (B, P, K * D) if K > 1
    words: Tensor | None = None  # (B, W, D) the word view, from features detached from the encoder; None without one


class Captioner(nn.Module):
    """An image encoder and a prefix mapper that learn to write a visual prefix for a frozen language model."""

    def __init__(self, encoder: nn.Module, mapper: PrefixMapper, lm: nn.Module, *, train_lm: bool = False,
                 prefix_depth: int = 1, word_mapper: PrefixMapper | None = None):  # fmt: skip
        """prefix_depth K > 1: the mapper writes K * P vectors, K sets of P (see `CaptionerConfig.prefix_depth`).

        word_mapper: the word view's head (`CaptionerConfig.word_view`), or None for none.
        """
        super().__init__()
        d = lm.get_input_embeddings().embedding_dim
        if mapper.embed_dim != d:
            raise ValueError(
                f"the mapper writes vectors of width {mapper.embed_dim}, the LM's embeddings have width {d}"
            )
        if mapper.in_dim != encoder.out_dim:
            raise ValueError(f"the encoder gives {encoder.out_dim} features, the mapper expects {mapper.in_dim}")
        if word_mapper is not None and (word_mapper.in_dim, word_mapper.embed_dim) != (encoder.out_dim, d):
            raise ValueError(f"the word view's head reads {word_mapper.in_dim} features into vectors of width "
                             f"{word_mapper.embed_dim}; the encoder gives {encoder.out_dim} and the LM's embeddings have "
                             f"width {d}")  # fmt: skip
        if mapper.prefix_length % prefix_depth:
            raise ValueError(f"a prefix read by {prefix_depth} blocks needs {prefix_depth} sets of P vectors; the "
                             f"mapper writes {mapper.prefix_length}, not a multiple of {prefix_depth}")  # fmt: skip
        self.encoder = encoder
        self.mapper = mapper
        self.word_mapper = word_mapper  # registered as a submodule when given: its weights train and save with the rest
        lm = freeze(lm) if not train_lm else lm.requires_grad_(True).eval()
        self.lm = lm if prefix_depth == 1 else DeepPrefixLM(lm, prefix_depth)  # checks the depth against the LM
        self.train_lm = train_lm
        self.prefix_depth = prefix_depth  # K
        self.prefix_length = mapper.prefix_length // prefix_depth  # P
        self.context = lm.config.n_positions  # the most positions the LM can see: P + T must fit

    @property
    def language_model(self) -> nn.Module:
        """The LM itself: `self.lm`, or the LM inside it when `self.lm` is a DeepPrefixLM (prefix_depth > 1)."""
        return self.lm.lm if isinstance(self.lm, DeepPrefixLM) else self.lm

    @classmethod
    def from_config(cls, lm: nn.Module, config: CaptionerConfig | str = "cpu") -> Captioner:
        """Build the encoder and mapper a config (or CAPTIONER_PRESETS name) describes, around this LM."""
        if isinstance(config, str):
            if config not in CAPTIONER_PRESETS:
                raise ValueError(f"unknown captioner preset {config!r}; choose one of {sorted(CAPTIONER_PRESETS)}")
            config = CAPTIONER_PRESETS[config]
        encoder = build_encoder(config.encoder, config.image_size, preset=config.cnn_preset,
                                weights=config.encoder_weights)  # fmt: skip
        return cls.around(encoder, lm, config)

    @classmethod
    def around(cls, encoder: nn.Module, lm: nn.Module, config: CaptionerConfig) -> Captioner:
        """A captioner of this encoder (any module giving (B, F) features) and a fresh mapper as `config` describes."""
        k, p = config.prefix_depth, config.prefix_length
        scale = None
        if config.normalize_prefix:  # one length for an input prefix; per set, the length its block reads
            scale = embedding_scale(lm) if k == 1 else [x for x in block_input_scales(lm, k) for _ in range(p)]
        d = lm.get_input_embeddings().embedding_dim
        options = {"cells": getattr(encoder, "cells", 1)} if config.mapper == "grid" else {}
        mapper = build_mapper(config.mapper, encoder.out_dim, d, k * p, scale, **options)
        # Made after the mapper, so the encoder and mapper start as they would without it. Not normalised: it must
        # match each token embedding's own length too.
        words = build_mapper("mlp", encoder.out_dim, d, config.word_view, None) if config.word_view else None
        return cls(encoder, mapper, lm, train_lm=config.train_lm, prefix_depth=k, word_mapper=words)

    def train(self, mode: bool = True) -> Captioner:
        """Set training mode on the vision side; the LM stays in eval mode (no dropout) either way."""
        super().train(mode)
        self.lm.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The weights an optimiser should hold: the encoder's and mapper's (and the LM's, with train_lm)."""
        return [p for p in self.parameters() if p.requires_grad]

    def prefix(self, images: Tensor) -> Tensor:
        """images (B, 3, S, S) -> the visual prefix (B, P, D), in the LM's embedding space; (B, P, K * D) if K > 1."""
        return self._prefix(self.encoder(images))

    def _prefix(self, features: Tensor) -> Tensor:
        prefix = self.mapper(features)  # (B, K * P, D)
        if self.prefix_depth == 1:
            return prefix
        return rearrange(prefix, "b (k p) d -> b p (k d)", k=self.prefix_depth)  # the slots DeepPrefixLM reads

    @property
    def word_view(self) -> int:
        """W: the vectors of the word view (`CaptionerConfig.word_view`); 0 if this captioner has none."""
        return 0 if self.word_mapper is None else self.word_mapper.prefix_length

    def words(self, images: Tensor) -> Tensor:
        """images (B, 3, S, S) -> the word view (B, W, D): vectors meant to be the token embeddings of their caption's
        last W tokens, read by the LM's input like text. With K > 1, (B, W, K * D): zeros in the deeper slots,
        as a token has (`minivlm.prefix.WideEmbedding`). A ValueError if this captioner has no word view."""
        if self.word_mapper is None:
            raise ValueError("this captioner has no word view (CaptionerConfig.word_view = 0); show its images as "
                             "the prefix, or train one with word_view > 0")  # fmt: skip
        words = self.word_mapper(self.encoder(images))  # (B, W, D)
        return words if self.prefix_depth == 1 else self.lm.get_input_embeddings().widen(words)

    def _check_length(self, t: int) -> None:
        if self.prefix_length + t > self.context:
            raise ValueError(
                f"a prefix of {self.prefix_length} tokens and {t} text tokens make {self.prefix_length + t} positions, "
                f"more than the language model's context of {self.context}; shorten the captions (max_length) or P"
            )

    def embed(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The LM's input: (inputs_embeds (B, P + T, D), attention_mask (B, P + T)), the prefix then the tokens.

        With prefix_depth K > 1 every vector is K * D wide: the prefix fills all K slots, a token its first
        (`minivlm.prefix.WideEmbedding`).
        """
        embeds, mask, _ = self._embed(images, input_ids, attention_mask)
        return embeds, mask

    def _embed(self, images: Tensor, input_ids: Tensor,
               attention_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """embed's (inputs_embeds, attention_mask), and the encoder's features (B, F) they came from."""
        if input_ids.ndim != 2:
            raise ValueError(f"expected input_ids of shape (B, T), got {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape {tuple(input_ids.shape)}"
            )
        self._check_length(input_ids.shape[1])
        features = self.encoder(images)  # (B, F); checks the images
        prefix = self._prefix(features)  # (B, P, D)
        if prefix.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"got {prefix.shape[0]} images but {input_ids.shape[0]} rows of input_ids; they must pair up"
            )
        tokens = self.lm.get_input_embeddings()(input_ids)  # (B, T, D)
        ones = attention_mask.new_ones(prefix.shape[:2])  # (B, P): the prefix is always attended to
        return torch.cat([prefix, tokens], dim=1), torch.cat([ones, attention_mask], dim=1), features

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, *, length_groups: int = 0) -> CaptionerOutput:  # fmt: skip
        """Logits (B, P + T, V) for prefix + caption; with labels (B, T), unshifted, -100 on padding, the loss too.

        Captions are right-padded (as `CaptionCollator` makes them), so positions are simply 0 .. P+T-1,
        and the LM needs no attention mask at all: in a causal LM a real token only sees tokens before it,
        never the padding after it, and the loss skips the padded positions. Without a mask, PyTorch's
        fused attention can take its fastest path (FlashAttention on a GPU).

        length_groups=G > 0 (with labels): the loss alone, the same up to rounding, and no logits. The
        captions are sorted by length and cut into G groups, and the LM reads each group padded only to
        its own longest caption. In a shapes-world batch, padding to the longest caption is a large share
        of the LM's positions (a 1-object caption is about a quarter as long as a 3-object one); the cpu
        training preset skips most of it this way (`bench/perf.py` counts the FLOPs saved). With a prefix
        read by every block (`DeepPrefixLM.reads_every_block`), its first P - 1 positions go to the LM as
        keys and values alone (`DeepPrefixLM.prefix_cache`), which skips the rest of the LM's work there.
        """
        if length_groups:
            if labels is None:
                raise ValueError("length_groups computes the loss alone, so it needs labels")
            return self._grouped_loss(images, input_ids, attention_mask, labels, length_groups)
        embeds, _, features = self._embed(images, input_ids, attention_mask)  # checks the mask's shape
        logits = self._logits(embeds)  # (B, P + T, V)
        prefix, words = embeds[:, : self.prefix_length], self._detached_words(features)  # (B, P, D), (B, W, D)
        if labels is None:
            return CaptionerOutput(logits, prefix=prefix, words=words)
        loss = next_token_loss(logits, self._shifted_labels(input_ids, labels))
        return CaptionerOutput(logits, loss, prefix, words)

    def _detached_words(self, features: Tensor) -> Tensor | None:
        """The word view (B, W, D) of features (B, F) it cannot change (its loss trains its head alone), or None."""
        return None if self.word_mapper is None else self.word_mapper(features.detach())

    def _logits(self, embeds: Tensor, cache=None) -> Tensor:
        """The LM's logits (B, S, V) for embeddings (B, S, D) whose rows start at position 0, or after a KV cache's."""
        past = 0 if cache is None else cache.get_seq_length()
        positions = torch.arange(past, past + embeds.shape[1], device=embeds.device)
        positions = repeat(positions, "s -> b s", b=embeds.shape[0])
        return self.lm(inputs_embeds=embeds, position_ids=positions, past_key_values=cache).logits

    def _shifted_labels(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        """labels (B, T) extended over the prefix: (B, P + T), IGNORE_INDEX on the P prefix positions."""
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have input_ids' shape {tuple(input_ids.shape)}")
        ignored = labels.new_full((labels.shape[0], self.prefix_length), IGNORE_INDEX)  # (B, P): not predicted
        # Shifted in next_token_loss: position P-1 (the last prefix vector) predicts the caption's first token.
        return torch.cat([ignored, labels], dim=1)

    def _grouped_loss(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor,
                      groups: int) -> CaptionerOutput:  # fmt: skip
        """forward's loss with the LM run on `groups` groups of captions of similar length (see forward)."""
        embeds, mask, features = self._embed(images, input_ids, attention_mask)  # (B, P + T, D), (B, P + T), (B, F)
        labels = self._shifted_labels(input_ids, labels)  # (B, P + T)
        lengths = mask.sum(dim=1)  # (B,) prefix and caption, EOT included
        # With a prefix read by every block, positions 0 .. P-2 are only keys and values (`DeepPrefixLM.prefix_cache`):
        # the LM runs from the last prefix position, the first whose output the loss reads.
        cached = self.prefix_length - 1 if isinstance(self.lm, DeepPrefixLM) and self.lm.reads_every_block else 0
        total = embeds.new_zeros(())
        for rows in torch.argsort(lengths).chunk(groups):  # shortest captions first
            s = int(lengths[rows].max())  # this group's longest row: the padding after it is never read
            cache = self.lm.prefix_cache(embeds[rows, :cached]) if cached else None
            logits = self._logits(embeds[rows, cached:s], cache)  # (B_g, s - cached, V)
            total = total + next_token_loss(logits, labels[rows, cached:s], reduction="sum")
        loss = total / (labels != IGNORE_INDEX).sum()  # the mean over every labelled token of the batch
        return CaptionerOutput(None, loss, embeds[:, : self.prefix_length], self._detached_words(features))

    def prompt_embeds(self, images: Tensor, prompt_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Where generation starts: (inputs_embeds (B, P + T, D), attention_mask), the prefix and an optional prompt.

        prompt_ids: (T,) one prompt for every image, or (B, T); None for the prefix alone (how the
        captioner was trained: the caption begins right after the prefix).
        """
        if prompt_ids is None:
            prefix = self.prefix(images)  # (B, P, D)
            return prefix, torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        if prompt_ids.ndim == 1:
            prompt_ids = repeat(prompt_ids, "t -> b t", b=images.shape[0])
        return self.embed(images, prompt_ids)

    @torch.no_grad()
    def generate(self, images: Tensor, tokenizer, max_new_tokens: int = 32, prompt: str | None = None,
                 **decoding_kwargs) -> list[str]:  # fmt: skip
        """Caption each image: decode from the prefix (and an optional text prompt), stop at EOT, return the texts.

        Runs in eval mode (restored afterwards). decoding_kwargs go to `minivlm.decoding.generate`
        (strategy="greedy", "beam" or "sample", ...). The texts are the continuation, without the prompt.
        """
        from minivlm.decoding import generate  # only generation needs the decoding code

        prompt_ids = None
        if prompt is not None:
            prompt_ids = torch.tensor(tokenizer(prompt, add_special_tokens=False)["input_ids"], device=images.device)
        was_training = self.training
        self.eval()
        try:
            embeds, mask = self.prompt_embeds(images, prompt_ids)
            self._check_length(embeds.shape[1] - self.prefix_length + max_new_tokens)
            eot = tokenizer.eos_token_id
            new = generate(self.lm, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                           eos_token_id=eot, **decoding_kwargs)  # (B, N)  # fmt: skip
        finally:
            self.train(was_training)
        rows = [row[: row.index(eot)] if eot in row else row for row in new.tolist()]  # cut at the first EOT
        return [tokenizer.decode(row, skip_special_tokens=True) for row in rows]
