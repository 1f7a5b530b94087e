"""Optimizer memory: state bytes of AdamS against AdamW, and resident memory over a long run.

    ./run bench memory [--steps 10000] [--sample-every 500] [--warmup 1000] [--no-compare]

A. Optimizer state: an MLP of 2:4 sparse Linear layers (768-3072-768-3072-768, 9.4 M
   sparse weights) plus dense biases and weight scales, after `sparsify`. One step with
   torch.optim.AdamW(fused=True) and one with cast_rs.AdamS on the same model; the bytes of
   every tensor in optimizer.state (numel * element_size), per state entry. AdamS should hold
   AdamW's state plus the packed masks: ceil(numel/8) bytes per sparse tensor, 1 bit per
   sparse weight.

B. Resident memory: a small sparsified MLP (scaling on, AdamS, mask_interval 10) trained for
   --steps steps on fresh random batches (forward, backward, step, zero_grad). Every
   --sample-every steps: gc.collect(), then the resident set size (/proc/self/statm) and the
   number of objects the garbage collector tracks. Growth and a least-squares slope are taken
   over the samples after --warmup steps. The same loop with torch.optim.AdamW(fused=True), on
   the same sparsified model, is torch's own baseline (--no-compare skips it). Each loop runs
   in a fresh child process, one after the other, so neither inherits the other's heap.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

import cast_rs
from _rss import peak_rss  # benchmarks/ is on sys.path when run

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def mlp(dims, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.GELU()]
    return nn.Sequential(*layers[:-1])


# ------------------------------------------------------------------------- A: state bytes
STATE_DIMS = (768, 3072, 768, 3072, 768)


def state_bytes(optimizer: torch.optim.Optimizer):
    """Bytes per state entry name over every parameter; non-tensor entries counted apart."""
    per_key, others = {}, {}
    for st in optimizer.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                per_key[k] = per_key.get(k, 0) + v.numel() * v.element_size()
            else:
                others[k] = others.get(k, 0) + 1
    return per_key, others


def part_a() -> bool:
    results = {}
    for name in ("AdamW", "AdamS"):
        model = mlp(STATE_DIMS)
        sparse = cast_rs.sparsify(model, "2:4")
        if name == "AdamW":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        else:
            opt = cast_rs.AdamS(model.parameters(), lr=1e-3, total_steps=100, mask_interval=10)
        x = torch.randn(8, STATE_DIMS[0])
        model(x).square().mean().backward()
        opt.step()
        sparse_numels = [w.numel() for w in sparse.sparse_parameters()]
        n_params = sum(p.numel() for p in model.parameters())
        results[name] = state_bytes(opt) + (sparse_numels, n_params)
        del model, sparse, opt
        gc.collect()
    (w_keys, w_other, sparse_numels, n_params), (s_keys, s_other, _, _) = results["AdamW"], results["AdamS"]
    n_sparse = sum(sparse_numels)
    print(
        f"A. optimizer state after one step: {len(sparse_numels)} sparse 2:4 Linear weights "
        f"({'-'.join(map(str, STATE_DIMS))}), {n_sparse:,} sparse weights, "
        f"{n_params - n_sparse:,} dense parameters (biases, weight scales), float32\n"
    )
    keys = list(dict.fromkeys([*w_keys, *s_keys]))
    print(f"{'state entry':<14}{'AdamW bytes':>16}{'AdamS bytes':>16}{'difference':>14}")
    for k in keys:
        a, b = w_keys.get(k, 0), s_keys.get(k, 0)
        print(f"{k:<14}{a:>16,}{b:>16,}{b - a:>+14,}")
    total_w, total_s = sum(w_keys.values()), sum(s_keys.values())
    diff = total_s - total_w
    packed = sum((n + 7) // 8 for n in sparse_numels)
    bits = diff * 8 / n_sparse
    print(f"{'total':<14}{total_w:>16,}{total_s:>16,}{diff:>+14,}")
    extra = ", ".join(f"{k} x{v}" for k, v in s_other.items() if w_other.get(k) != v)
    if extra:
        print(f"(non-tensor state, not counted: AdamS {extra}: a Python float per sparse tensor)")
    print(
        f"\nsparse weights {n_sparse:,}; packed masks sum(ceil(numel/8)) = {packed:,} bytes; "
        f"difference = {bits:.4f} bits per sparse weight; AdamS/AdamW = {total_s / total_w:.4f}x"
    )
    ok = 0 <= diff <= packed and bits <= 1.0 + 8 * len(sparse_numels) / n_sparse
    print(
        f"{'PASS' if ok else 'FAIL'}: AdamS state = AdamW state + at most 1 bit per sparse weight "
        f"(+{diff:,} bytes, {bits:.4f} bits/weight)"
    )
    return ok


# ------------------------------------------------------------------------- B: RSS over time
RSS_DIMS = (256, 512, 512, 64)
BATCH = 32


def child(opt_name: str, steps: int, sample_every: int, threads: int, progress: bool) -> None:
    """One training loop; prints its samples as JSON on the last stdout line."""
    from tqdm import tqdm

    if threads:
        torch.set_num_threads(threads)
    after_import = rss_bytes()
    model = mlp(RSS_DIMS)
    cast_rs.sparsify(model, "2:4")
    if opt_name == "adams":
        opt = cast_rs.AdamS(model.parameters(), lr=1e-3, total_steps=steps, mask_interval=10)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    samples = []
    gc.collect()
    samples.append((0, rss_bytes(), len(gc.get_objects())))
    label = "AdamS" if opt_name == "adams" else "AdamW(fused)"
    for step in tqdm(
        range(1, steps + 1), desc=label, unit="step", mininterval=1.0, disable=not progress, file=sys.stderr, dynamic_ncols=True
    ):
        x = torch.randn(BATCH, RSS_DIMS[0])
        y = torch.randint(0, RSS_DIMS[-1], (BATCH,))
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % sample_every == 0:
            del x, y, loss
            gc.collect()
            samples.append((step, rss_bytes(), len(gc.get_objects())))
    info = {
        "samples": samples,
        "after_import": after_import,
        "peak_rss": peak_rss(),
        "kernel_calls": list(getattr(opt, "_kernel_calls", [0, 0])),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(info))


def run_child(opt_name: str, args) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        opt_name,
        "--steps",
        str(args.steps),
        "--sample-every",
        str(args.sample_every),
        "--threads",
        str(args.threads),
    ]
    if args.no_progress:
        cmd.append("--no-progress")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the {opt_name} loop failed (exit code {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def slope_per_1000(points) -> float:
    """Least-squares slope of (step, bytes) in KiB per 1000 steps."""
    n = len(points)
    if n < 2:
        return float("nan")
    mx = sum(s for s, _ in points) / n
    my = sum(b for _, b in points) / n
    sxx = sum((s - mx) ** 2 for s, _ in points)
    sxy = sum((s - mx) * (b - my) for s, b in points)
    return sxy / sxx * 1000 / 1024


def verdict(points) -> str:
    first, last = points[0][1], points[-1][1]
    growth = last - first
    flat = abs(growth) < 0.01 * first or abs(growth) < 2 * MIB
    return ("flat" if flat else "GROWING") + f" (growth {growth / MIB:+.2f} MiB = {100 * growth / first:+.2f}%)"


def part_b(args) -> bool:
    n_weights = sum(a * b for a, b in zip(RSS_DIMS[:-1], RSS_DIMS[1:]))
    names = ["adams"] + (["adamw"] if args.compare else [])
    labels = {"adams": "AdamS", "adamw": "AdamW(fused)"}
    print(
        f"\nB. resident memory over {args.steps:,} training steps: MLP {'-'.join(map(str, RSS_DIMS))} "
        f"({n_weights:,} weights, all 2:4, weight scaling), batch {BATCH}, fresh random input each step, "
        f"mask_interval 10; gc.collect() before each sample; warm-up {args.warmup:,} steps; "
        f"each loop in its own process",
        flush=True,
    )
    runs = {name: run_child(name, args) for name in names}
    ths = {runs[n]["threads"] for n in names}
    print(
        f"(torch threads: {'/'.join(map(str, ths))}; AdamS kernel calls fast/generic: "
        f"{runs['adams']['kernel_calls'][0]:,}/{runs['adams']['kernel_calls'][1]:,}; resident after "
        f"importing torch and cast_rs, before the model: {runs['adams']['after_import'] / MIB:.0f} MiB)\n"
    )
    header = f"{'step':>7}" + "".join(f"{labels[n] + ' RSS MiB':>22}{'gc objects':>12}" for n in names)
    print(header)
    steps = [s for s, _, _ in runs["adams"]["samples"]]
    for i, step in enumerate(steps):
        row = f"{step:>7,}"
        for n in names:
            _, rss, objs = runs[n]["samples"][i]
            row += f"{rss / MIB:>22.2f}{objs:>12,}"
        if step < args.warmup:
            row += "   (warm-up)"
        print(row)
    ok = True
    print()
    for n in names:
        post = [(s, b) for s, b, _ in runs[n]["samples"] if s >= args.warmup]
        objs = [o for s, _, o in runs[n]["samples"] if s >= args.warmup]
        v = verdict(post)
        print(
            f"{labels[n]:<13} steps {post[0][0]:,}->{post[-1][0]:,}: RSS {post[0][1] / MIB:.2f} -> "
            f"{post[-1][1] / MIB:.2f} MiB, slope {slope_per_1000(post):+.1f} KiB per 1000 steps, "
            f"gc objects {objs[0]:,} -> {objs[-1]:,}, peak RSS {runs[n]['peak_rss'] / MIB:.1f} MiB: {v}"
        )
        if n == "adams":
            ok = v.startswith("flat") and objs[-1] - objs[0] < 100
    print(
        f"{'PASS' if ok else 'FAIL'}: AdamS training loop's resident memory is flat over {args.steps:,} steps "
        f"(growth < 1% or < 2 MiB after warm-up, no growth in gc-tracked objects)"
    )
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10_000, help="training steps of part B (default 10000)")
    ap.add_argument("--sample-every", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=1000, help="steps before the samples that count (default 1000)")
    ap.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the loop with torch.optim.AdamW(fused=True) (default on)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in part B (default 1: memory, not speed, is measured here; 0: torch's default)",
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--only", choices=["a", "b"], help="run one part")
    ap.add_argument("--child", choices=["adams", "adamw"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.steps, args.sample_every, args.threads, not args.no_progress)
        return
    if args.warmup >= args.steps:
        ap.error("--warmup must be below --steps")
    print(f"torch {torch.__version__}, cast-rs {cast_rs.__version__}, page size {PAGE} B\n")
    if args.only in (None, "a"):
        part_a()
    if args.only in (None, "b"):
        part_b(args)


if __name__ == "__main__":
    main()
