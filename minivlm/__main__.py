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

    commands.add_parser("demo", help="the main job: run the end-to-end demo", description=DEMO_NOTE)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from minivlm.verify import verify

    if args.command == "verify":
        if args.new_tokens < 1:
            parser.error("--new-tokens must be at least 1")
        return 0 if verify(args.preset, args.new_tokens) else 1
    print(DEMO_NOTE)
    return 0 if verify() else 1


if __name__ == "__main__":
    sys.exit(main())
