"""Command line: ``cast-rs <command>`` or ``python -m cast_rs <command>``."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import List, Optional


def _check_output_path(parser: argparse.ArgumentParser, flag: str, path: str) -> Path:
    """An output file must be writable *before* the run it records: a missing directory found
    after ten minutes of training loses the results."""
    p = Path(path)
    if p.is_dir():
        parser.error(f"{flag} {path}: is a directory; expected a file path")
    parent = p.parent
    if not parent.is_dir():
        parser.error(f"{flag} {path}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        parser.error(f"{flag} {path}: directory {str(parent)!r} is not writable")
    return p


def _plot_formats() -> Optional[List[str]]:
    """The file formats matplotlib can write, or None when matplotlib is not installed."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return None
    return sorted(FigureCanvasBase.get_supported_filetypes())


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:  # noqa: C901 (a flat list of independent checks)
    """Every value and output path, checked before any work starts (``parser.error``: a
    message and exit status 2)."""
    for key in ("steps", "pretrain_steps", "batch"):
        v = getattr(args, key, None)
        if v is not None and v < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {v}")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2**63:
        parser.error(f"--seed must be in [0, 2**63), got {seed}")
    for key in ("lr", "cast_lr"):
        lr = getattr(args, key, None)
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            parser.error(f"--{key.replace('_', '-')} must be a finite number > 0, got {lr}")
    l1 = getattr(args, "l1_decay", None)
    if l1 is not None and not (math.isfinite(l1) and l1 >= 0):
        parser.error(f"--l1-decay must be a finite number >= 0, got {l1}")
    warmup = getattr(args, "warmup", None)
    if warmup is not None and not (math.isfinite(warmup) and 0 <= warmup < 1):
        parser.error(f"--warmup must be a fraction in [0, 1), got {warmup}")
    pattern = getattr(args, "pattern", None)
    if pattern is not None:
        from .nm import parse_pattern

        try:
            parse_pattern(pattern, param="--pattern")
        except (TypeError, ValueError) as e:
            parser.error(str(e))
    for path in getattr(args, "data", None) or ():
        if not Path(path).exists():
            parser.error(f"--data {path}: no such file or directory")
    for flag in ("json", "save"):
        path = getattr(args, flag, None)
        if path is not None:
            _check_output_path(parser, f"--{flag}", path)
    plot = getattr(args, "plot", None)
    if plot is not None:
        p = _check_output_path(parser, "--plot", plot)
        formats = _plot_formats()
        if formats is None:
            parser.error("--plot needs matplotlib, which is not installed (pip install matplotlib)")
        suffix = p.suffix[1:].lower()
        if suffix and suffix not in formats:
            parser.error(
                f"--plot {plot}: matplotlib cannot write '.{suffix}' files; use one of: " + ", ".join("." + f for f in formats)
            )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="cast-rs", description="CAST N:M sparse training for PyTorch, with a Rust core.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="CAST 2:4 vs baselines on a small byte-level GPT trained on real text (about 7 minutes on 2 cores)"
    )
    demo.add_argument(
        "--quick", action="store_true", help="small model and few steps (about a minute on 2 cores; used by the tests)"
    )
    demo.add_argument(
        "--data", nargs="+", metavar="PATH", help="your own text files or folders instead of the Python standard library sources"
    )
    demo.add_argument("--json", metavar="PATH", help="write the results (one entry per method) as JSON")
    demo.add_argument("--plot", metavar="PATH", help="write a PNG: validation perplexity vs step, and final perplexities")
    demo.add_argument("--steps", type=int, help="continued-training steps per method")
    demo.add_argument(
        "--pretrain-steps",
        dest="pretrain_steps",
        type=int,
        help="pretrain the dense model here for this many steps instead of loading the shipped checkpoint",
    )
    demo.add_argument(
        "--from-scratch",
        dest="from_scratch",
        action="store_true",
        help="pretrain the dense model here (3000 steps, ~12 min) instead of loading the shipped checkpoint",
    )
    demo.add_argument("--lr", type=float, help="learning rate of dense continued training and SR-STE (default 1e-3)")
    demo.add_argument(
        "--cast-lr",
        dest="cast_lr",
        type=float,
        help="AdamS learning rate for CAST, masked_lr_scale 1 (default: sparse.suggest_adams(steps, "
        "dense_lr=--lr): half the dense lr at the default 400 steps, the whole of it from about 800, "
        "masked weights at the dense lr)",
    )
    demo.add_argument("--l1-decay", dest="l1_decay", type=float, help="AdamS l1_decay (lambda)")
    demo.add_argument(
        "--warmup",
        type=float,
        metavar="FRACTION",
        help="linear learning-rate warmup over this fraction of the steps, every trained method (default 0.1)",
    )
    demo.add_argument("--batch", type=int, help="sequences per batch")
    demo.add_argument(
        "--seed",
        type=int,
        help="seed of the batches and, with --from-scratch, of the dense model "
        "(the shipped dense checkpoint is seed 0; another seed pretrains here)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    ex = sub.add_parser("example", help="short sparsification run on a small MLP (about 10 seconds)")
    ex.add_argument("--pattern", default="2:4", help="N:M pattern (default 2:4)")
    ex.add_argument("--steps", type=int, default=600, help="training steps per method (default 600)")
    ex.add_argument("--seed", type=int, default=0)

    dist = sub.add_parser(
        "distributed",
        help="the example's MLP trained with CAST on several processes: torchrun --nproc-per-node 2 -m cast_rs distributed",
    )
    dist.add_argument("--mode", choices=("fsdp", "ddp"), default="fsdp", help="FSDP2 fully_shard (default) or DDP")
    dist.add_argument("--pattern", default="2:4", help="N:M pattern (default 2:4)")
    dist.add_argument("--steps", type=int, default=600, help="dense and CAST training steps (default 600)")
    dist.add_argument("--save", metavar="PATH", help="write the finalized weights (plain state dict) here")
    dist.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(args)
    if args.command == "distributed":
        from .distributed_example import main as distributed_main

        return distributed_main(mode=args.mode, steps=args.steps, pattern=args.pattern, save=args.save, seed=args.seed)
    from .example import main as example_main

    example_main(pattern=args.pattern, steps=args.steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
