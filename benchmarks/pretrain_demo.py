"""Reproduce the demo's shipped dense checkpoint bit for bit (``cast_rs/data/demo_dense.pt``).

    ./run bench pretrain_demo            # pretrain, compare with the shipped file (~25 min)
    ./run bench pretrain_demo --write    # pretrain and (re)write the shipped file

The demo's default model (4 layers, width 128) trained with AdamW for ``DemoConfig``'s
``pretrain_steps`` on the Python standard library sources, on ONE torch thread: float sums
split over several threads round differently, so the thread count is part of the recipe (it is
stored in the checkpoint's metadata, with the torch and Python versions and a sha256 of the
training text). Same Python (same standard library), same torch, one thread: same bits.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cast_rs.demo import (
    SHIPPED_DENSE,
    Batches,
    DemoConfig,
    corpus_digest,
    load_corpus,
    load_dense,
    pretrain,
    pretrain_meta,
    save_dense,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help=f"write the result to {SHIPPED_DENSE}")
    ap.add_argument("--out", default="results/demo_dense.pt", help="where to write the result otherwise")
    ap.add_argument("--steps", type=int, default=None, help="pretraining steps (default: DemoConfig's)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = DemoConfig()
    if args.steps:
        cfg.pretrain_steps = args.steps
    torch.manual_seed(cfg.seed)
    train_data, _, desc = load_corpus()
    print(f"corpus: {desc} (sha256 {corpus_digest(train_data)[:16]}...)")
    t0 = time.perf_counter()
    model = pretrain(cfg, Batches(train_data, cfg.batch, cfg.model.context, cfg.seed))
    print(f"pretrained {cfg.pretrain_steps} steps in {time.perf_counter() - t0:.0f} s on 1 thread")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = pretrain_meta(cfg, train_data)
    target = SHIPPED_DENSE if args.write else Path(args.out)
    if SHIPPED_DENSE.exists() and not args.write:
        shipped, smeta = load_dense(SHIPPED_DENSE)
        same = shipped.keys() == state.keys() and all(torch.equal(shipped[k], state[k]) for k in state)
        print(
            f"shipped checkpoint: {'IDENTICAL, bit for bit' if same else 'DIFFERENT'} "
            f"(shipped: torch {smeta['torch']}, Python {smeta['python']}, {smeta['threads']} thread(s); "
            f"here: torch {meta['torch']}, Python {meta['python']})"
        )
        if not same and smeta["corpus_sha256"] != meta["corpus_sha256"]:
            print("  the training text differs (another Python's standard library): a different result is expected")
    save_dense(target, state, meta)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
