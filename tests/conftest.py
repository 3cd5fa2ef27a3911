"""Shared fixtures. Tests are offline, seeded and fast; models are built locally with random weights."""

from __future__ import annotations

import os

# Tests never touch the network: any attempt to reach the Hugging Face hub fails at once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from minivlm.gpt2 import GPT2, GPT2Config


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """One CPU thread: the tests' models are tiny and only lose time to thread synchronisation (often 10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_gpt2(preset: str, std: float | None = None):
    """A `transformers` GPT2LMHeadModel of a named size with random weights (no download), in eval mode.

    With `std`, every weight matrix is redrawn with that spread: GPT-2's own init (0.02) makes an
    untrained model predict nearly the same token everywhere, which would let decoding tests pass
    trivially; larger weights make its outputs vary from position to position.
    """
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config.from_preset(preset).to_hf()).eval()
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.normal_(0.0, std)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE trained on 300 shapes captions (every caption is at most 24 tokens); a test module
    that needs another tokenizer defines its own `tokenizer` fixture, which takes precedence."""
    from minivlm.data.shapes import ShapesWorld
    from minivlm.tokenizer import train_tokenizer

    world = ShapesWorld("train", seed=1, length=300)
    return train_tokenizer([world.caption(i) for i in range(len(world))], vocab_size=400)


@pytest.fixture(scope="session")
def tiny_pair():
    """(transformers' GPT-2, ours with the same weights), tiny preset, weights spread enough to vary."""
    torch.manual_seed(0)
    hf = hf_gpt2("tiny", std=0.3)
    return hf, GPT2.from_hf(hf).eval()
