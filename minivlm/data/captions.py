"""From captioned images to training batches: a shapes-world Dataset, and the collate that tokenises and pads.

What it teaches: how a captioning model is fed. Every dataset in `minivlm.data` yields the same item,
`(image float32 (C, H, W), caption str)`, so one collate function turns any of them into a batch. The
collate tokenises each caption and appends the end-of-text token (EOT), so the model learns where a
caption stops: generation ends when it predicts EOT, as GPT-2 ends a document (Radford et al., 2019).
Captions of different lengths are padded on the right to the longest in the batch, and the padding is
masked twice: `attention_mask` 0 so no real token attends to it, and label -100 so the loss ignores it
(-100 is the `ignore_index` of `torch.nn.functional.cross_entropy`, and Hugging Face's convention).

One trap is worth a test of its own. GPT-2's tokenizer has no padding token, so it is usually padded
with EOT itself (`tokenizer_for_hub_model`). A mask built by comparing ids with `pad_token_id` would
then also mask the *real* EOT after each caption, and the model would never learn to stop. Labels here
are built from the attention mask, which knows which positions are real.

The visual prefix is not added here: the captioner prepends its P prefix positions itself (ClipCap,
Mokady et al., 2021; Frozen, Tsimpoukelli et al., 2021), and extends the labels with -100 over them.

The shapes world is small enough to render whole: `ShapesCaptions` draws every image of a split once,
at construction (60,000 images of 32 pixels in seconds), and keeps them as uint8, a quarter of the
memory of float32; an item is converted to float only when it is asked for.

`swap_words` serves the captioner's training (`TrainConfig.colour_swap`, 0.3 in the cpu preset): it replaces some of
the caption's colour words in the *input* by other colours, and leaves the labels as they were. No training image
has a green diamond, so in training "green" is never followed by "diamond", and a captioner can learn to take
the shape from the colour it has just said instead of from the image; with swapped inputs, the word before a
shape is no longer a reliable guide to it, and the shape must be read from the picture. A swap can put a held-out
pair into the text the captioner reads ("green" before a diamond's "diamond"), as the course LM's own corpus has
them; no training image shows one.

Axis letters: N images in a split, B batch, T tokens, C channels (3), H height, W width.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from einops import rearrange
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F

from minivlm.data.folders import IMAGENET_MEAN, IMAGENET_STD
from minivlm.data.shapes import ShapesWorld, caption, render_batch

__all__ = ["IGNORE_INDEX", "ShapesCaptions", "CaptionCollator", "caption_loader", "word_ids", "swap_words"]

IGNORE_INDEX = -100  # label of a position the loss skips: cross_entropy's default ignore_index


def _short(text: str, limit: int = 60) -> str:
    """`text`'s repr, cut to about `limit` characters, for error messages."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


class ShapesCaptions(Dataset):
    """A shapes-world split as (image, caption) items, like CocoCaptions and CsvCaptions, rendered once up front."""

    def __init__(self, world: ShapesWorld, normalize: bool = False):
        self.world = world
        self.normalize = normalize  # subtract the ImageNet mean, divide by its std, as pretrained CNNs expect
        scenes = [world.scene(i) for i in range(len(world))]  # sampled once, for both images and captions
        pixels = torch.from_numpy(render_batch(scenes, world.image_size))  # (N, H, W, C) uint8: world.images
        self.pixels = rearrange(pixels, "n h w c -> n c h w").contiguous()  # (N, C, H, W) uint8
        self.captions = [caption(scene) for scene in scenes]  # N strings

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        """Item i as (image float32 (C, H, W) in [0, 1], or ImageNet-normalised, caption)."""
        i = operator.index(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} is out of range for ShapesCaptions of length {len(self)} "
                             f"(valid indices: 0 to {len(self) - 1})")  # fmt: skip
        image = self.pixels[i].float() / 255  # (C, H, W) in [0, 1]
        if self.normalize:
            image = F.normalize(image, IMAGENET_MEAN, IMAGENET_STD)  # as image_transform(normalize=True)
        return image, self.captions[i]


class CaptionCollator:
    """Turns a list of (image, caption) items into a padded batch: images, token ids, attention mask, labels.

    Each caption is tokenised without special tokens and ends with EOT; rows are padded on the right to
    T = the longest caption + 1. `labels` are the text's own ids with IGNORE_INDEX on padding: they are
    not yet shifted, and the captioner shifts them and extends them with IGNORE_INDEX over its prefix.
    A caption longer than max_length - 1 tokens is an error, never silently truncated. A plain class
    rather than a closure, so that it pickles into DataLoader worker processes.
    """

    def __init__(self, tokenizer, max_length: int):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no end-of-text (eos) token, so a caption cannot be ended; "
                             "use minivlm.tokenizer.train_tokenizer or tokenizer_for_hub_model")  # fmt: skip
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no padding token; GPT-2's has none, and "
                             "minivlm.tokenizer.tokenizer_for_hub_model pads with <|endoftext|>")  # fmt: skip
        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int of at least 2 (a token and EOT), got {max_length!r}")
        self.tokenizer = tokenizer
        self.max_length = max_length  # most tokens in one row, EOT included

    def __call__(self, items: Sequence[tuple[torch.Tensor, str]]) -> dict:
        """The batch: images (B, C, H, W), input_ids, attention_mask and labels (B, T), and the captions."""
        if len(items) == 0:
            raise ValueError("cannot collate an empty batch")
        images, captions = zip(*items)
        for k, image in enumerate(images):
            if not isinstance(image, torch.Tensor):
                raise ValueError(f"item {k}'s image is of type {type(image).__name__}, not a tensor; give the "
                                 f"dataset a transform, such as minivlm.data.folders.image_transform(S)")  # fmt: skip
            if image.shape != images[0].shape:
                raise ValueError(f"images in one batch must have one shape: item 0 is {tuple(images[0].shape)}, "
                                 f"item {k} is {tuple(image.shape)}; resize them to one size")  # fmt: skip
        ids = self.tokenizer(list(captions), add_special_tokens=False)["input_ids"]  # B lists of token ids
        for text, row in zip(captions, ids):
            if len(row) + 1 > self.max_length:
                raise ValueError(f"caption {_short(text)} has {len(row)} tokens, {len(row) + 1} with EOT, "
                                 f"more than max_length={self.max_length}; raise max_length or shorten the caption")
        t = max(len(row) for row in ids) + 1
        input_ids = torch.full((len(ids), t), self.tokenizer.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(ids), t), dtype=torch.long)  # (B, T) 1 real, 0 padding
        for b, row in enumerate(ids):
            input_ids[b, : len(row) + 1] = torch.tensor([*row, self.tokenizer.eos_token_id])
            attention_mask[b, : len(row) + 1] = 1
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)  # never compare ids with pad: pad may be EOT
        return {"images": torch.stack(images).float(), "input_ids": input_ids, "attention_mask": attention_mask,
                "labels": labels, "captions": list(captions)}  # fmt: skip


def caption_loader(dataset: Dataset, tokenizer, *, batch_size: int, max_length: int, shuffle: bool, seed: int = 0,
                   num_workers: int = 0) -> DataLoader:  # fmt: skip
    """A DataLoader of caption batches whose shuffling (and workers' random seeds) are fixed by `seed`."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=CaptionCollator(tokenizer, max_length),
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip


def word_ids(tokenizer, words: Sequence[str]) -> torch.Tensor:
    """(len(words),) the token id of each word as it is written inside a caption, after a space.

    Each word must be one token of this tokenizer, or swapping it for another would change the caption's length.
    """
    ids = []
    for word in words:
        tokens = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"{word!r} is {len(tokens)} tokens of this tokenizer, not one; only words of one token "
                             f"can be swapped for each other (the course LM's tokenizer has one for each colour)")
        ids.append(tokens[0])
    if len(set(ids)) < 2:
        raise ValueError(f"swapping needs at least two different words, got {list(words)!r}")
    return torch.tensor(ids)


def swap_words(input_ids: torch.Tensor, words: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """input_ids (B, T) with each token that is one of `words` replaced, with probability p, by another of them.

    The replacement is drawn uniformly from the other words, never the word itself; every other token stays.
    A new tensor: the labels made from the same ids (`CaptionCollator`) keep the true words.
    """
    if not 0 <= p <= 1:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    match = input_ids[..., None] == words  # (B, T, K): which of the K words each token is
    which = match.float().argmax(dim=-1)  # (B, T) its index among the words (0 where it is none)
    swap = match.any(dim=-1) & (torch.rand(input_ids.shape, generator=generator) < p)  # (B, T)
    step = torch.randint(1, len(words), input_ids.shape, generator=generator)  # 1 .. K-1: never the same word
    return torch.where(swap, words[(which + step) % len(words)], input_ids)
