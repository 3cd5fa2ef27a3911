"""Self-checks for lesson 06, training the captioner (solutions/06_training.ipynb).

Each check runs the learner's answer on a tiny `Captioner` (a random tiny GPT-2, frozen; a tiny
SmallCNN; a linear mapper with P = 2) or on seeded integers, and compares it with what
`minivlm.train.train` does. When the answer is wrong, the check replays the usual mistakes and names
the one the answer matches:

- 6.1, one training step: no `zero_grad` (gradients pile up from step to step), clipping after the
  step or before `backward`, the norm after clipping returned instead of the norm before, `zero_grad`
  between `backward` and `step`, the loss of a second forward pass, an LM that takes a step too. The
  check hands the step plain SGD, on which a gradient's scale shows in every update: Adam divides most
  of it away, which would hide a missing clip.
- 6.2, AdamW's parameter groups: the frozen LM's weights included, biases and norm gains decayed (or
  nothing decayed, or the two swapped), parameters left out or listed twice, trainable weights picked
  by name instead of by `requires_grad`.
- 6.3, the batch of a step as a pure function of (seed, step): NumPy's global random state, the same
  order in every epoch, `default_rng(seed + epoch)` (whose epochs collide across seeds), batches that
  run over the end of an epoch, indices drawn with replacement.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor, nn

from minivlm.captioner import CAPTIONER_PRESETS, Captioner
from minivlm.exercises import fail
from minivlm.exercises.tools import call
from minivlm.gpt2 import GPT2, GPT2Config
from minivlm.train import batch_indices

__all__ = ["CHECKS"]

V, T, B = 128, 7, 4  # the tiny LM's vocabulary; caption tokens and images of the checks' batches


def _one_thread(check: Callable[..., str]) -> Callable[..., str]:
    """Run a check on one CPU thread: the tiny model's steps take milliseconds there, and can take 100 times as
    long on two threads of a busy machine. The caller's thread count is restored."""

    @functools.wraps(check)
    def wrapped(*answers):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return check(*answers)
        finally:
            torch.set_num_threads(threads)

    return wrapped


def _captioner(train_lm: bool = False) -> Captioner:
    """A tiny captioner in training mode, the same on every call; the learner's random state is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        lm = GPT2(GPT2Config.from_preset("tiny"))  # V = 128, D = 32, context 64
        config = replace(CAPTIONER_PRESETS["tiny"], train_lm=train_lm)  # tiny CNN, linear mapper, P = 2
        return Captioner.from_config(lm, config).train()


def _batch(seed: int) -> dict[str, Tensor]:
    """A batch as CaptionCollator makes one: images (B, 3, 32, 32), input_ids, attention_mask, labels (B, T), text."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 5, 6, 3])
    mask = (torch.arange(T) < lengths[:, None]).long()  # (B, T): 1 on the caption, 0 on padding
    ids = torch.randint(2, V, (B, T), generator=generator).masked_fill(mask == 0, 0)
    return {"images": torch.rand(B, 3, 32, 32, generator=generator), "input_ids": ids, "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100), "captions": [f"caption {i}" for i in range(B)]}  # fmt: skip


# Exercise 6.1: one training step ------------------------------------------------------------------

MAX_NORM = 0.05  # well below the tiny captioner's gradient norms, so every step is clipped
LR = 0.5  # SGD's learning rate: the update is lr times the (clipped) gradient, so the clip shows


def _loss(captioner: Captioner, batch: dict) -> Tensor:
    return captioner(batch["images"], batch["input_ids"], batch["attention_mask"], batch["labels"]).loss


def _reference(captioner, optimizer, batch, max_norm):
    optimizer.zero_grad(set_to_none=True)  # last step's gradients gone
    loss = _loss(captioner, batch)
    loss.backward()  # gradients of this batch only
    norm = nn.utils.clip_grad_norm_(captioner.trainable_parameters(), max_norm)  # the norm before clipping
    optimizer.step()
    return loss.item(), norm.item()


def _no_zero_grad(captioner, optimizer, batch, max_norm):
    loss = _loss(captioner, batch)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(captioner.trainable_parameters(), max_norm)
    optimizer.step()
    return loss.item(), norm.item()


def _clip_after_step(captioner, optimizer, batch, max_norm):
    optimizer.zero_grad()
    loss = _loss(captioner, batch)
    loss.backward()
    optimizer.step()
    norm = nn.utils.clip_grad_norm_(captioner.trainable_parameters(), max_norm)
    return loss.item(), norm.item()


def _clip_before_backward(captioner, optimizer, batch, max_norm):
    optimizer.zero_grad()
    loss = _loss(captioner, batch)
    norm = nn.utils.clip_grad_norm_(captioner.trainable_parameters(), max_norm)
    loss.backward()
    optimizer.step()
    return loss.item(), norm.item()


def _no_clip(captioner, optimizer, batch, max_norm):
    optimizer.zero_grad()
    loss = _loss(captioner, batch)
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in captioner.trainable_parameters()]))
    optimizer.step()
    return loss.item(), norm.item()


def _norm_after_clip(captioner, optimizer, batch, max_norm):
    optimizer.zero_grad()
    loss = _loss(captioner, batch)
    loss.backward()
    nn.utils.clip_grad_norm_(captioner.trainable_parameters(), max_norm)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in captioner.trainable_parameters()]))
    optimizer.step()
    return loss.item(), norm.item()


def _zero_grad_after_backward(captioner, optimizer, batch, max_norm):
    loss = _loss(captioner, batch)
    loss.backward()
    optimizer.zero_grad()
    norm = nn.utils.clip_grad_norm_(captioner.trainable_parameters(), max_norm)
    optimizer.step()
    return loss.item(), norm.item()


def _loss_after_step(captioner, optimizer, batch, max_norm):
    _, norm = _reference(captioner, optimizer, batch, max_norm)
    with torch.no_grad():
        return _loss(captioner, batch).item(), norm


UNCLIPPED = ("the step was not clipped: call torch.nn.utils.clip_grad_norm_(params, max_norm) between "
             "loss.backward() and optimizer.step(); after the step it is too late, the weights have moved")
STEP_MISTAKES: dict[str, tuple[Callable, str]] = {
    "no zero_grad": (_no_zero_grad,
                     "your second step's gradient norm is too large: the gradients of the first step were still "
                     "there. PyTorch *adds* each backward() to .grad; call optimizer.zero_grad() before "
                     "loss.backward()"),
    "zero_grad after backward": (_zero_grad_after_backward,
                                 "the weights never changed and the norm is 0: optimizer.zero_grad() after "
                                 "loss.backward() erases the gradients you just computed. Zero them first"),
    "clip after step": (_clip_after_step, UNCLIPPED),
    "clip before backward": (_clip_before_backward,
                             "the norm you return is 0 and the step was not clipped: did you clip before "
                             "loss.backward(), when there were no gradients yet? Order: zero_grad, forward, "
                             "backward, clip, step"),
    "no clip": (_no_clip, UNCLIPPED),
    "norm after clipping": (_norm_after_clip,
                            "the step is right, but the norm you return is the norm *after* clipping (at most "
                            "max_norm): return what clip_grad_norm_ returns, the norm before clipping, as train() "
                            "records in history['grad_norm']"),
    "loss after step": (_loss_after_step,
                        "the weights are right, but the loss you return is from a second forward pass after the "
                        "step: return the loss the gradients came from, loss.item() of the one forward pass"),
}  # fmt: skip


def _learned(captioner: Captioner) -> Tensor:
    """Every trainable weight, flattened into one vector."""
    return torch.cat([p.detach().flatten() for p in captioner.trainable_parameters()])


def _trace(step: Callable, what: str = "") -> tuple[list[float], list[float], Tensor, Captioner]:
    """Two steps of `step` on a fresh captioner with SGD: (losses, norms, learned weights, captioner)."""
    captioner = _captioner()
    optimizer = torch.optim.SGD(captioner.trainable_parameters(), lr=LR)
    losses, norms = [], []
    for seed in (1, 2):
        if what:
            out = call(step, captioner, optimizer, _batch(seed), MAX_NORM, what=what,
                       hint="The batch is CaptionCollator's dict: the caption loss is captioner(batch['images'], "
                            "batch['input_ids'], batch['attention_mask'], batch['labels']).loss")  # fmt: skip
            if not isinstance(out, (tuple, list)) or len(out) != 2:
                fail(f"{what} should return two numbers, (loss, grad_norm), got {type(out).__name__}")
            try:
                loss, norm = float(out[0]), float(out[1])
            except (TypeError, ValueError, RuntimeError):
                fail(f"{what} should return two numbers, (loss.item(), norm.item()): got "
                     f"({type(out[0]).__name__}, {type(out[1]).__name__})")  # fmt: skip
        else:
            loss, norm = step(captioner, optimizer, _batch(seed), MAX_NORM)
        losses.append(loss)
        norms.append(norm)
    return losses, norms, _learned(captioner), captioner


def _close(a: list[float], b: list[float]) -> bool:
    return np.allclose(a, b, rtol=1e-4, atol=1e-6)


def _same_trace(a, b) -> bool:
    return _close(a[0], b[0]) and _close(a[1], b[1]) and torch.allclose(a[2], b[2], rtol=1e-4, atol=1e-6)


@_one_thread
def check_training_step(training_step: Callable) -> str:
    """Exercise 6.1: zero_grad, forward, backward, clip (keeping the norm before clipping), step."""
    lm_before = {k: v.clone() for k, v in _captioner().lm.state_dict().items()}
    ours = _trace(training_step, what="training_step(captioner, optimizer, batch, max_norm)")
    lm_after = ours[3].lm.state_dict()
    if any(not torch.equal(lm_before[k], lm_after[k]) for k in lm_before) or any(
            p.requires_grad for p in ours[3].lm.parameters()):  # fmt: skip
        fail("the language model's weights changed (or were unfrozen): the LM is frozen and never takes a step. "
             "Use the optimizer you are given, which holds only captioner.trainable_parameters()")
    expected = _trace(_reference)
    if _same_trace(ours, expected):
        return (f"two steps equal minivlm.train's (zero_grad, backward, clip_grad_norm_, step), the norms returned "
                f"are the norms before clipping ({expected[1][0]:.2f} and {expected[1][1]:.2f}, clipped to "
                f"{MAX_NORM}), and the frozen LM did not move")  # fmt: skip
    for mistake, hint in STEP_MISTAKES.values():
        if _same_trace(ours, _trace(mistake)):
            fail(hint)
    if torch.allclose(ours[2], _trace(_no_clip)[2], rtol=1e-4, atol=1e-6):
        fail(UNCLIPPED)
    if torch.allclose(ours[2], expected[2], rtol=1e-4, atol=1e-6):  # the right weights, a wrong number returned
        if not _close(ours[0], expected[0]):
            fail(f"the weights are right, but the losses you return, {[round(x, 4) for x in ours[0]]}, should be "
                 f"{[round(x, 4) for x in expected[0]]}: loss.item() of the forward pass, before the step")  # fmt: skip
        fail(f"the weights are right, but the norms you return, {[round(x, 4) for x in ours[1]]}, should be "
             f"{[round(x, 4) for x in expected[1]]}: what clip_grad_norm_ returns, the pre-clip norm")  # fmt: skip
    fail("the weights after two steps differ from zero_grad -> loss.backward() -> clip_grad_norm_(params, "
         "max_norm) -> optimizer.step(): check the order, and that you step the optimizer you are given once")


# Exercise 6.2: AdamW's parameter groups -------------------------------------------------------------


def _groups(param_groups: Callable, captioner: Captioner, weight_decay: float, what: str) -> dict[int, list[float]]:
    """{id(param): [the weight decay of each group that lists it]} from the answer, or a hint."""
    out = call(param_groups, captioner, weight_decay, what=what)
    if isinstance(out, dict) or not isinstance(out, (list, tuple)) or not all(isinstance(g, dict) for g in out):
        fail(f"{what} should return a list of dicts, [{{'params': [...], 'weight_decay': ...}}, ...], "
             f"got {type(out).__name__}")  # fmt: skip
    decays: dict[int, list[float]] = {}
    for group in out:
        if "params" not in group or "weight_decay" not in group:
            fail(f"every group needs 'params' and 'weight_decay' (AdamW's own default would decay it by 0.01); "
                 f"got a group with keys {sorted(group)}")  # fmt: skip
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if not isinstance(p, nn.Parameter):
                fail(f"'params' should hold the parameters themselves (nn.Parameter), got {type(p).__name__}")
            decays.setdefault(id(p), []).append(float(group["weight_decay"]))
    return decays


@_one_thread
def check_param_groups(param_groups: Callable) -> str:
    """Exercise 6.2: two groups of the trainable parameters, matrices decayed, biases and gains not."""
    wd = 0.1  # not AdamW's default 0.01, nor train()'s: a hard-coded number shows
    for train_lm in (False, True):
        captioner = _captioner(train_lm)
        what = f"param_groups(captioner{' with train_lm=True' if train_lm else ''}, weight_decay={wd})"
        names = {id(p): name for name, p in captioner.named_parameters()}
        trainable = {id(p): p for p in captioner.trainable_parameters()}
        decays = _groups(param_groups, captioner, wd, what)
        frozen = [names[i] for i in decays if i not in trainable and i in names]
        if frozen:
            fail(f"you included {len(frozen)} frozen parameters ({frozen[0]}, ...): the frozen LM's weights have "
                 f"requires_grad=False and must not be in the optimiser. Take only p.requires_grad "
                 f"(captioner.trainable_parameters())")  # fmt: skip
        if any(i not in names for i in decays):
            fail("some parameters in your groups are not the captioner's own: take them from the captioner passed in")
        twice = [names[i] for i, d in decays.items() if len(d) > 1]
        if twice:
            fail(f"{twice[0]} is in more than one group (AdamW refuses that): each parameter goes in exactly one")
        missing = [i for i in trainable if i not in decays]
        if missing:
            if train_lm and all(names[i].startswith("lm.") for i in missing):
                fail("with train_lm=True the LM's weights are trainable too, and you left them out: pick the "
                     "parameters by p.requires_grad (captioner.trainable_parameters()), not by their names")
            if all(trainable[i].ndim < 2 for i in missing):
                fail(f"you left out the biases and norm gains ({names[missing[0]]}, ...): they are trained too, "
                     f"only without weight decay; put them in a group with weight_decay 0.0")  # fmt: skip
            fail(f"{len(missing)} trainable parameters are in no group ({names[missing[0]]}, ...): every "
                 f"p with p.requires_grad goes in one")  # fmt: skip
        matrices = {d[0] for i, d in decays.items() if trainable[i].ndim >= 2}
        vectors = {d[0] for i, d in decays.items() if trainable[i].ndim < 2}
        if matrices == vectors == {wd}:
            fail("you decay every parameter: weight decay pulls biases and LayerNorm/GroupNorm gains towards 0, "
                 "which only hurts (a gain of 0 switches a feature off). Give the 1-d tensors (p.ndim < 2) "
                 "weight_decay 0.0")
        if matrices == vectors == {0.0}:
            fail("no parameter is decayed: the weight matrices and conv kernels (p.ndim >= 2) should get "
                 "weight_decay=weight_decay")
        if matrices == {0.0} and vectors == {wd}:
            fail("your groups are swapped: decay the matrices (p.ndim >= 2), not the biases and gains (p.ndim < 2)")
        if matrices != {wd} or vectors != {0.0}:
            if matrices - {0.0, wd} or vectors - {0.0, wd}:
                fail(f"use the weight_decay argument ({wd} here) for the decayed group, not a fixed number")
            wrong = next(names[i] for i, d in decays.items() if d[0] != (wd if trainable[i].ndim >= 2 else 0.0))
            fail(f"{wrong} has the wrong decay: the rule is by shape, weight_decay for p.ndim >= 2 (matrices, "
                 f"kernels), 0.0 for p.ndim < 2 (biases, norm gains)")  # fmt: skip
        torch.optim.AdamW(param_groups(captioner, wd), lr=1e-3)  # AdamW accepts the groups
    n_matrices = sum(p.ndim >= 2 for p in _captioner().trainable_parameters())
    n_vectors = sum(p.ndim < 2 for p in _captioner().trainable_parameters())
    return (f"the tiny captioner's {n_matrices} matrices and kernels get the decay and its {n_vectors} biases and "
            f"gains none, the frozen LM is left out, and with train_lm=True its weights join the groups")  # fmt: skip


# Exercise 6.3: the batch of a step, a pure function of (seed, step) -----------------------------------


def _no_reshuffle(seed, step, n, batch_size):
    k = step % (n // batch_size)
    return np.random.default_rng([seed, 0]).permutation(n)[k * batch_size : (k + 1) * batch_size]


def _seed_plus_epoch(seed, step, n, batch_size):
    epoch, k = divmod(step, n // batch_size)
    return np.random.default_rng(seed + epoch).permutation(n)[k * batch_size : (k + 1) * batch_size]


def _run_over(seed, step, n, batch_size):
    start = step * batch_size
    epoch, k = divmod(start, n)
    order = np.concatenate([np.random.default_rng([seed, e]).permutation(n) for e in (epoch, epoch + 1)])
    return order[k : k + batch_size]


BATCH_MISTAKES: dict[str, tuple[Callable, str]] = {
    "no reshuffle": (_no_reshuffle,
                     "every epoch sees the images in the same order: draw a new permutation for each epoch, seeded "
                     "with the epoch too: np.random.default_rng([seed, epoch]), epoch = step // (n // batch_size)"),
    "seed + epoch": (_seed_plus_epoch,
                     "default_rng(seed + epoch) makes seed 0's second epoch the same as seed 1's first: pass both "
                     "numbers as a list, np.random.default_rng([seed, epoch])"),
    "run over the epoch's end": (_run_over,
                                 "your batches run over the end of a permutation into the next: an epoch has "
                                 "n // batch_size steps, each a whole slice of that epoch's permutation, and the "
                                 "last n % batch_size images sit the epoch out"),
}  # fmt: skip

CASES = [(0, 0, 10, 3), (0, 2, 10, 3), (0, 3, 10, 3), (0, 7, 10, 3), (1, 0, 10, 3), (1, 4, 10, 3),
         (5, 13, 100, 16), (7, 40, 64, 8), (2, 9, 20, 20)]  # (seed, step, n, batch_size)  # fmt: skip


def _indices(answer: Callable, args: tuple) -> np.ndarray:
    what = f"batch_indices(seed={args[0]}, step={args[1]}, n={args[2]}, batch_size={args[3]})"
    out = np.asarray(call(answer, *args, what=what))
    if out.shape != (args[3],) or not np.issubdtype(out.dtype, np.integer):
        fail(f"{what} should return batch_size = {args[3]} integer indices, shape ({args[3]},), "
             f"got {out.dtype} of shape {out.shape}")  # fmt: skip
    return out


def check_batch_indices(answer: Callable) -> str:
    """Exercise 6.3: equals minivlm.train.batch_indices, is deterministic and leaves global random states alone."""
    state = np.random.get_state()
    first = _indices(answer, (0, 4, 10, 3))
    after = np.random.get_state()
    np.random.set_state(state)
    if not all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(state, after)):
        fail("your function changed NumPy's global random state (np.random.seed, np.random.permutation, ...): a "
             "pure function makes its own generator, np.random.default_rng([seed, epoch]), and touches nothing else")
    if not np.array_equal(first, _indices(answer, (0, 4, 10, 3))):
        fail("the same (seed, step) gave two different batches: a resumed run would see other images. Make a "
             "fresh generator from (seed, epoch) on every call instead of drawing from a shared one")
    epoch = np.concatenate([_indices(answer, (0, s, 10, 3)) for s in range(3)])
    if len(set(epoch.tolist())) != 9 or epoch.min() < 0 or epoch.max() >= 10:
        fail(f"the 3 batches of the first epoch (n=10, batch_size=3) hold {sorted(epoch.tolist())}: an epoch should "
             f"show 9 different images of 0..9. Slice one permutation of range(n) per epoch, rather than "
             f"drawing indices with replacement or a new permutation every step")  # fmt: skip
    for args in CASES:
        if not np.array_equal(_indices(answer, args), batch_indices(*args)):
            for mistake, hint in BATCH_MISTAKES.values():
                if all(np.array_equal(_indices(answer, a), mistake(*a)) for a in CASES):
                    fail(hint)
            fail(f"batch_indices{args} gave {_indices(answer, args).tolist()}, expected "
                 f"{batch_indices(*args).tolist()}: epoch, k = divmod(step, n // batch_size); "
                 f"order = np.random.default_rng([seed, epoch]).permutation(n); "
                 f"batch = order[k * batch_size:(k + 1) * batch_size]")  # fmt: skip
    return ("equals minivlm.train.batch_indices for 9 (seed, step, n, batch_size) cases across epochs, gives the "
            "same batch for the same (seed, step), and leaves NumPy's global random state alone")  # fmt: skip


CHECKS: dict[str, Callable[..., str]] = {
    "6.1": check_training_step,
    "6.2": check_param_groups,
    "6.3": check_batch_indices,
}
