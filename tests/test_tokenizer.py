"""The course tokenizer: GPT-2's byte-level BPE, trained here, saved and loaded as a transformers tokenizer."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from minivlm.tokenizer import EOT, PAD, load_tokenizer, tokenizer_for_hub_model, train_tokenizer

TEXTS = [
    "a small red circle to the left of a large blue square.",
    "a large green triangle above a small yellow diamond, which is below a small purple circle.",
    "answer with dax or blicket. a small red circle. this is a dax.",
] * 40


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=400)


def test_round_trip_of_any_text(tokenizer):
    for text in [*TEXTS[:3], "Ünïcödé, emoji 🙂 and tabs\tare bytes too", ""]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_explicit_end_of_text_and_padding_tokens(tokenizer):
    assert tokenizer.eos_token == EOT and tokenizer.pad_token == PAD
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert tokenizer(EOT)["input_ids"] == [tokenizer.eos_token_id]  # one token, never split
    batch = tokenizer(["a red circle.", "a small red circle to the left of a large blue square."], padding=True)
    short, long = batch["input_ids"]
    assert len(short) == len(long) and short[-1] == tokenizer.pad_token_id
    assert batch["attention_mask"][0][-1] == 0 and all(batch["attention_mask"][1])


def test_bpe_learns_whole_words_of_the_corpus(tokenizer):
    assert len(tokenizer) <= 400
    for word in ["small", "circle", "triangle", "left"]:
        assert len(tokenizer(" " + word)["input_ids"]) == 1, f"{word!r} should be one token after training"
    assert len(tokenizer(" zyxwvut")["input_ids"]) > 1  # unseen text still encodes, byte by byte


def test_save_and_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert loaded(TEXTS[1])["input_ids"] == tokenizer(TEXTS[1])["input_ids"]
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_hub_style_tokenizer_without_padding_pads_with_end_of_text(tokenizer, tmp_path):
    """GPT-2's own tokenizer has no padding token; we pad with <|endoftext|> (padding is masked out)."""
    gpt2_like = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token=EOT)
    gpt2_like.save_pretrained(tmp_path / "gpt2-like")
    loaded = tokenizer_for_hub_model(tmp_path / "gpt2-like")
    assert loaded.pad_token == EOT


def test_too_small_a_vocabulary_is_refused():
    with pytest.raises(ValueError, match="at least 258"):
        train_tokenizer(TEXTS, vocab_size=100)


def test_hub_tokenizer_offline_fails_fast_with_advice(tmp_path, monkeypatch):
    import time

    from minivlm.hub import OfflineError

    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache; conftest sets HF_HUB_OFFLINE
    start = time.perf_counter()
    with pytest.raises(OfflineError, match="the tokenizer of 'gpt2' is not in the local Hugging Face cache"):
        tokenizer_for_hub_model("gpt2")
    assert time.perf_counter() - start < 10
    with pytest.raises(FileNotFoundError, match="no directory at .*nowhere.*tokenizer"):
        tokenizer_for_hub_model(tmp_path / "nowhere" / "tok.json")
