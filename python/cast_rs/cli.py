"""Command line: ``cast-rs <command>`` or ``python -m cast_rs <command>``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="cast-rs", description="CAST N:M sparse training for PyTorch, with a Rust core.")
    sub = parser.add_subparsers(dest="command", required=True)

    for name, helptext in (
        ("demo", "the main demonstration (currently the short example below)"),
        ("example", "short sparsification run on a small MLP (about half a minute)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--pattern", default="2:4", help="N:M pattern (default 2:4)")
        p.add_argument("--steps", type=int, default=600, help="training steps per method (default 600)")
        p.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    if args.command in ("demo", "example"):
        from .example import main as example_main

        if args.steps < 1:
            parser.error("--steps must be >= 1")
        example_main(pattern=args.pattern, steps=args.steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
