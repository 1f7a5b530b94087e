"""CAST weight scaling: a learnable ``[R, n]`` scale on each sparse weight.

Column block ``j = c // (C / n)`` of output row ``r`` is multiplied by ``A[r, j]``, so the
layer computes with ``W_s = W · A[r, c // (C/n)]``; ``A`` starts at ones and is trained as an
ordinary dense parameter. Scaling is element-wise: the zeros of ``W`` (its N:M pattern) are
those of ``W_s``. Forward and backward are Rust kernels (fast path for contiguous float32 /
float64 on CPU, tensor ops otherwise), registered as the PyTorch operators
``torch.ops.cast_rs.scale_forward`` / ``scale_backward`` (C++, ``csrc/``; fake
implementations and autograd in ``_registrations``, so ``torch.compile(fullgraph=True)`` and
``torch.export`` trace through them).
"""

from __future__ import annotations

from typing import Any, Tuple

import torch
from torch import nn

from . import _cast_rs
from ._registrations import input_grads, ops
from ._tensor_args import check_plain_tensor, tracing
from ._config import generic_path_forced


class _ScaleFn(torch.autograd.Function):
    """Eager mode's path: the same Rust entry points called directly through pyo3, which
    costs less per call than the dispatcher operator with its Python autograd formula
    (``./run bench ops`` prints both); tracing needs the operator, eager mode does not."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, scale: torch.Tensor, groups: int, dim: int, force_generic: bool) -> torch.Tensor:
        ctx.save_for_backward(weight, scale)
        ctx.groups, ctx.dim, ctx.force_generic = groups, dim, force_generic
        return _cast_rs.scale_forward(weight.detach(), scale.detach(), groups, dim, force_generic)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Tuple[Any, ...]:
        weight, scale = ctx.saved_tensors
        grad_w, grad_a = _cast_rs.scale_backward(
            grad.contiguous(), weight.detach(), scale.detach(), ctx.groups, ctx.dim, ctx.force_generic
        )
        return input_grads(ctx, grad_w, grad_a)


def scale_weight(weight: torch.Tensor, scale: torch.Tensor, groups: int, dim: int = -1) -> torch.Tensor:
    """Differentiable ``W · A`` (see the module docstring). ``dim`` is the group (input)
    dimension of the weight: -1 for ``nn.Linear`` ``[out, in]``, 0 for ``Conv1D`` ``[in, out]``.

    Eager calls on plain tensors take the direct kernel path (:class:`_ScaleFn`); under
    ``torch.compile`` / ``torch.export`` (or with fake tensors) the registered operator
    ``torch.ops.cast_rs.scale_forward`` is used. Both run the same kernels."""
    force_generic = generic_path_forced()
    if tracing(weight):
        return ops.scale_forward(weight, scale, groups, dim, force_generic)
    check_plain_tensor(weight, "weight")  # another subclass (a DTensor): a clear error
    check_plain_tensor(scale, "scale")
    return _ScaleFn.apply(weight, scale, groups, dim, force_generic)


class WeightScale(nn.Module):
    """A ``torch.nn.utils.parametrize`` parametrization: ``weight ↦ weight · scale``.

    Args:
        out_features: R, the number of output rows.
        groups: n, the number of column blocks per row (must divide the input dimension).
        dim: the weight's input dimension, -1 (``[out, in]``) or 0 (``[in, out]``).
    """

    def __init__(self, out_features: int, groups: int, dim: int = -1, *, device=None, dtype=None) -> None:
        super().__init__()
        if groups < 1:
            raise ValueError(f"scaling_groups: expected an int >= 1, got {groups}")
        self.groups = int(groups)
        self.dim = int(dim)
        self.scale = nn.Parameter(torch.ones(out_features, groups, device=device, dtype=dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return scale_weight(weight, self.scale, self.groups, self.dim)

    def extra_repr(self) -> str:
        return f"scale={tuple(self.scale.shape)}, dim={self.dim}"
