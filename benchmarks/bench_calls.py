"""Per-call cost of the eager Python API, for comparing two builds of cast-rs.

    ./run bench calls [--repeats 300]

Times what a training loop calls at every step, on a small input (where the binding layer
dominates) and a large one (where the kernel does):

* ``AdamS.step()`` on a 2:4 group (8 weights) through the whole Python optimizer;
* ``torch.ops.cast_rs.adams_step_`` directly (the operator and the kernel, no Python optimizer);
* ``scale_weight`` forward + backward (the operator and its C++ autograd formula);
* ``torch.ops.cast_rs.scale_forward`` directly;
* ``nm_mask``.

To compare with another commit (the "before" of a change to the binding layer), build that
commit's extension and put its package first on ``sys.path`` (``git worktree add`` of that
commit, ``cargo build --release --features python`` there, its ``python/`` on PYTHONPATH).
Every figure is a median of ``--repeats`` calls.
"""

from __future__ import annotations

import argparse

import torch

import cast_rs
from bench_ops import median_us, step_args  # benchmarks/ is on sys.path when run


def adams_group(rows: int, cols: int):
    params = [torch.nn.Parameter(torch.randn(rows, cols)) for _ in range(8)]
    for p in params:
        p.grad = torch.randn(rows, cols)
    opt = cast_rs.AdamS([{"params": params, "pattern": "2:4"}], lr=1e-4, total_steps=10**9)
    return opt


def raw_step(rows: int, cols: int):
    p, g, mu, v, masks, steps, kw = step_args(8, rows, cols)
    op, flat = torch.ops.cast_rs.adams_step_.default, [2, 4, -1] * len(p)
    return lambda: op(p, g, mu, v, masks, flat, steps, [], **kw)


def scale_fwd_bwd(rows: int, cols: int):
    w = torch.randn(rows, cols, requires_grad=True)
    s = torch.rand(rows, 2, requires_grad=True)
    return lambda: cast_rs.scale_weight(w, s, 2).sum().backward()


def raw_scale_forward(rows: int, cols: int):
    w, s = torch.randn(rows, cols), torch.rand(rows, 2)
    op = torch.ops.cast_rs.scale_forward.default
    return lambda: op(w, s, 2, -1, False)


def nm_mask_call(rows: int, cols: int):
    x = torch.randn(rows, cols)
    return lambda: cast_rs.nm_mask(x, "2:4")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=300)
    a = ap.parse_args()
    print(f"cast-rs from {cast_rs.__file__}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median µs per call")
    print(f"{'call':>34} {'64x64':>10} {'1024x1024':>10}")
    rows = []
    for name, make in [
        ("AdamS.step() (8 weights, 2:4)", lambda r, c: adams_group(r, c).step),
        ("adams_step_ operator (8 weights)", raw_step),
        ("scale_weight fwd + bwd", scale_fwd_bwd),
        ("scale_forward (the operator)", raw_scale_forward),
        ("nm_mask", nm_mask_call),
    ]:
        small = median_us(make(64, 64), a.repeats)
        large = median_us(make(1024, 1024), max(20, a.repeats // 10))
        rows.append((name, small, large))
        print(f"{name:>34} {small:10.1f} {large:10.1f}", flush=True)


if __name__ == "__main__":
    main()
