"""Time per training step of the demo model, side by side in one run (medians, ratios).

    ./run bench training [--steps 30]

* dense: plain training with torch.optim.AdamW(fused=True), no teacher
* CAST without the teacher: sparsify (weight scaling) + AdamS, cross-entropy loss
* CAST: sparsify + AdamS + the dense teacher's forward pass + distill_loss

The three are timed in interleaved rounds on the same batches.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import cast_rs
from cast_rs.demo import Batches, DemoConfig, TinyGPT, load_corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="the demo's --quick model")
    args = ap.parse_args()
    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    c = cfg.model
    tr, _, _ = load_corpus()
    batches = Batches(tr, cfg.batch, c.context, 0)
    torch.manual_seed(0)
    base = TinyGPT(c)
    teacher = copy.deepcopy(base).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    dense = copy.deepcopy(base)
    opt_dense = torch.optim.AdamW(dense.parameters(), lr=1e-3, fused=True)
    plain = copy.deepcopy(base)
    cast_rs.sparsify(plain)
    opt_plain = cast_rs.AdamS(plain.parameters(), lr=1e-3, total_steps=10_000)
    cast = copy.deepcopy(base)
    cast_rs.sparsify(cast)
    opt_cast = cast_rs.AdamS(cast.parameters(), lr=1e-3, total_steps=10_000)

    def step_ce(model, opt, x, y):
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
        opt.step()

    def step_distill(model, opt, x, y):
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        with torch.no_grad():
            t = teacher(x)
        cast_rs.distill_loss(logits, t, y).backward()
        opt.step()

    runs = {
        "dense AdamW(fused=True)": lambda x, y: step_ce(dense, opt_dense, x, y),
        "CAST without teacher": lambda x, y: step_ce(plain, opt_plain, x, y),
        "CAST (AdamS + scaling + teacher)": lambda x, y: step_distill(cast, opt_cast, x, y),
    }
    times = {k: [] for k in runs}
    for i in range(args.steps + 3):
        x, y = batches.get(i)
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn(x, y)
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
    base_t = statistics.median(times["dense AdamW(fused=True)"])
    print(
        f"demo model: {sum(p.numel() for p in base.parameters()) / 1e6:.2f} M parameters, batch {cfg.batch}x{c.context}, "
        f"{torch.get_num_threads()} threads, {args.steps} interleaved rounds"
    )
    print(f"{'training step':<34} {'median ms':>10} {'vs dense':>9}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<34} {med * 1e3:10.1f} {med / base_t:8.2f}x")


if __name__ == "__main__":
    main()
