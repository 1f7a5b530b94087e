"""CAST weight scaling: a learnable ``[R, n]`` scale on each sparse weight.

Column block ``j = c // (C / n)`` of output row ``r`` is multiplied by ``A[r, j]``, so the
layer computes with ``W_s = W · A[r, c // (C/n)]``; ``A`` starts at ones and is trained as an
ordinary dense parameter. Scaling is element-wise: the zeros of ``W`` (its N:M pattern) are
those of ``W_s``. Forward and backward are Rust kernels (fast path for contiguous float32 /
float64 on CPU, tensor ops otherwise), registered as the PyTorch operators
``torch.ops.cast_rs.scale_forward`` / ``scale_backward`` (C++, ``csrc/``, with the autograd
formula; fake implementations in ``_registrations``, so ``torch.compile(fullgraph=True)`` and
``torch.export`` trace through them).
"""

from __future__ import annotations


import torch
from torch import nn

from ._registrations import ops
from ._tensor_args import check_plain_tensor, tracing
from ._config import generic_path_forced


def scale_weight(weight: torch.Tensor, scale: torch.Tensor, groups: int, dim: int = -1) -> torch.Tensor:
    """Differentiable ``W · A`` (see the module docstring). ``dim`` is the group (input)
    dimension of the weight: -1 for ``nn.Linear`` ``[out, in]``, 0 for ``Conv1D`` ``[in, out]``.

    One call of the operator ``torch.ops.cast_rs.scale_forward``, whose autograd formula is
    registered with it (C++), in eager mode and under ``torch.compile`` / ``torch.export``."""
    if not tracing(weight):
        check_plain_tensor(weight, "weight")  # another subclass (a DTensor): a clear error
        check_plain_tensor(scale, "scale")
    return _SCALE_FORWARD(weight, scale, groups, dim, generic_path_forced())


_SCALE_FORWARD = ops.scale_forward.default


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
