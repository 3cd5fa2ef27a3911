"""GPT-2 from scratch, with GPT-2's own parameter names, so real GPT-2 weights load through one key map.

GPT-2 (Radford et al., 2019, "Language Models are Unsupervised Multitask Learners") is a stack of
pre-norm transformer blocks — x + attn(ln_1(x)), then x + mlp(ln_2(x)) — over token embeddings `wte`
plus learned position embeddings `wpe`, a final LayerNorm `ln_f`, and an output layer `lm_head` that
shares its weight with `wte`. Module and parameter names follow Hugging Face's `GPT2LMHeadModel`
(as nanoGPT's `model.py` does), so its state dict maps onto ours key for key; the only difference is
that GPT-2 stores its linear layers as `Conv1D`, whose weight is the transpose of `nn.Linear`'s.

The forward pass takes the same arguments and returns the same fields (`logits`, `past_key_values`,
`attentions`) as `GPT2LMHeadModel`, so the captioner and decoding code work with either model. In
Frozen, the visual prefix enters through `inputs_embeds`.

Axis letters: B batch, T new tokens, S past + new tokens, D model width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minivlm.attention import KVCache, MultiHeadSelfAttention, attention_bias, padding_mask

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

__all__ = ["GPT2Config", "GPT2", "GPT2Output", "PRESETS", "hf_key_map"]


@dataclass
class GPT2Config:
    """GPT-2's hyper-parameters, under the names Hugging Face's `GPT2Config` uses for them."""

    vocab_size: int = 50257  # V: number of tokens (GPT-2: 50,000 BPE merges + 256 bytes + <|endoftext|>)
    n_positions: int = 1024  # context length: the most tokens the model can see at once
    n_embd: int = 768  # D: width of every token's vector
    n_layer: int = 12  # number of transformer blocks
    n_head: int = 12  # H: attention heads per block; head width K = D / H
    layer_norm_epsilon: float = 1e-5  # added to the variance in every LayerNorm
    embd_pdrop: float = 0.1  # dropout on token + position embeddings (training only)
    attn_pdrop: float = 0.1  # dropout on attention weights (training only)
    resid_pdrop: float = 0.1  # dropout before each residual addition (training only)
    attn_impl: str = "sdpa"  # "math": our from-scratch attention; "sdpa": PyTorch's fused kernel (same result)

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.attn_impl not in ("math", "sdpa"):
            raise ValueError(f"unknown attn_impl {self.attn_impl!r}; expected 'math' or 'sdpa'")

    @property
    def head_dim(self) -> int:
        """K, the width of one attention head."""
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPT2Config:
        """A named configuration (see PRESETS), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf(cls, hf_config) -> GPT2Config:
        """Read a `transformers.GPT2Config`; refuse the options our GPT-2 does not implement."""
        unsupported = {
            "activation_function": (hf_config.activation_function, ("gelu_new", "gelu_pytorch_tanh")),
            "scale_attn_weights": (hf_config.scale_attn_weights, (True,)),
            "scale_attn_by_inverse_layer_idx": (hf_config.scale_attn_by_inverse_layer_idx, (False,)),
            "reorder_and_upcast_attn": (hf_config.reorder_and_upcast_attn, (False,)),
            "add_cross_attention": (hf_config.add_cross_attention, (False,)),
            "n_inner": (hf_config.n_inner, (None, 4 * hf_config.n_embd)),
        }
        for name, (value, allowed) in unsupported.items():
            if value not in allowed:
                raise ValueError(f"this GPT-2 supports {name} in {allowed}, the checkpoint has {value!r}")
        ours = {f.name for f in fields(cls)} - {"attn_impl"}
        return cls(**{name: getattr(hf_config, name) for name in ours})

    def to_hf(self):
        """The equivalent `transformers.GPT2Config` (tanh-approximated GELU, as GPT-2 was trained).

        As in GPT-2, the last token of the vocabulary is <|endoftext|>, which begins and ends texts.
        """
        from transformers import GPT2Config as HFGPT2Config

        kwargs = {k: v for k, v in asdict(self).items() if k != "attn_impl"}
        eot = self.vocab_size - 1
        return HFGPT2Config(activation_function="gelu_new", bos_token_id=eot, eos_token_id=eot, **kwargs)


# Named sizes. "tiny" is for tests (runs in milliseconds); the others are the released GPT-2 models.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4),
    "distilgpt2": dict(n_layer=6),
    "gpt2": dict(),  # GPT-2 124M: GPT2Config() defaults
    "gpt2-medium": dict(n_embd=1024, n_layer=24, n_head=16),
}


@dataclass
class GPT2Output:
    """What a forward pass returns; the same field names as `transformers`' CausalLMOutputWithPast."""

    logits: Tensor  # (B, T, V) scores for the next token at every position
    past_key_values: KVCache | None = None  # the cache, when use_cache=True
    attentions: tuple[Tensor, ...] | None = None  # per layer (B, H, T, S), when output_attentions=True


class MLP(nn.Module):
    """The position-wise feed-forward layer: widen to 4D, GELU, back to D."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        # GPT-2 uses the tanh approximation of GELU ("gelu_new" in transformers).
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """One pre-norm transformer block: tokens talk to each other (attention), then each thinks alone (MLP)."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = MultiHeadSelfAttention(
            config.n_embd, config.n_head, attn_pdrop=config.attn_pdrop, resid_pdrop=config.resid_pdrop, impl=config.attn_impl
        )
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, bias: Tensor | None, cache: KVCache | None, layer: int, return_weights: bool):
        # With padding, GPT2.forward has folded the causal and padding masks into `bias`; without, the
        # attention applies the causal mask itself (and can use PyTorch's fast is_causal path).
        a, weights = self.attn(
            self.ln_1(x), bias, causal=bias is None, cache=cache, layer=layer, return_weights=return_weights
        )
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, weights


class GPT2(nn.Module):
    """GPT-2 with a language-model head, built from `minivlm.attention`, loadable from real GPT-2 weights."""

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings (V, D)
                wpe=nn.Embedding(config.n_positions, config.n_embd),  # position embeddings
                drop=nn.Dropout(config.embd_pdrop),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output layer shrinks with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding table; the visual prefix must live in the same space (same name as in transformers)."""
        return self.transformer.wte

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
        logits_to_keep: int = 0,
    ) -> GPT2Output:
        """Next-token logits for every position.

        input_ids (B, T) or inputs_embeds (B, T, D): exactly one of them.
        attention_mask (B, S): 1 for real tokens, 0 for padding, over past + new tokens (as in transformers);
          None (faster: see below) when nothing is padded.
        position_ids (B, T): defaults to past_length, past_length + 1, ...; with left padding pass
          `attention_mask.cumsum(-1) - 1` instead, as generation does.
        past_key_values / use_cache: continue from a KVCache and return it updated.
        logits_to_keep: compute logits for the last n positions only (0 = all), as in transformers;
          decoding needs just the last one, and the (D, V) output layer is a third of GPT-2 124M's work.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) and inputs_embeds (B, T, D)")
        if input_ids is not None:
            if input_ids.ndim != 2:
                raise ValueError(f"expected input_ids of shape (B, T), got {tuple(input_ids.shape)}")
            inputs_embeds = self.transformer.wte(input_ids)  # (B, T, D)
        elif inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.config.n_embd:
            raise ValueError(
                f"expected inputs_embeds of shape (B, T, {self.config.n_embd}), got {tuple(inputs_embeds.shape)}"
            )
        b, t, _ = inputs_embeds.shape
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        past = cache.get_seq_length() if cache is not None else 0
        s = past + t
        if s > self.config.n_positions:
            raise ValueError(
                f"sequence of {s} tokens ({past} cached + {t} new) is longer than the model's context "
                f"of {self.config.n_positions} tokens"
            )
        if position_ids is None:
            position_ids = torch.arange(past, s, device=inputs_embeds.device).unsqueeze(0)  # (1, T)
        x = self.transformer.drop(inputs_embeds + self.transformer.wpe(position_ids))

        # With an attention_mask: one additive mask for all layers, causal (each token sees itself and the
        # past) + padding (nobody sees a padding token). Without one, each attention applies the causal
        # mask itself, and PyTorch's fused kernel can take its fastest, is_causal path: pass None when
        # nothing is padded. The mask's values are deliberately not inspected (`if attention_mask.all()`):
        # on a GPU, reading one boolean back makes the CPU wait for every queued kernel, at every call.
        bias = None
        if attention_mask is not None:
            if attention_mask.shape != (b, s):
                raise ValueError(
                    f"expected an attention_mask of shape (B, S) = ({b}, {s}) covering cached and new "
                    f"tokens, got {tuple(attention_mask.shape)}"
                )
            mask = padding_mask(attention_mask)  # (B, 1, 1, S)
            bias = attention_bias(mask, causal=True, shape=(b, 1, t, s), dtype=x.dtype, device=x.device)

        attentions = []
        for i, block in enumerate(self.transformer.h):
            x, weights = block(x, bias, cache, i, output_attentions)
            attentions.append(weights)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V), or (B, logits_to_keep, V)
        return GPT2Output(
            logits=logits,
            past_key_values=cache if use_cache else None,
            attentions=tuple(attentions) if output_attentions else None,
        )

    # ---- real GPT-2 weights ----------------------------------------------------------------------

    def load_hf_state_dict(self, hf_state_dict: dict[str, Tensor]) -> None:
        """Copy a `GPT2LMHeadModel` state dict into this model through `hf_key_map`, checking every shape."""
        ours = self.state_dict()
        missing = []
        with torch.no_grad():
            for key, (hf_key, transpose) in hf_key_map(self.config.n_layer).items():
                if hf_key not in hf_state_dict:
                    missing.append(hf_key)
                    continue
                w = hf_state_dict[hf_key]
                w = w.t() if transpose else w
                if w.shape != ours[key].shape:
                    raise ValueError(
                        f"shape mismatch for {key}: our model has {tuple(ours[key].shape)}, the checkpoint's "
                        f"{hf_key} gives {tuple(w.shape)}{' after transposing' if transpose else ''}"
                    )
                ours[key].copy_(w)
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} GPT-2 weights, e.g. {missing[:3]}")
        known = {hf_key for hf_key, _ in hf_key_map(self.config.n_layer).values()}
        unexpected = [k for k in hf_state_dict if k not in known and not k.endswith((".attn.bias", ".attn.masked_bias"))]
        if unexpected:
            raise ValueError(f"the checkpoint has weights this GPT-2 does not use, e.g. {unexpected[:3]}")

    def to_hf(self) -> GPT2LMHeadModel:
        """A `transformers` GPT2LMHeadModel with this model's weights: the key map, read backwards.

        This is how the course's own small GPT-2 is saved (`save_pretrained`), so that anything that
        reads GPT-2 checkpoints, `GPT2.from_pretrained` included, can load it.
        """
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel(self.config.to_hf())
        ours = self.state_dict()
        hf_state = {
            hf_key: ours[key].t() if transpose else ours[key]
            for key, (hf_key, transpose) in hf_key_map(self.config.n_layer).items()
        }
        hf.load_state_dict(hf_state, strict=True)  # every weight, no more, no fewer
        return hf.train(self.training)

    @classmethod
    def from_hf(cls, hf_model: GPT2LMHeadModel, **overrides) -> GPT2:
        """Our GPT-2 with the configuration and weights of a `transformers` GPT2LMHeadModel."""
        model = cls(replace(GPT2Config.from_hf(hf_model.config), **overrides))
        model.load_hf_state_dict(hf_model.state_dict())
        return model

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **overrides) -> GPT2:
        """Load real GPT-2 weights: a hub name ("gpt2", "distilgpt2", "gpt2-medium") or a save_pretrained directory."""
        from minivlm.hub import load_hf_gpt2

        return cls.from_hf(load_hf_gpt2(name_or_path), **overrides)


def hf_key_map(n_layer: int) -> dict[str, tuple[str, bool]]:
    """Our parameter name -> (the GPT2LMHeadModel name, whether its Conv1D weight must be transposed).

    The names are identical by construction; the map exists to say so in one place and to mark the
    four Conv1D weights per block, stored (in, out) where nn.Linear stores (out, in).
    """
    keys = ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    per_block = [
        "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
        "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
        "mlp.c_proj.weight", "mlp.c_proj.bias",
    ]  # fmt: skip
    mapping = {k: (k, False) for k in keys}
    for i in range(n_layer):
        for name in per_block:
            key = f"transformer.h.{i}.{name}"
            mapping[key] = (key, name in conv1d)
    mapping["lm_head.weight"] = ("lm_head.weight", False)  # tied to wte; loading it again is harmless
    return mapping
