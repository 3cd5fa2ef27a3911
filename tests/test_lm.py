"""The frozen language model: pretraining is deterministic and learns, the cache is keyed and atomic,
freezing stops weights but not gradients, and every way of loading an LM gives a frozen one."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

import minivlm.lm as lm
from minivlm.corpus import CorpusConfig
from minivlm.gpt2 import GPT2, GPT2Config
from minivlm.hub import OfflineError
from minivlm.lm import (
    LM_PRESETS, cache_key, course_lm, document_ranges, document_starts, evaluate_perplexity, freeze, heldout_texts,
    learning_rate, load_frozen_lm, pretrain, sinusoidal_positions,
)  # fmt: skip
from minivlm.tokenizer import train_tokenizer

TINY = LM_PRESETS["tiny"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """A fresh, empty minivlm cache per test."""
    monkeypatch.setenv("MINIVLM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_lm():
    """(model, tokenizer, stats) of one tiny pretraining run, shared by the tests that only read it."""
    return pretrain("tiny", progress=False)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_pretraining_is_deterministic(tiny_lm):
    model, tokenizer, stats = tiny_lm
    again, tokenizer2, stats2 = pretrain("tiny", progress=False)
    assert tokenizer.get_vocab() == tokenizer2.get_vocab()
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs between two runs of the same config"
    assert stats["losses"] == stats2["losses"]


def test_pretraining_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    pretrain(replace(TINY, steps=2, warmup=0), progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_pretraining_learns(tiny_lm):
    model, tokenizer, stats = tiny_lm
    assert not model.training
    assert stats["final_loss"] < stats["first_loss"] - 1.5
    assert stats["tokens_seen"] == TINY.steps * TINY.batch_size * TINY.block_size
    texts = heldout_texts("tiny")
    untrained = GPT2(TINY.gpt2).eval()
    trained_ppl = evaluate_perplexity(model, tokenizer, texts, TINY.block_size)
    assert trained_ppl < evaluate_perplexity(untrained, tokenizer, texts, TINY.block_size) / 5


def test_sinusoidal_positions_make_every_offset_one_linear_map():
    table = sinusoidal_positions(256, 32)
    assert table.shape == (256, 32)
    assert_close(table.pow(2).mean().sqrt(), torch.tensor(0.02))  # the scale of GPT-2's normal init
    w = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(0, 32, 2) / 32)
    for k in (1, 4, 5):  # row t + k is row t rotated in each (sin, cos) pair by k * w_i, for every t
        c, s = torch.cos(k * w), torch.sin(k * w)
        sin_t, cos_t = table[:-k, 0::2], table[:-k, 1::2]
        assert_close(table[k:, 0::2], sin_t * c + cos_t * s, atol=1e-6, rtol=0)
        assert_close(table[k:, 1::2], cos_t * c - sin_t * s, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="even width"):
        sinusoidal_positions(8, 5)


def test_position_embeddings_start_as_configured():
    frozen_start = replace(TINY, steps=2, warmup=0, lr=0.0)  # no step moves a weight: what remains is the init
    sinusoidal, _, _ = pretrain(frozen_start, progress=False)
    assert torch.equal(sinusoidal.transformer.wpe.weight, sinusoidal_positions(TINY.n_positions, TINY.n_embd))
    normal, _, _ = pretrain(replace(frozen_start, position_init="normal"), progress=False)
    assert 0.015 < normal.transformer.wpe.weight.std() < 0.025
    assert not torch.allclose(normal.transformer.wpe.weight, sinusoidal.transformer.wpe.weight)
    assert torch.equal(normal.transformer.h[0].attn.c_attn.weight, sinusoidal.transformer.h[0].attn.c_attn.weight)
    with pytest.raises(ValueError, match="unknown position_init 'rope'"):
        replace(TINY, position_init="rope")


def test_perplexity_does_not_depend_on_padding(tiny_lm):
    """Batched with padding, or one text at a time with none: the same tokens, the same perplexity."""
    model, tokenizer, _ = tiny_lm
    texts = heldout_texts("tiny")[:12]
    batched = evaluate_perplexity(model, tokenizer, texts, TINY.block_size, batch_size=12)
    assert batched == pytest.approx(evaluate_perplexity(model, tokenizer, texts, TINY.block_size, batch_size=1), rel=1e-5)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    lrs = [learning_rate(s, peak=1.0, warmup=10, steps=100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1)


def test_heldout_documents_are_never_trained_on(monkeypatch):
    ranges = document_ranges(TINY)
    read = []  # the index ranges pretraining asks the corpus for
    real = lm.documents

    def spy(config, n, start=0):
        read.append(range(start, start + n))
        return real(config, n, start)

    monkeypatch.setattr(lm, "documents", spy)
    pretrain(replace(TINY, steps=2, warmup=0), progress=False)
    assert read == [ranges["tokenizer"], ranges["train"]]
    assert not set(ranges["heldout"]) & (set(ranges["tokenizer"]) | set(ranges["train"]))
    assert heldout_texts(TINY) == list(real(TINY.corpus, TINY.heldout_documents, 0))


def test_cache_trains_once_then_loads(monkeypatch, capsys):
    model, tokenizer, info = course_lm("tiny", progress=False)
    assert "cached in" in capsys.readouterr().out
    assert info["preset"] == "tiny" and info["path"].endswith(f"tiny-{cache_key(TINY)}")

    def no_training(*args, **kwargs):
        raise AssertionError("the second call should load from the cache, not train")

    monkeypatch.setattr(lm, "pretrain", no_training)
    loaded, loaded_tokenizer, loaded_info = course_lm("tiny", progress=False)
    assert capsys.readouterr().out == ""
    assert loaded_info == info
    ids = torch.tensor([tokenizer("a small red circle.")["input_ids"]])
    assert loaded_tokenizer("a small red circle.")["input_ids"] == ids[0].tolist()
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_a_freshly_trained_lm_is_returned_as_the_cache_gives_it_back():
    trained, _, _ = course_lm("tiny", progress=False)  # trains (the cache is empty)
    loaded, _, _ = course_lm("tiny", progress=False)  # loads
    for model in (trained, loaded):
        assert not model.training
        assert all(p.grad is None for p in model.parameters())  # no gradient left over from the last step


def test_retrain_trains_again(monkeypatch):
    course_lm("tiny", progress=False)
    calls = []
    monkeypatch.setattr(lm, "pretrain", lambda *a, **k: calls.append(1) or pretrain(*a, **k))
    course_lm("tiny", retrain=True, progress=False)
    assert calls == [1]
    course_lm("tiny", progress=False)
    assert calls == [1]  # the retrained model is in the cache


def test_any_change_to_the_config_changes_the_key():
    changed = [replace(TINY, steps=31), replace(TINY, lr=2e-2), replace(TINY, corpus=CorpusConfig(seed=1)),
               replace(TINY, position_init="normal")]  # fmt: skip
    assert len({cache_key(c) for c in [TINY, *changed]}) == 5
    assert cache_key(replace(TINY, threads=2)) == cache_key(TINY)  # how fast, not what is trained


def test_an_interrupted_save_leaves_no_model(monkeypatch, tmp_path):
    written = []

    def disk_full(self, directory, *args, **kwargs):  # the tokenizer is saved after the weights
        written.extend(p.name for p in Path(directory).iterdir())
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="disk full"):
        course_lm("tiny", progress=False)
    assert "model.safetensors" in written  # it failed half-way through ...
    assert list((tmp_path / "cache" / "lm").iterdir()) == []  # ... and left neither a model nor a partial copy


def test_freeze_stops_weights_but_not_gradients_through_the_model():
    model = freeze(GPT2(GPT2Config.from_preset("tiny")).train())
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())
    prefix = torch.randn(2, 3, model.config.n_embd, requires_grad=True)  # (B, P, D): what the vision side writes
    model(inputs_embeds=prefix).logits.sum().backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0  # the gradient reaches the prefix ...
    assert all(p.grad is None for p in model.parameters())  # ... and no weight of the LM
    with torch.no_grad():
        assert not model(inputs_embeds=prefix).logits.requires_grad  # no_grad would cut the prefix off


def test_course_lm_loads_frozen_with_either_backend():
    ours, tokenizer = load_frozen_lm("course:tiny")
    hf, _ = load_frozen_lm("course:tiny", backend="transformers")
    assert isinstance(ours, GPT2) and isinstance(hf, GPT2LMHeadModel)
    assert hf.config.eos_token_id == tokenizer.eos_token_id and hf.config.pad_token_id == tokenizer.pad_token_id
    for model in (ours, hf):
        assert not model.training and not any(p.requires_grad for p in model.parameters())
    ids = torch.tensor([tokenizer("a large blue square above a small red circle.")["input_ids"]])
    assert_close(logits(ours, ids), logits(hf, ids), atol=1e-5, rtol=0)


def test_a_local_directory_loads_frozen(tmp_path):
    hf = GPT2LMHeadModel(GPT2Config.from_preset("tiny", vocab_size=300).to_hf()).eval()
    tokenizer = train_tokenizer(heldout_texts("tiny"), vocab_size=300)
    hf.save_pretrained(tmp_path / "my-lm")
    tokenizer.save_pretrained(tmp_path / "my-lm")
    model, loaded_tokenizer = load_frozen_lm(tmp_path / "my-lm")
    assert isinstance(model, GPT2) and not any(p.requires_grad for p in model.parameters())
    ids = torch.tensor([loaded_tokenizer("a small red circle.")["input_ids"]])
    assert ids[0].tolist() == tokenizer("a small red circle.")["input_ids"]
    assert_close(logits(model, ids), logits(hf, ids), atol=1e-5, rtol=0)


def test_a_directory_without_tokenizer_is_refused_clearly(tmp_path):
    GPT2LMHeadModel(GPT2Config.from_preset("tiny").to_hf()).save_pretrained(tmp_path / "weights-only")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.*tokenizer\.save_pretrained"):
        load_frozen_lm(str(tmp_path / "weights-only"))
    with pytest.raises(FileNotFoundError, match="no language model directory"):
        load_frozen_lm(str(tmp_path / "nowhere"))


def test_unknown_names_list_the_options():
    with pytest.raises(ValueError, match=r"'tiny'.*'gpt2'.*directory"):
        load_frozen_lm("gpt3")
    with pytest.raises(ValueError, match=r"preset 'huge'.*'cpu', 'tiny'"):
        load_frozen_lm("course:huge")
    with pytest.raises(ValueError, match="backend"):
        load_frozen_lm("course:tiny", backend="jax")


def test_hub_model_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    start = time.perf_counter()
    with pytest.raises(OfflineError, match="not in the local Hugging Face cache"):
        load_frozen_lm("gpt2")
    assert time.perf_counter() - start < 10


def test_training_windows_start_at_document_starts():
    stream = torch.tensor([0, 5, 6, 0, 7, 0, 8, 9, 9, 0])  # EOT = 0 before every document
    assert document_starts(stream, eot=0, t=4).tolist() == [0, 3, 5]  # 9 would leave a window of 1 token
    windows = stream[document_starts(stream, 0, 4)[:, None] + torch.arange(4)]  # (S, T)
    assert (windows[:, 0] == 0).all()
    with pytest.raises(ValueError, match="no document starts a window"):
        document_starts(torch.tensor([0, 5, 6]), eot=0, t=4)
