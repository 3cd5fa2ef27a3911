"""Frozen's few-shot experiments on the shapes world: fast concept binding and VQA, beside their baselines.

The course's trained captioner (`minivlm.train.course_captioner`, read from the cache or trained
once) is prompted with interleaved images and text (`minivlm.fewshot`); every cell is measured on
new episodes (`minivlm.data.episodes`) whose images no training step saw. Each row is one task
setting, each pair of columns one way of showing the episode's scenes, scored two ways:

- open: greedy decoding; right if it says exactly the answer, then stops ("dax." or "dax" + end);
- rank: the answer is the most likely of the task's candidates (the episode's names; the colours or shapes).

Columns: "images" (each image as its visual prefix: Frozen's way), "words" (each image as the captioner's
word view, `Captioner.words`: vectors trained to be its caption's token embeddings; "-" for a captioner
without one), "blind" (the images removed: what the text alone allows), "text" (each image replaced by its
true caption: the LM binding words, the ceiling of a perfect visual prefix), and chance (1 / number of
candidates). Frozen's own numbers on
2-way Open-Ended miniImageNet were 53.4 / 57.9 / 58.9% with 1 / 3 / 5 shots and task induction
(chance 50%), and on VQAv2 29.5 / 35.7 / 38.2% with 0 / 1 / 4 shots (Tsimpoukelli et al., 2021).

A cell whose prompts do not fit the LM's context (P vectors per image) prints "too long".

Run from the repository root:
    .venv/bin/python bench/fewshot.py                    # the cpu captioner, 200 episodes a cell (a few minutes)
    .venv/bin/python bench/fewshot.py --quick            # the tiny captioner, 4 episodes a cell: proves it runs
    .venv/bin/python bench/fewshot.py --preset cpu-words # the captioner whose prefix is written in words
    .venv/bin/python bench/fewshot.py --json out.json    # also write every number as JSON
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

COLUMNS = ("images", "words", "blind", "text")  # "words": the episodes' "images" mode, shown through the word view


def binding_rows() -> list[dict]:
    """Every fast-binding setting measured: 2-way and 5-way by colour, as the LM's corpus binds names, and
    2-way by shape, which it never does, x shots x task induction; then, for the headline setting (2-way,
    1 shot, induction): repeats, held-out colour–shape pairs, and fresh made-up names instead of
    Frozen-style ones (dax, blicket, ...), which the corpus also uses."""
    rows = []
    for ways, attribute in ((2, "colour"), (5, "colour"), (2, "shape")):
        for shots in (0, 1, 3, 5):
            for induction in (True, False) if shots else (True,):
                rows.append(dict(ways=ways, attribute=attribute, shots=shots, task_induction=induction, repeats=1,
                                 split="test", made_up_names=False))  # fmt: skip
    for attribute in ("colour", "shape"):
        headline = dict(ways=2, attribute=attribute, shots=1, task_induction=True, repeats=1, split="test",
                        made_up_names=False)  # fmt: skip
        rows += [{**headline, "repeats": 2}, {**headline, "repeats": 4}, {**headline, "split": "heldout"},
                 {**headline, "made_up_names": True}]  # fmt: skip
    return rows


def vqa_rows() -> list[dict]:
    """Visual question answering: colour and shape questions with 0, 1 and 4 solved examples (Frozen's shots)."""
    return [dict(kind=kind, shots=shots, split="test") for kind in ("colour", "shape") for shots in (0, 1, 4)]


def binding_label(row: dict) -> str:
    """'2-way shape, 1 shot, induction, x2, held-out pairs'."""
    label = f"{row['ways']}-way {row['attribute']}, {row['shots']} shot" + "s" * (row["shots"] != 1)
    label += ", induction" if row["task_induction"] else ""
    label += f", x{row['repeats']}" if row["repeats"] > 1 else ""
    label += ", held-out pairs" if row["split"] == "heldout" else ""
    return label + (", made-up names" if row["made_up_names"] else "")


def measure(captioner, tokenizer, episodes, image_size: int, normalize: bool) -> dict:
    """Open-ended and ranked accuracy of every mode on these episodes (None where a prompt is too long)."""
    from minivlm import fewshot
    from minivlm.data.episodes import to_prompts

    out = {"chance": 1 / len(episodes[0].candidates)}
    for column in COLUMNS:
        mode, view = ("images", "words") if column == "words" else (column, "prefix")
        if column == "words" and not captioner.word_view:
            out[column] = "none"  # printed as "-"
            continue
        prompts = to_prompts(episodes, mode, image_size=image_size, normalize=normalize)
        candidates = [[f" {c}." for c in e.candidates] for e in episodes]
        try:
            said = fewshot.complete(captioner, tokenizer, prompts, max_new_tokens=6, view=view)
            scores = fewshot.score(captioner, tokenizer, prompts, candidates, view=view)
        except ValueError as error:
            if "context" not in str(error):
                raise
            out[column] = None
            continue
        picked = scores.argmax(-1).tolist()
        out[column] = {
            "open": float(np.mean([fewshot.says(s, e.answer) for s, e in zip(said, episodes)])),
            "rank": float(np.mean([e.candidates[j] == e.answer for j, e in zip(picked, episodes)])),
            "example": said[0],
        }
    return out


def cell(result: dict | str | None, how: str) -> str:
    if result == "none":  # the captioner has no word view
        return "-"
    return "too long" if result is None else f"{100 * result[how]:5.1f}"


def table(title: str, labels: list[str], results: list[dict]) -> str:
    columns = "".join(f"{m + ' ' + h:>13}" for m in COLUMNS for h in ("open", "rank"))
    header = f"{title:<48}" + columns + f"{'chance':>9}"
    lines = [header, "-" * len(header)]
    for label, r in zip(labels, results):
        lines.append(f"{label:<48}" + "".join(f"{cell(r[m], h):>13}" for m in COLUMNS for h in ("open", "rank"))
                     + f"{100 * r['chance']:9.1f}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu", help="the course captioner preset (default: cpu)")
    parser.add_argument("--episodes", type=int, default=200, help="episodes per cell (default: 200)")
    parser.add_argument("--seed", type=int, default=0, help="seeds every cell's episodes")
    parser.add_argument("--quick", action="store_true", help="the tiny captioner, 4 episodes a cell: proves the script runs")
    parser.add_argument("--json", help="also write every number to this file")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's)")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.episodes = "tiny", 4
    if args.threads:
        torch.set_num_threads(args.threads)

    from minivlm.data.episodes import binding_episode, vqa_episode
    from minivlm.train import course_captioner

    captioner, tokenizer, info = course_captioner(args.preset)
    config = info["config"]
    size, normalize = config.captioner.image_size, config.normalize_images
    print(f"captioner '{args.preset}': P = {captioner.prefix_length} prefix vectors per image, a word view of "
          f"{captioner.word_view or 'none'}, LM context "
          f"{captioner.context}; {args.episodes} episodes per cell; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}\n")  # fmt: skip
    start = time.perf_counter()

    binding = []
    for i, row in enumerate(binding_rows()):
        rng = np.random.default_rng([args.seed, 1, i])
        episodes = [binding_episode(rng, row["ways"], row["shots"], attribute=row["attribute"],
                                    task_induction=row["task_induction"], repeats=row["repeats"], split=row["split"],
                                    made_up_names=row["made_up_names"])
                    for _ in range(args.episodes)]  # fmt: skip
        binding.append({**row, **measure(captioner, tokenizer, episodes, size, normalize)})
    labels = [binding_label(r) for r in binding]
    print(table("fast binding (% right)", labels, binding), "\n")

    vqa = []
    for i, row in enumerate(vqa_rows()):
        rng = np.random.default_rng([args.seed, 2, i])
        episodes = [vqa_episode(rng, row["shots"], kind=row["kind"], split=row["split"]) for _ in range(args.episodes)]
        vqa.append({**row, **measure(captioner, tokenizer, episodes, size, normalize)})
    labels = [f"VQA {r['kind']} questions, {r['shots']} shot{'s' * (r['shots'] != 1)}" for r in vqa]
    print(table("visual question answering (% right)", labels, vqa))
    seconds = time.perf_counter() - start
    print(f"\n{seconds:.0f} s for every cell")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "episodes": args.episodes, "seed": args.seed, "seconds": seconds,
                       "prefix_length": captioner.prefix_length, "word_view": captioner.word_view,
                       "context": captioner.context,
                       "binding": binding, "vqa": vqa}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
