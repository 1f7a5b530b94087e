"""The Python half of the cast-rs PyTorch operators: fake (meta) implementations and autograd.

The operators themselves are C++ (``csrc/cast_rs_ops.cpp``): ``TORCH_LIBRARY(cast_rs, ...)``
schemas and CPU / CUDA kernels that call the Rust entry points, registered when the extension
(``cast_rs._cast_rs``) loads. They are ordinary dispatcher operators, callable from Python
(``torch.ops.cast_rs.*``), TorchScript and C++, and traced by ``torch.compile`` /
``torch.export`` through the fake implementations below (shapes and dtypes only, no data).

==========================  =====================================================  =========
operator                    schema (abridged)                                       autograd
==========================  =====================================================  =========
``nm_mask``                 ``(Tensor x, int n, int m, int dim=-1) -> Tensor``      none (bool)
``nm_mask_packed``          ``(Tensor x, int n, int m, int dim=-1) -> Tensor``      none
``unpack_mask``             ``(Tensor bits, int[] shape) -> Tensor``                none
``scale_forward``           ``(Tensor weight, Tensor scale, int groups, int dim)``  yes
``scale_backward``          ``(Tensor grad, Tensor weight, Tensor scale, ...)``     --
``adams_step_``             mutates params, exp_avgs, exp_avg_sqs, masks, steps     --
``nm_compress``             ``(Tensor weight, int n, int m) -> (values, index)``    none
``nm_decompress``           ``(Tensor values, Tensor index, int rows, ...)``        none
``nm_linear``               ``(Tensor input, Tensor values, Tensor index, ...)``    none
==========================  =====================================================  =========

The last three (CPU only) are the compressed N:M layers of ``cast_rs.inference``.

Every operator also takes ``force_generic: bool = False`` (the tests' way to run the generic
path on CPU). ``adams_step_`` takes the per-parameter patterns flat, ``(n, m, dim)`` each with
``n = 0`` for a dense parameter, and returns an ``int64`` tensor of mask flips per parameter
(``-1`` where the mask was not refreshed).

Eager calls from the Python API go to the same Rust entry points through pyo3 directly,
which costs less per call than the dispatcher (``./run bench ops`` prints both); errors and
numbers are the same on both routes because the Rust side owns every check.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

from . import _cast_rs  # noqa: F401  (loading the extension registers the C++ operators)
from ._cast_rs import CastError

ops = torch.ops.cast_rs


def _group_size_check(x: torch.Tensor, m: int, dim: int) -> None:
    if x.dim() == 0:
        raise ValueError("x: N:M groups need a tensor with at least one dimension, got a 0-d tensor")
    size = x.shape[dim]
    if size % m:
        raise ValueError(f"x: the group dimension (dim {dim}, size {size}) is not divisible by M={m}")


@torch.library.register_fake("cast_rs::nm_mask")
def _nm_mask_fake(x: torch.Tensor, n: int, m: int, dim: int = -1, force_generic: bool = False) -> torch.Tensor:
    _group_size_check(x, m, dim)
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)


@torch.library.register_fake("cast_rs::nm_mask_packed")
def _nm_mask_packed_fake(x: torch.Tensor, n: int, m: int, dim: int = -1, force_generic: bool = False) -> torch.Tensor:
    _group_size_check(x, m, dim)
    return torch.empty(((x.numel() + 7) // 8,), dtype=torch.uint8, device=x.device)


@torch.library.register_fake("cast_rs::unpack_mask")
def _unpack_mask_fake(bits: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=torch.bool, device=bits.device)


@torch.library.register_fake("cast_rs::scale_forward")
def _scale_forward_fake(
    weight: torch.Tensor, scale: torch.Tensor, groups: int, dim: int = -1, force_generic: bool = False
) -> torch.Tensor:
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


@torch.library.register_fake("cast_rs::scale_backward")
def _scale_backward_fake(
    grad: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int, dim: int = -1, force_generic: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.empty(weight.shape, dtype=weight.dtype, device=weight.device),
        torch.empty(scale.shape, dtype=scale.dtype, device=scale.device),
    )


@torch.library.register_fake("cast_rs::adams_step_")
def _adams_step_fake(
    params: List[torch.Tensor],
    grads: List[torch.Tensor],
    exp_avgs: List[torch.Tensor],
    exp_avg_sqs: List[torch.Tensor],
    masks: List[Optional[torch.Tensor]],
    patterns: List[int],
    steps: List[torch.Tensor],
    **scalars: Any,
) -> torch.Tensor:
    return torch.empty((len(params),), dtype=torch.int64)


#: Output rows per block of the compressed layout (``src/nm_linear``'s ``ROW_BLOCK``).
ROW_BLOCK = 16


def layout_sizes(out_features: int, in_features: int, n: int, m: int) -> Tuple[int, int]:
    """(values length, index length in int32 words) of the compressed layout."""
    if not (2 <= m <= 8 and 1 <= n < m):
        raise CastError(f"pattern: expected N:M with 1 <= N < M <= 8, got {n}:{m}")
    if in_features % m:
        raise CastError(f"in_features: {in_features} is not a multiple of M = {m}")
    blocks = -(-out_features // ROW_BLOCK)
    kept = in_features // m * n
    words_per_slot = ROW_BLOCK * (2 if m <= 4 else 4) // 32
    return blocks * kept * ROW_BLOCK, blocks * kept * words_per_slot


@torch.library.register_fake("cast_rs::nm_compress")
def _nm_compress_fake(weight: torch.Tensor, n: int, m: int) -> Tuple[torch.Tensor, torch.Tensor]:
    values_len, index_len = layout_sizes(weight.shape[0], weight.shape[1], n, m)
    return (
        torch.empty((values_len,), dtype=weight.dtype, device=weight.device),
        torch.empty((index_len,), dtype=torch.int32, device=weight.device),
    )


@torch.library.register_fake("cast_rs::nm_decompress")
def _nm_decompress_fake(values: torch.Tensor, index: torch.Tensor, rows: int, cols: int, n: int, m: int) -> torch.Tensor:
    return torch.empty((rows, cols), dtype=values.dtype, device=values.device)


@torch.library.register_fake("cast_rs::nm_linear")
def _nm_linear_fake(
    input: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor,
    bias: Optional[torch.Tensor],
    rows: int,
    cols: int,
    n: int,
    m: int,
) -> torch.Tensor:
    if input.shape[-1] != cols:
        raise ValueError(f"input: expected a last dimension of {cols} (in_features), got shape {tuple(input.shape)}")
    return input.new_empty((*input.shape[:-1], rows))


def _scale_setup_context(ctx: Any, inputs: Tuple[Any, ...], output: torch.Tensor) -> None:
    weight, scale, groups, dim, force_generic = inputs
    ctx.save_for_backward(weight, scale)
    ctx.groups, ctx.dim, ctx.force_generic = groups, dim, force_generic


def input_grads(ctx: Any, grad_w: torch.Tensor, grad_a: torch.Tensor) -> Tuple[Any, ...]:
    """Autograd's answer for the inputs (weight, scale, groups, dim, force_generic)."""
    return (grad_w if ctx.needs_input_grad[0] else None, grad_a if ctx.needs_input_grad[1] else None, None, None, None)


def _scale_backward(ctx: Any, grad: torch.Tensor) -> Tuple[Any, ...]:
    weight, scale = ctx.saved_tensors
    grad_w, grad_a = ops.scale_backward(grad, weight, scale, ctx.groups, ctx.dim, ctx.force_generic)
    return input_grads(ctx, grad_w, grad_a)


torch.library.register_autograd("cast_rs::scale_forward", _scale_backward, setup_context=_scale_setup_context)
