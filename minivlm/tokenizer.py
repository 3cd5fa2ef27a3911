"""The tokenizer: GPT-2's algorithm, byte-level BPE, trained on the course's own text.

GPT-2 (Radford et al., 2019, section 2.2) splits text into bytes, so that any string can be encoded,
then learns merges of frequent neighbouring pairs (byte-pair encoding, Sennrich et al., 2016) until the
vocabulary has the size asked for. Trained on the shapes world's small corpus, a few hundred merges
make every word of the grammar a single token. We train it with Hugging Face's `tokenizers` library
and wrap it as a `transformers` tokenizer, so that it saves, loads and pads like GPT-2's own.

Unlike GPT-2's, this tokenizer has an explicit padding token; `<|endoftext|>` ends every text.
With a hub model, use that model's own tokenizer (`tokenizer_for_hub_model`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from minivlm import hub

__all__ = ["EOT", "PAD", "train_tokenizer", "load_tokenizer", "tokenizer_for_hub_model"]

EOT = "<|endoftext|>"  # ends every text, as in GPT-2
PAD = "<|pad|>"  # fills batches of texts of different lengths; never predicted


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Learn byte-level BPE merges from `texts`; return a `transformers` tokenizer with EOT and PAD tokens."""
    if vocab_size < 256 + 2:
        raise ValueError(f"vocab_size must be at least 258 (256 bytes + {EOT} + {PAD}), got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # bytes, split before spaces
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text can be encoded
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOT, bos_token=EOT, pad_token=PAD)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer written by `save_pretrained`."""
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def tokenizer_for_hub_model(name_or_path: str | Path):
    """A hub model's own tokenizer; GPT-2 has no padding token, so pad with <|endoftext|> (masked out anyway)."""
    tokenizer = hub.load_hf_tokenizer(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
