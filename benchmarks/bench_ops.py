"""Per-call cost of the weight-scaling kernels as PyTorch operators, side by side in one run.

    ./run bench ops [--repeats 200]

For each weight shape, median microseconds per call of:

* ``direct``: the pyo3 function ``cast_rs._cast_rs.scale_forward`` (what the library called
  before the kernels were operators);
* ``torch.ops``: the same kernel through the dispatcher, ``torch.ops.cast_rs.scale_forward``;
* ``Function``: forward + backward through ``cast_rs.scaling._ScaleFn``, a
  ``torch.autograd.Function`` around the direct calls (what ``scale_weight`` runs in eager mode);
* ``custom_op``: forward + backward through the operator with its registered autograd (what
  ``scale_weight`` runs under ``torch.compile`` / ``torch.export``).

The ratio columns are operator / direct and custom_op / Function: the dispatcher's overhead,
which matters for small layers and disappears into the kernel for large ones (it is why eager
mode keeps the direct path).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable

import torch

import cast_rs
from cast_rs import _cast_rs
from bench_optimizer import timed  # the same timing loop (benchmarks/ is on sys.path when run)
from cast_rs.scaling import _scale_forward_op, _ScaleFn


def median_us(fn: Callable[[], Any], repeats: int) -> float:
    return 1e6 * statistics.median(timed(fn, repeats, warmup=max(5, repeats // 10)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=200)
    a = ap.parse_args()
    print(f"cast-rs {cast_rs.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"median µs per call over {a.repeats} calls")
    head = f"{'weight':>11} | {'direct':>8} {'torch.ops':>9} {'ratio':>6} | {'Function':>9} {'custom_op':>9} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for rows, cols in ((64, 64), (256, 256), (1024, 1024), (4096, 4096)):
        w = torch.randn(rows, cols, requires_grad=True)
        s = torch.rand(rows, 2, requires_grad=True)
        repeats = a.repeats if rows <= 1024 else max(20, a.repeats // 10)
        direct = median_us(lambda: _cast_rs.scale_forward(w.detach(), s.detach(), 2, -1, False), repeats)
        op = median_us(lambda: torch.ops.cast_rs.scale_forward(w.detach(), s.detach(), 2, -1, False), repeats)

        def fn_old() -> None:
            _ScaleFn.apply(w, s, 2, -1, False).sum().backward()

        def fn_new() -> None:
            _scale_forward_op(w, s, 2, -1, False).sum().backward()

        old = median_us(fn_old, repeats)
        new = median_us(fn_new, repeats)
        print(f"{f'{rows}x{cols}':>11} | {direct:8.1f} {op:9.1f} {op / direct:6.2f} | {old:9.1f} {new:9.1f} {new / old:6.2f}")


if __name__ == "__main__":
    main()
