"""The minivlm command line: `python -m minivlm <command> --help`.

verify and pretrain-lm check the language side; train, evaluate and caption are the captioner's life
cycle, one checkpoint folder passed from each to the next; demo runs all of it end to end and writes
a report; check runs a lesson exercise's self-check from the shell. A mistake the user can fix (a bad
value, a missing file, no network) ends in one line on stderr, `minivlm: error: ...`, and exit code 2,
as argparse ends a bad argument: never a traceback.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

DEMO_OUT = "reports/demo"
# images per evaluation split: seconds for tests, steady numbers for the course
DEMO_IMAGES = {"tiny": 32, "cpu": 1000, "cpu-words": 1000, "gpu": 1000, "gpu-224": 1000}


def _int_at_least(text: str, low: int, wanted: str) -> int:
    """text as an int of at least `low`, or argparse's one-line error saying it `wanted` one."""
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an int of at least 1, or argparse's one-line error."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An argparse type: an int of at least 0, or argparse's one-line error."""
    return _int_at_least(text, 0, "an integer of at least 0")


def _float_in(text: str, high: float, wanted: str) -> float:
    """float(text) if it is in [0, high] (NaN is not), else argparse's one-line error saying what was wanted."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= high:
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite float of at least 0, or argparse's one-line error."""
    return _float_in(text, sys.float_info.max, "a number of at least 0")


def probability(text: str) -> float:
    """An argparse type: a number in [0, 1], or argparse's one-line error."""
    return _float_in(text, 1.0, "a probability in [0, 1]")


def build_parser() -> argparse.ArgumentParser:
    from minivlm.decoding import STRATEGIES
    from minivlm.gpt2 import PRESETS
    from minivlm.lm import LM_PRESETS
    from minivlm.prefix import MAPPERS
    from minivlm.train import LM_INITS, TRAIN_PRESETS

    parser = argparse.ArgumentParser(
        prog="python -m minivlm", description="minivlm: a Frozen-style vision-language model, built from scratch."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    verify = commands.add_parser(
        "verify", help="check that attention and GPT-2 from scratch equal the reference on this machine",
        description="Build GPT-2's architecture with random weights in transformers (no download), load them into "
        "our GPT-2, and check that attention, logits and greedy decoding agree; time decoding with and without "
        "the KV cache.",
    )  # fmt: skip
    verify.add_argument("--preset", default="gpt2", choices=list(PRESETS), help="GPT-2 size to check (default: gpt2)")
    verify.add_argument("--new-tokens", type=int, default=24, help="tokens to decode when timing the KV cache")

    pretrain = commands.add_parser(
        "pretrain-lm",
        help="pretrain the course's small GPT-2 on text (or load it from the cache) and probe it",
        description="Pretrain the course's small GPT-2 on the text corpus, cache it on disk, and print how well "
        "it copies captions and binds names in context. Loads from the cache when it is already there.",
    )
    pretrain.add_argument("--preset", default="cpu", choices=sorted(LM_PRESETS), help="LM preset (default: cpu)")
    pretrain.add_argument("--retrain", action="store_true", help="train again even if the cache has the model")

    recipe = argparse.ArgumentParser(add_help=False)  # the options of train and demo
    recipe.add_argument("--preset", default="cpu", choices=sorted(TRAIN_PRESETS),
                        help="training preset: 'cpu' the course's run, 'cpu-words' it with a prefix written in "
                        "words, 'tiny' a smoke run of seconds, 'gpu' and "
                        "'gpu-224' GPT-2 124M from the hub on GPUs, 64 or 224-pixel images (default: cpu)")  # fmt: skip
    recipe.add_argument("--steps", type=positive_int, help="optimiser steps (default: the preset's); a warm-up "
                        "longer than a tenth of them is cut to that")  # fmt: skip

    train = commands.add_parser(
        "train", parents=[recipe], help="train a captioner's vision side against the frozen LM, with checkpoints",
        description="Train the captioner's vision side (CNN and prefix mapper) against a frozen LM on the shapes "
        "world, saving a checkpoint folder that `evaluate` and `caption` read. Ctrl-C keeps the last checkpoint; "
        "the same command with --resume continues it exactly. On several GPUs, `torchrun --nproc_per_node W -m "
        "minivlm train ...` trains with W processes, each on its share of every batch (the preset's batch size "
        "is the batch of all of them together); rank 0 prints and writes the checkpoint.",
    )  # fmt: skip
    train.add_argument("--mapper", choices=sorted(MAPPERS), help="prefix mapper (default: the preset's)")
    train.add_argument("--prefix-length", type=positive_int, metavar="P", help="visual prefix tokens P "
                       "(default: the preset's)")  # fmt: skip
    train.add_argument("--prefix-depth", type=positive_int, metavar="K", help="blocks of the LM that read the "
                       "prefix: 1 its input only (Frozen), up to the LM's n_layer (default: the preset's)")  # fmt: skip
    train.add_argument("--lm-init", choices=LM_INITS, help="'random': the control with an untrained, frozen LM "
                       "(default: pretrained)")  # fmt: skip
    train.add_argument("--train-lm", action="store_true", help="the control that fine-tunes the LM too")
    train.add_argument("--word-alignment", type=non_negative_float, metavar="W", help="weight of the loss that "
                       "writes each prefix vector nearest a word of the caption (default: the preset's)")  # fmt: skip
    train.add_argument("--word-view", type=non_negative_int, metavar="W", help="vectors of the word view, a head "
                       "that writes each image as the token embeddings of its caption's last W tokens, for few-shot "
                       "prompts; 0: none (default: the preset's)")  # fmt: skip
    train.add_argument("--lm", metavar="SPEC", help="the LM: 'course[:preset]', a hub name such as 'gpt2', or a "
                       "save_pretrained directory (default: the preset's)")  # fmt: skip
    train.add_argument("--seed", type=non_negative_int, help="the vision side's init and the batch order (default: "
                       "the preset's, 0); the held-out split's exact match moves with it (README)")  # fmt: skip
    train.add_argument("--colour-swap", type=probability, metavar="P", help="the chance that each colour word of a "
                       "caption's input is swapped for another colour, its label kept, so that the shape after it "
                       "must come from the image (default: the preset's: 0.3 for cpu and cpu-words, else 0; "
                       "README)")  # fmt: skip
    train.add_argument("--out", default="runs/captioner", metavar="DIR",
                       help="checkpoint folder (default: runs/captioner)")
    train.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    train.add_argument("--compile", action="store_true", default=None, help="torch.compile the captioner: about "
                       "a minute of compiling, then faster steps on a GPU (default: the preset's)")  # fmt: skip

    decoding = argparse.ArgumentParser(add_help=False)  # the options of evaluate and caption
    decoding.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint folder written by train")
    decoding.add_argument("--strategy", default="greedy", choices=list(STRATEGIES), help="decoding (default: greedy)")
    decoding.add_argument("--beams", type=positive_int, default=4, metavar="K", help="beams of --strategy beam "
                          "(default: 4)")  # fmt: skip

    evaluate = commands.add_parser(
        "evaluate", parents=[decoding], help="score a trained captioner on the test and held-out splits",
        description="Caption shapes-world images of the test split and of the held-out split (scenes with a "
        "colour-shape pair never trained on), and print exact match, per-attribute accuracy, BLEU, ROUGE-L and "
        "CIDEr as a markdown table.",
    )  # fmt: skip
    evaluate.add_argument("--images", type=positive_int, default=500, metavar="N",
                          help="images per split (default: 500)")

    caption = commands.add_parser(
        "caption", parents=[decoding], help="caption image files with a trained captioner",
        description="Caption image files (any format and colour mode Pillow reads): each is resized and "
        "centre-cropped to the captioner's image size, and printed as 'path: caption'.",
    )  # fmt: skip
    caption.add_argument("images", nargs="+", metavar="IMAGE", help="image files")

    demo = commands.add_parser(
        "demo", parents=[recipe], help="the main job: pretrain the LM, train the captioner, evaluate, write a report",
        description="End to end: pretrain the course LM (or load it from the cache), train the captioner against "
        "it, caption the test and held-out splits, print the metrics, and write a report folder: metrics.md, "
        "metrics.json, samples.png, loss.png, and the checkpoint (replaced if an earlier run left one).",
    )  # fmt: skip
    demo.add_argument("--images", type=positive_int, metavar="N", help="images per evaluation split "
                      f"(default: {', '.join(f'{n} with {p}' for p, n in DEMO_IMAGES.items())})")  # fmt: skip
    demo.add_argument("--out", default=DEMO_OUT, metavar="DIR", help=f"report folder (default: {DEMO_OUT})")

    check = commands.add_parser(
        "check", help="run an exercise's self-check from the shell: python -m minivlm check 1.1",
        description="Run the code cells of an exercise's lesson notebook (exercises/NN_*.ipynb, the one you edit) "
        "in order, up to and including the cell that calls check(\"N.M\", ...), and say whether the exercise "
        "passes, with a hint if it does not. Exit code 0: passed; 1: failed, not done, or an earlier cell broke.",
    )  # fmt: skip
    check.add_argument("exercise", metavar="N.M", help="the exercise, e.g. 1.1 (lesson 1, exercise 1)")
    where = check.add_mutually_exclusive_group()
    where.add_argument("--solutions", action="store_true", help="run the filled-in solutions/ notebook instead")
    where.add_argument("--notebook", metavar="PATH", help="run this notebook instead")
    return parser


def main(argv: list[str] | None = None) -> int:
    from minivlm.hub import OfflineError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "verify" and args.new_tokens < 1:
        parser.error("--new-tokens must be at least 1")
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, OfflineError) as err:
        print(f"minivlm: error: {err}", file=sys.stderr)  # what to fix, in one line: no traceback
        return 2


def run_verify(args: argparse.Namespace) -> int:
    """Smoke-check attention and GPT-2 against the reference."""
    from minivlm.verify import verify

    return 0 if verify(args.preset, args.new_tokens) else 1


def run_pretrain_lm(args: argparse.Namespace) -> int:
    """Pretrain (or load) the course LM; print where it lives and what the text probes say."""
    from minivlm.data.shapes import caption, sample_scene
    from minivlm.lm import course_lm
    from minivlm.probes import (
        binding_accuracy, copy_accuracy, copy_attribute_scores, list_copy_accuracy, word_similarity,
    )  # fmt: skip

    model, tokenizer, info = course_lm(args.preset, retrain=args.retrain)
    stats = info["stats"]
    print(f"course LM '{args.preset}': {stats['params']:,} parameters, trained {stats['train_seconds']:.0f} s "
          f"to loss {stats['final_loss']:.3f}; cached in {info['path']}")  # fmt: skip
    captions = [caption(sample_scene("test", 0, i)) for i in range(100)]
    copy = copy_accuracy(model, tokenizer, captions)
    lists = list_copy_accuracy(model, tokenizer, episodes=100)
    bind = binding_accuracy(model, tokenizer, ways=2, episodes=100)
    print(f"text probes: copy a caption {copy:.0%}, a list of words {lists:.0%}, 2-way name binding {bind:.0%} "
          "(chance 50%)")
    parts = copy_attribute_scores(model, tokenizer, captions)
    print("copies, per attribute: " + ", ".join(f"{k} {parts[k]:.0%}" for k in ("count", "relation", "size", "colour", "shape")))
    similar = word_similarity(model, tokenizer)
    print("embedding cosine within word groups (1 = cannot tell them apart): "
          + ", ".join(f"{k}s {v:.2f}" for k, v in similar.items()))  # fmt: skip
    return 0


def train_config(preset: str, steps: int | None = None, *, lm: str | None = None, lm_init: str | None = None,
                 compile: bool | None = None, word_alignment: float | None = None, seed: int | None = None,
                 colour_swap: float | None = None, **captioner_changes):  # fmt: skip
    """A TRAIN_PRESETS config with the options given on the command line (None: the preset's) changed."""
    from minivlm.train import TRAIN_PRESETS

    config = TRAIN_PRESETS[preset]
    given = (("lm", lm), ("lm_init", lm_init), ("compile", compile), ("word_alignment", word_alignment),
             ("seed", seed), ("colour_swap", colour_swap))
    changes = {k: v for k, v in given if v is not None}
    if steps is not None:
        changes |= {"steps": steps, "warmup": min(config.warmup, steps // 10)}
    captioner = replace(config.captioner, **{k: v for k, v in captioner_changes.items() if v is not None})
    return replace(config, captioner=captioner, **changes)


def run_train(args: argparse.Namespace) -> int:
    """Train a captioner into a checkpoint folder; plot its loss there. Under torchrun, as one of W ranks."""
    from minivlm import distributed
    from minivlm.report import save_loss_curve
    from minivlm.train import train

    config = train_config(args.preset, args.steps, lm=args.lm, lm_init=args.lm_init, compile=args.compile,
                          word_alignment=args.word_alignment, seed=args.seed, colour_swap=args.colour_swap,
                          mapper=args.mapper, prefix_length=args.prefix_length, prefix_depth=args.prefix_depth,
                          word_view=args.word_view, train_lm=args.train_lm or None)  # fmt: skip
    out = Path(args.out)
    with distributed.process_group():  # under torchrun: train() finds the group up; rank 0 reports below
        try:
            _, history = train(config, out_dir=out, resume=args.resume)
        except FileExistsError:
            raise FileExistsError(f"{out} already holds a checkpoint: add --resume to continue it, or choose "
                                  f"another --out") from None  # fmt: skip
        except KeyboardInterrupt:
            if distributed.is_main():
                print(f"minivlm: interrupted; the last checkpoint in {out} is kept: run the same command with "
                      f"--resume to continue it", file=sys.stderr)  # fmt: skip
            return 130
        if not distributed.is_main():
            return 0
        curve = save_loss_curve(history, out / "loss.png")
        print(f"trained {len(history['loss'])} steps to loss {history['loss'][-1]:.3f}; checkpoint in {out}, "
              f"loss curve {curve}")  # fmt: skip
    return 0


def load_checkpoint(directory: str):
    """(captioner, tokenizer, TrainConfig) of a checkpoint folder, the frozen LM rebuilt from its spec once."""
    from minivlm.lm import load_frozen_lm
    from minivlm.train import load_captioner, read_config

    config = read_config(directory)
    lm, tokenizer = load_frozen_lm(config.lm)
    return load_captioner(directory, lm=lm), tokenizer, config


def run_evaluate(args: argparse.Namespace) -> int:
    """Print a checkpoint's metrics on the test and held-out splits, then how its wrong captions are wrong."""
    from minivlm.evaluate import metrics_table
    from minivlm.report import caption_splits, kinds_table

    captioner, tokenizer, config = load_checkpoint(args.checkpoint)
    splits = caption_splits(captioner, tokenizer, image_size=config.captioner.image_size, n_images=args.images,
                            strategy=args.strategy, num_beams=args.beams, normalize=config.normalize_images,
                            max_new_tokens=config.max_length)  # fmt: skip
    print(f"{args.checkpoint}: {args.images} images per split, {args.strategy} decoding\n")
    print(metrics_table({split: c.scores() for split, c in splits.items()}))
    print("\nHow the wrong captions are wrong:\n\n" + kinds_table({split: c.kinds() for split, c in splits.items()}))
    return 0


def run_caption(args: argparse.Namespace) -> int:
    """Print 'path: caption' for each image file; every file is read before the model is loaded."""
    import torch

    from minivlm.data.folders import image_transform, load_rgb
    from minivlm.report import decoding_options
    from minivlm.train import read_config

    pictures = [load_rgb(path) for path in args.images]  # a missing or unreadable file fails here, at once
    config = read_config(args.checkpoint)
    transform = image_transform(config.captioner.image_size, normalize=config.normalize_images)
    images = torch.stack([transform(picture) for picture in pictures])  # (N, 3, S, S)
    captioner, tokenizer, _ = load_checkpoint(args.checkpoint)
    texts = captioner.generate(images, tokenizer, config.max_length,
                               **decoding_options(args.strategy, num_beams=args.beams))  # fmt: skip
    for path, text in zip(args.images, texts):
        print(f"{path}: {text.strip()}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """The main job: the frozen LM, a trained captioner, both splits scored, and the report folder."""
    import torch

    from minivlm.evaluate import metrics_table
    from minivlm.lm import load_frozen_lm
    from minivlm.report import EVAL_SEED, caption_splits, kinds_table, write_report
    from minivlm.train import keep_in_cache, train

    start = time.perf_counter()
    config = train_config(args.preset, args.steps)
    n_images = args.images or DEMO_IMAGES[args.preset]
    out = Path(args.out)
    print(f"[1/3] the frozen language model '{config.lm}' (pretrained on first use, then read from the cache)")
    lm, tokenizer = load_frozen_lm(config.lm)
    lm_seconds = time.perf_counter() - start
    print(f"[2/3] training the captioner: {config.steps} steps of {config.batch_size} images")
    checkpoint = out / "checkpoint"
    if checkpoint.is_dir():
        shutil.rmtree(checkpoint)  # the demo always trains afresh, so its timings are real
    tick = time.perf_counter()
    captioner, history = train(config, out_dir=checkpoint)  # the LM from its spec, so the checkpoint reloads alone
    train_seconds = time.perf_counter() - tick
    kept = keep_in_cache(args.preset, checkpoint)  # the lessons' course_captioner(preset) need not train it again
    if kept:
        print(f"the captioner is also cached in {kept}, for the lessons")
    print(f"[3/3] captioning {n_images} test and {n_images} held-out images")
    tick = time.perf_counter()
    captions = caption_splits(captioner, tokenizer, image_size=config.captioner.image_size, n_images=n_images,
                              normalize=config.normalize_images, max_new_tokens=config.max_length)  # fmt: skip
    results = {split: c.scores() for split, c in captions.items()}
    eval_seconds = time.perf_counter() - tick
    total = time.perf_counter() - start
    c = config.captioner
    info = {
        "command": f"python -m minivlm demo --preset {args.preset}" + (f" --steps {args.steps}" if args.steps else "")
        + (f" --images {args.images}" if args.images else ""),
        "language model": f"{config.lm}, {sum(p.numel() for p in lm.parameters()):,} parameters, frozen",
        "captioner": f"{c.encoder} ({c.cnn_preset}) encoder, {c.mapper} mapper, P = {c.prefix_length}"
        + (f" read by {c.prefix_depth} blocks" if c.prefix_depth > 1 else "") + ", "
        f"{c.image_size}-pixel images; {sum(p.numel() for p in captioner.trainable_parameters()):,} trained parameters",
        "training": f"{config.steps} steps of {config.batch_size} from {config.train_images:,} images, peak lr "
        f"{config.lr:g}; loss {history['loss'][0]:.3f} at step 1, {history['loss'][-1]:.3f} at the last",
        "evaluation": f"{n_images} images per split (ShapesWorld seed {EVAL_SEED}), greedy decoding",
        "timings": f"LM {lm_seconds:.0f} s, training {train_seconds:.0f} s "
        f"({train_seconds / config.steps:.2f} s a step), evaluation {eval_seconds:.0f} s; wall time {total:.0f} s",
        "machine": f"{'cuda' if torch.cuda.is_available() else 'cpu'}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}",
    }  # fmt: skip
    write_report(out, results, history, captions, info=info, config=config.to_dict())
    print("\n" + metrics_table(results) + "\n")
    kinds = {split: c.kinds() for split, c in captions.items()}
    print(f"How the wrong captions are wrong:\n\n{kinds_table(kinds)}\n")
    print(f"report: {out}/metrics.md, with samples.png, loss.png and metrics.json; checkpoint: {checkpoint}")
    print(f"wall time {total:.0f} s")
    return 0


def run_check(args: argparse.Namespace) -> int:
    """Run one exercise's self-check in its notebook; print passed, the hint, or what broke first."""
    from minivlm.exercises.run import run_exercise

    outcome = run_exercise(args.exercise, solutions=args.solutions, notebook=args.notebook)
    print(outcome.message)
    return 0 if outcome.passed else 1


COMMANDS = {"verify": run_verify, "pretrain-lm": run_pretrain_lm, "train": run_train, "evaluate": run_evaluate,
            "caption": run_caption, "demo": run_demo, "check": run_check}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
