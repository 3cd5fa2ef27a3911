"""Self-checks for lesson 03, pretraining and freezing a language model (solutions/03_pretrain_lm.ipynb).

Each check runs the learner's answer on seeded inputs and compares it with the package: perplexity
with `minivlm.lm.evaluate_perplexity`'s definition, exp(mean loss over the real tokens); the schedule
with `minivlm.lm.learning_rate` on every step of several runs; freezing with `minivlm.lm.freeze`'s two
switches, tried on a small GPT-2 with dropout. When the answer is wrong, the check recomputes the usual
mistakes (the exponential of a sum, padding averaged in, a warm-up that starts at 0, no floor, layers
left unfrozen, dropout left on, ...) and names the one the answer matches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from minivlm.exercises import fail
from minivlm.exercises.tools import call, randn
from minivlm.gpt2 import GPT2, GPT2Config
from minivlm.lm import learning_rate

__all__ = ["CHECKS"]


# Exercise 3.1: perplexity from per-token losses -------------------------------------------------------


def _lengths_mask(lengths: list[int], t: int) -> Tensor:
    """(B, T) attention-mask style: 1 for the first `length` tokens of each row, 0 for the padding after."""
    return (torch.arange(t) < torch.tensor(lengths)[:, None]).long()


def _perplexity_cases() -> list[tuple[Tensor, Tensor]]:
    """(losses (B, T), mask (B, T)) pairs: rows of different lengths, padding holding 0 or garbage."""
    zeros_at_padding = _lengths_mask([7, 3, 5], 7)
    losses = randn(3, 7, seed=31).abs() + 0.5  # (B, T) nats, like next_token_loss(..., reduction="none")
    garbage = _lengths_mask([2, 6, 6, 4], 6)
    other = randn(4, 6, seed=32).abs() * 2 + 0.2
    return [
        (other.masked_fill(garbage == 0, 9.0), garbage),  # whatever a model scored at the padding
        (losses * zeros_at_padding, zeros_at_padding),  # ignore_index gives 0 at padding
    ]


def _reference_perplexity(losses: Tensor, mask: Tensor) -> float:
    """exp(Σ loss·mask / Σ mask): evaluate_perplexity's exp(total / count)."""
    return math.exp(float((losses * mask).sum() / mask.sum()))


PERPLEXITY_MISTAKES: dict[str, tuple[Callable[[Tensor, Tensor], float], str]] = {
    "exp of sum": (lambda l, m: math.exp(min(float((l * m).sum()), 700.0)),
                   "you took the exponential of the *sum* of the losses: perplexity is exp of the *mean* loss per "
                   "token, exp(Σ loss·mask / Σ mask), so that it does not grow with the length of the text"),
    "mean over padding": (lambda l, m: math.exp(float(l.mean())),
                          "you averaged over every position, padding included: count only the real tokens, "
                          "exp((losses * mask).sum() / mask.sum())"),
    "sum over real / all positions": (lambda l, m: math.exp(float((l * m).sum() / l.numel())),
                                      "you summed the real tokens' losses but divided by every position, padding "
                                      "included: divide by mask.sum(), the number of real tokens"),
    "no exp": (lambda l, m: float((l * m).sum() / m.sum()),
               "that is the mean loss (in nats); perplexity is its exponential, math.exp(mean) or mean.exp()"),
    "base 2": (lambda l, m: 2.0 ** float((l * m).sum() / m.sum()),
               "cross-entropy from PyTorch is in nats (natural log): undo it with exp, not 2 ** (that is for bits)"),
    "mean of row perplexities": (lambda l, m: float(((l * m).sum(1) / m.sum(1)).exp().mean()),
                                 "you averaged the perplexities of the rows: take the mean loss over all real "
                                 "tokens first, then one exp (a mean of exps is larger, and rows of different "
                                 "lengths should not count the same)"),
    "mean of row means": (lambda l, m: math.exp(float(((l * m).sum(1) / m.sum(1)).mean())),
                          "you averaged each row's mean loss, so a short row's tokens count more than a long "
                          "row's: divide the total loss by the total number of real tokens"),
    "integer mask as index": (lambda l, m: math.exp(float(l[m].mean())),
                              "indexing with an integer mask, losses[mask], picks *rows* 0 and 1 rather than "
                              "positions: use losses[mask.bool()], or multiply by the mask"),
}  # fmt: skip


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)


def _as_float(out, what: str) -> float:
    """A Python float from a float or a tensor of one number; else a hint."""
    if isinstance(out, Tensor):
        if out.numel() != 1:
            fail(f"{what} should be one number, got a tensor of shape {tuple(out.shape)}: sum (or average) over "
                 f"every real token of the batch, not per row")  # fmt: skip
        return float(out)
    if isinstance(out, (int, float)):
        return float(out)
    fail(f"{what} should return a number (a float or a one-element tensor), got {type(out).__name__}")


def check_perplexity(perplexity: Callable) -> str:
    """Exercise 3.1: perplexity(losses, mask) = exp(Σ loss·mask / Σ mask), padding left out."""
    for losses, mask in _perplexity_cases():
        what = f"perplexity(losses of shape {tuple(losses.shape)}, mask with lengths {mask.sum(1).tolist()})"
        got = _as_float(call(perplexity, losses.clone(), mask.clone(), what=what), what)
        expected = _reference_perplexity(losses, mask)
        if not _close(got, expected):
            for mistake, hint in PERPLEXITY_MISTAKES.values():
                if _close(got, mistake(losses, mask)):
                    fail(f"{what} gave {got:.4g}, expected {expected:.4g}: {hint}")
            fail(f"{what} gave {got:.4g}, expected {expected:.4g}: perplexity is exp(Σ loss·mask / Σ mask), "
                 f"the exponential of the mean loss over the real tokens")  # fmt: skip
    # A model that spreads its probability evenly over V tokens has loss ln V everywhere: perplexity V.
    v = 512
    uniform = torch.full((2, 5), math.log(v))
    what = "perplexity of a uniform guess"
    got = _as_float(call(perplexity, uniform, torch.ones(2, 5, dtype=torch.long), what=what), what)
    if not _close(got, v):
        fail(f"a uniform guess over {v} tokens (loss ln {v} everywhere) should have perplexity {v}, got {got:.4g}")
    bool_mask = mask.bool()
    got = _as_float(call(perplexity, losses, bool_mask, what="perplexity with a boolean mask"), "perplexity")
    if not _close(got, _reference_perplexity(losses, mask)):
        fail("right with a 0/1 integer mask but not with a boolean one (True for real tokens): convert the mask "
             "with mask.float() (or index with mask.bool()) so both work")  # fmt: skip
    return ("equals exp(Σ loss·mask / Σ mask) (minivlm.lm.evaluate_perplexity's definition) on batches with "
            f"padding, and a uniform guess over {v} tokens has perplexity {v}")  # fmt: skip


# Exercise 3.2: linear warm-up, then cosine decay to a floor --------------------------------------------

# (peak, warmup, steps, floor): the course LM's run, a tiny one, no warm-up at all, a floor of 0.
SCHEDULES = [(2e-3, 100, 1000, 0.1), (1e-2, 5, 30, 0.1), (0.5, 0, 12, 0.2), (1.0, 3, 10, 0.0)]


def _variant(warm: Callable | None = None, progress: Callable | None = None, end: Callable | None = None) -> Callable:
    """learning_rate(step, peak, warmup, steps, floor) with one part done wrong: the warm-up, the decay's progress
    p (from 0 to 1), or how the decay's end (peak, floor, p) -> rate is computed."""

    def rate(s: int, peak: float, w: int, n: int, floor: float) -> float:
        if s < w:
            return warm(s, peak, w) if warm else peak * (s + 1) / w
        p = progress(s, w, n) if progress else (s - w) / max(1, n - 1 - w)
        return end(peak, floor, p) if end else peak * (floor + (1 - floor) * _cosine(p))

    return rate


def _cosine(progress: float) -> float:
    """Half a cosine: 1 at progress 0, 0 at progress 1."""
    return 0.5 * (1 + math.cos(math.pi * progress))


BLEND = "peak * (floor + (1 - floor) * 0.5 * (1 + cos(π · progress)))"
SCHEDULE_MISTAKES: dict[str, tuple[Callable[..., float], str]] = {
    "warm-up from 0": (_variant(warm=lambda s, p, w: p * s / w),
                       "your warm-up is off by one: step 0 gets a learning rate of 0 (a wasted step) and the peak is "
                       "reached one step late. Use peak * (step + 1) / warmup, so that step warmup - 1 is at the peak"),
    "no floor": (_variant(end=lambda p, f, x: p * _cosine(x)),
                 f"your schedule decays to 0: it should end at floor * peak. Blend the cosine between the two: "
                 f"{BLEND}"),
    "floor not scaled by the peak": (_variant(end=lambda p, f, x: f + (p - f) * _cosine(x)),
                                     "the floor is a fraction of the peak: the schedule should end at floor * peak, "
                                     "not at floor"),
    "floor by clamping": (_variant(end=lambda p, f, x: max(f * p, p * _cosine(x))),
                          f"you clamped the cosine at the floor, which flattens its end: blend instead, {BLEND}, "
                          f"which meets the floor exactly at the last step"),
    "decay over steps - warmup": (_variant(progress=lambda s, w, n: (s - w) / (n - w)),
                                  "the decay never reaches the floor: the last step is steps - 1, so progress = "
                                  "(step - warmup) / (steps - 1 - warmup) runs from 0 at the end of the warm-up to 1 "
                                  "at the last step"),
    "decay over all steps": (_variant(progress=lambda s, w, n: s / max(1, n - 1)),
                             "your cosine counts from step 0, so the warm-up eats its top and the peak is never "
                             "reached: measure progress from the end of the warm-up, (step - warmup) / "
                             "(steps - 1 - warmup)"),
    "no one half": (_variant(end=lambda p, f, x: p * (f + (1 - f) * math.cos(math.pi * x))),
                    "your cosine goes from 1 down to -1: rescale it to run from 1 to 0 with "
                    "0.5 * (1 + cos(π · progress))"),
    "quarter cosine": (_variant(end=lambda p, f, x: p * (f + (1 - f) * math.cos(math.pi / 2 * x))),
                       "your curve is a quarter cosine, cos(π/2 · progress), which falls fastest at the end: use "
                       "half a cosine, 0.5 * (1 + cos(π · progress)), which falls slowly, then fast, then slowly"),
}  # fmt: skip


def _rate(schedule: Callable, step: int, peak: float, warmup: int, steps: int, floor: float):
    """The answer's learning rate at `step`, asked with keywords as minivlm.lm.learning_rate takes them."""
    what = f"learning_rate({step}, peak={peak}, warmup={warmup}, steps={steps}, floor={floor})"
    hint = ("with warmup=0 there is no warm-up at all: go straight to the cosine (the test `step < warmup` is then "
            "never true)") if warmup == 0 else ""  # fmt: skip
    answer = partial(schedule, peak=peak, warmup=warmup, steps=steps, floor=floor)
    return _as_float(call(answer, step, what=what, hint=hint), what)


def _matches(schedule: Callable, mistake: Callable, peak: float, warmup: int, steps: int, floor: float) -> bool:
    """Whether the answer equals `mistake` on every step of this run."""
    try:
        return all(_close(_rate(schedule, s, peak, warmup, steps, floor), mistake(s, peak, warmup, steps, floor))
                   for s in range(steps))  # fmt: skip
    except (AssertionError, ZeroDivisionError):
        return False


def check_learning_rate(schedule: Callable) -> str:
    """Exercise 3.2: schedule(step, peak=, warmup=, steps=, floor=) equals minivlm.lm.learning_rate on every step."""
    for peak, warmup, steps, floor in SCHEDULES:
        for step in range(steps):
            got = _rate(schedule, step, peak, warmup, steps, floor)
            expected = learning_rate(step, peak=peak, warmup=warmup, steps=steps, floor=floor)
            if not _close(got, expected):
                what = f"learning_rate({step}, peak={peak}, warmup={warmup}, steps={steps}, floor={floor})"
                for mistake, hint in SCHEDULE_MISTAKES.values():
                    if _matches(schedule, mistake, peak, warmup, steps, floor):
                        fail(f"{what} gave {got:.4g}, expected {expected:.4g}: {hint}")
                fail(f"{what} gave {got:.4g}, expected {expected:.4g}. The schedule: peak * (step + 1) / warmup "
                     f"while step < warmup; then {BLEND} with progress = (step - warmup) / (steps - 1 - warmup)")
    peak, warmup, steps, floor = SCHEDULES[0]
    return (f"equals minivlm.lm.learning_rate on every step of {len(SCHEDULES)} runs, warm-up 0 and floor 0 included: "
            f"the course LM's starts at {learning_rate(0, peak=peak, warmup=warmup, steps=steps):.0e}, peaks at "
            f"{peak:.0e} on step {warmup - 1} and ends at {floor * peak:.0e}")  # fmt: skip


# Exercise 3.3: freeze a language model ----------------------------------------------------------------


def _model() -> GPT2:
    """A seeded tiny GPT-2 *with* dropout, in training mode; the learner's global RNG is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return GPT2(GPT2Config.from_preset("tiny", embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)).train()


def check_freeze(freeze: Callable) -> str:
    """Exercise 3.3: freeze(model) sets requires_grad False on every weight and eval mode; returns the model."""
    model = _model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grad_on = torch.is_grad_enabled()
    try:
        out = call(freeze, model, what="freeze(model)")
    finally:
        switched_off = grad_on and not torch.is_grad_enabled()
        torch.set_grad_enabled(grad_on)  # undo a global switch-off before anything else runs
    if switched_off:
        fail("freeze switched gradients off for *everything* (torch.set_grad_enabled(False)), so the visual prefix "
             "could not learn either: leave autograd on and set requires_grad_(False) on the LM's weights only")
    if out is None:
        fail("freeze returned None: return the model, so that lm = freeze(lm) works")
    if out is not model:
        fail("freeze should freeze the model it is given and return *it*, not a copy: the captioner holds that model")
    if model.__dict__.get("requires_grad") is False:
        fail("model.requires_grad = False only adds an attribute to the module; no weight changes. Call "
             "model.requires_grad_(False) (with the underscore), or set p.requires_grad = False for each parameter")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if len(trainable) == len(before):
        fail("every weight still has requires_grad=True, so an optimiser would still change the LM. model.eval() "
             "only switches dropout off, and torch.no_grad() only stops recording inside its with-block: set "
             "p.requires_grad_(False) on every parameter (model.parameters())")
    if trainable:
        shown = ", ".join(trainable[:3]) + (", ..." if len(trainable) > 3 else "")
        fail(f"{len(trainable)} of {len(before)} weights still require gradients ({shown}). Frozen and ClipCap freeze "
             f"the *whole* language model, not its first layers: loop over all of model.parameters()")  # fmt: skip
    if any(not torch.equal(p, before[name]) for name, p in model.named_parameters()):
        fail("freeze changed the weights' values: it should only switch gradients and dropout off")
    modules = [name for name, _ in model.named_modules()]  # "" is the model itself
    still = [name for name, m in model.named_modules() if m.training]
    if len(still) == len(modules):
        fail("the weights are frozen but the model is still in training mode, so dropout still zeroes random "
             "activations and the LM is not the function it was pretrained to be: also call model.eval()")
    if still:
        top = "" if "" in still else ": model.training = False changes the top module only"
        fail(f"{len(still)} of its {len(modules)} submodules are still in training mode ({', '.join(still[:2])}, ...)"
             f"{top}; model.eval() (or model.train(False)) sets every submodule")  # fmt: skip
    # Behaviour: the same input gives the same output twice (no dropout), and gradients still flow *through*
    # the frozen model to its input embeddings (what trains a visual prefix), with no weight getting one.
    embeds = randn(2, 5, model.config.n_embd, seed=33).requires_grad_(True)  # (B, T, D)
    with torch.enable_grad():
        first = model(inputs_embeds=embeds).logits
        if not torch.equal(first, model(inputs_embeds=embeds).logits):
            fail("two passes of the same input differ: dropout is still on somewhere; call model.eval()")
        first.sum().backward()
    if embeds.grad is None or not embeds.grad.abs().sum() > 0:
        fail("no gradient reached the input embeddings through your frozen model: it must still pass gradients "
             "*through* to whatever feeds it (the visual prefix); do not wrap it in torch.no_grad()")
    if any(p.grad is not None for p in model.parameters()):
        fail("a weight received a gradient: every parameter needs requires_grad=False")
    n = sum(p.numel() for p in model.parameters())
    return (f"all {len(before)} weight tensors ({n:,} numbers) of a GPT-2 with dropout have requires_grad=False, "
            "every submodule is in eval mode, outputs repeat exactly, and gradients still reach the input embeddings")


CHECKS: dict[str, Callable[..., str]] = {
    "3.1": check_perplexity,
    "3.2": check_learning_rate,
    "3.3": check_freeze,
}
