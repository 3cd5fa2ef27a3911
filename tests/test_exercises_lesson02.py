"""Lesson 02's self-checks fail on the blank and on each plausible mistake (with its hint) and pass on the answer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from minivlm.exercises import ExerciseFailed, ExerciseNotDone, check


def blank(*args):
    raise NotImplementedError("Exercise 2.x: still blank")


# ---- 2.1: one GPT-2 block ---------------------------------------------------------------------------------


def mlp(block, h, act=lambda z: F.gelu(z, approximate="tanh")):
    return block.mlp.c_proj(act(block.mlp.c_fc(h)))


def block_right(x, block):
    x = x + block.attn(block.ln_1(x))[0]
    return x + mlp(block, block.ln_2(x))


def block_post_norm(x, block):
    x = block.ln_1(x + block.attn(x)[0])
    return block.ln_2(x + mlp(block, x))


def block_no_residuals(x, block):
    return mlp(block, block.ln_2(block.attn(block.ln_1(x))[0]))


def block_no_mlp_residual(x, block):
    x = x + block.attn(block.ln_1(x))[0]
    return mlp(block, block.ln_2(x))


def block_ln_1_twice(x, block):
    x = x + block.attn(block.ln_1(x))[0]
    return x + mlp(block, block.ln_1(x))


def block_exact_gelu(x, block):
    x = x + block.attn(block.ln_1(x))[0]
    return x + mlp(block, block.ln_2(x), F.gelu)


def block_relu(x, block):
    x = x + block.attn(block.ln_1(x))[0]
    return x + mlp(block, block.ln_2(x), F.relu)


def block_not_causal(x, block):
    x = x + block.attn(block.ln_1(x), causal=False)[0]
    return x + mlp(block, block.ln_2(x))


def block_forgot_index(x, block):
    x = x + block.attn(block.ln_1(x))  # a (output, weights) pair
    return x + mlp(block, block.ln_2(x))


# ---- 2.2: the causal LM loss ------------------------------------------------------------------------------


def loss_right(logits, labels):
    return F.cross_entropy(rearrange(logits[:, :-1], "b t v -> (b t) v"), rearrange(labels[:, 1:], "b t -> (b t)"))


def loss_transposed_right(logits, labels):  # the other correct way: classes on axis 1
    return F.cross_entropy(rearrange(logits[:, :-1], "b t v -> b v t"), labels[:, 1:])


def loss_not_shifted(logits, labels):
    return F.cross_entropy(rearrange(logits, "b t v -> (b t) v"), rearrange(labels, "b t -> (b t)"))


def loss_wrong_shift(logits, labels):
    return F.cross_entropy(rearrange(logits[:, 1:], "b t v -> (b t) v"), rearrange(labels[:, :-1], "b t -> (b t)"))


def loss_softmax_first(logits, labels):
    return loss_right(logits.softmax(-1), labels)


def loss_sum(logits, labels):
    return F.cross_entropy(
        rearrange(logits[:, :-1], "b t v -> (b t) v"), rearrange(labels[:, 1:], "b t -> (b t)"), reduction="sum"
    )


def loss_not_flattened(logits, labels):
    return F.cross_entropy(logits[:, :-1], labels[:, 1:])


def loss_item(logits, labels):
    return loss_right(logits, labels).item()


def loss_by_hand_counting_padding(logits, labels):
    """Gathers each label's log-probability, masks padding, but divides by every position."""
    log_p = logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    keep = target != -100
    picked = log_p.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum() / target.numel()


def loss_by_hand_gather_minus_100(logits, labels):
    log_p = logits[:, :-1].log_softmax(-1)
    return -log_p.gather(-1, labels[:, 1:].unsqueeze(-1)).mean()


# ---- 2.3: temperature and top-k ---------------------------------------------------------------------------


def probs_right(logits, temperature, top_k):
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.softmax(dim=-1)


def probs_k_minus_1(logits, temperature, top_k):
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits <= kth, float("-inf"))
    return logits.softmax(dim=-1)


def probs_temperature_after_softmax(logits, temperature, top_k):
    return probs_right(logits, 1.0, top_k) / temperature


def probs_softmax_wrong_axis(logits, temperature, top_k):
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.softmax(dim=0)


def probs_topk_wrong_axis(logits, temperature, top_k):
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[0]), dim=0).values[-1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits.softmax(dim=-1)


def probs_zero_filled(logits, temperature, top_k):
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, 0.0)
    return logits.softmax(dim=-1)


def probs_no_temperature(logits, temperature, top_k):
    return probs_right(logits, 1.0, top_k)


def probs_times_temperature(logits, temperature, top_k):
    return probs_right(logits * temperature, 1.0, top_k)


def probs_k_zero_not_handled(logits, temperature, top_k):
    logits = logits / temperature
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf")).softmax(dim=-1)


# ---- 2.4: one step with a KV cache ------------------------------------------------------------------------


def attend(q, keys, values):
    return (q @ keys.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1) @ values


def step_right(q, k, v, past_k, past_v):
    keys, values = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
    return attend(q, keys, values), keys, values


def step_sdpa_right(q, k, v, past_k, past_v):
    keys, values = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
    return F.scaled_dot_product_attention(q, keys, values), keys, values


def step_top_left_causal(q, k, v, past_k, past_v):
    keys, values = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
    return F.scaled_dot_product_attention(q, keys, values, is_causal=True), keys, values


def step_prepended(q, k, v, past_k, past_v):
    keys, values = torch.cat([k, past_k], dim=-2), torch.cat([v, past_v], dim=-2)
    return attend(q, keys, values), keys, values


def step_wrong_axis(q, k, v, past_k, past_v):
    keys, values = torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1)
    return attend(q, keys, values), keys, values


def step_past_ignored(q, k, v, past_k, past_v):
    keys, values = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
    return attend(q, k, v), keys, values


def step_no_scaling(q, k, v, past_k, past_v):
    keys, values = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
    return (q @ keys.transpose(-2, -1)).softmax(-1) @ values, keys, values


def step_output_only(q, k, v, past_k, past_v):
    return step_right(q, k, v, past_k, past_v)[0]


RIGHT = {
    "2.1": [block_right],
    "2.2": [loss_right, loss_transposed_right],
    "2.3": [probs_right],
    "2.4": [step_right, step_sdpa_right],
}

MISTAKES = [  # (exercise, the mistake, a piece of the hint it must get)
    ("2.1", block_post_norm, "*post*-norm block"),
    ("2.1", block_no_residuals, "no residual connections"),
    ("2.1", block_no_mlp_residual, "MLP's residual is missing"),
    ("2.1", block_ln_1_twice, "its own LayerNorm"),
    ("2.1", block_exact_gelu, "tanh approximation"),
    ("2.1", block_relu, "not ReLU"),
    ("2.1", block_not_causal, "must be causal"),
    ("2.1", block_forgot_index, "take its [0]"),
    ("2.2", loss_not_shifted, "its *own* token"),
    ("2.2", loss_wrong_shift, "shifted the wrong way"),
    ("2.2", loss_softmax_first, "raw logits"),
    ("2.2", loss_sum, "the loss is their mean"),
    ("2.2", loss_not_flattened, "flatten batch and time"),
    ("2.2", loss_item, "no .item()"),
    ("2.2", loss_by_hand_counting_padding, "padding included"),
    ("2.2", loss_by_hand_gather_minus_100, "labels of -100 mark padding"),
    ("2.3", probs_k_minus_1, "you kept k - 1 tokens"),
    ("2.3", probs_temperature_after_softmax, "before the softmax"),
    ("2.3", probs_softmax_wrong_axis, "softmax over the last axis"),
    ("2.3", probs_topk_wrong_axis, "along the vocabulary axis"),
    ("2.3", probs_zero_filled, "float('-inf') (not 0)"),
    ("2.3", probs_no_temperature, "temperature has no effect"),
    ("2.3", probs_times_temperature, "you multiplied the logits by the temperature"),
    ("2.3", probs_k_zero_not_handled, "top_k=0 means no limit"),
    ("2.4", step_top_left_causal, "aligned top-left"),
    ("2.4", step_prepended, "append it *after*"),
    ("2.4", step_wrong_axis, "append along the token axis"),
    ("2.4", step_past_ignored, "attended only to itself"),
    ("2.4", step_no_scaling, "√K"),
    ("2.4", step_output_only, "should return three tensors"),
]


@pytest.mark.parametrize("exercise", sorted(RIGHT))
def test_blank_is_not_done(exercise):
    with pytest.raises(ExerciseNotDone, match=f"Exercise {exercise} is not done yet"):
        check(exercise, blank)


@pytest.mark.parametrize(("exercise", "answer"), [(e, a) for e, answers in RIGHT.items() for a in answers],
                         ids=lambda x: getattr(x, "__name__", x))  # fmt: skip
def test_right_answer_passes(exercise, answer, capsys):
    message = check(exercise, answer)
    assert message.startswith(f"Exercise {exercise} passed: ")
    assert capsys.readouterr().out.strip() == message


@pytest.mark.parametrize(("exercise", "mistake", "hint"), MISTAKES, ids=[m.__name__ for _, m, _ in MISTAKES])
def test_mistake_fails_with_its_hint(exercise, mistake, hint):
    with pytest.raises(ExerciseFailed) as info:
        check(exercise, mistake)
    assert hint in str(info.value), str(info.value)


def test_checks_leave_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    for exercise, answers in RIGHT.items():
        check(exercise, answers[0])
    assert torch.equal(torch.rand(3), expected)


def test_checks_are_deterministic():
    assert check("2.2", loss_right) == check("2.2", loss_right)
