"""What the lessons' self-checks share: seeded inputs, calling an answer safely, naming a known mistake.

A check runs the learner's function on seeded random inputs (`randn`), turns an error it raises into a
hint (`call`), and, when the result differs from the package's, recomputes the usual mistakes and
names the one the result equals (`diagnose`): "you forgot to divide by √K" beats "wrong by 0.31".
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minivlm.exercises import fail

__all__ = ["Mistakes", "randn", "call", "tensor", "same", "diagnose"]

Mistakes = dict[str, tuple[Callable[..., torch.Tensor], str]]  # name: (the mistake, computed; its hint)


def randn(*shape: int, seed: int) -> torch.Tensor:
    """Standard normal numbers from their own generator: the same on every run, global RNG untouched."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def call(answer: Callable, *args, what: str, hint: str = ""):
    """The answer's result; an error it raises becomes a hint (NotImplementedError passes: still blank)."""
    try:
        return answer(*args)
    except NotImplementedError:
        raise
    except Exception as err:
        fail(f"{what} raised {type(err).__name__}: {str(err).rstrip('.')}. {hint}".strip())


def tensor(out, what: str) -> torch.Tensor:
    """`out` if it is a tensor; else a hint saying what came back instead."""
    if not isinstance(out, torch.Tensor):
        fail(f"{what} should return a tensor, got {type(out).__name__}")
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and values to float32 round-off."""
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def diagnose(out: torch.Tensor, args: tuple, mistakes: Mistakes, what: str, reference: torch.Tensor,
             advice: str) -> None:  # fmt: skip
    """Fail with the hint of the first known mistake `out` equals, else with the largest difference and `advice`."""
    for mistake, hint in mistakes.values():
        with torch.no_grad():
            if same(out, mistake(*args)):
                fail(hint)
    error = (out - reference).abs().max().item()
    fail(f"{what} differs from the reference by up to {error:.3g}; {advice}")
