"""Per-call cost of each cast-rs kernel through its two routes, side by side in one run.

    ./run bench ops [--repeats 200]

Every kernel is reachable two ways, both ending in the same Rust entry point (``src/ops.rs``):

* ``direct``: the pyo3 function in ``cast_rs._cast_rs`` (what the Python API calls in eager
  mode);
* ``torch.ops``: the C++ PyTorch operator (``csrc/cast_rs_ops.cpp``) through the dispatcher,
  ``torch.ops.cast_rs.*`` (what ``torch.compile`` / ``torch.export``, TorchScript and C++
  callers use).

For each operator and a small and a large input: median microseconds per call and the ratio
torch.ops / direct. On the small input the kernel is nearly free, so the figure is the call
overhead; on the large one the overhead disappears into the kernel. Two more rows time
forward + backward of weight scaling with autograd: ``Function`` (``_ScaleFn``, around the
direct calls: eager mode) against the operator with its registered autograd formula (traced
mode).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable, List, Tuple

import torch

import cast_rs
from cast_rs import _cast_rs
from bench_optimizer import timed  # the same timing loop (benchmarks/ is on sys.path when run)
from cast_rs.scaling import _ScaleFn

ops = torch.ops.cast_rs


def median_us(fn: Callable[[], Any], repeats: int) -> float:
    return 1e6 * statistics.median(timed(fn, repeats, warmup=max(5, repeats // 10)))


def step_args(n_params: int, rows: int, cols: int):
    """A param group of `n_params` sparse 2:4 weights, with state as AdamS keeps it."""
    p = [torch.randn(rows, cols) for _ in range(n_params)]
    g = [torch.randn(rows, cols) for _ in range(n_params)]
    mu = [torch.zeros(rows, cols) for _ in range(n_params)]
    v = [torch.zeros(rows, cols) for _ in range(n_params)]
    masks = [torch.zeros((rows * cols + 7) // 8, dtype=torch.uint8) for _ in range(n_params)]
    steps = [torch.tensor(0.0) for _ in range(n_params)]
    kw = dict(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, l1_decay=0.1, total_steps=1e9, mask_interval=10)
    return p, g, mu, v, masks, steps, kw


def rows_for(rows: int, cols: int) -> List[Tuple[str, Callable[[], Any], Callable[[], Any]]]:
    x = torch.randn(rows, cols)
    s = torch.rand(rows, 2)
    bits = _cast_rs.nm_mask_packed(x, 2, 4)
    shape = [rows, cols]
    p, g, mu, v, masks, steps, kw = step_args(8, rows, cols)
    pats = [(2, 4, -1)] * len(p)
    flat = [2, 4, -1] * len(p)
    return [
        ("nm_mask", lambda: _cast_rs.nm_mask_tensor(x, 2, 4, -1, False), lambda: ops.nm_mask(x, 2, 4, -1, False)),
        ("nm_mask_packed", lambda: _cast_rs.nm_mask_packed(x, 2, 4, -1, False), lambda: ops.nm_mask_packed(x, 2, 4, -1, False)),
        ("unpack_mask", lambda: _cast_rs.unpack_mask(bits, shape), lambda: ops.unpack_mask(bits, shape)),
        ("scale_forward", lambda: _cast_rs.scale_forward(x, s, 2, -1, False), lambda: ops.scale_forward(x, s, 2, -1, False)),
        (
            "scale_backward",
            lambda: _cast_rs.scale_backward(x, x, s, 2, -1, False),
            lambda: ops.scale_backward(x, x, s, 2, -1, False),
        ),
        (
            "adams_step_ (8 tensors)",
            lambda: _cast_rs.adams_step(p, g, mu, v, masks, pats, steps, **kw),
            lambda: ops.adams_step_(p, g, mu, v, masks, flat, steps, **kw),
        ),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    a = ap.parse_args()
    print(
        f"cast-rs {cast_rs.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"median µs per call over {a.repeats} calls (fewer for the large inputs)"
    )
    head = f"{'operator':>24} {'input':>10} | {'direct':>9} {'torch.ops':>9} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for rows, cols in ((64, 64), (1024, 1024)):
        repeats = a.repeats if rows <= 64 else max(20, a.repeats // 10)
        for name, direct, op in rows_for(rows, cols):
            d, o = median_us(direct, repeats), median_us(op, repeats)
            print(f"{name:>24} {f'{rows}x{cols}':>10} | {d:9.1f} {o:9.1f} {o / d:6.2f}")
    print()
    head = f"{'scaling fwd + bwd':>24} {'input':>10} | {'Function':>9} {'operator':>9} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for rows, cols in ((64, 64), (1024, 1024)):
        repeats = a.repeats if rows <= 64 else max(20, a.repeats // 10)
        w = torch.randn(rows, cols, requires_grad=True)
        s = torch.rand(rows, 2, requires_grad=True)
        old = median_us(lambda w=w, s=s: _ScaleFn.apply(w, s, 2, -1, False).sum().backward(), repeats)
        new = median_us(lambda w=w, s=s: ops.scale_forward(w, s, 2, -1, False).sum().backward(), repeats)
        print(f"{'autograd':>24} {f'{rows}x{cols}':>10} | {old:9.1f} {new:9.1f} {new / old:6.2f}")


if __name__ == "__main__":
    main()
