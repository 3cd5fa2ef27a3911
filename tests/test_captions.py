"""minivlm.data.captions: shapes items equal the world's; the collate pads right, ends with EOT, masks only padding."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from minivlm.data.captions import IGNORE_INDEX, CaptionCollator, ShapesCaptions, caption_loader, swap_words, word_ids
from minivlm.data.folders import IMAGENET_MEAN, IMAGENET_STD, CocoCaptions, image_transform
from minivlm.data.shapes import COLOURS, ShapesWorld
from minivlm.tokenizer import EOT, train_tokenizer

S = 32  # image side
WORLD = ShapesWorld("train", image_size=S, seed=0, length=16)


@pytest.fixture(scope="module")
def dataset():
    return ShapesCaptions(WORLD)


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE trained on 64 shapes captions: a real tokenizer with a pad token distinct from EOT."""
    world = ShapesWorld("train", image_size=S, seed=1, length=64)
    return train_tokenizer([world.caption(i) for i in range(len(world))], vocab_size=300)


@pytest.fixture(scope="module")
def gpt2_style(tokenizer):
    """The same tokenizer padded as GPT-2's is (tokenizer_for_hub_model): pad == eos."""
    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id
    return tok


def items(dataset, indices):
    return [dataset[i] for i in indices]


def test_items_equal_the_world(dataset):
    pixels = torch.from_numpy(WORLD.images(range(len(WORLD))))  # (N, H, W, C) uint8
    assert len(dataset) == len(WORLD) and dataset.world is WORLD
    assert dataset.pixels.dtype == torch.uint8 and dataset.pixels.shape == (len(WORLD), 3, S, S)
    for i in (0, 7, 15):
        image, text = dataset[i]
        assert image.dtype == torch.float32 and image.shape == (3, S, S)
        assert torch.equal(image, pixels[i].permute(2, 0, 1).float() / 255)
        assert 0 <= image.min() and image.max() <= 1
        assert text == WORLD.caption(i)


def test_deterministic_and_bad_index(dataset):
    again = ShapesCaptions(ShapesWorld("train", image_size=S, seed=0, length=16))
    assert torch.equal(again.pixels, dataset.pixels) and again.captions == dataset.captions
    for bad in (16, -1):
        with pytest.raises(IndexError, match=r"index .* out of range .* length 16 \(valid indices: 0 to 15\)"):
            dataset[bad]


def test_normalize(dataset):
    normed = ShapesCaptions(WORLD, normalize=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    raw, x = dataset[3][0], normed[3][0]
    assert_close(x, (raw - mean) / std)
    assert_close(x.mean(dim=(1, 2)), (raw.mean(dim=(1, 2)) - mean.flatten()) / std.flatten())
    assert raw.mean() > 0.5 and x.mean() > raw.mean()  # a light-grey background sits above ImageNet's mean


def test_collate_pads_right_and_ends_with_eot(dataset, tokenizer):
    batch = CaptionCollator(tokenizer, max_length=64)(items(dataset, range(6)))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in batch["captions"]]
    assert len(set(lengths)) > 1  # the batch does need padding
    assert batch["images"].shape == (6, 3, S, S) and batch["images"].dtype == torch.float32
    assert ids.shape == mask.shape == labels.shape == (6, max(lengths))
    assert ids.dtype == mask.dtype == labels.dtype == torch.long
    assert batch["captions"] == [dataset.captions[i] for i in range(6)]
    for b, n in enumerate(lengths):
        assert mask[b].tolist() == [1] * n + [0] * (ids.shape[1] - n)  # right padding
        assert ids[b, n - 1] == tokenizer.eos_token_id and (ids[b, n:] == tokenizer.pad_token_id).all()
        text = tokenizer.decode(ids[b][mask[b] == 1], clean_up_tokenization_spaces=False)
        assert text == batch["captions"][b] + EOT
    assert torch.equal(labels == IGNORE_INDEX, mask == 0)
    assert torch.equal(labels[mask == 1], ids[mask == 1])


def test_pad_equal_to_eos_keeps_the_eot_label(dataset, tokenizer, gpt2_style):
    batch = CaptionCollator(gpt2_style, max_length=64)(items(dataset, range(6)))
    reference = CaptionCollator(tokenizer, max_length=64)(items(dataset, range(6)))
    mask, labels = batch["attention_mask"], batch["labels"]
    assert torch.equal(mask, reference["attention_mask"]) and torch.equal(labels, reference["labels"])
    lengths = mask.sum(dim=1)
    short = int(lengths.argmin())
    assert lengths[short] < mask.shape[1]  # a padded row: its EOT is followed by pad ids equal to it
    assert labels[short, lengths[short] - 1] == gpt2_style.eos_token_id
    assert (labels[short, lengths[short] :] == IGNORE_INDEX).all()


def test_too_long_caption_is_an_error(tokenizer):
    long = "a small red circle " * 20 + "."
    n = len(tokenizer(long, add_special_tokens=False)["input_ids"])
    collate = CaptionCollator(tokenizer, max_length=n)  # one short: EOT does not fit
    image = torch.zeros(3, S, S)
    with pytest.raises(ValueError, match=rf"caption 'a small red circle .*'\.\.\. has {n} tokens, {n + 1} with EOT, "
                                         rf"more than max_length={n}"):  # fmt: skip
        collate([(image, "a circle."), (image, long)])
    assert CaptionCollator(tokenizer, max_length=n + 1)([(image, long)])["input_ids"].shape == (1, n + 1)


def test_bad_batches_are_errors(tokenizer):
    collate = CaptionCollator(tokenizer, max_length=32)
    with pytest.raises(ValueError, match=r"item 0 is \(3, 32, 32\), item 1 is \(3, 16, 16\)"):
        collate([(torch.zeros(3, 32, 32), "a circle."), (torch.zeros(3, 16, 16), "a square.")])
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
    with pytest.raises(ValueError, match="image is of type Image, not a tensor; give the dataset a transform"):
        collate([(Image.new("RGB", (8, 8)), "a circle.")])
    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="no end-of-text"):
        CaptionCollator(no_eos, max_length=32)


def test_collator_pickles(dataset, tokenizer):
    collate = pickle.loads(pickle.dumps(CaptionCollator(tokenizer, max_length=64)))
    batch, reference = collate(items(dataset, range(3))), CaptionCollator(tokenizer, 64)(items(dataset, range(3)))
    assert torch.equal(batch["input_ids"], reference["input_ids"])


def test_same_collator_serves_coco(tmp_path, tokenizer):
    Image.new("RGB", (30, 20), (200, 30, 30)).save(tmp_path / "red.png")  # not square: the transform crops
    Image.new("RGB", (20, 24), (40, 80, 220)).save(tmp_path / "blue.png")
    captions = ["a large blue square.", "a small red square to the left of a large blue circle."]
    coco = {"images": [{"id": 1, "file_name": "red.png"}, {"id": 2, "file_name": "blue.png"}],
            "annotations": [{"image_id": 2, "caption": captions[0]}, {"image_id": 1, "caption": captions[1]}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    data = CocoCaptions(tmp_path, tmp_path / "captions.json", transform=image_transform(S))
    batch = CaptionCollator(tokenizer, max_length=64)([data[0], data[1]])
    assert batch["images"].shape == (2, 3, S, S)
    assert batch["captions"] == captions
    assert batch["attention_mask"][0, -1] == 0 and batch["attention_mask"][1, -1] == 1


def test_loader_order_is_fixed_by_the_seed(dataset, tokenizer):
    def order(seed):
        loader = caption_loader(dataset, tokenizer, batch_size=4, max_length=64, shuffle=True, seed=seed)
        return [c for batch in loader for c in batch["captions"]]

    first = order(0)
    assert sorted(first) == sorted(dataset.captions)  # every item once
    assert order(0) == first
    assert order(1) != first
    loader = caption_loader(dataset, tokenizer, batch_size=4, max_length=64, shuffle=False)
    assert [c for batch in loader for c in batch["captions"]] == dataset.captions


def test_swap_words_replaces_only_the_words_each_by_another_of_them():
    words = torch.tensor([5, 7, 9])
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([5, 7, 9, 1, 2]).repeat(4000, 1)  # (4000, 5): three words and two other tokens per row
    swapped = swap_words(ids, words, 0.3, g)
    assert torch.equal(swapped[:, 3:], ids[:, 3:])  # other tokens never change
    changed = swapped[:, :3] != ids[:, :3]
    assert 0.28 < changed.float().mean() < 0.32  # about p of the words
    assert torch.isin(swapped[:, :3], words).all()  # each into another word, never itself (else it is not "changed")
    for i, word in enumerate(words.tolist()):  # uniformly into the other two
        into = swapped[:, i][changed[:, i]]
        others = [w for w in words.tolist() if w != word]
        counts = [(into == w).sum().item() for w in others]
        assert sum(counts) == len(into) and min(counts) > 0.4 * len(into)
    again = swap_words(ids, words, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(again, swapped)  # the generator decides
    assert torch.equal(swap_words(ids, words, 0.0, g), ids)
    assert (swap_words(ids, words, 1.0, g)[:, :3] != ids[:, :3]).all()
    with pytest.raises(ValueError, match="probability"):
        swap_words(ids, words, 1.5, g)


def test_word_ids_are_the_words_single_tokens_or_a_clear_error(tokenizer):
    world = ShapesWorld("train", image_size=S, seed=1, length=300)
    larger = train_tokenizer([world.caption(i) for i in range(len(world))], vocab_size=400)  # a token per colour
    ids = word_ids(larger, COLOURS)
    caption = larger(" a large red circle", add_special_tokens=False)["input_ids"]
    assert len(ids) == len(COLOURS) and ids[0].item() in caption  # " red" as a caption writes it
    with pytest.raises(ValueError, match="'red' is 3 tokens of this tokenizer, not one"):
        word_ids(tokenizer, COLOURS)  # this module's BPE of 300 tokens spells "red" in 3
    with pytest.raises(ValueError, match="two different words"):
        word_ids(larger, ["red", "red"])
