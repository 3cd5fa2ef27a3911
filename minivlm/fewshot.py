"""Multimodal few-shot prompting: images and text interleaved in one prompt to the frozen LM, scored and decoded.

What it teaches: what made Frozen (Tsimpoukelli et al., 2021, "Multimodal Few-Shot Learning with
Frozen Language Models", section 4) more than a captioner. The captioner was trained on one image and
its caption at a time, yet because its LM is frozen, the LM keeps everything it learned from text,
including reading its context. So a prompt may hold *several* images, each turned into its P visual
prefix vectors, between pieces of text:

    [image] this is a dax. [image] this is a blicket. [image] this is a   ->  " dax."

The LM has never seen "dax" bound to anything; it can only answer by matching the last image with
the earlier ones and copying the name that followed the match: learning a new word from one example,
in context, without a single weight changing.

A prompt is a sequence of segments, each a `str` or one image (3, S, S). `embed_prompts` turns each
into one `inputs_embeds` row (text -> token embeddings, image -> `Captioner.prefix`), and left-pads
the rows of a batch so that every prompt ends in the same column: the positions are then counted from
each row's first real vector (`positions_from_mask`), exactly as in batched decoding. A prompt that
opens with text starts with <|endoftext|>, as every pretraining text did; one that opens with an image
starts with its prefix, as every captioning example did (`embed_prompts`).

Two ways to show an image (`view`):

- "prefix": its visual prefix, what the captioner learned to caption from (Frozen's way);
- "words": its word view (`Captioner.words`, when `CaptionerConfig.word_view` > 0): W vectors trained to be
  the token embeddings of its caption's last W tokens, read by the LM like text. The course LM's in-context
  look-ups match words; a prefix trained for captioning alone matches none, and images shown that way did
  not bind to names (`bench/fewshot.py` measures both).

Two ways to read the LM's answer:

- open-ended (`complete`): greedy decoding with the KV cache; right if it says exactly the answer and
  then stops (`says`): " dax." or " dax" then end-of-text, never " daxes" or " dax blicket".
- ranking (`score`): the log-probability of each candidate answer after the prompt; the prompt goes
  through the LM once, its KV cache is copied for every candidate, and only the candidates' tokens
  are run on top of it.

Works with our `minivlm.gpt2.GPT2` and with `transformers`' `GPT2LMHeadModel` as the captioner's LM.
Axis letters: B prompts, L vectors in a prompt, P prefix vectors per image, D the LM's width, K
candidates per prompt, C tokens in a candidate, V vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from einops import repeat
from torch import Tensor

from minivlm.captioner import Captioner
from minivlm.decoding import reorder_cache, generate, positions_from_mask

__all__ = ["Segment", "VIEWS", "embed_prompts", "complete", "score", "says"]

Segment = str | Tensor  # text, or one image (3, S, S)
VIEWS = ("prefix", "words")  # how an image is shown to the LM (see the module docstring)
IMAGE_CHUNK = 256  # images encoded per call


def _check_segments(prompts: Sequence[Sequence[Segment]]) -> None:
    """Raise a ValueError naming the prompt and segment unless every segment is a str or a (3, S, S) tensor."""
    if not prompts:
        raise ValueError("got no prompts")
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, Tensor)):
            raise ValueError(f"prompt {i} must be a sequence of segments (str or image), got a single {type(prompt).__name__}")
        if not prompt:
            raise ValueError(f"prompt {i} is empty: it needs at least one segment")
        for j, segment in enumerate(prompt):
            if isinstance(segment, Tensor):
                if segment.ndim != 3 or segment.shape[0] != 3:
                    raise ValueError(f"prompt {i}, segment {j}: an image must be (3, S, S), got {tuple(segment.shape)}")
            elif not isinstance(segment, str):
                raise ValueError(f"prompt {i}, segment {j}: expected a str or an image tensor, got {type(segment).__name__}")


def embed_prompts(captioner: Captioner, tokenizer, prompts: Sequence[Sequence[Segment]], *,
                  start_of_text: bool = True, view: str = "prefix") -> tuple[Tensor, Tensor]:  # fmt: skip
    """Interleaved prompts -> (inputs_embeds (B, L, D), attention_mask (B, L)), left-padded, ready for the LM.

    Every image of every prompt goes through the encoder and mapper together (in chunks), every text
    through the LM's own embedding table. Each prompt begins as what its first segment was trained
    after. The LM read every text of its pretraining after <|endoftext|> (`minivlm.probes`), so a
    prompt that opens with text gets <|endoftext|> in front (start_of_text=False: not); so does one that
    opens with an image shown in words, which stands for text. The captioner learned its prefix at
    position 0, where nothing comes before, so a prompt that opens with an image's prefix gets nothing.
    view: "prefix" (each image as its visual prefix) or "words" (as its word view). Raises a ValueError
    if a prompt is longer than the LM's context, or the captioner has no word view to show.
    """
    _check_segments(prompts)
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose one of {VIEWS}")
    show = captioner.prefix if view == "prefix" else captioner.words
    table = captioner.lm.get_input_embeddings()
    images = [s for prompt in prompts for s in prompt if isinstance(s, Tensor)]
    device = table.weight.device
    prefixes: list[Tensor] = []  # (P, D) or (W, D) per image, in order
    for start in range(0, len(images), IMAGE_CHUNK):
        batch = torch.stack(images[start : start + IMAGE_CHUNK]).to(device)  # (N, 3, S, S)
        prefixes += list(show(batch))  # checks the image size
    texts = [s for prompt in prompts for s in prompt if isinstance(s, str)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    next_prefix, next_text = iter(prefixes), iter(ids)
    rows = []
    opening = [tokenizer.eos_token_id] if start_of_text else []
    for prompt in prompts:
        parts = [next(next_prefix) if isinstance(s, Tensor)
                 else table(torch.tensor(next(next_text), dtype=torch.long, device=device))  # "" gives no rows
                 for s in prompt]  # fmt: skip
        if opening and (isinstance(prompt[0], str) or view == "words"):  # text, and words, begin after <|endoftext|>
            parts.insert(0, table(torch.tensor(opening, device=device)))
        rows.append(torch.cat([p.to(table.weight.dtype) for p in parts]))  # (L_i, D)
    lengths = [len(r) for r in rows]
    if max(lengths) > captioner.context:
        i = max(range(len(rows)), key=lengths.__getitem__)
        per_image = captioner.prefix_length if view == "prefix" else captioner.word_view
        raise ValueError(f"prompt {i} is {lengths[i]} vectors long ({per_image} per image), more than "
                         f"the language model's context of {captioner.context}: use fewer shots or shorter text")  # fmt: skip
    longest = max(lengths)
    embeds = table.weight.new_zeros(len(rows), longest, rows[0].shape[-1])  # (B, L, D), or (B, L, K * D)
    mask = torch.zeros(len(rows), longest, dtype=torch.long, device=device)  # (B, L)
    for i, row in enumerate(rows):
        embeds[i, longest - len(row) :] = row  # left padding: every prompt ends in the last column
        mask[i, longest - len(row) :] = 1
    return embeds, mask


@torch.no_grad()
def complete(captioner: Captioner, tokenizer, prompts: Sequence[Sequence[Segment]], *, max_new_tokens: int = 8,
             batch_size: int = 64, start_of_text: bool = True, view: str = "prefix",
             **decoding_kwargs) -> list[str]:  # fmt: skip
    """The LM's continuation of each prompt (greedy by default, with the KV cache), cut at end-of-text.

    start_of_text, view: as in `embed_prompts`."""
    out: list[str] = []
    eot = tokenizer.eos_token_id
    was_training = captioner.training
    captioner.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            embeds, mask = embed_prompts(captioner, tokenizer, prompts[start : start + batch_size],
                                         start_of_text=start_of_text, view=view)  # fmt: skip
            room = captioner.context - embeds.shape[1]
            if room < 1:
                raise ValueError(f"a prompt of {embeds.shape[1]} vectors leaves no room to answer in the "
                                 f"language model's context of {captioner.context}")  # fmt: skip
            new = generate(captioner.lm, inputs_embeds=embeds, attention_mask=mask, eos_token_id=eot,
                           max_new_tokens=min(max_new_tokens, room), **decoding_kwargs)  # (B, N)  # fmt: skip
            rows = [row[: row.index(eot)] if eot in row else row for row in new.tolist()]
            out += [tokenizer.decode(row, skip_special_tokens=True) for row in rows]
    finally:
        captioner.train(was_training)
    return out


@torch.no_grad()
def score(captioner: Captioner, tokenizer, prompts: Sequence[Sequence[Segment]],
          candidates: Sequence[Sequence[str]], *, batch_size: int = 64,
          start_of_text: bool = True, view: str = "prefix") -> Tensor:  # fmt: skip
    """(B, K) log p(candidate | prompt), summed over the candidate's tokens; every prompt has K candidates.

    The prompts run once; each prompt's KV cache is then repeated K times and the candidates (right-padded)
    run on top of it, so a prompt of L vectors costs L + K·C positions rather than K·(L + C).
    start_of_text, view: as in `embed_prompts`.
    """
    if len(candidates) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(candidates)} lists of candidates")
    k = len(candidates[0]) if candidates else 0
    if k == 0 or any(len(c) != k for c in candidates):
        raise ValueError(f"every prompt needs the same number (at least one) of candidates, got {[len(c) for c in candidates]}")
    was_training = captioner.training
    captioner.eval()
    try:
        return torch.cat([_score(captioner, tokenizer, prompts[i : i + batch_size], candidates[i : i + batch_size],
                                 start_of_text, view) for i in range(0, len(prompts), batch_size)])  # fmt: skip
    finally:
        captioner.train(was_training)


def _score(captioner: Captioner, tokenizer, prompts: Sequence[Sequence[Segment]],
           candidates: Sequence[Sequence[str]], start_of_text: bool, view: str) -> Tensor:  # fmt: skip
    lm = captioner.lm
    embeds, mask = embed_prompts(captioner, tokenizer, prompts, start_of_text=start_of_text, view=view)  # (B, L, D)
    b, k = len(prompts), len(candidates[0])
    ids = tokenizer([c for row in candidates for c in row], add_special_tokens=False)["input_ids"]  # B·K lists
    if min(map(len, ids)) == 0:
        raise ValueError("a candidate answer is empty; candidates are texts such as ' dax.'")
    c = max(map(len, ids))
    if embeds.shape[1] + c > captioner.context:
        raise ValueError(f"a prompt of {embeds.shape[1]} vectors and a candidate of {c} tokens do not fit in the "
                         f"language model's context of {captioner.context}")  # fmt: skip
    tokens = torch.full((b * k, c), tokenizer.pad_token_id, dtype=torch.long, device=mask.device)  # (B·K, C)
    real = torch.zeros_like(tokens)  # (B·K, C) 1 on a candidate's own tokens
    for row, seq in enumerate(ids):
        tokens[row, : len(seq)] = torch.tensor(seq)
        real[row, : len(seq)] = 1
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=True,
             logits_to_keep=1)  # fmt: skip
    cache = out.past_key_values
    reorder_cache(cache, torch.arange(b, device=mask.device).repeat_interleave(k))  # B -> B·K rows
    full = torch.cat([repeat(mask, "b l -> (b k) l", k=k), real], dim=1)  # (B·K, L + C)
    logits = lm(input_ids=tokens, attention_mask=full, position_ids=positions_from_mask(full)[:, -c:],
                past_key_values=cache, use_cache=True).logits  # (B·K, C, V)  # fmt: skip
    first = repeat(out.logits[:, -1], "b v -> (b k) 1 v", k=k)  # the prompt's last position predicts token 0
    logp = torch.cat([first, logits[:, :-1]], dim=1).float().log_softmax(-1)  # (B·K, C, V)
    picked = logp.gather(-1, tokens[..., None])[..., 0] * real  # (B·K, C), 0 on padding
    return picked.sum(-1).view(b, k)


def says(continuation: str, answer: str) -> bool:
    """Is the continuation exactly ' answer' and then an end: '.', end-of-text, or nothing more?"""
    return re.fullmatch(rf" {re.escape(answer)}(\..*)?", continuation, flags=re.DOTALL) is not None
