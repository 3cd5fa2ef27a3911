"""The course LM, measured: pretraining time, held-out perplexity, and whether it reads its context.

Pretrains the course's small GPT-2 from scratch (`minivlm.lm.pretrain`, not the cache: the time is
the point), then probes it with text alone (`minivlm.probes`):

- pretraining time on this machine (target: at most 5 minutes on 2 CPU cores);
- perplexity on held-out corpus documents (never trained on);
- copy accuracy: "CAPTION." continued by " CAPTION." exactly, on test-split captions, and on
  held-out-split captions (colour–shape pairs no training *image* has; the default corpus does name them);
- list copy: a list of 4-11 distinct words in random order said again (`probes.list_copy_accuracy`):
  copying *tokens*, which only an induction head does, where a caption can be copied partly by its grammar;
- the copies read back attribute by attribute (sentence shape vs content words), and how similar the
  embeddings of interchangeable words are (" red" vs " blue": 1.0 means the LM cannot tell them apart);
- N-way fast binding (Frozen's task, in text): 2-way and 5-way, 1 shot, with and without task
  induction ("answer with dax or wug."), names following the colour as in the corpus; chance is 1 / N;
  2-way with the query's description a word-for-word repeat of an example's, the easiest match there is;
  and 2-way with names following the shape, which the corpus never does; each with the corpus's mix of
  names, with the course's NAMES only (one token each, as in the few-shot lesson) and made-up ones only;
- question answering from a caption in the prompt.

Run from the repository root:
    .venv/bin/python bench/lm.py               # the "cpu" preset: the course's LM (about 5 minutes)
    .venv/bin/python bench/lm.py --quick       # the "tiny" preset, seconds: proves the script runs
    .venv/bin/python bench/lm.py --seed 1      # the same recipe from another init and batch order
    .venv/bin/python bench/lm.py --json out.json

Copying forms abruptly during pretraining (induction heads appear in a phase change, Olsson et al.,
2022), so whether it has formed by the last step can depend on the seed: `--seed` measures how much.
Every probe reads its prompt after <|endoftext|>, as the LM read every pretraining window
(`minivlm.probes`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace

import torch

from minivlm.data import shapes as S
from minivlm.lm import LM_PRESETS, evaluate_perplexity, heldout_texts, pretrain
from minivlm.probes import (
    answer_accuracy, binding_accuracy, copy_accuracy, copy_attribute_scores, list_copy_accuracy, word_similarity,
)  # fmt: skip

TARGET_SECONDS = 300  # pretraining on 2 CPU cores


NAME_KINDS = {"mixed": None, "course": False, "made_up": True}  # `binding_prompt(made_up=...)`


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(LM_PRESETS), help="course LM preset (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="the tiny preset and few probes: a smoke run")
    parser.add_argument("--episodes", type=int, default=200, help="prompts per probe (default: 200)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--seed", type=int, default=None,
                        help="the LM's seed: its init and batch order (default: the preset's)")  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args()
    preset, n = ("tiny", 20) if args.quick else (args.preset, args.episodes)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = LM_PRESETS[preset] if args.seed is None else replace(LM_PRESETS[preset], seed=args.seed)
    print(f"course LM preset {preset!r}, seed {config.seed}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {platform.processor() or platform.machine()}")  # fmt: skip

    start = time.perf_counter()
    model, tokenizer, stats = pretrain(config, progress=False)
    seconds = time.perf_counter() - start  # tokenizer, token stream and training
    results = {
        "preset": preset,
        "seed": config.seed,
        "params": stats["params"],
        "tokens_seen": stats["tokens_seen"],
        "pretrain_seconds": round(seconds, 1),
        "train_loop_seconds": stats["train_seconds"],
        "heldout_perplexity": round(evaluate_perplexity(model, tokenizer, heldout_texts(config), config.n_positions), 3),
        "copy_test": copy_accuracy(model, tokenizer, [S.caption(S.sample_scene("test", 0, i)) for i in range(n)]),
        "copy_heldout": copy_accuracy(model, tokenizer, [S.caption(S.sample_scene("heldout", 0, i)) for i in range(n)]),
        "copy_attributes": copy_attribute_scores(model, tokenizer, [S.caption(S.sample_scene("test", 0, i)) for i in range(n)]),
        "list_copy": list_copy_accuracy(model, tokenizer, episodes=n),
        "word_similarity": word_similarity(model, tokenizer),
        "answer": answer_accuracy(model, tokenizer, [S.sample_scene("test", 0, i) for i in range(n)]),
        "binding": [
            {"ways": ways, "shots": 1, "task_induction": ti, "chance": 1 / ways, **{
                key: binding_accuracy(model, tokenizer, ways=ways, shots=1, task_induction=ti, episodes=n,
                                      made_up=made_up) for key, made_up in NAME_KINDS.items()}}
            for ways in (2, 5) for ti in (True, False)
        ],  # fmt: skip
        "binding_echo": {key: binding_accuracy(model, tokenizer, ways=2, shots=1, task_induction=True, episodes=n,
                                               echo=True, made_up=made_up) for key, made_up in NAME_KINDS.items()},
        "binding_by_shape": [
            {"ways": 2, "shots": 1, "task_induction": ti, "chance": 0.5, **{
                key: binding_accuracy(model, tokenizer, ways=2, shots=1, task_induction=ti, episodes=n,
                                      made_up=made_up, attribute="shape") for key, made_up in NAME_KINDS.items()}}
            for ti in (True, False)
        ],  # fmt: skip
    }
    ok = "within" if seconds <= TARGET_SECONDS else "OVER"
    print(f"\nparameters             {results['params']:>10,}")
    print(f"tokens seen            {results['tokens_seen']:>10,}")
    print(f"pretraining time       {seconds:>10.1f} s   ({ok} the {TARGET_SECONDS} s target)")
    print(f"held-out perplexity    {results['heldout_perplexity']:>10.3f}")
    print(f"copy, test captions    {results['copy_test']:>10.1%}   ({n} captions)")
    print(f"copy, held-out pairs   {results['copy_heldout']:>10.1%}")
    a = results["copy_attributes"]
    print("copy, per attribute    " + ", ".join(f"{k} {a[k]:.0%}" for k in ("count", "relation", "size", "colour", "shape")))
    print(f"list copy (induction)  {results['list_copy']:>10.1%}   (distinct words in random order)")
    w = results["word_similarity"]
    print("word similarity        " + ", ".join(f"{k}s {v:.2f}" for k, v in w.items()) + "   (cosine; 1 = merged)")
    print(f"question answering     {results['answer']:>10.1%}")
    print("\nfast binding, 1 shot, open-ended   names: mixed   course   made-up   chance")
    rows = [(f"{r['ways']}-way, {'with' if r['task_induction'] else 'no'} task induction", r, r["chance"])
            for r in results["binding"]]
    rows.append(("2-way, the query repeated", results["binding_echo"], 0.5))
    rows += [(f"2-way by shape, {'with' if r['task_induction'] else 'no'} induction", r, r["chance"])
             for r in results["binding_by_shape"]]
    for label, r, chance in rows:
        print(f"  {label:<32} " + "".join(f"{r[k]:>9.1%}" for k in NAME_KINDS) + f"{chance:>9.1%}")
    print("  (names follow the colour, as in the corpus, except in the rows by shape. mixed: half the episodes'")
    print("  names are NAMES, half made up, as in the corpus; course: NAMES, one token each, like dax; made-up:")
    print("  fresh words of several tokens. The repeated query's description is an example's, word for word.)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
