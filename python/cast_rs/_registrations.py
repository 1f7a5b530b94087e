"""The Python half of the cast-rs PyTorch operators: their fake (meta) implementations.

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
``scale_forward``           ``(Tensor weight, Tensor scale, int groups, int dim)``  yes (C++)
``scale_backward``          ``(Tensor grad, Tensor weight, Tensor scale, ...)``     --
``adams_step_``             mutates params, exp_avgs, exp_avg_sqs, masks, steps,   --
                            keep_cache
``nm_compress``             ``(Tensor weight, int n, int m) -> (values, index)``    none
``nm_compress_int8``        ``(Tensor weight, int n, int m) -> (values, index,``    none
                            ``scales)``
``nm_decompress``           ``(Tensor values, Tensor index, int rows, ...,``        none
                            ``Tensor? scales=None)``
``nm_linear``               ``(Tensor input, Tensor values, Tensor index, ...,``    none
                            ``Tensor? scales=None)``
==========================  =====================================================  =========

The last four (CPU only) are the compressed N:M layers of ``cast_rs.inference``; int8 values
come with one float32 scale per output row (``scales``), float values with none.

Every operator also takes ``force_generic: bool = False`` (the tests' way to run the generic
path on CPU). ``adams_step_`` takes the per-parameter patterns flat, ``(n, m, dim)`` each with
``n = 0`` for a dense parameter, and the generic path's cache of unpacked masks (``keep_cache``:
``[]``, or one entry per parameter: ``None``, or a tensor the operator fills in place, empty for
none cached); it returns an ``int64`` tensor of mask flips per parameter (``-1`` where the mask
was not refreshed) and a ``bool`` tensor: stepped by the fast path.

The Python API calls these operators and nothing else for its kernels, in eager mode too (as
torchvision does): one route, so one set of numbers and one error per mistake (the Rust side
owns every check and builds the exception, see ``src/capi.rs``).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

from . import _cast_rs  # noqa: F401  (loading the extension registers the C++ operators)
from ._cast_rs import CastError

ops = torch.ops.cast_rs


# The fake kernels give shapes and dtypes only and check nothing: every rule is the Rust
# side's, which the real kernel applies when a compiled graph runs, so a mistake raises the
# same exception, with the same fields, compiled or not.


def _result_device(*tensors: torch.Tensor) -> torch.device:
    """The first input's device, or meta when any input is a meta tensor: this kernel also runs
    for real calls that reach the Meta key (a meta tensor among real ones), whose results must
    be meta tensors, not uninitialised memory on another device."""
    if any(t.device.type == "meta" for t in tensors):
        return torch.device("meta")
    return tensors[0].device


@torch.library.register_fake("cast_rs::nm_mask")
def _nm_mask_fake(x: torch.Tensor, n: int, m: int, dim: int = -1, force_generic: bool = False) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.bool, device=x.device)


@torch.library.register_fake("cast_rs::nm_mask_packed")
def _nm_mask_packed_fake(x: torch.Tensor, n: int, m: int, dim: int = -1, force_generic: bool = False) -> torch.Tensor:
    return torch.empty(((x.numel() + 7) // 8,), dtype=torch.uint8, device=x.device)


@torch.library.register_fake("cast_rs::unpack_mask")
def _unpack_mask_fake(bits: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=torch.bool, device=bits.device)


@torch.library.register_fake("cast_rs::scale_forward")
def _scale_forward_fake(
    weight: torch.Tensor, scale: torch.Tensor, groups: int, dim: int = -1, force_generic: bool = False
) -> torch.Tensor:
    return torch.empty(weight.shape, dtype=weight.dtype, device=_result_device(weight, scale))


@torch.library.register_fake("cast_rs::scale_backward")
def _scale_backward_fake(
    grad: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, groups: int, dim: int = -1, force_generic: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    device = _result_device(grad, weight, scale)
    return (
        torch.empty(weight.shape, dtype=weight.dtype, device=device),
        torch.empty(scale.shape, dtype=scale.dtype, device=device),
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
    keep_cache: List[Optional[torch.Tensor]],
    **scalars: Any,
) -> Tuple[torch.Tensor, torch.Tensor]:
    k = len(params)
    return torch.empty((k,), dtype=torch.int64), torch.empty((k,), dtype=torch.bool)


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


@torch.library.register_fake("cast_rs::nm_compress_int8")
def _nm_compress_int8_fake(weight: torch.Tensor, n: int, m: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values_len, index_len = layout_sizes(weight.shape[0], weight.shape[1], n, m)
    return (
        torch.empty((values_len,), dtype=torch.int8, device=weight.device),
        torch.empty((index_len,), dtype=torch.int32, device=weight.device),
        torch.empty((weight.shape[0],), dtype=torch.float32, device=weight.device),
    )


@torch.library.register_fake("cast_rs::nm_decompress")
def _nm_decompress_fake(
    values: torch.Tensor, index: torch.Tensor, rows: int, cols: int, n: int, m: int, scales: Optional[torch.Tensor] = None
) -> torch.Tensor:
    # int8 values with their scales give the dequantized float32 weight.
    dtype = values.dtype if scales is None else torch.float32
    return torch.empty((rows, cols), dtype=dtype, device=values.device)


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
    scales: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], rows))
