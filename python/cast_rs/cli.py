"""Command line: ``cast-rs <command>`` or ``python -m cast_rs <command>``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="cast-rs", description="CAST N:M sparse training for PyTorch, with a Rust core.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="CAST 2:4 vs baselines on a small byte-level GPT trained on real text (~10 min)")
    demo.add_argument("--quick", action="store_true", help="small model and few steps (about 1-2 minutes; used by the tests)")
    demo.add_argument("--data", nargs="+", metavar="PATH", help="your own text files or folders instead of the Python standard library sources")
    demo.add_argument("--json", metavar="PATH", help="write the results (one entry per method) as JSON")
    demo.add_argument("--plot", metavar="PATH", help="write a PNG: validation perplexity vs step, and final perplexities")
    demo.add_argument("--steps", type=int, help="continued-training steps per method")
    demo.add_argument("--pretrain-steps", dest="pretrain_steps", type=int,
                      help="pretrain the dense model here for this many steps instead of loading the shipped checkpoint")
    demo.add_argument("--from-scratch", dest="from_scratch", action="store_true",
                      help="pretrain the dense model here (3000 steps, ~12 min) instead of loading the shipped checkpoint")
    demo.add_argument("--lr", type=float, help="learning rate of continued training")
    demo.add_argument("--l1-decay", dest="l1_decay", type=float, help="AdamS l1_decay (lambda)")
    demo.add_argument("--batch", type=int, help="sequences per batch")
    demo.add_argument("--seed", type=int, help="seed of the batches and, with --from-scratch, of the dense model "
                      "(the shipped dense checkpoint is seed 0; another seed pretrains here)")
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
    for key in ("steps", "pretrain_steps", "batch"):
        v = getattr(args, key, None)
        if v is not None and v < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
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
