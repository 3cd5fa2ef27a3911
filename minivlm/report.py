"""The evaluation report: caption the test and held-out splits, score them, and write what a reader looks at.

What it teaches: how a captioning result is reported so that someone else can check it. Numbers alone
hide what a model says, so a report shows three things side by side (as captioning papers do, e.g.
ClipCap, Mokady et al., 2021): the metrics table (`minivlm.evaluate`), example images with the
caption the model wrote next to the true one, and the training loss curve.

Two splits answer two questions. "test" holds new scenes from the training distribution: has the
model learned to read images it has not seen? "heldout" scenes each hold one colour–shape pair that
never appears in training (`minivlm.data.shapes`): can it *compose* a colour and a shape it knows
only apart? The gap between the two columns is the compositional-generalisation result of the course.

The scenes are drawn with EVAL_SEED. `sample_scene` seeds each scene with (seed, split, index), so
test and held-out scenes never repeat training ones whatever the seed; a seed other than training's
default (TrainConfig.data_seed = 0) makes that plain to a reader too.

A report folder (`write_report`):

    metrics.md    how the run was set up, its timings, then the table: one column per split; then how the
                  wrong captions are wrong (`minivlm.evaluate.error_kinds`)
    metrics.json  the same numbers (and the config) for scripts
    samples.png   images from each split, the generated caption (green: exact match, red: not) and the true one
    loss.png      the training loss per step (`save_loss_curve`)

Axis letters: N images, B batch, H height, W width.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from minivlm.data.captions import ShapesCaptions
from minivlm.data.shapes import ShapesWorld
from minivlm.decoding import STRATEGIES
from minivlm.evaluate import error_kinds, evaluate_captions, metrics_table, true_captions

__all__ = ["EVAL_SEED", "EVAL_SPLITS", "SplitCaptions", "decoding_options", "caption_splits", "evaluate_splits",
           "caption_grid", "save_loss_curve", "kinds_table", "write_report"]  # fmt: skip

EVAL_SEED = 1  # the seed of the evaluation scenes; training draws its scenes with TrainConfig.data_seed (0)
EVAL_SPLITS = ("test", "heldout")  # new scenes of the training distribution; scenes with a held-out pair
GRID_PER_SPLIT = 8  # images of each split in samples.png
GRID_COLUMNS = 4
WRAP = 34  # characters per line of a caption under an image
MAX_LINES = 4  # lines per caption under an image: the longest true caption needs 4
GREEN, RED = "#1a7f37", "#cf222e"  # exact match or not


@dataclass
class SplitCaptions:
    """One split's images, the captions generated for them and their true captions: what is scored and shown."""

    images: np.ndarray  # (N, H, W, 3) uint8, as rendered
    predictions: list[str]  # N generated captions
    references: list[list[str]]  # N lists: every true caption of the image (`true_captions`), its own first

    def scores(self) -> dict[str, float]:
        """Every metric of `evaluate_captions` for this split."""
        return evaluate_captions(self.predictions, self.references)

    def kinds(self) -> dict[str, float]:
        """`error_kinds` of this split: the share of its captions exactly right, and of each way of being wrong."""
        return error_kinds(self.predictions, self.references)


def decoding_options(strategy: str = "greedy", *, num_beams: int = 4, seed: int = 0,
                     device: torch.device | str = "cpu") -> dict:  # fmt: skip
    """`Captioner.generate`'s decoding keyword arguments: beams for beam search, a seeded generator for sampling."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown decoding strategy {strategy!r}; choose one of {sorted(STRATEGIES)}")
    if strategy == "beam":
        return {"strategy": strategy, "num_beams": num_beams}
    if strategy == "sample":  # the same seed, the same captions
        return {"strategy": strategy, "generator": torch.Generator(device).manual_seed(seed)}
    return {"strategy": strategy}


@torch.no_grad()
def caption_splits(captioner, tokenizer, *, image_size: int, n_images: int, splits: Sequence[str] = EVAL_SPLITS,
                   strategy: str = "greedy", num_beams: int = 4, normalize: bool = False, seed: int = EVAL_SEED,
                   batch_size: int = 100, max_new_tokens: int = 48) -> dict[str, SplitCaptions]:  # fmt: skip
    """Caption the first n_images of each split's shapes world (seed `seed`), in batches; {split: SplitCaptions}.

    image_size and normalize must be what the captioner was trained on (its TrainConfig's
    `captioner.image_size` and `normalize_images`); max_new_tokens at least its longest caption.
    """
    if not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be a positive int, got {n_images!r}")
    device = next(captioner.parameters()).device
    decoding = decoding_options(strategy, num_beams=num_beams, seed=seed, device=device)
    out = {}
    for split in splits:
        world = ShapesWorld(split, image_size, seed, n_images)
        data = ShapesCaptions(world, normalize=normalize)  # the images exactly as training fed them
        predictions = []
        for start in range(0, n_images, batch_size):
            images = torch.stack([data[i][0] for i in range(start, min(start + batch_size, n_images))])  # (B, 3, H, W)
            predictions += captioner.generate(images.to(device), tokenizer, max_new_tokens, **decoding)
        references = [true_captions(world.scene(i)) for i in range(n_images)]
        images = rearrange(data.pixels, "n c h w -> n h w c").numpy()  # (N, H, W, 3) uint8
        out[split] = SplitCaptions(images, predictions, references)
    return out


def evaluate_splits(captioner, tokenizer, *, image_size: int, n_images: int, strategy: str = "greedy",
                    **kwargs) -> dict[str, dict[str, float]]:  # fmt: skip
    """{"test": scores, "heldout": scores}: `caption_splits`, then `evaluate_captions` on each split."""
    captions = caption_splits(captioner, tokenizer, image_size=image_size, n_images=n_images, strategy=strategy,
                              **kwargs)  # fmt: skip
    return {split: c.scores() for split, c in captions.items()}


def _wrap(text: str) -> str:
    """A caption as lines of at most WRAP characters, at most MAX_LINES of them (a runaway generation is cut)."""
    return textwrap.fill(text, WRAP, max_lines=MAX_LINES, placeholder=" ...")


def _matches(prediction: str, truths: Sequence[str]) -> str | None:
    """The true caption a prediction equals (surrounding spaces aside, as `attribute_scores` compares), else None."""
    return next((t for t in truths if t.strip() == prediction.strip()), None)


def caption_grid(images: np.ndarray, predictions: Sequence[str], truths: Sequence[str | Sequence[str]],
                 path: str | Path, *, titles: Sequence[str] | None = None,
                 columns: int = GRID_COLUMNS) -> Path:  # fmt: skip
    """A PNG grid of images, each with its generated caption (green if exactly right, red if not) and the true one.

    images: (N, H, W, 3) uint8. truths: one caption per image, or a list of every true caption (a
    prediction matching any of them is right; the first is shown otherwise). titles: a label per image.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # a Figure without pyplot: no window, no global backend switch

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
    n = len(images)
    if not n or len(predictions) != n or len(truths) != n or (titles is not None and len(titles) != n):
        raise ValueError(f"need at least one image, and one prediction, truth (and title) per image: got {n} images, "
                         f"{len(predictions)} predictions, {len(truths)} truths")  # fmt: skip
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(2.6 * columns, 4.0 * rows))
    FigureCanvasAgg(fig)
    for i, (image, said, true) in enumerate(zip(images, predictions, truths)):
        true = [true] if isinstance(true, str) else list(true)
        match = _matches(said, true)
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(image, interpolation="nearest")  # a 32-pixel image, scaled up without blurring
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
        said_text = ax.text(0.0, -0.03, _wrap("said: " + (said.strip() or "(nothing)")), transform=ax.transAxes,
                            va="top", fontsize=7, color=GREEN if match else RED)  # fmt: skip
        ax.annotate(_wrap("true: " + (match or true[0])), xy=(0, 0), xycoords=said_text, xytext=(0, -3),
                    textcoords="offset points", va="top", fontsize=7)  # just below the generated caption
    fig.subplots_adjust(wspace=0.15, hspace=0.75)
    path = Path(path)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight", pad_inches=0.1)  # "tight": the last row's text too
    return path


def save_loss_curve(history: dict, path: str | Path) -> Path:
    """Plot the training loss against the step, raw and as a moving average, to a PNG file (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # a Figure without pyplot: no window, no global backend switch

    loss = np.asarray(history["loss"], dtype=float)  # (steps,)
    if loss.size == 0:
        raise ValueError("the history holds no losses to plot")
    steps = np.arange(1, loss.size + 1)
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)  # the Agg renderer draws to memory, then to the PNG
    ax = fig.add_subplot()
    ax.plot(steps, loss, lw=0.8, alpha=0.4, label="loss per step")
    window = max(1, loss.size // 20)
    if window > 1:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")  # mean of each `window` steps
        ax.plot(steps[window - 1 :], smooth, lw=2, label=f"mean of {window} steps")
    ax.set(xlabel="step", ylabel="caption loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=120)
    return path


def _json_safe(value):
    """NaN (a metric with nothing to count) as null, so metrics.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def kinds_table(kinds: dict[str, dict[str, float]]) -> str:
    """{split: `SplitCaptions.kinds()`} as a markdown table and the line that reads it: for metrics.md and the CLI."""
    return (f"{metrics_table(kinds)}\n\nEach caption in the first kind that fits (`minivlm.evaluate.error_kinds`), "
            f"in % of the split's captions. \"Paired wrongly\": every colour and every shape right, not on the same "
            f"objects.")


def write_report(out_dir: str | Path, results: dict[str, dict[str, float]], history: dict,
                 examples: dict[str, SplitCaptions], *, info: dict[str, str], config: dict | None = None,
                 title: str = "minivlm: captioning the shapes world") -> dict[str, Path]:  # fmt: skip
    """Write metrics.md, metrics.json, samples.png and loss.png into out_dir; return their paths by name.

    results: {split: scores}; history: train()'s; examples: {split: SplitCaptions} of the scored images,
    whose kinds of error go into metrics.md and metrics.json and whose first GRID_PER_SPLIT images into
    samples.png; info: lines for the header ("what": "value"), e.g. the set-up and timings; config: the
    TrainConfig as a dict, kept in metrics.json.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("metrics.md", "metrics.json", "samples.png", "loss.png")}
    header = "\n".join(f"- **{key}**: {value}" for key, value in info.items())
    notes = ("Metrics in %. `test`: new scenes of the training distribution. `heldout`: every scene holds one "
             "colour–shape pair never seen in training. Exact match counts a caption right when it equals any "
             "true caption of its image (`true_captions`).")  # fmt: skip
    kinds = {split: c.kinds() for split, c in examples.items()}
    paths["metrics.md"].write_text(f"# {title}\n\n{header}\n\n{metrics_table(results)}\n\n{notes}\n\n"
                                   f"## How the wrong captions are wrong\n\n{kinds_table(kinds)}\n\n"
                                   f"![samples](samples.png)\n\n![training loss](loss.png)\n")  # fmt: skip
    record = {"info": info, "results": _json_safe(results), "error kinds": kinds, "config": config}
    paths["metrics.json"].write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    shown = {split: range(min(GRID_PER_SPLIT, len(c.predictions))) for split, c in examples.items()}
    caption_grid(np.concatenate([examples[s].images[list(idx)] for s, idx in shown.items()]),
                 [examples[s].predictions[i] for s, idx in shown.items() for i in idx],
                 [examples[s].references[i] for s, idx in shown.items() for i in idx], paths["samples.png"],
                 titles=[f"{s} {i}" for s, idx in shown.items() for i in idx])  # fmt: skip
    save_loss_curve(history, paths["loss.png"])
    return paths
