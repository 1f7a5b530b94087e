"""Sweep CAST's continued-training settings on the demo's model and data.

    ./run bench sweep_cast [--steps 300] [--grid lr=1e-3,3e-3 l1_decay=1e-4,1e-3,1e-2]

Pretrains the demo's dense model once (cached in results/dense_<hash>.pt), then runs CAST
(sparsify + AdamS + distillation, finalize) for each combination and prints validation
perplexity after finalize, next to dense, dense_continued and one-shot magnitude.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cast_rs import baselines, check_nm
from cast_rs.demo import Batches, DemoConfig, evaluate, from_state, load_corpus, pretrain, train_cast


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--grid", nargs="*", default=["lr=1e-3,3e-3", "l1_decay=1e-4,1e-3,1e-2"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="results/sweep_cast.json")
    args = ap.parse_args()
    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    if args.steps:
        cfg.steps = args.steps
    grid = {}
    for item in args.grid:
        key, vals = item.split("=")
        grid[key] = [float(v) if key != "mask_interval" else int(v) for v in vals.split(",")]
    torch.manual_seed(cfg.seed)
    tr, va, desc = load_corpus()
    c = cfg.model
    key = hashlib.sha1(json.dumps(asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:10]
    Path("results").mkdir(exist_ok=True)
    cache = Path(f"results/dense_{key}.pt")
    batches = Batches(tr, cfg.batch, c.context, cfg.seed)
    cont = Batches(tr, cfg.batch, c.context, cfg.seed + 1)
    ev = lambda m: evaluate(m, va, cfg.eval_windows, c.context)  # noqa: E731
    if cache.exists():
        state = torch.load(cache)
    else:
        state = pretrain(cfg, batches).state_dict()
        torch.save(state, cache)
    fresh = lambda: from_state(c, state)  # noqa: E731
    teacher = from_state(c, state, frozen=True)
    dense = ev(fresh())
    m = fresh()
    baselines.magnitude_prune(m)
    mag = ev(m)
    print(f"dense {dense:.4f}  magnitude {mag:.4f}  steps {cfg.steps}", flush=True)
    rows = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        hp = dict(zip(keys, values))
        lr = hp.get("lr", cfg.lr)
        l1 = hp.get("l1_decay", cfg.l1_decay)
        t0 = time.perf_counter()
        m = fresh()
        h, opt, _, _ = train_cast(
            m, cfg, cont, teacher, lr=lr, l1_decay=l1, mask_interval=int(hp.get("mask_interval", cfg.mask_interval)), show=False
        )
        ratio = h.stats(opt).overall
        before = ev(m)
        h.finalize()
        assert check_nm(m).ok
        after = ev(m)
        rec = (mag - after) / (mag - dense) if mag > dense else float("nan")
        rows.append(
            {
                **hp,
                "ppl_dense_forward": before,
                "ppl": after,
                "sparse_ratio": ratio,
                "gap_recovered": rec,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(
            f"{hp}  ppl before finalize {before:.4f}  after {after:.4f}  ratio {ratio:.4f}  "
            f"recovered {100 * rec:.1f}%  ({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
    Path(args.out).write_text(json.dumps({"dense": dense, "magnitude": mag, "steps": cfg.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
