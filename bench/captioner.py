"""The captioner, measured: the controls, the ablation over prefix length and mapper, the stem, the depth, the colour,
the mapper of the preset, the budget, the CNN's last stage, the precision, the colour path's pooling.

Eleven tables, each row a captioner trained from scratch (`minivlm.train.train`) against the course LM
(pretrained once, or read from the cache) and scored on new test and held-out images:

- `--table controls`: the course's run (frozen pretrained LM) beside Frozen's two controls, a frozen
  *random* LM (the paper's "from scratch" row: the prefix has nothing to steer) and the LM fine-tuned
  as well (what freezing saves: time per image and memory). Prints training images per second, the
  final loss, the peak memory of the process, and the caption metrics.
- `--table ablation`: prefix length P in (1, 2, 4, 8) x mapper in (linear, mlp, transformer).
- `--table stem`: the CNN without a full-resolution stem, with the preset's, and with a wider one
  (`CNNConfig.stem` channels in STEMS): how much seeing every pixel helps with small shapes.
- `--table depth`: the prefix read by the LM's input only (Frozen, ClipCap), by its first two blocks,
  and by every block (`CaptionerConfig.prefix_depth`, prefix-tuning): how much a small frozen LM gains
  when the image speaks to each block rather than only to the first.
- `--table colour`: one CNN that sees colour and shape together, beside a colour-blind CNN with a colour
  path of its own (`CNNConfig.colour`, the preset): what telling shape apart from colour does for the
  held-out colour–shape pairs.
- `--table mapper`: the preset with one prefix for the whole image, written by ClipCap's MLP or Frozen's
  linear map (P = 4), beside a prefix vector per cell of the CNN's grid (`GridMapper`, LLaVA's, P = 16,
  the preset): what writing each place's colour and shape into one vector does for binding them.
- `--table budget`: the preset's recipe beside the same on 3/7 of its images (76,800 of 179,200, what about 5
  minutes of training covers on 2 slow CPU cores), at the preset's batch and at half of it, with 2.5 times its
  learning rate: what the issue's 5-minute budget buys, and whether more, smaller steps buy more of it.
- `--table cnn`: the preset's CNN beside cheaper last stages (`CNNConfig.widths` and `blocks`: fewer channels or
  one residual block fewer at 4 x 4, where half of the CNN's FLOPs are): what a cheaper, faster step costs in
  captions.
- `--table precision`: the preset in float32 beside the same under bfloat16 autocast (`TrainConfig.precision`):
  what a CPU with bfloat16 instructions (`minivlm.train.native_bf16`) buys in time and costs in captions.
- `--table pool`: the preset, whose grid cells hold the mean of the colour path's features, beside the same with
  their maximum (`CNNConfig.colour_pool`): whether a small object's colour, as strong in its cell as a large one's,
  keeps the held-out pairs from being named as pairs of training (`bench/errors.py`, measurement 4).
- `--table swap`: the preset with its captions' colour words as they are beside the same with 30% of them swapped
  in the inputs for other colours, their labels kept (`TrainConfig.colour_swap`; the cpu preset's since
  2026-12-08): whether a captioner that cannot trust the colour it has said reads the held-out pairs' shapes from
  the image instead of from the colour (`bench/errors.py`).

Each row runs in a fresh process, so its peak resident memory (CPU) or peak allocated memory (CUDA) is
its own. Images per second count training steps only (not the LM's loading or the evaluation).

Run from the repository root:
    .venv/bin/python bench/captioner.py --table controls              # 3 runs of the cpu preset (about 20 minutes)
    .venv/bin/python bench/captioner.py --table ablation --steps 400  # 12 shorter runs
    .venv/bin/python bench/captioner.py --table stem --threads 2      # 3 runs of the cpu preset (about 16 minutes)
    .venv/bin/python bench/captioner.py --table depth --threads 2     # 3 runs of the cpu preset (about 20 minutes)
    .venv/bin/python bench/captioner.py --table colour --threads 2    # 2 runs of the cpu preset (about 32 minutes)
    .venv/bin/python bench/captioner.py --table mapper --threads 2    # 3 runs of the cpu preset (about 48 minutes)
    .venv/bin/python bench/captioner.py --table budget --threads 2    # the preset and 2 shorter runs (about 25 minutes)
    .venv/bin/python bench/captioner.py --table budget --seed 1       # the same from another init and batch order
    .venv/bin/python bench/captioner.py --table cnn --threads 2       # 3 runs of the cpu preset (about 35 minutes)
    .venv/bin/python bench/captioner.py --table precision --threads 2 # 2 runs of the cpu preset (about 30 minutes)
    .venv/bin/python bench/captioner.py --table pool --seed 1         # 2 runs of the cpu preset (about 20 minutes)
    .venv/bin/python bench/captioner.py --table swap --seed 1         # 2 runs of the cpu preset (about 20 minutes)
    .venv/bin/python bench/captioner.py --quick                       # every table on the tiny preset: seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from dataclasses import fields, replace

import torch

TABLES = ("controls", "ablation", "stem", "depth", "colour", "mapper", "budget", "cnn", "precision", "pool", "swap")
CONTROLS = {  # row label: changes to the preset's TrainConfig (lm_init) and CaptionerConfig (train_lm)
    "frozen pretrained LM (the course)": {},
    "frozen random LM (control)": {"lm_init": "random"},
    "fine-tuned LM (control)": {"train_lm": True},
}
PREFIX_LENGTHS = (1, 2, 4, 8)
MAPPERS = ("linear", "mlp", "transformer")
STEMS = (0, 16, 32)  # channels of the CNN's full-resolution stem (0: none); the cpu preset has 16
DEPTHS = (1, 2, "every")  # blocks of the LM that read the prefix; "every": all n_layer of them
COLOUR_PATHS = (0, 16)  # channels of the CNN's colour path (0: none, one CNN sees colour and shape); the preset's 16
PRESET_MAPPERS = {  # row label: the mapper and P (the preset's is the last)
    "one prefix, MLP (ClipCap), P=4": {"mapper": "mlp", "prefix_length": 4},
    "one prefix, linear (Frozen), P=4": {"mapper": "linear", "prefix_length": 4},
    "a vector per cell, grid (LLaVA), P=16": {"mapper": "grid", "prefix_length": 16},
}
BUDGETS = {  # row label: the share of the preset's images (and steps), its batch and learning rate scaled
    "the preset": {},
    "3/7 of the images, the same batch, lr x2.5": {"share": 3 / 7, "lr_scale": 2.5},
    "3/7 of the images, half the batch, lr x2.5": {"share": 3 / 7, "batch_scale": 0.5, "lr_scale": 2.5},
}
BUDGET_KEYS = ("share", "batch_scale", "lr_scale")  # a budget row's changes, applied to the recipe, not the captioner
LAST_STAGES = ((160, 2), (128, 1), (96, 2))  # (channels, residual blocks) of the CNN's last stage; the preset's first
PRECISION_ROWS = {"float32": "fp32", "bfloat16 autocast": "bf16"}  # row label: TrainConfig.precision
POOL_ROWS = {"colour path: each cell's mean": "mean", "colour path: each cell's maximum": "max"}  # CNNConfig.colour_pool
TRAINER_FIELDS = ("lm_init", "seed", "precision", "colour_swap")  # changes that are TrainConfig's, not the captioner's
SWAP_ROWS = {"colour words as they are": 0.0, "30% of colour words swapped": 0.3}  # TrainConfig.colour_swap
SHOWN = ("exact match", "colour", "shape", "size", "relation", "CIDEr")  # metrics in the printed table


def rows(table: str) -> list[tuple[str, dict]]:
    """(label, changes) for every run of a table."""
    if table == "controls":
        return list(CONTROLS.items())
    if table == "stem":
        return [(f"stem of {c} channels" if c else "no stem", {"stem": c}) for c in STEMS]
    if table == "depth":
        labels = {1: "read by the input (Frozen)", 2: "read by 2 blocks", "every": "read by every block"}
        return [(labels[k], {"prefix_depth": k}) for k in DEPTHS]
    if table == "colour":
        labels = {0: "one CNN: colour and shape", 16: "colour-blind CNN + colour path"}
        return [(labels[c], {"colour": c}) for c in COLOUR_PATHS]
    if table == "mapper":
        return list(PRESET_MAPPERS.items())
    if table == "budget":
        return list(BUDGETS.items())
    if table == "cnn":
        return [(f"last stage: {c} channels, {n} block{'s' * (n > 1)}", {"last_stage": [c, n]}) for c, n in LAST_STAGES]
    if table == "precision":
        return [(label, {"precision": p}) for label, p in PRECISION_ROWS.items()]
    if table == "pool":
        return [(label, {"colour_pool": pool}) for label, pool in POOL_ROWS.items()]
    if table == "swap":
        return [(label, {"colour_swap": p}) for label, p in SWAP_ROWS.items()]
    return [(f"P={p}, {m}", {"prefix_length": p, "mapper": m}) for m in MAPPERS for p in PREFIX_LENGTHS]


def cannot_run(table: str, preset: str) -> str | None:
    """Why `table` cannot run on `preset`, or None: swapping colour words needs a token for each colour."""
    if table != "swap":
        return None
    from minivlm.data.captions import word_ids
    from minivlm.data.shapes import COLOURS
    from minivlm.lm import load_frozen_lm
    from minivlm.train import TRAIN_PRESETS

    try:
        word_ids(load_frozen_lm(TRAIN_PRESETS[preset].lm)[1], COLOURS)
    except ValueError as err:
        return str(err)
    return None


def run_one(preset: str, steps: int | None, images: int, changes: dict) -> dict:
    """Train one captioner with `changes` and score it; what the row reports (runs in its own process)."""
    from minivlm.captioner import CaptionerConfig
    from minivlm.cnn import CNN_PRESETS, CNNConfig
    from minivlm.lm import load_frozen_lm
    from minivlm.report import evaluate_splits
    from minivlm.train import TRAIN_PRESETS, train

    config = TRAIN_PRESETS[preset]
    if "last_stage" in changes:  # the CNN's last stage with c channels and n residual blocks; the stages before it kept
        (c, n), base = changes["last_stage"], CNN_PRESETS[config.captioner.cnn_preset]
        changes = {**{k: v for k, v in changes.items() if k != "last_stage"},
                   "widths": (*base.widths[:-1], c), "blocks": (*base.blocks[:-1], n)}  # fmt: skip
    cnn_fields = {f.name for f in fields(CNNConfig)} - {f.name for f in fields(CaptionerConfig)}  # the CNN's own
    cnn_changes = {k: v for k, v in changes.items() if k in cnn_fields}
    if cnn_changes:  # a CNN preset of its own, for this process only: the preset's CNN with another stem, colour
        # path, last stage or colour pooling
        cnn = ", ".join([config.captioner.cnn_preset, *(f"{k} {v}" for k, v in cnn_changes.items())])
        CNN_PRESETS[cnn] = replace(CNN_PRESETS[config.captioner.cnn_preset], **cnn_changes)
        changes = {**{k: v for k, v in changes.items() if k not in cnn_changes}, "cnn_preset": cnn}
    if steps is not None:
        config = replace(config, steps=steps, warmup=min(config.warmup, steps // 10))
    if set(BUDGET_KEYS) & changes.keys():  # a budget row: fewer images, each seen as often
        share, batch_scale = changes.get("share", 1.0), changes.get("batch_scale", 1.0)
        batch = round(config.batch_size * batch_scale)
        config = replace(config, batch_size=batch, steps=round(config.steps * share / batch_scale),
                         train_images=max(batch, round(config.train_images * share)),
                         lr=config.lr * changes.get("lr_scale", 1.0))  # fmt: skip
        changes = {k: v for k, v in changes.items() if k not in BUDGET_KEYS}
    lm, tokenizer = load_frozen_lm(config.lm)  # before the clock: loading is not training
    if changes.get("prefix_depth") == "every":  # the LM's every block
        changes = {**changes, "prefix_depth": len(lm.transformer.h)}
    trainer = {k: v for k, v in changes.items() if k in TRAINER_FIELDS}  # TrainConfig's; the rest the captioner's
    vision = {k: v for k, v in changes.items() if k not in trainer}
    config = replace(config, captioner=replace(config.captioner, **vision), **trainer)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    captioner, history = train(config, lm=lm, tokenizer=tokenizer, progress=False)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    results = evaluate_splits(captioner, tokenizer, image_size=config.captioner.image_size, n_images=images,
                              normalize=config.normalize_images, max_new_tokens=config.max_length)  # fmt: skip
    return {
        "steps": config.steps,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "train_images": config.train_images,
        "lr": config.lr,
        "precision": config.precision,
        "colour_swap": config.colour_swap,
        "train_seconds": round(seconds, 1),
        "images_per_second": round(config.steps * config.batch_size / seconds, 1),
        "trained_parameters": sum(p.numel() for p in captioner.trainable_parameters()),
        "peak_memory_mb": round(peak / 2**20, 1),
        "peak_memory_kind": "CUDA allocated" if cuda else "process resident (CPU)",
        "first_loss": round(history["loss"][0], 3),
        "final_loss": round(sum(history["loss"][-20:]) / len(history["loss"][-20:]), 3),  # mean of the last 20 steps
        "metrics": results,
    }


def run_in_subprocess(preset: str, steps: int | None, images: int, changes: dict, threads: int | None) -> dict:
    """run_one in a fresh Python process (so peak memory is the row's own); its JSON result."""
    spec = json.dumps({"preset": preset, "steps": steps, "images": images, "changes": changes, "threads": threads})
    out = subprocess.run([sys.executable, __file__, "--row", spec], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the run {changes} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(table: str, results: list[dict]) -> None:
    """One line per run: speed, memory, loss, and the test / held-out metrics."""
    width = max(len(r["label"]) for r in results)
    metrics = "  ".join(f"{m:^13}" for m in SHOWN)
    print(f"\n{table}: test / held-out (%; CIDEr x100)")
    print(f"{'run':<{width}}  {'steps':>9}  {'train s':>7}  {'img/s':>6}  {'peak MB':>8}  {'loss':>6}  {metrics}")
    for r in results:
        cells = "  ".join(f"{r['metrics']['test'][m] * 100:>6.1f}/{r['metrics']['heldout'][m] * 100:<6.1f}" for m in SHOWN)
        steps = f"{r['steps']}x{r['batch_size']}"
        print(f"{r['label']:<{width}}  {steps:>9}  {r['train_seconds']:>7.0f}  {r['images_per_second']:>6.0f}  "
              f"{r['peak_memory_mb']:>8.0f}  {r['final_loss']:>6.3f}  {cells}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", choices=TABLES, action="append", help="which table (default: all of them)")
    parser.add_argument("--preset", default="cpu", help="TRAIN_PRESETS entry (default: cpu)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the preset's)")
    parser.add_argument("--seed", type=int, default=None, help="every run's seed: the vision side's init and the "
                        "batch order (default: the preset's)")  # fmt: skip
    parser.add_argument("--images", type=int, default=500, help="evaluation images per split (default: 500)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--quick", action="store_true", help="the tiny preset, few images: a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: one run, in a subprocess
    args = parser.parse_args()
    if args.row:
        spec = json.loads(args.row)
        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        print(json.dumps(run_one(spec["preset"], spec["steps"], spec["images"], spec["changes"])))
        return
    preset, images = ("tiny", 20) if args.quick else (args.preset, args.images)
    tables = args.table or list(TABLES)
    print(f"captioner preset {preset!r}; torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, "
          f"{'cuda' if torch.cuda.is_available() else platform.processor() or platform.machine()}")  # fmt: skip
    everything = {"preset": preset, "steps": args.steps, "images": images, "seed": args.seed}
    for table in tables:
        if (reason := cannot_run(table, preset)) is not None:
            print(f"\n{table}: not run on the {preset!r} preset: {reason}")
            continue
        results = []
        for label, changes in rows(table):
            changes = changes if args.seed is None else {**changes, "seed": args.seed}
            print(f"  {label} ...", flush=True)
            results.append({"label": label, "changes": changes,
                            **run_in_subprocess(preset, args.steps, images, changes, args.threads)})  # fmt: skip
        print_table(table, results)
        everything[table] = results
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=1)


if __name__ == "__main__":
    main()
