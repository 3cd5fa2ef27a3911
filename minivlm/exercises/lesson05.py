"""Self-checks for lesson 05, the visual prefix (solutions/05_prefix.ipynb).

Each check runs the learner's answer on seeded inputs and compares it with the package: a tiny
`Captioner` (a random tiny GPT-2, a tiny SmallCNN, a linear mapper with P = 4) supplies the reference
for the LM's input (`Captioner.embed`) and the loss (`Captioner.forward`), and `minivlm.prefix` the
reference for the prefix's scale (`embedding_scale` and the mappers' RMSNorm). The captions end with
EOT and are padded with EOT too, as GPT-2's tokenizer pads, so that a mask built from token ids shows.
Where the answer is wrong, the check recomputes the usual mistakes (the prefix after the text, a mask
without the prefix, labels that score the prefix or skip the EOT, labels shifted twice, a norm over the
wrong axis or a maximum instead of each vector's own length) and names the one the answer matches.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from minivlm.captioner import Captioner, CaptionerConfig
from minivlm.data.captions import IGNORE_INDEX
from minivlm.exercises import fail
from minivlm.exercises.tools import Mistakes, call, diagnose, randn, same, tensor
from minivlm.gpt2 import GPT2, GPT2Config
from minivlm.lm import next_token_loss
from minivlm.prefix import LinearMapper, embedding_scale

__all__ = ["CHECKS"]

P = 4  # prefix tokens of the checks' captioner: B = 3, T = 6 and D = 32 all differ from it, so axes cannot mix
EOT = 0  # the end-of-text id, and the padding id (as GPT-2 pads): a mask made from ids hides the real EOT


def _captioner() -> Captioner:
    """A tiny captioner in eval mode, the same on every call; the learner's random state is left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        lm = GPT2(GPT2Config.from_preset("tiny"))  # V = 128, D = 32, context 64
        config = CaptionerConfig(cnn_preset="tiny", mapper="linear", prefix_length=P)
        return Captioner.from_config(lm, config).eval()


def _batch() -> tuple[Tensor, Tensor, Tensor]:
    """images (3, 3, 32, 32), input_ids and attention_mask (3, 6): captions of 6, 4 and 2 tokens, EOT last."""
    generator = torch.Generator().manual_seed(5)
    lengths = torch.tensor([6, 4, 2])  # EOT included
    mask = (torch.arange(6) < lengths[:, None]).long()  # (B, T) 1 real, 0 padding
    ids = torch.randint(2, 128, (3, 6), generator=generator)
    ids[torch.arange(3), lengths - 1] = EOT  # every caption ends with EOT ...
    ids = ids.masked_fill(mask == 0, EOT)  # ... and is padded with EOT, as GPT-2's tokenizer pads
    return torch.rand(3, 3, 32, 32, generator=generator), ids, mask


def _two(out, what: str) -> tuple[Tensor, Tensor]:
    """The answer's (inputs_embeds, attention_mask), or a hint."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        fail(f"{what} should return two tensors, (inputs_embeds, attention_mask), got {type(out).__name__}")
    return tensor(out[0], f"{what}[0], inputs_embeds,"), tensor(out[1], f"{what}[1], the attention mask,")


# Exercise 5.1: the LM's input, prefix then tokens ---------------------------------------------------------


def check_build_inputs(build_inputs: Callable) -> str:
    """Exercise 5.1: build_inputs(prefix, input_ids, attention_mask, embedding) equals Captioner.embed."""
    model = _captioner()
    images, ids, mask = _batch()
    wte = model.lm.get_input_embeddings()
    with torch.no_grad():
        prefix = model.prefix(images)  # (B, P, D)
        expected, expected_mask = model.embed(images, ids, mask)  # (B, P + T, D), (B, P + T)
        tokens = wte(ids)  # (B, T, D)
    b, t, d = *ids.shape, prefix.shape[-1]
    what = f"build_inputs(prefix {tuple(prefix.shape)}, input_ids {tuple(ids.shape)}, attention_mask, embedding)"
    prefix_in = prefix.clone().requires_grad_()
    embeds, full_mask = _two(call(build_inputs, prefix_in, ids.clone(), mask.clone(), wte, what=what,
                                  hint="Look the tokens up with embedding(input_ids), then torch.cat along dim=1"),
                             what)  # fmt: skip

    # inputs_embeds
    if embeds.shape != expected.shape:
        shape = tuple(embeds.shape)
        if shape == (b, t, d):
            fail(f"{what} returned embeddings of shape {shape}, the tokens alone: put the prefix in front of them, "
                 f"torch.cat([prefix, tokens], dim=1) -> (B, P + T, D) = {tuple(expected.shape)}")  # fmt: skip
        if shape == (2 * b, t, d) or shape[0] == 2 * b:
            fail(f"{what} returned embeddings of shape {shape}: you joined along the batch axis (dim=0); "
                 f"the prefix comes before the caption in *time*, along dim=1")  # fmt: skip
        if shape[-1] != d:
            fail(f"{what} returned embeddings of shape {shape}: every position must stay a vector of the LM's width "
                 f"D = {d}; join along the sequence axis, dim=1, not the last one")  # fmt: skip
        fail(f"{what} returned embeddings of shape {shape}; expected (B, P + T, D) = {tuple(expected.shape)}")
    embeds_value = embeds.detach()
    if same(embeds_value, torch.cat([tokens, prefix], dim=1)):
        fail("your prefix comes after the text: the LM reads left to right, and a caption token can only attend to "
             "what came before it, so the image must come first: torch.cat([prefix, tokens], dim=1)")
    if not same(embeds_value, expected):
        if same(embeds_value[:, :P], prefix):
            fail("the prefix is in the right place, but the token part is wrong: it should be embedding(input_ids), "
                 "the LM's own token embeddings (B, T, D), unchanged (the LM adds the position embeddings itself)")
        fail(f"your inputs_embeds differ from Captioner.embed's by up to "
             f"{(embeds_value - expected).abs().max().item():.3g}: they should be torch.cat([prefix, "
             f"embedding(input_ids)], dim=1)")  # fmt: skip
    if not embeds.requires_grad:
        fail("your inputs_embeds do not depend on the prefix for autograd (did you .detach() it, or build them under "
             "torch.no_grad()?): the gradient must flow through the LM into the prefix, which is what learns")
    embeds[:, :P].sum().backward()
    if prefix_in.grad is None or not torch.equal(prefix_in.grad, torch.ones_like(prefix)):
        fail("the gradient does not reach the prefix unchanged: use the prefix tensor itself in torch.cat")

    # attention mask
    shape = tuple(full_mask.shape)
    if shape == (b, t):
        fail(f"your attention mask has shape {shape}, the caption's alone: the LM now reads P + T = {P + t} "
             f"positions, so the mask needs P ones for the prefix in front: "
             f"torch.cat([torch.ones(B, P), attention_mask], dim=1)")  # fmt: skip
    if shape != tuple(expected_mask.shape):
        fail(f"your attention mask has shape {shape}; it should be (B, P + T) = {tuple(expected_mask.shape)}, one "
             f"entry per position of inputs_embeds")  # fmt: skip
    if full_mask.is_floating_point() and not torch.isin(full_mask, torch.tensor([0.0, 1.0])).all():
        fail("your attention mask should hold 1 (attend) and 0 (padding) only")
    got = full_mask.long()
    ones, zeros = torch.ones(b, P, dtype=torch.long), torch.zeros(b, P, dtype=torch.long)
    if torch.equal(got, torch.cat([zeros, mask], dim=1)):
        fail("the prefix positions are 0 in your mask: then no caption token may attend to them and the LM never "
             "sees the image. The prefix is always real: ones for its P positions")
    if torch.equal(got, torch.cat([mask, ones], dim=1)):
        fail("your mask puts the prefix's ones after the caption's mask; the mask must follow inputs_embeds' order, "
             "the prefix first: torch.cat([ones, attention_mask], dim=1)")
    if torch.equal(got, torch.ones_like(got)):
        fail("your mask is all ones: the caption's padding positions must stay 0, as in attention_mask")
    if not torch.equal(got, expected_mask):
        fail("your attention mask differs from Captioner.embed's: P ones for the prefix, then attention_mask "
             "unchanged")
    return (f"equals Captioner.embed: inputs_embeds {tuple(expected.shape)} = the prefix (B, P, D), then the token "
            f"embeddings; the mask has P ones, then the caption's mask; the gradient reaches the prefix")  # fmt: skip


# Exercise 5.2: labels over prefix and caption --------------------------------------------------------------


def _labels(ids: Tensor, mask: Tensor, p: int) -> Tensor:
    """The reference: -100 on the prefix and the padding, the token ids elsewhere, unshifted; (B, P + T)."""
    return torch.cat([ids.new_full((ids.shape[0], p), IGNORE_INDEX), ids.masked_fill(mask == 0, IGNORE_INDEX)], 1)


def _eot_ignored(ids: Tensor, mask: Tensor, p: int) -> Tensor:
    last = mask.sum(1) - 1  # (B,) the position of each caption's EOT
    labels = _labels(ids, mask, p)
    labels[torch.arange(len(ids)), p + last] = IGNORE_INDEX
    return labels


LABEL_MISTAKES: dict[str, tuple[Callable[[Tensor, Tensor, int], Tensor], str]] = {
    "padding scored": (lambda ids, mask, p: _labels(ids, torch.ones_like(mask), p),
                       "the padding positions (attention_mask 0) must be -100 too, or the loss teaches the model to "
                       "write padding after the caption"),
    "EOT ignored": (_eot_ignored,
                    "the EOT that ends each caption is -100 in your labels: keep its label, it is how the model learns "
                    "where a caption stops. (Comparing ids with the padding id does this: GPT-2 pads with EOT itself, "
                    "so build the labels from attention_mask, never from the ids)"),
    "shifted": (lambda ids, mask, p: F.pad(_labels(ids, mask, p)[:, 1:], (0, 1), value=IGNORE_INDEX),
                "your labels are already shifted by one (position t holds token t + 1); the loss shifts them itself "
                "(next_token_loss, and the Captioner), so they would be shifted twice and position t scored on token "
                "t + 2. Keep them aligned with inputs_embeds: label t is the token *at* position t"),
    "shifted right": (lambda ids, mask, p: F.pad(_labels(ids, mask, p)[:, :-1], (1, 0), value=IGNORE_INDEX),
                      "your labels are shifted one position to the right; keep them aligned with inputs_embeds: "
                      "P -100s, then the caption's own ids"),
}  # fmt: skip


def check_caption_labels(caption_labels: Callable) -> str:
    """Exercise 5.2: caption_labels(input_ids, attention_mask, prefix_length) -> (B, P + T), -100 on prefix and padding."""
    model = _captioner()
    images, ids, mask = _batch()
    b, t = ids.shape
    for p in (P, 1):  # the captioner's P, and another, so that a hard-coded P shows
        what = f"caption_labels(input_ids {tuple(ids.shape)}, attention_mask, prefix_length={p})"
        ids_in, mask_in = ids.clone(), mask.clone()
        out = tensor(call(caption_labels, ids_in, mask_in, p, what=what), what)
        if not (torch.equal(ids_in, ids) and torch.equal(mask_in, mask)):
            fail(f"{what} changed input_ids or attention_mask in place (the LM still needs the real ids): use "
                 f"masked_fill, not masked_fill_, or work on a clone")  # fmt: skip
        expected = _labels(ids, mask, p)
        shape = tuple(out.shape)
        if shape == (b, t):
            fail(f"{what} returned {shape}, one label per caption token; the labels must line up with inputs_embeds, "
                 f"(B, P + T) = {tuple(expected.shape)}: P labels of -100 for the prefix in front")  # fmt: skip
        if shape == (b, p + t - 1):
            fail(f"{what} returned {shape}: do not shift or cut the labels, the loss does that; they have one entry "
                 f"per position of inputs_embeds, (B, P + T) = {tuple(expected.shape)}")  # fmt: skip
        if len(shape) == 2 and shape[0] == b and shape[1] > t and shape[1] != p + t:
            fail(f"{what} returned {shape}, expected (B, P + T) = {tuple(expected.shape)}: use the prefix_length "
                 f"argument for the number of -100s in front")  # fmt: skip
        if shape != tuple(expected.shape):
            fail(f"{what} returned {shape}, expected (B, P + T) = {tuple(expected.shape)}")
        if out.is_floating_point() or out.dtype == torch.bool:
            fail(f"{what} returned a {out.dtype} tensor; labels are token ids, an integer (torch.long) tensor")
        if torch.equal(out, expected):
            continue
        for mistake, hint in LABEL_MISTAKES.values():
            if torch.equal(out, mistake(ids, mask, p)):
                fail(hint)
        if (out[:, :p] != IGNORE_INDEX).any():
            fail("the prefix positions must be -100: the prefix is given, not predicted, so the loss must not score "
                 "what the LM writes there (and the prefix has no token id to compare with)")
        wrong = (out != expected).nonzero()[0].tolist()
        fail(f"{what}: label {wrong[1]} of row {wrong[0]} is {out[wrong[0], wrong[1]].item()}, expected "
             f"{expected[wrong[0], wrong[1]].item()}. Labels are -100 on the P prefix positions, the token id where "
             f"attention_mask is 1, and -100 where it is 0")  # fmt: skip
    with torch.no_grad():
        reference = model(images, ids, mask, labels=ids.masked_fill(mask == 0, IGNORE_INDEX))
        ours = next_token_loss(reference.logits, caption_labels(ids, mask, P))
    if not torch.allclose(ours, reference.loss, atol=1e-6):
        fail("next_token_loss with your labels differs from the Captioner's loss")
    return ("-100 on the prefix and the padding, every caption token and its EOT labelled, unshifted; "
            "next_token_loss(logits, labels) equals the Captioner's loss")  # fmt: skip


# Exercise 5.3: the prefix at the scale of the token embeddings ---------------------------------------------


def _number(out, what: str, shape: tuple[int, int]) -> float:
    """One number from the answer (a float or a one-element tensor), or a hint."""
    if isinstance(out, Tensor):
        if out.numel() != 1:
            v, d = shape
            if tuple(out.shape) == (v,):
                fail(f"{what} returned the V = {v} lengths; combine them into one number, the root mean square "
                     f"sqrt(mean(length²)): the typical length")  # fmt: skip
            if tuple(out.shape) == (d,):
                fail(f"{what} returned {d} numbers, one per *column*: each token's vector is a row of the (V, D) "
                     f"table, so take lengths over the last axis (dim=-1)")  # fmt: skip
            fail(f"{what} should return one number, got a tensor of shape {tuple(out.shape)}")
        return out.item()
    if isinstance(out, (int, float)):
        return float(out)
    fail(f"{what} should return a number, got {type(out).__name__}")


SCALE_MISTAKES: dict[str, tuple[Callable[[Tensor], Tensor], str]] = {
    "mean length": (lambda w: w.norm(dim=-1).mean(),
                    "you took the plain mean of the lengths; minivlm.prefix.embedding_scale takes their root mean "
                    "square, sqrt(mean(length²)), the length of an average *squared* vector (a little larger)"),
    "max length": (lambda w: w.norm(dim=-1).max(),
                   "you took the longest embedding; the target is a *typical* length, the root mean square of all V "
                   "lengths, sqrt(mean(length²)): a prefix as long as the longest token would stand out"),
    "RMS of numbers": (lambda w: w.square().mean().sqrt(),
                       "you took the root mean square of the V·D single numbers, the scale of one coordinate; a "
                       "vector's length is √D times that: sqrt(mean over tokens of sum over D of e²)"),
    "wrong axis": (lambda w: w.square().sum(0).mean().sqrt(),
                   "you summed the squares over the tokens (dim=0); each token's vector is a row: its squared length "
                   "is the sum over D (dim=-1), then the mean over the V tokens"),
    "no square root": (lambda w: w.square().sum(-1).mean(),
                       "you forgot the square root: mean(length²) is a squared length"),
}  # fmt: skip


def _rms(x: Tensor) -> Tensor:
    return x.square().mean(-1, keepdim=True).sqrt()


RESCALE_MISTAKES: Mistakes = {
    "over P": (lambda x, s: x / x.norm(dim=1, keepdim=True) * s,
               "you normalised over the prefix axis P (dim=1); each of the P vectors gets its own length, over its "
               "D numbers: the last axis (dim=-1)"),
    "over B": (lambda x, s: x / x.norm(dim=0, keepdim=True) * s,
               "you normalised over the batch axis (dim=0); normalise each vector over its D numbers, dim=-1"),
    "whole prefix": (lambda x, s: x / x.norm(dim=(1, 2), keepdim=True) * s,
                     "you gave each image's whole (P, D) prefix length `target`; each of its P vectors is one "
                     "'word' and gets length `target` on its own: norm over dim=-1"),
    "max": (lambda x, s: x / x.norm(dim=-1, keepdim=True).max() * s,
            "you divided every vector by the longest one's length: the others stay shorter than `target`. "
            "Divide each vector by its *own* length (or RMS), keepdim=True"),
    "mean": (lambda x, s: x / x.norm(dim=-1, keepdim=True).mean() * s,
             "you divided every vector by the mean length: only their average is right. Divide each vector by its "
             "*own* length (or RMS), keepdim=True"),
    "RMS, times target": (lambda x, s: x / _rms(x) * s,
                          "you divided by the RMS and multiplied by `target`: x / RMS(x) has length √D, not 1, so your "
                          "vectors are √D times too long. Multiply by target / √D (or divide by the length instead)"),
    "unit": (lambda x, s: x / x.norm(dim=-1, keepdim=True),
             "your vectors have length 1: multiply by `target`, the token embeddings' typical length"),
    "layer norm": (lambda x, s: F.layer_norm(x, x.shape[-1:]) * s / math.sqrt(x.shape[-1]),
                   "LayerNorm also subtracts each vector's mean, which changes its direction; minivlm.prefix uses "
                   "RMSNorm without a gain, which only rescales: x / RMS(x) · target / √D"),
}  # fmt: skip


def check_prefix_scale(token_scale: Callable, rescale: Callable) -> str:
    """Exercise 5.3: token_scale(weight) = embedding_scale; rescale(prefix, target) = the mappers' normalisation."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        lm = GPT2(GPT2Config.from_preset("tiny"))  # (V, D) = (128, 32)
        mapper = LinearMapper(10, 32, 4, target_scale=1.0)  # only its projection is used below
    spread = torch.linspace(0.2, 3.0, 128)[:, None]  # tokens of very different lengths: a mean is not an RMS
    with torch.no_grad():
        lm.get_input_embeddings().weight.mul_(spread * 50)  # (GPT-2's init, std 0.02, times 10 to 150)
    weight = lm.get_input_embeddings().weight.detach()
    expected = embedding_scale(lm)
    what = f"token_scale(weight {tuple(weight.shape)})"
    got = _number(call(token_scale, weight.clone(), what=what), what, tuple(weight.shape))
    if not math.isclose(got, expected, rel_tol=1e-4):
        for mistake, hint in SCALE_MISTAKES.values():
            if math.isclose(got, mistake(weight).item(), rel_tol=1e-4):
                fail(f"{what} gave {got:.4f}, embedding_scale gives {expected:.4f}: {hint}")
        fail(f"{what} gave {got:.4f}, minivlm.prefix.embedding_scale gives {expected:.4f}: the root mean square of "
             f"the rows' lengths, sqrt(mean over the V tokens of sum over D of e²)")  # fmt: skip

    features = randn(3, 10, seed=51) * torch.tensor([[0.3], [1.0], [6.0]])  # (B, F): prefixes of very different sizes
    with torch.no_grad():
        raw = mapper.project(features)  # (B, P, D) = (3, 4, 32), before normalisation
    for target in (expected, 0.7):
        mapper.target_scale.fill_(target)
        with torch.no_grad():
            reference = mapper(features)  # (B, P, D), every vector of length target
        what = f"rescale(prefix {tuple(raw.shape)}, target={target:.3g})"
        out = tensor(call(rescale, raw.clone(), target, what=what,
                          hint="Take each vector's length over its last axis, with keepdim=True"), what)  # fmt: skip
        if out.shape != raw.shape:
            extra = " (did you forget keepdim=True? The lengths must broadcast against (B, P, D))" if out.ndim != 3 else ""
            fail(f"{what} returned shape {tuple(out.shape)}; the prefix keeps its shape (B, P, D) = "
                 f"{tuple(raw.shape)}{extra}")  # fmt: skip
        if not same(out, reference):
            diagnose(out, (raw, target), RESCALE_MISTAKES, what, reference,
                     "each of the B·P vectors should keep its direction and get length `target`: "
                     "x / |x| · target, with |x| over the last axis")  # fmt: skip
    lengths = reference.norm(dim=-1)
    return (f"token_scale equals minivlm.prefix.embedding_scale ({expected:.3f} on a spread-out table), and "
            f"rescale equals the mappers' RMSNorm: each of the B·P = {lengths.numel()} prefix vectors gets length "
            f"`target`, its direction unchanged")  # fmt: skip


CHECKS: dict[str, Callable[..., str]] = {
    "5.1": check_build_inputs,
    "5.2": check_caption_labels,
    "5.3": check_prefix_scale,
}
