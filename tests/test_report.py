"""minivlm.report: each split's images are scored against their own true captions, sampling is seeded, the grid
colours right and wrong captions, and a report folder holds the table of both splits, the grid and the loss curve."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from einops import rearrange
from PIL import Image
from torch import nn

from minivlm.captioner import Captioner
from minivlm.data.shapes import HELD_OUT_PAIRS, ShapesWorld, parse_caption
from minivlm.evaluate import CAPTION_METRICS, true_captions
from minivlm.gpt2 import GPT2, GPT2Config
from minivlm.report import EVAL_SEED, caption_grid, caption_splits, decoding_options, evaluate_splits, write_report

N = 6  # images per split


@pytest.fixture(scope="module")
def captioner(tokenizer):
    """An untrained tiny captioner: its captions are nonsense, but every code path runs."""
    torch.manual_seed(0)
    lm = GPT2(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    return Captioner.from_config(lm, "tiny").eval()


class Oracle(nn.Module):
    """A 'captioner' that looks each image up among the rendered scenes and says its true caption."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(0))  # caption_splits asks the parameters for the device
        worlds = [ShapesWorld(split, 32, EVAL_SEED, N) for split in ("test", "heldout")]
        self.captions = {w.image(i).tobytes(): w.caption(i) for w in worlds for i in range(N)}

    def generate(self, images, tokenizer, max_new_tokens, **decoding):
        pixels = rearrange((images * 255).round().to(torch.uint8), "b c h w -> b h w c").numpy()  # (B, H, W, 3)
        return [self.captions[image.tobytes()] for image in pixels]


def test_each_split_is_scored_against_its_own_true_captions():
    """An oracle scores 100% only if images, predictions and references stay paired, in batches of any size."""
    captions = caption_splits(Oracle(), None, image_size=32, n_images=N, batch_size=4)
    assert set(captions) == {"test", "heldout"}
    for split, c in captions.items():
        world = ShapesWorld(split, 32, EVAL_SEED, N)
        assert np.array_equal(c.images, world.images(range(N)))
        assert c.references == [true_captions(world.scene(i)) for i in range(N)]
        assert c.scores()["exact match"] == 1.0
    for refs in captions["heldout"].references:  # every held-out scene holds one pair never trained on
        objects = parse_caption(refs[0]).objects
        assert sum((colour, shape) in HELD_OUT_PAIRS for _, colour, shape in objects) == 1


def test_evaluate_splits_on_a_tiny_captioner(captioner, tokenizer):
    results = evaluate_splits(captioner, tokenizer, image_size=32, n_images=N, max_new_tokens=12)
    assert set(results) == {"test", "heldout"}
    for scores in results.values():
        assert {"exact match", "parsed", *CAPTION_METRICS} <= set(scores)
        assert 0.0 <= scores["exact match"] <= 1.0


def test_sampling_is_seeded_and_beams_run(captioner, tokenizer):
    def said(**kwargs):
        return caption_splits(captioner, tokenizer, image_size=32, n_images=3, splits=["test"], max_new_tokens=8,
                              **kwargs)["test"].predictions  # fmt: skip

    assert said(strategy="sample") == said(strategy="sample")
    assert said(strategy="sample") != said(strategy="sample", seed=EVAL_SEED + 1)
    assert len(said(strategy="beam", num_beams=2)) == 3
    with pytest.raises(ValueError, match="unknown decoding strategy"):
        decoding_options("nucleus")


def coloured(path, colour: tuple[int, int, int]) -> int:
    """How many pixels of a PNG are within a small distance of an RGB colour."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("RGB"), dtype=int)  # (H, W, 3)
    return int((np.abs(pixels - colour).sum(-1) < 60).sum())


def test_grid_is_a_png_with_right_captions_green_and_wrong_ones_red(tmp_path):
    grey = np.full((2, 32, 32, 3), 200, np.uint8)  # no red or green in the images themselves
    truths = [["a small red circle.", "a small red circle."], "a large blue square."]
    right = caption_grid(grey, ["a small red circle.", " a large blue square. "], truths, tmp_path / "right.png")
    wrong = caption_grid(grey, ["a small blue circle.", ""], truths, tmp_path / "wrong.png", titles=["x", "y"])
    green, red = (0x1A, 0x7F, 0x37), (0xCF, 0x22, 0x2E)
    assert coloured(right, green) > 20 and coloured(right, red) == 0
    assert coloured(wrong, red) > 20 and coloured(wrong, green) == 0
    with pytest.raises(ValueError, match="one prediction"):
        caption_grid(grey, ["only one"], truths, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="uint8"):
        caption_grid(grey.astype(float), ["a", "b"], truths, tmp_path / "bad.png")


def test_report_folder_holds_both_splits(tmp_path):
    captions = caption_splits(Oracle(), None, image_size=32, n_images=N)
    results = {split: c.scores() for split, c in captions.items()}
    results["test"]["relation"] = float("nan")  # a metric with nothing to count
    history = {"loss": [3.0, 2.0, 1.5], "lr": [0.1] * 3, "grad_norm": [1.0] * 3}
    paths = write_report(tmp_path / "report", results, history, captions, info={"timings": "training 1 s"},
                         config={"steps": 3})  # fmt: skip
    text = paths["metrics.md"].read_text()
    assert "| metric | test | heldout |" in text and "| exact match | 100.0 | 100.0 |" in text
    assert "- **timings**: training 1 s" in text and "![samples](samples.png)" in text
    record = json.loads(paths["metrics.json"].read_text())  # strict JSON: NaN is written as null
    assert record["results"]["test"]["relation"] is None and record["config"] == {"steps": 3}
    assert "## How the wrong captions are wrong" in text and "| colours and shapes paired wrongly | 0.0 | 0.0 |" in text
    assert record["error kinds"] == {split: c.kinds() for split, c in captions.items()}
    assert record["error kinds"]["heldout"]["exact match"] == 1.0  # the oracle is always right
    for name in ("samples.png", "loss.png"):
        with Image.open(paths[name]) as image:
            assert image.format == "PNG"
