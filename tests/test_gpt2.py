"""Our GPT-2 equals transformers' GPT2LMHeadModel on the same random weights, with and without a KV cache."""

from __future__ import annotations

import time

import pytest
import torch
from torch.testing import assert_close

from conftest import hf_gpt2
from minivlm.decoding import positions_from_mask
from minivlm.gpt2 import GPT2, GPT2Config, hf_key_map
from minivlm.hub import OfflineError, load_hf_gpt2

TOL = dict(atol=1e-5, rtol=0)
LEFT_PADDED = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]])


def assert_padded_logits_equal(ours, hf, mask: torch.Tensor) -> None:
    """Same logits at every real (unpadded) position, positions counted from each row's first token."""
    ids = torch.randint(0, hf.config.vocab_size, mask.shape)
    positions = positions_from_mask(mask)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, position_ids=positions).logits
        b = hf(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert_close(a[real], b[real], **TOL)


@pytest.fixture(scope="module")
def gpt2_124m_pair():
    """GPT-2 124M's exact architecture (GPT2Config() defaults), random init: no download."""
    torch.manual_seed(0)
    hf = hf_gpt2("gpt2")
    assert hf.config.to_dict()["n_embd"] == 768 and hf.config.n_layer == 12 and hf.config.vocab_size == 50257
    return hf, GPT2.from_hf(hf).eval()


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_tiny_logits_equal_transformers(tiny_pair, impl):
    hf, _ = tiny_pair
    ours = GPT2.from_hf(hf, attn_impl=impl).eval()
    ids = torch.randint(0, hf.config.vocab_size, (3, 20))
    with torch.no_grad():
        assert_close(ours(ids).logits, hf(ids).logits, **TOL)


def test_gpt2_124m_config_logits_equal_transformers(gpt2_124m_pair):
    hf, ours = gpt2_124m_pair
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters()) == 124_439_808
    ids = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        assert_close(ours(ids).logits, hf(ids).logits, **TOL)


def test_gpt2_124m_config_with_padding_equals_transformers(gpt2_124m_pair):
    hf, ours = gpt2_124m_pair
    assert_padded_logits_equal(ours, hf, LEFT_PADDED)


@pytest.mark.parametrize("impl", ["math", "sdpa"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_and_attention_mask_equal_transformers(tiny_pair, impl, side):
    hf, _ = tiny_pair
    ours = GPT2.from_hf(hf, attn_impl=impl).eval()
    assert_padded_logits_equal(ours, hf, LEFT_PADDED if side == "left" else LEFT_PADDED.flip(1))


def test_padding_does_not_change_real_tokens(tiny_pair):
    """A left-padded row gives the same logits as the same tokens alone, unpadded."""
    _, ours = tiny_pair
    ids = torch.randint(0, 128, (3, 8))
    with torch.no_grad():
        batched = ours(ids, attention_mask=LEFT_PADDED, position_ids=positions_from_mask(LEFT_PADDED)).logits
        for row, mask in zip(range(3), LEFT_PADDED):
            alone = ours(ids[row : row + 1, mask.bool()]).logits
            assert_close(batched[row, mask.bool()], alone[0], **TOL)


def test_inputs_embeds_equal_transformers_and_input_ids(tiny_pair):
    hf, ours = tiny_pair
    ids = torch.randint(0, 128, (2, 10))
    embeds = torch.randn(2, 10, 32)  # any vectors of width D, as a visual prefix will be
    with torch.no_grad():
        assert_close(ours(inputs_embeds=embeds).logits, hf(inputs_embeds=embeds).logits, **TOL)
        assert_close(ours(inputs_embeds=ours.get_input_embeddings()(ids)).logits, ours(ids).logits, **TOL)


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_kv_cache_logits_equal_full_forward(tiny_pair, impl):
    hf, _ = tiny_pair
    ours = GPT2.from_hf(hf, attn_impl=impl).eval()
    ids = torch.randint(0, 128, (3, 8))
    with torch.no_grad():
        full = ours(ids, attention_mask=LEFT_PADDED, position_ids=positions_from_mask(LEFT_PADDED)).logits
        out = ours(ids[:, :5], attention_mask=LEFT_PADDED[:, :5], position_ids=positions_from_mask(LEFT_PADDED)[:, :5], use_cache=True)
        steps = [out.logits]
        for i in range(5, 8):
            mask = LEFT_PADDED[:, : i + 1]
            out = ours(ids[:, i : i + 1], attention_mask=mask, position_ids=positions_from_mask(mask)[:, -1:], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert out.past_key_values.get_seq_length() == 8
    real = LEFT_PADDED.bool()
    assert_close(torch.cat(steps, dim=1)[real], full[real], **TOL)


def test_sequence_longer_than_context_names_both_lengths(tiny_pair):
    _, ours = tiny_pair
    with pytest.raises(ValueError, match=r"65 tokens.*context of 64"):
        ours(torch.zeros(1, 65, dtype=torch.long))
    out = ours(torch.zeros(1, 60, dtype=torch.long), use_cache=True)
    with pytest.raises(ValueError, match=r"66 tokens \(60 cached \+ 6 new\).*context of 64"):
        ours(torch.zeros(1, 6, dtype=torch.long), past_key_values=out.past_key_values)


def test_bad_arguments_are_named(tiny_pair):
    _, ours = tiny_pair
    ids = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        ours(ids, inputs_embeds=torch.zeros(2, 5, 32))
    with pytest.raises(ValueError, match=r"inputs_embeds of shape \(B, T, 32\), got \(2, 5, 16\)"):
        ours(inputs_embeds=torch.zeros(2, 5, 16))
    with pytest.raises(ValueError, match=r"attention_mask of shape \(B, S\) = \(2, 5\).*\(2, 4\)"):
        ours(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="unknown GPT-2 preset 'gpt5'"):
        GPT2Config.from_preset("gpt5")


def test_attention_weights_for_plotting(tiny_pair):
    _, ours = tiny_pair
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        out = ours(ids, output_attentions=True)
        plain = ours(ids)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 6, 6)
    assert torch.all(out.attentions[0].triu(diagonal=1) == 0), "no token may attend to the future"
    assert_close(out.logits, plain.logits, **TOL)


def test_loads_a_save_pretrained_directory(tiny_pair, tmp_path):
    hf, _ = tiny_pair
    hf.save_pretrained(tmp_path / "my-gpt2")
    ours = GPT2.from_pretrained(tmp_path / "my-gpt2").eval()
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert_close(ours(ids).logits, hf(ids).logits, **TOL)


def test_key_map_covers_every_parameter_and_checks_shapes(tiny_pair):
    hf, ours = tiny_pair
    assert set(hf_key_map(2)) == set(ours.state_dict())
    bad = dict(hf.state_dict())
    bad["transformer.h.1.mlp.c_fc.weight"] = bad["transformer.h.1.mlp.c_fc.weight"].t()  # stored as nn.Linear
    with pytest.raises(ValueError, match=r"shape mismatch for transformer\.h\.1\.mlp\.c_fc\.weight"):
        GPT2(ours.config).load_hf_state_dict(bad)
    missing = {k: v for k, v in hf.state_dict().items() if "h.1.ln_2" not in k}
    with pytest.raises(ValueError, match="lacks 2 GPT-2 weights"):
        GPT2(ours.config).load_hf_state_dict(missing)
    extra = {**hf.state_dict(), "transformer.h.2.ln_1.weight": torch.ones(32)}
    with pytest.raises(ValueError, match="does not use"):
        GPT2(ours.config).load_hf_state_dict(extra)


def test_unsupported_gpt2_variants_are_refused():
    config = GPT2Config.from_preset("tiny").to_hf()
    config.scale_attn_by_inverse_layer_idx = True
    from transformers import GPT2LMHeadModel

    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        GPT2.from_hf(GPT2LMHeadModel(config))


def test_hub_name_offline_fails_fast_with_advice(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    start = time.perf_counter()
    with pytest.raises(OfflineError, match="not in the local Hugging Face cache.*offline"):
        GPT2.from_pretrained("distilgpt2")
    assert time.perf_counter() - start < 10


def test_missing_local_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no directory at .*nowhere .looking for GPT-2"):
        load_hf_gpt2(tmp_path / "nowhere")


def test_logits_to_keep_computes_only_the_last_positions(tiny_pair):
    hf, ours = tiny_pair
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        last = ours(ids, logits_to_keep=1).logits
        assert last.shape == (2, 1, 128)
        assert_close(last, ours(ids).logits[:, -1:], **TOL)
        assert_close(last, hf(ids, logits_to_keep=1).logits, **TOL)


def test_an_all_ones_attention_mask_changes_nothing(tiny_pair):
    _, ours = tiny_pair
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert_close(ours(ids, attention_mask=torch.ones(2, 9)).logits, ours(ids).logits, **TOL)


def test_to_hf_round_trip(tiny_pair, tmp_path):
    """Our weights -> transformers -> save_pretrained -> ours again: the same logits all the way."""
    _, ours = tiny_pair
    hf = ours.to_hf().eval()
    ids = torch.randint(0, 128, (2, 7))
    hf.save_pretrained(tmp_path / "exported")
    back = GPT2.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        assert_close(hf(ids).logits, ours(ids).logits, **TOL)
        assert_close(back(ids).logits, ours(ids).logits, **TOL)
