"""Per-call cost of each cast-rs operator, side by side in one run.

    ./run bench ops [--repeats 200]

The Python API reaches every kernel through its PyTorch operator, ``torch.ops.cast_rs.*``
(``csrc/cast_rs_ops.cpp``, then the Rust entry point in ``src/ops.rs``). For each operator and
a small and a large input: median microseconds per call. On the small input the kernel is
nearly free, so the figure is the call overhead; on the large one the overhead disappears into
the kernel. Two more rows time forward + backward of weight scaling: the operator
with its C++ autograd formula (what ``scale_weight`` runs) against the same operators wrapped
in a Python ``torch.autograd.Function`` (what a Python formula would cost).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable, List, Tuple

import torch

import cast_rs
from cast_rs._adams_hyper import kernel_hyper  # the operator's hyper list, as AdamS builds it
from bench_optimizer import timed  # the same timing loop (benchmarks/ is on sys.path when run)

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
    group = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, l1_decay=0.1, masked_lr_scale=1.0)
    kw = dict(hyper=kernel_hyper(group), total_steps=1e9, mask_interval=10)
    return p, g, mu, v, masks, steps, kw


class _PythonScaleFn(torch.autograd.Function):
    """The weight-scaling formula in Python around the operators: the comparison row."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w, s)
        return ops.scale_forward(w.detach(), s.detach(), 2, -1, False)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Any, ...]:
        w, s = ctx.saved_tensors
        return ops.scale_backward(grad.contiguous(), w, s, 2, -1, False)


def rows_for(rows: int, cols: int) -> List[Tuple[str, Callable[[], Any]]]:
    x = torch.randn(rows, cols)
    s = torch.rand(rows, 2)
    bits = ops.nm_mask_packed(x, 2, 4)
    shape = [rows, cols]
    return [
        ("nm_mask", lambda: ops.nm_mask.default(x, 2, 4, -1, False)),
        ("nm_mask_packed", lambda: ops.nm_mask_packed.default(x, 2, 4, -1, False)),
        ("unpack_mask", lambda: ops.unpack_mask.default(bits, shape)),
        ("scale_forward", lambda: ops.scale_forward.default(x, s, 2, -1, False)),
        ("scale_backward", lambda: ops.scale_backward.default(x, x, s, 2, -1, False)),
        ("adams_step_ (8 tensors)", adams_call(rows, cols)),
    ]


def adams_call(rows: int, cols: int) -> Callable[[], Any]:
    """One AdamS step of 8 sparse 2:4 tensors through the operator (no mask cache)."""
    p, g, mu, v, masks, steps, kw = step_args(8, rows, cols)
    flat = [2, 4, -1] * len(p)
    return lambda: ops.adams_step_.default(p, g, mu, v, masks, flat, steps, [], **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    a = ap.parse_args()
    print(
        f"cast-rs {cast_rs.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"median µs per call over {a.repeats} calls (fewer for the large inputs)"
    )
    head = f"{'operator':>24} {'input':>10} | {'torch.ops':>9}"
    print(head)
    print("-" * len(head))
    sizes = ((64, 64), (1024, 1024))
    for rows, cols in sizes:
        repeats = a.repeats if rows <= 64 else max(20, a.repeats // 10)
        for name, op in rows_for(rows, cols):
            print(f"{name:>24} {f'{rows}x{cols}':>10} | {median_us(op, repeats):9.1f}")
    print()
    head = f"{'scaling fwd + bwd':>24} {'input':>10} | {'C++ grad':>9} {'Py grad':>9} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for rows, cols in sizes:
        repeats = a.repeats if rows <= 64 else max(20, a.repeats // 10)
        w = torch.randn(rows, cols, requires_grad=True)
        s = torch.rand(rows, 2, requires_grad=True)
        cpp = median_us(lambda w=w, s=s: ops.scale_forward(w, s, 2, -1, False).sum().backward(), repeats)
        py = median_us(lambda w=w, s=s: _PythonScaleFn.apply(w, s).sum().backward(), repeats)
        print(f"{'scale_weight':>24} {f'{rows}x{cols}':>10} | {cpp:9.1f} {py:9.1f} {py / cpp:6.2f}")


if __name__ == "__main__":
    main()
