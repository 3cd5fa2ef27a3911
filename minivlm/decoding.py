"""Decoding: turning a language model's next-token scores into text, with and without a KV cache.

Greedy decoding picks the most likely next token, appends it, and repeats. Done naively, step n runs
the model over all n tokens again; with a KV cache (see `minivlm.attention.KVCache`) each step runs
only the newest token and reuses the keys and values stored for the others — same tokens, far less work.

Batches of prompts of different lengths are *left*-padded so that every prompt ends at the same
column and the next token is always appended on the right; positions are then counted from each
prompt's first real token (`position_ids = attention_mask.cumsum(-1) - 1`), so padding changes nothing.

Works with our `minivlm.gpt2.GPT2` and with `transformers`' `GPT2LMHeadModel`: both take
(input_ids, attention_mask, position_ids, past_key_values, use_cache, logits_to_keep) and return `.logits`.
Axis letters: B batch, T prompt tokens, N new tokens, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["greedy", "positions_from_mask"]


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, S) 1/0 mask -> (B, S) positions counted from each row's first real token (padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def greedy(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int,
    eos_token_id: int | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Greedy decoding: (B, T) left-padded prompts -> (B, N) new tokens, N <= max_new_tokens.

    A row that has produced `eos_token_id` keeps producing it (it is finished); decoding stops early
    once every row is finished.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"expected input_ids of shape (B, T), got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
        )
    ids, mask = input_ids, attention_mask.long()
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new_tokens: list[Tensor] = []
    cache = None
    step_ids = ids  # what goes through the model this step: the whole prompt first
    for _ in range(max_new_tokens):
        positions = positions_from_mask(mask)
        if use_cache:
            out = model(
                step_ids,
                attention_mask=mask,
                position_ids=positions[:, -step_ids.shape[1] :],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = out.past_key_values
        else:
            out = model(ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
        next_token = out.logits[:, -1].argmax(dim=-1)  # (B,)
        if eos_token_id is not None:
            next_token = next_token.masked_fill(finished, eos_token_id)
            finished |= next_token == eos_token_id
        new_tokens.append(next_token)
        step_ids = next_token[:, None]  # (B, 1)
        ids = torch.cat([ids, step_ids], dim=1)
        mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        if eos_token_id is not None and finished.all():
            break
    return torch.stack(new_tokens, dim=1) if new_tokens else ids.new_zeros(ids.shape[0], 0)
