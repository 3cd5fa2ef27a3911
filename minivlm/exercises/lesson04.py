"""Self-checks for lesson 04, a small CNN image encoder: output sizes, convolution by hand, forward hooks.

Each check runs the learner's answer on seeded inputs and compares it with PyTorch (`nn.Conv2d`,
`F.conv2d`) or with the package's `SmallCNN`. Where the answer is wrong, the check tries the mistakes
learners make most often (true convolution's flipped kernel, a forgotten bias or padding, a hook left
attached) and names the one that fits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minivlm.cnn import CNN_PRESETS, ResidualBlock, SmallCNN
from minivlm.exercises import fail

__all__ = ["CHECKS"]

# (size, kernel_size, stride, padding): odd and even sizes, so that a stride that does not divide evenly
# (and therefore floor division) matters, and padding 0, 1 and 2 with kernels 1, 3, 5 and 7.
SIZE_CASES = [(32, 3, 1, 1), (32, 3, 2, 1), (31, 3, 2, 1), (28, 5, 1, 0), (28, 5, 1, 2), (33, 7, 2, 3),
              (10, 3, 3, 0), (7, 1, 1, 0), (64, 4, 4, 0), (17, 3, 2, 0)]  # fmt: skip


def _conv_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """What nn.Conv2d gives along one side, asked of nn.Conv2d itself."""
    conv = nn.Conv2d(1, 1, kernel_size, stride, padding, bias=False)
    with torch.no_grad():
        return conv(torch.zeros(1, 1, size, size)).shape[-1]


def check_output_size(conv_output_size: Callable[..., int]) -> str:
    """Exercise 4.1: floor((n + 2p - k) / s) + 1, compared with nn.Conv2d on sizes where each term matters."""
    wrong = {  # a plausible mistake -> its hint
        "the padding is added on *both* sides of the image: use size + 2 * padding, not size + padding": (
            lambda n, k, s, p: (n + p - k) // s + 1
        ),
        "you forgot the + 1: a window fits at offset 0 too, so (size + 2p - k) // stride windows fit *after* the first": (
            lambda n, k, s, p: (n + 2 * p - k) // s
        ),
        "the stride divides the room the kernel can move in, (size + 2p - k), before the + 1, not the whole expression": (
            lambda n, k, s, p: (n + 2 * p - k + 1) // s
        ),
        "ignoring the stride: a stride of s moves the kernel s pixels at a time, so divide by it": (
            lambda n, k, s, p: n + 2 * p - k + 1
        ),
        "a window that would run past the (padded) edge is dropped: round *down* (floor division //), not up": (
            lambda n, k, s, p: -(-(n + 2 * p - k) // s) + 1
        ),
    }
    for n, k, s, p in SIZE_CASES:
        expected = _conv_size(n, k, s, p)
        got = conv_output_size(n, k, stride=s, padding=p)
        if isinstance(got, float) or (isinstance(got, Tensor) and got.is_floating_point()):
            fail(f"conv_output_size({n}, {k}, stride={s}, padding={p}) returned the float {got}: a convolution "
                 f"fits a whole number of windows, so use floor division // (not /) and return an int")  # fmt: skip
        if not isinstance(got, int):
            fail(f"conv_output_size should return an int, got {type(got).__name__}")
        if got != expected:
            for hint, mistake in wrong.items():
                if all(mistake(*case) == conv_output_size(case[0], case[1], stride=case[2], padding=case[3])
                       for case in SIZE_CASES):  # fmt: skip
                    fail(f"conv_output_size({n}, {k}, stride={s}, padding={p}) gave {got}, nn.Conv2d gives "
                         f"{expected}: {hint}")  # fmt: skip
            fail(f"conv_output_size({n}, {k}, stride={s}, padding={p}) gave {got}, but nn.Conv2d gives {expected}; "
                 f"the formula is (size + 2 * padding - kernel_size) // stride + 1")  # fmt: skip
    return f"matches nn.Conv2d on {len(SIZE_CASES)} (size, kernel, stride, padding) cases"


# (batch, in channels, out channels, height, width, kernel, stride, padding): non-square images, and
# kernels whose flip is not themselves, so that every mistake below changes the answer.
CONV_CASES = [(2, 3, 4, 7, 7, 3, 1, 1), (1, 2, 3, 8, 6, 3, 2, 0), (2, 3, 2, 9, 9, 5, 2, 2), (1, 1, 1, 5, 5, 2, 1, 0)]


def check_conv2d(conv2d: Callable[..., Tensor]) -> str:
    """Exercise 4.2: a 2-D convolution by hand equals F.conv2d, with bias, stride and padding."""
    generator = torch.Generator().manual_seed(4)
    for b, c_in, c_out, h, w, k, s, p in CONV_CASES:
        x = torch.randn(b, c_in, h, w, generator=generator)  # (B, C_in, H, W)
        weight = torch.randn(c_out, c_in, k, k, generator=generator)  # (C_out, C_in, k, k)
        bias = torch.randn(c_out, generator=generator)  # (C_out,)
        expected = F.conv2d(x, weight, bias, stride=s, padding=p)  # (B, C_out, H', W')
        call = f"conv2d(x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias, stride={s}, padding={p})"
        got = conv2d(x.clone(), weight.clone(), bias.clone(), stride=s, padding=p)
        if not isinstance(got, Tensor):
            fail(f"{call} should return a tensor, got {type(got).__name__}")
        if got.shape != expected.shape:
            unpadded = F.conv2d(x, weight, bias, stride=s).shape
            if p > 0 and got.shape == unpadded:
                fail(f"{call} has shape {tuple(got.shape)}, F.conv2d gives {tuple(expected.shape)}: you did not pad; "
                     f"add `padding` zeros on every side first, e.g. F.pad(x, (padding,) * 4)")  # fmt: skip
            if p > 0 and got.shape == F.conv2d(F.pad(x, (p, p)), weight, bias, stride=s).shape:
                fail(f"{call} has shape {tuple(got.shape)}, F.conv2d gives {tuple(expected.shape)}: you padded the "
                     f"width only; F.pad's tuple names the last axis first, (left, right, top, bottom), so "
                     f"F.pad(x, (p, p)) pads W alone and F.pad(x, (p, p, p, p)) pads W and H")  # fmt: skip
            if s > 1 and got.shape == F.conv2d(x, weight, bias, padding=p).shape:
                fail(f"{call} has shape {tuple(got.shape)}, F.conv2d gives {tuple(expected.shape)}: you ignored the "
                     f"stride; take every `stride`-th window position along each axis")  # fmt: skip
            fail(f"{call} has shape {tuple(got.shape)}, F.conv2d gives {tuple(expected.shape)} (B, C_out, H', W'), "
                 f"with H' = (H + 2 * padding - k) // stride + 1")  # fmt: skip
        if torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
            continue
        if torch.allclose(got, F.conv2d(x, weight.flip(-2, -1), bias, stride=s, padding=p), atol=1e-4, rtol=1e-4):
            fail(f"{call} flips the kernel, as the textbook convolution does; PyTorch's conv2d (like every deep "
                 f"learning library's) is a cross-correlation: out[i, j] = sum(window at (i, j) * weight), "
                 f"with no flip")  # fmt: skip
        if torch.allclose(got, F.conv2d(x, weight, None, stride=s, padding=p), atol=1e-4, rtol=1e-4):
            fail(f"{call} is right but for the bias: add bias[o] to every position of output channel o")
        fail(f"{call} has the right shape but the wrong values (largest difference "
             f"{(got - expected).abs().max().item():.3g}): each output is the sum over *all* input channels and "
             f"kernel positions of window * weight[o], plus bias[o]")  # fmt: skip
    return f"equals F.conv2d on {len(CONV_CASES)} seeded cases (channels, stride, padding, bias)"


def _hooks(model: nn.Module) -> int:
    """How many forward hooks are attached anywhere in the model."""
    return sum(len(m._forward_hooks) for m in model.modules())


def check_capture(capture: Callable[[nn.Module, nn.Module, Tensor], Tensor]) -> str:
    """Exercise 4.3: a forward hook returns one layer's output, the same as running the layers up to it, and is removed."""
    torch.manual_seed(4)
    encoder = SmallCNN(CNN_PRESETS["tiny"]).eval()
    with torch.no_grad():
        for block in encoder.layers:
            if isinstance(block, ResidualBlock):  # a new block is the identity (zero gain): then output = input
                block.f[-1][1].weight.fill_(1.0)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    cases = [(4, "encoder.layers[4], the residual block of the second stage"), (0, "encoder.layers[0], the stem")]
    for index, name in cases:
        layer = encoder.layers[index]
        with torch.no_grad():
            expected = encoder.layers[: index + 1](images)  # (B, C, H, W) the layers up to this one, run by hand
            layer_input = encoder.layers[:index](images)
            model_output = encoder(images)
        before = _hooks(encoder)
        with torch.no_grad():
            got = capture(encoder, layer, images)
        if _hooks(encoder) != before:
            fail(f"after capture(encoder, {name}, images) the model has {_hooks(encoder) - before} more forward "
                 f"hook(s) than before: keep the handle that register_forward_hook returns and call "
                 f"handle.remove() (in a `finally:`), or every later forward pass runs your hook too")  # fmt: skip
        if not isinstance(got, Tensor):
            fail(f"capture(encoder, {name}, images) should return a tensor, got {type(got).__name__}; did the hook "
                 f"store `output` somewhere that capture then returns?")  # fmt: skip
        if got.shape == model_output.shape and torch.allclose(got, model_output, atol=1e-5):
            fail(f"capture(encoder, {name}, images) returned the whole model's output {tuple(got.shape)}; return "
                 f"what the hook received as `output`, the layer's own output {tuple(expected.shape)}")  # fmt: skip
        if got.shape == layer_input.shape and torch.allclose(got, layer_input, atol=1e-5) and index > 0:
            fail(f"capture(encoder, {name}, images) returned the layer's *input*; a forward hook is called as "
                 f"hook(module, inputs, output): keep its third argument")  # fmt: skip
        if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-5):
            fail(f"capture(encoder, {name}, images) gave {tuple(got.shape)}, but the layers up to it give "
                 f"{tuple(expected.shape)} with other values: register the hook on `layer`, run model(images), "
                 f"and return the output the hook kept")  # fmt: skip
    return "returns the hooked layer's output (stem and a residual block of SmallCNN) and removes its hook"


CHECKS: dict[str, Callable[..., str]] = {"4.1": check_output_size, "4.2": check_conv2d, "4.3": check_capture}
