"""Decoding: turning a language model's next-token scores into text: greedy, sampling, beam search; KV cache.

A language model gives, for a sequence, scores (logits) for the token that comes next. Decoding is the
loop that picks one, appends it and asks again. Three ways to pick:

- **greedy**: the most likely token. Deterministic, and what the probes and the benchmark use.
- **sampling**: draw from the model's distribution, sharpened by a *temperature* (logits / τ, τ < 1 is
  more confident), restricted to the k most likely tokens (top-k, Fan et al., 2018, "Hierarchical
  Neural Story Generation") and/or to the *nucleus*, the smallest set of most likely tokens whose
  probability reaches p (top-p, Holtzman et al., 2020, "The Curious Case of Neural Text Degeneration").
  `filter_logits` does both; a `torch.Generator` makes a run repeatable.
- **beam search**: keep the K best partial sequences ("beams") instead of one; each step extends every
  beam by every token and keeps the K best of the K·V candidates. A candidate that ends (end-of-text,
  or the length limit) becomes a finished hypothesis scored by its *length-normalised* log-probability
  Σ log p / Nᵅ (α = `length_penalty`; Wu et al., 2016, "Google's Neural Machine Translation System",
  whose penalty is ((5 + N) / 6)ᵅ; we use Nᵅ, as `transformers`' beam search does), since otherwise
  short captions always win. ClipCap (Mokady et al., 2021) decodes its captions this way.

Done naively, step n runs the model over all n tokens again; with a KV cache (see
`minivlm.attention.KVCache`) each step runs only the newest token and reuses the keys and values
stored for the others: same tokens, far less work. Beam search must *reorder* the cache each step,
because a surviving beam may descend from any of the previous beams. `use_cache=False` is kept for
every strategy: it is the reference the cached path is tested against, and the way ClipCap's published
decoder works (the benchmark compares the two).

The prompt is either token ids (B, T) or embeddings (B, T, D). The captioner uses the second: its
prompt is P visual-prefix vectors (Frozen, Tsimpoukelli et al., 2021), optionally followed by embedded
text; the tokens it generates are then fed back as ids. Batches of prompts of different lengths are
*left*-padded so that every prompt ends at the same column and the next token is always appended on
the right; positions are counted from each prompt's first real token (`positions_from_mask`), so
padding changes nothing.

Works with our `minivlm.gpt2.GPT2` and with `transformers`' `GPT2LMHeadModel`: both take
(input_ids | inputs_embeds, attention_mask, position_ids, past_key_values, use_cache, logits_to_keep)
and return `.logits` and `.past_key_values`.
Axis letters: B batch, T prompt tokens, D model width, N new tokens, V vocabulary, K beams (here K is
not attention's head width).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

__all__ = ["generate", "greedy", "sample", "beam_search", "filter_logits", "positions_from_mask", "reorder_cache",
           "STRATEGIES"]  # fmt: skip


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, S) 1/0 mask -> (B, S) positions counted from each row's first real token (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _check_filter(top_k: int, top_p: float) -> None:
    """Raise a ValueError unless top_k >= 0 and 0 <= top_p <= 1."""
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p is a probability mass in [0, 1] (1 keeps every token), got {top_p}")


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """(..., V) logits with every token outside the top-k and the top-p nucleus set to -inf; never empties a row.

    top_k: keep the k highest scores (0 = no limit); ties with the k-th score are kept too, as in transformers.
    top_p: then keep the smallest set of most likely tokens whose probability reaches p (1 = no limit);
      the most likely token is always kept, so top_p=0 is greedy.
    """
    _check_filter(top_k, top_p)
    hidden = float("-inf")
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]  # (..., 1) the k-th best score
        logits = logits.masked_fill(logits < kth, hidden)
    if top_p < 1.0:
        ranked, order = logits.sort(dim=-1, descending=True)  # (..., V) best first
        reached = ranked.softmax(dim=-1).cumsum(dim=-1)  # probability of the best 1, 2, ... tokens
        before = F.pad(reached[..., :-1], (1, 0))  # probability of the tokens ranked above each one
        drop = before >= top_p  # the nucleus had reached p without this token
        drop[..., 0] = False  # never drop the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), hidden)  # back to vocabulary order
    return logits


def _check_inputs(
    input_ids: Tensor | None, attention_mask: Tensor | None, inputs_embeds: Tensor | None, max_new_tokens: int
) -> Tensor:
    """Check that the prompt is exactly one of ids (B, T) and embeddings (B, T, D); return its (B, T) mask."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if (input_ids is None) == (inputs_embeds is None):
        given = "both" if input_ids is not None else "neither"
        raise ValueError(
            f"pass the prompt as exactly one of input_ids (B, T) and inputs_embeds (B, T, D); got {given}"
        )
    if input_ids is not None and input_ids.ndim != 2:
        raise ValueError(f"expected input_ids of shape (B, T), got {tuple(input_ids.shape)}")
    if inputs_embeds is not None and inputs_embeds.ndim != 3:
        raise ValueError(f"expected inputs_embeds of shape (B, T, D), got {tuple(inputs_embeds.shape)}")
    prompt, name = (input_ids, "input_ids") if input_ids is not None else (inputs_embeds, "inputs_embeds")
    b, t = prompt.shape[:2]
    if attention_mask is None:
        return torch.ones(b, t, dtype=torch.long, device=prompt.device)
    if attention_mask.shape != (b, t):
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must be (B, T) = ({b}, {t}), like {name}")
    if not attention_mask[:, -1].bool().all():
        raise ValueError(
            "every prompt's last token must be real (attention_mask[:, -1] == 1): pad prompts on the left"
        )
    return attention_mask.long()


def reorder_cache(cache, index: Tensor) -> None:
    """Keep the cache's rows `index`, in that order: ours has `reorder`, transformers' `Cache` has `reorder_cache`."""
    if hasattr(cache, "reorder"):
        cache.reorder(index)
    elif hasattr(cache, "reorder_cache"):
        cache.reorder_cache(index)
    else:
        raise TypeError(
            f"beam search cannot reorder a {type(cache).__name__} cache: "
            "it needs a reorder(index) or reorder_cache(index) method"
        )


class _Sequences:
    """The batch being decoded: the prompt, the tokens chosen so far, and the KV cache when there is one.

    `next_logits` runs the model over what it has not seen: with the cache, the whole prompt and then one
    token a step; without it, everything again, the new tokens re-embedded after an embedded prompt.
    """

    def __init__(
        self, model: nn.Module, input_ids: Tensor | None, inputs_embeds: Tensor | None, mask: Tensor, use_cache: bool
    ):
        self.model, self.use_cache = model, use_cache
        self.prompt_ids, self.prompt_embeds = input_ids, inputs_embeds  # one of (B, T), (B, T, D)
        self.mask = mask  # (B, T + n): 1 = real token, 0 = padding
        # Looked at once, here: without padding the model needs neither mask nor positions (it counts
        # them itself) and takes its fast unmasked path, and no step waits to read the mask from a GPU.
        self.padded = not bool(mask.all())
        self.new = mask.new_zeros(mask.shape[0], 0)  # (B, n) the tokens chosen so far
        self.cache = None

    def _unseen(self) -> dict[str, Tensor]:
        """The model's input this step: the newest token if the cache holds the rest, else the whole sequence."""
        if self.use_cache and self.new.shape[1] > 0:
            return {"input_ids": self.new[:, -1:]}
        if self.prompt_ids is not None:
            return {"input_ids": torch.cat([self.prompt_ids, self.new], dim=1)}
        new = self.model.get_input_embeddings()(self.new).to(self.prompt_embeds.dtype)  # (B, n, D)
        return {"inputs_embeds": torch.cat([self.prompt_embeds, new], dim=1)}

    def next_logits(self) -> Tensor:
        """(B, V) scores for the token that follows each sequence."""
        inputs = self._unseen()
        t = next(iter(inputs.values())).shape[1]
        out = self.model(
            **inputs,
            attention_mask=self.mask if self.padded else None,
            position_ids=positions_from_mask(self.mask)[:, -t:] if self.padded else None,
            past_key_values=self.cache,
            use_cache=self.use_cache,
            logits_to_keep=1,  # only the last position's scores are needed
        )
        self.cache = out.past_key_values if self.use_cache else None
        return out.logits[:, -1]

    def append(self, tokens: Tensor) -> None:
        """Add one chosen token (B,) to every sequence."""
        self.new = torch.cat([self.new, rearrange(tokens, "b -> b 1")], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)

    def reorder(self, index: Tensor) -> None:
        """Make row i a copy of row index[i] (beam search: each surviving beam continues its parent)."""
        self.new, self.mask = self.new[index], self.mask[index]
        if self.cache is not None:  # the cache holds the prompt, which is not read again
            reorder_cache(self.cache, index)
        elif self.prompt_ids is not None:
            self.prompt_ids = self.prompt_ids[index]
        else:
            self.prompt_embeds = self.prompt_embeds[index]


def _token_by_token(
    seqs: _Sequences, pick: Callable[[Tensor], Tensor], max_new_tokens: int, eos_token_id: int | None
) -> Tensor:
    """Greedy and sampling's shared loop: `pick` one token per row from (B, V) logits; finished rows repeat eos."""
    finished = torch.zeros(seqs.mask.shape[0], dtype=torch.bool, device=seqs.mask.device)
    for _ in range(max_new_tokens):
        token = pick(seqs.next_logits())  # (B,)
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= token == eos_token_id
        seqs.append(token)
        if eos_token_id is not None and finished.all():  # every row has ended: stop early
            break
    return seqs.new


@torch.no_grad()
def greedy(
    model: nn.Module,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    inputs_embeds: Tensor | None = None,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Greedy decoding: a (B, T) or (B, T, D) left-padded prompt -> (B, N) new tokens, N <= max_new_tokens.

    A row that has produced `eos_token_id` keeps producing it (it is finished); decoding stops early
    once every row is finished.
    """
    mask = _check_inputs(input_ids, attention_mask, inputs_embeds, max_new_tokens)
    seqs = _Sequences(model, input_ids, inputs_embeds, mask, use_cache)
    return _token_by_token(seqs, lambda logits: logits.argmax(dim=-1), max_new_tokens, eos_token_id)


@torch.no_grad()
def sample(
    model: nn.Module,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    inputs_embeds: Tensor | None = None,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Sampling with temperature, top-k and top-p: a left-padded prompt -> (B, N) new tokens.

    The same `generator` seed (a torch.Generator on the model's device) gives the same tokens.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; at 0 sampling would be greedy: use greedy()")
    _check_filter(top_k, top_p)  # before running the model
    mask = _check_inputs(input_ids, attention_mask, inputs_embeds, max_new_tokens)
    seqs = _Sequences(model, input_ids, inputs_embeds, mask, use_cache)

    def pick(logits: Tensor) -> Tensor:
        probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)  # (B, V)
        return rearrange(torch.multinomial(probs, 1, generator=generator), "b 1 -> b")

    return _token_by_token(seqs, pick, max_new_tokens, eos_token_id)


@torch.no_grad()
def beam_search(
    model: nn.Module,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    inputs_embeds: Tensor | None = None,
    max_new_tokens: int,
    eos_token_id: int | None,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    use_cache: bool = True,
) -> Tensor:
    """Beam search: a left-padded prompt -> (B, N) each row's best hypothesis by Σ log p / Nᵅ, eos-padded after its end.

    Follows `transformers`' beam search (early_stopping=False): each step keeps the 2K best candidates, so
    that K live beams remain even if K of them end; an ending candidate ranked in the top K becomes a
    finished hypothesis, and each row keeps its K best. A row is done once it has K hypotheses and its
    best live beam, normalised at its present length, scores no better than the worst of them.
    eos_token_id=None: hypotheses end only at max_new_tokens.
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1 (1 is greedy search), got {num_beams}")
    mask = _check_inputs(input_ids, attention_mask, inputs_embeds, max_new_tokens)
    b, k, n_max, device = mask.shape[0], num_beams, max_new_tokens, mask.device
    if n_max == 0:
        return mask.new_zeros(b, 0)

    def beams(x: Tensor | None) -> Tensor | None:
        """Every row becomes K beams, rows b·K ... b·K + K-1, which start as copies of its prompt."""
        return None if x is None else repeat(x, "b ... -> (b k) ...", k=k)

    seqs = _Sequences(model, beams(input_ids), beams(inputs_embeds), beams(mask), use_cache)
    pad = eos_token_id if eos_token_id is not None else 0
    first = rearrange(torch.arange(b, device=device) * k, "b -> b 1")  # (B, 1) row b's first beam

    live = torch.full((b, k), float("-inf"), device=device)  # (B, K) Σ log p of each live beam
    live[:, 0] = 0.0  # one live beam at first, so that the K beams start from K different tokens
    done_scores = torch.full((b, k), float("-inf"), device=device)  # (B, K) finished hypotheses, best first
    done_tokens = torch.full((b, k, n_max), pad, dtype=torch.long, device=device)  # (B, K, N) theirs, eos-padded
    done_lengths = torch.zeros(b, k, dtype=torch.long, device=device)
    row_done = torch.zeros(b, dtype=torch.bool, device=device)  # no live beam can beat the row's hypotheses

    for n in range(1, n_max + 1):  # n: tokens per candidate after this step
        log_p = seqs.next_logits().float().log_softmax(dim=-1)  # (B K, V)
        v = log_p.shape[-1]
        scores = rearrange(live, "b k -> b k 1") + rearrange(log_p, "(b k) v -> b k v", k=k)
        top, flat = rearrange(scores, "b k v -> b (k v)").topk(2 * k, dim=-1)  # (B, 2K) best candidates, best first
        parent, token = flat // v, flat % v  # (B, 2K) the beam each extends, and with which token
        ends = token == eos_token_id if eos_token_id is not None else torch.zeros_like(token, dtype=torch.bool)
        if n == n_max:
            ends = torch.ones_like(ends)  # the length limit ends every candidate

        # Finished hypotheses: ending candidates ranked in the top K, merged with the row's K best so far.
        history = rearrange(seqs.new[rearrange(parent + first, "b c -> (b c)")], "(b c) n -> b c n", b=b)
        cand_tokens = F.pad(torch.cat([history, rearrange(token, "b c -> b c 1")], dim=-1), (0, n_max - n), value=pad)
        in_top_k = rearrange(torch.arange(2 * k, device=device) < k, "c -> 1 c")
        ended = ends & in_top_k & rearrange(~row_done, "b -> b 1")
        cand_scores = (top / n**length_penalty).masked_fill(~ended, float("-inf"))  # (B, 2K)
        done_scores, keep = torch.cat([done_scores, cand_scores], dim=1).topk(k, dim=-1)  # (B, K)
        done_tokens = torch.cat([done_tokens, cand_tokens], dim=1).gather(1, repeat(keep, "b k -> b k n", n=n_max))
        done_lengths = torch.cat([done_lengths, torch.full_like(token, n)], dim=1).gather(1, keep)
        if n == n_max:
            break

        # Live beams: the K best candidates that did not end; the cache follows each one's parent.
        live, survivors = top.masked_fill(ends, float("-inf")).topk(k, dim=-1)  # (B, K)
        seqs.reorder(rearrange(parent.gather(1, survivors) + first, "b k -> (b k)"))
        seqs.append(rearrange(token.gather(1, survivors), "b k -> (b k)"))

        row_done |= done_scores.isfinite().all(dim=-1) & (live[:, 0] / n**length_penalty <= done_scores[:, -1])
        if row_done.all():
            break
    return done_tokens[:, 0, : int(done_lengths[:, 0].max())]


STRATEGIES: dict[str, Callable[..., Tensor]] = {"greedy": greedy, "beam": beam_search, "sample": sample}


def generate(
    model: nn.Module,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    inputs_embeds: Tensor | None = None,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    strategy: str = "greedy",
    **kwargs,
) -> Tensor:
    """One entry point for every decoding strategy: `strategy` names one of STRATEGIES, kwargs go to it."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown decoding strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    return STRATEGIES[strategy](
        model, input_ids, attention_mask, inputs_embeds=inputs_embeds, max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id, **kwargs,
    )  # fmt: skip
