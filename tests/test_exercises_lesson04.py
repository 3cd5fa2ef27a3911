"""Lesson 04's self-checks: each fails on the blank and on the plausible mistakes, with its hint, and passes on an answer.

The wrong answers below are the mistakes a learner makes: an output-size formula that forgets the
second padding, the + 1, the stride or the floor; a convolution that flips its kernel (the textbook
convolution, not PyTorch's cross-correlation), forgets the bias, the padding or pads only the width;
a forward hook left attached, or one that keeps the layer's input or the model's output.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from minivlm.exercises import ExerciseFailed, ExerciseNotDone, check


def blank(*args, **kwargs):
    raise NotImplementedError("Exercise 4.x: the generator's stub")


def assert_fails(exercise: str, answer, hint: str) -> None:
    with pytest.raises(ExerciseFailed, match=hint):
        check(exercise, answer)


@pytest.mark.parametrize("exercise", ["4.1", "4.2", "4.3"])
def test_blank_is_not_done(exercise):
    with pytest.raises(ExerciseNotDone, match=f"Exercise {exercise} is not done yet"):
        check(exercise, blank)


# Exercise 4.1: conv_output_size(size, kernel_size, stride=1, padding=0)


def output_size(size, kernel_size, stride=1, padding=0):
    return (size + 2 * padding - kernel_size) // stride + 1


def test_output_size_passes(capsys):
    check("4.1", output_size)
    assert "Exercise 4.1 passed: matches nn.Conv2d" in capsys.readouterr().out


@pytest.mark.parametrize(
    "wrong, hint",
    [
        (lambda n, k, stride=1, padding=0: (n + 2 * padding - k) / stride + 1, "use floor division //"),
        (lambda n, k, stride=1, padding=0: (n + padding - k) // stride + 1, r"on \*both\* sides"),
        (lambda n, k, stride=1, padding=0: (n + 2 * padding - k) // stride, r"you forgot the \+ 1"),
        (lambda n, k, stride=1, padding=0: n + 2 * padding - k + 1, "ignoring the stride"),
        (lambda n, k, stride=1, padding=0: -(-(n + 2 * padding - k) // stride) + 1, r"round \*down\*"),
        (lambda n, k, stride=1, padding=0: (n - k) // stride + 1, "the formula is"),  # no padding at all
    ],
)
def test_output_size_mistakes(wrong, hint):
    assert_fails("4.1", wrong, hint)


# Exercise 4.2: conv2d(x, weight, bias, stride=1, padding=0) by hand


def conv2d(x, weight, bias, stride=1, padding=0, flip=False, pad=None, use_bias=True):
    """A correct convolution by unfold, and, through its flags, the mistakes."""
    x = F.pad(x, (padding,) * 4 if pad is None else pad)
    if flip:
        weight = weight.flip(-2, -1)
    k = weight.shape[-1]
    windows = x.unfold(2, k, stride).unfold(3, k, stride)  # (B, C_in, H', W', k, k)
    out = torch.einsum("bchwij,ocij->bohw", windows, weight)  # (B, C_out, H', W')
    return out + rearrange(bias, "o -> 1 o 1 1") if use_bias else out


def loop_conv2d(x, weight, bias, stride=1, padding=0):
    """The same by explicit loops over output positions: slow, but checks must accept any correct answer."""
    x = F.pad(x, (padding,) * 4)
    c_out, _, k, _ = weight.shape
    h, w = (x.shape[2] - k) // stride + 1, (x.shape[3] - k) // stride + 1
    out = torch.zeros(x.shape[0], c_out, h, w)
    for i in range(h):
        for j in range(w):
            window = x[:, :, i * stride : i * stride + k, j * stride : j * stride + k]  # (B, C_in, k, k)
            out[:, :, i, j] = (window[:, None] * weight).sum((2, 3, 4)) + bias
    return out


@pytest.mark.parametrize("answer", [conv2d, loop_conv2d])
def test_conv2d_passes(answer, capsys):
    check("4.2", answer)
    assert "Exercise 4.2 passed: equals F.conv2d" in capsys.readouterr().out


@pytest.mark.parametrize(
    "mistake, hint",
    [
        (dict(flip=True), "flips the kernel.*cross-correlation"),
        (dict(use_bias=False), "right but for the bias"),
        (dict(pad=(0, 0, 0, 0)), "you did not pad"),
        (dict(pad="width"), "you padded the width only"),
    ],
)
def test_conv2d_mistakes(mistake, hint):
    def wrong(x, weight, bias, stride=1, padding=0):
        pad = mistake.get("pad")
        kwargs = {**mistake, "pad": (padding, padding) if pad == "width" else pad}
        return conv2d(x, weight, bias, stride=stride, padding=padding, **kwargs)

    assert_fails("4.2", wrong, hint)


def test_conv2d_ignoring_the_stride_fails():
    assert_fails("4.2", lambda x, weight, bias, stride=1, padding=0: conv2d(x, weight, bias, 1, padding), "ignored the stride")


def test_conv2d_without_summing_channels_fails():
    """Summing the kernel positions but keeping only the first input channel: right shape, wrong values."""

    def wrong(x, weight, bias, stride=1, padding=0):
        return conv2d(x[:, :1], weight[:, :1], bias, stride, padding)

    assert_fails("4.2", wrong, "sum over \\*all\\* input channels")


# Exercise 4.3: capture(model, layer, images) with a forward hook


def capture(model, layer, images):
    kept = {}
    handle = layer.register_forward_hook(lambda module, inputs, output: kept.update(output=output))
    try:
        model(images)
    finally:
        handle.remove()
    return kept["output"]


def test_capture_passes(capsys):
    check("4.3", capture)
    assert "Exercise 4.3 passed: returns the hooked layer's output" in capsys.readouterr().out


def test_capture_leaving_the_hook_fails():
    def wrong(model, layer, images):
        kept = {}
        layer.register_forward_hook(lambda module, inputs, output: kept.update(output=output))
        model(images)
        return kept["output"]

    assert_fails("4.3", wrong, r"call handle.remove\(\)")


def test_capture_keeping_the_input_fails():
    def wrong(model, layer, images):
        kept = {}
        handle = layer.register_forward_hook(lambda module, inputs, output: kept.update(output=inputs[0]))
        model(images)
        handle.remove()
        return kept["output"]

    assert_fails("4.3", wrong, r"returned the layer's \*input\*")


def test_capture_returning_the_model_output_fails():
    def wrong(model, layer, images):
        handle = layer.register_forward_hook(lambda module, inputs, output: None)
        out = model(images)
        handle.remove()
        return out

    assert_fails("4.3", wrong, "returned the whole model's output")


def test_capture_returning_nothing_fails():
    def wrong(model, layer, images):
        handle = layer.register_forward_hook(lambda module, inputs, output: output)
        model(images)
        handle.remove()

    assert_fails("4.3", wrong, "should return a tensor")
