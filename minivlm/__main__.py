"""The minivlm command line: `python -m minivlm <command> --help`."""

from __future__ import annotations

import argparse
import sys

DEMO_NOTE = (
    "The end-to-end captioning demo is not built yet; until it is, `demo` runs `verify`, "
    "a smoke run of what exists: attention and GPT-2 from scratch against the reference."
)


def build_parser() -> argparse.ArgumentParser:
    from minivlm.gpt2 import PRESETS

    parser = argparse.ArgumentParser(
        prog="python -m minivlm", description="minivlm: a Frozen-style vision-language model, built from scratch."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    verify = commands.add_parser(
        "verify", help="check that attention and GPT-2 from scratch equal the reference on this machine"
    )
    verify.add_argument("--preset", default="gpt2", choices=list(PRESETS), help="GPT-2 size to check (default: gpt2)")
    verify.add_argument("--new-tokens", type=int, default=24, help="tokens to decode when timing the KV cache")

    from minivlm.lm import LM_PRESETS

    pretrain = commands.add_parser(
        "pretrain-lm",
        help="pretrain the course's small GPT-2 on text (or load it from the cache) and probe it",
        description="Pretrain the course's small GPT-2 on the text corpus, cache it on disk, and print how well "
        "it copies captions and binds names in context. Loads from the cache when it is already there.",
    )
    pretrain.add_argument("--preset", default="cpu", choices=sorted(LM_PRESETS), help="LM preset (default: cpu)")
    pretrain.add_argument("--retrain", action="store_true", help="train again even if the cache has the model")

    commands.add_parser("demo", help="the main job: run the end-to-end demo", description=DEMO_NOTE)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from minivlm.verify import verify

    if args.command == "pretrain-lm":
        return pretrain_lm(args.preset, args.retrain)
    if args.command == "verify":
        if args.new_tokens < 1:
            parser.error("--new-tokens must be at least 1")
        return 0 if verify(args.preset, args.new_tokens) else 1
    print(DEMO_NOTE)
    return 0 if verify() else 1


def pretrain_lm(preset: str, retrain: bool) -> int:
    """Pretrain (or load) the course LM; print where it lives and what the text probes say."""
    from minivlm.data.shapes import caption, sample_scene
    from minivlm.lm import course_lm
    from minivlm.probes import binding_accuracy, copy_accuracy

    model, tokenizer, info = course_lm(preset, retrain=retrain)
    stats = info["stats"]
    print(f"course LM '{preset}': {stats['params']:,} parameters, trained {stats['train_seconds']:.0f} s "
          f"to loss {stats['final_loss']:.3f}; cached in {info['path']}")  # fmt: skip
    copy = copy_accuracy(model, tokenizer, [caption(sample_scene("test", 0, i)) for i in range(100)])
    bind = binding_accuracy(model, tokenizer, ways=2, episodes=100)
    print(f"text probes: copy a caption {copy:.0%}, 2-way name binding {bind:.0%} (chance 50%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
