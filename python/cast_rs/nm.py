"""N:M patterns and masks.

An N:M mask keeps, in every group of M consecutive weights along the group dimension, the N
of largest magnitude. Rules (identical on every kernel path):

* NaN counts as larger than any number (±inf included); all NaNs tie.
* ``-0.0`` and ``+0.0`` tie.
* Ties go to the lower index along the group dimension, so every group keeps exactly N.

The group dimension is the last one (``nn.Linear`` weights are ``[out, in]``: groups run
along the input dimension) or dimension 0 (GPT-2 ``Conv1D`` stores ``[in, out]``).
"""

from __future__ import annotations

import functools
import numbers
import re
from typing import Any, Optional, Tuple, Union, overload

import numpy as np
import torch

from . import _cast_rs
from ._registrations import ops
from ._tensor_args import check_plain_tensor, tracing
from ._config import generic_path_forced

Pattern = Union[str, Tuple[int, int]]

_PATTERN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")

#: Largest supported group size M (defined once, in the Rust core: ``nm::MAX_M``).
MAX_M: int = _cast_rs.MAX_M

# The operator overload itself: skips the packet's overload resolution on every call.
_NM_MASK = ops.nm_mask.default


@functools.lru_cache(maxsize=64)
def _parsed(pattern: str) -> Tuple[int, int]:
    """:func:`parse_pattern` of a string, remembered (a mask call on a small tensor costs a few
    microseconds, of which the pattern's regular expression was a fifth)."""
    return parse_pattern(pattern)


def parse_pattern(pattern: Any, *, param: str = "pattern") -> Tuple[int, int]:
    """Turn ``"N:M"`` or ``(N, M)`` into a validated ``(n, m)`` with ``1 <= N < M <= 32``.

    Raises ``TypeError`` for anything that is not a string or a pair of ints and
    ``ValueError`` for a pattern outside that range (``"4:4"``, ``"0:4"``, ``"5:4"``).
    """
    if isinstance(pattern, str):
        match = _PATTERN_RE.match(pattern)
        if match is None:
            raise ValueError(f'{param}: expected a string like "2:4" (N:M), got {pattern!r}')
        n, m = int(match.group(1)), int(match.group(2))
    elif (
        isinstance(pattern, (tuple, list))
        and len(pattern) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) for v in pattern)
    ):
        n, m = int(pattern[0]), int(pattern[1])
    else:
        raise TypeError(f'{param}: expected "N:M" or a pair of ints (N, M), got {pattern!r}')
    if not 2 <= m <= MAX_M:
        raise ValueError(f"{param}: M must be in 2..{MAX_M}, got {n}:{m}")
    if not 1 <= n < m:
        raise ValueError(f"{param}: N must satisfy 1 <= N < M (N = M keeps everything), got {n}:{m}")
    return n, m


def format_pattern(nm: Tuple[int, int]) -> str:
    return f"{nm[0]}:{nm[1]}"


def _normalize_dim(dim: int, ndim: int, param: str = "dim") -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{param}: expected an int, got {dim!r}")
    if ndim == 0:
        raise ValueError("x: N:M groups need a tensor with at least one dimension, got a 0-d tensor")
    d = dim + ndim if dim < 0 else dim
    if d not in (0, ndim - 1):
        raise ValueError(f"{param}: groups run along the first or the last dimension; got dim={dim} for a {ndim}-d tensor")
    return -1 if d == ndim - 1 else 0


@overload
def nm_mask(x: torch.Tensor, pattern: Pattern = ..., dim: int = ...) -> torch.Tensor: ...
@overload
def nm_mask(x: np.ndarray, pattern: Pattern = ..., dim: int = ...) -> np.ndarray: ...


def nm_mask(x: Union[torch.Tensor, np.ndarray], pattern: Pattern = "2:4", dim: int = -1) -> Union[torch.Tensor, np.ndarray]:
    """Boolean N:M mask of ``x``: True for the N largest-magnitude weights of each group.

    Args:
        x: a floating-point ``torch.Tensor`` (any device, dtype and strides) or a numpy array
            (float16/32/64, or integers, which are compared as float64).
        pattern: ``"N:M"`` or ``(N, M)``, ``1 <= N < M <= 32``.
        dim: the group dimension: ``-1`` (last, default) or ``0``.

    Returns:
        A bool tensor / array of the same shape (and device) with exactly N True per group.

    Raises:
        ValueError: bad pattern, ``dim`` not first/last, or the group dimension not divisible by M.
        TypeError: ``x`` is neither a tensor nor an array, or has a non-floating dtype.
    """
    n, m = _parsed(pattern) if type(pattern) is str else parse_pattern(pattern)
    if isinstance(x, torch.Tensor):
        d = _normalize_dim(dim, x.dim())
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
        # A plain tensor is never a tracer's (those are subclasses), so the common eager call
        # skips asking whether something is being traced.
        if type(x) is not torch.Tensor and type(x) is not torch.nn.Parameter and not tracing(x):
            check_plain_tensor(x, "x")
        # The operator has no autograd formula (a mask has no gradient): detach what tracks one.
        return _NM_MASK(x.detach() if x.requires_grad else x, n, m, d, generic_path_forced())
    if isinstance(x, np.ndarray):
        d = _normalize_dim(dim, x.ndim)
        if x.dtype == np.float16:
            arr = x.astype(np.float32)  # exact: every float16 is a float32
        elif x.dtype in (np.float32, np.float64):
            arr = x
        elif np.issubdtype(x.dtype, np.integer):
            arr = x.astype(np.float64)
        else:
            raise TypeError(f"x: expected a float or integer numpy array, got dtype {x.dtype}")
        # The same operator on a tensor view of the array's memory.
        return _NM_MASK(torch.from_numpy(np.ascontiguousarray(arr)), n, m, d, False).numpy()
    raise TypeError(f"x: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def nm_mask_packed(x: torch.Tensor, pattern: Pattern = "2:4", dim: int = -1) -> torch.Tensor:
    """The N:M mask of ``x`` packed one bit per weight (``uint8``, ``ceil(numel/8)`` bytes).

    Bit ``i % 8`` (least significant first) of byte ``i // 8`` is the weight at row-major index
    ``i`` (``x.reshape(-1)[i]``). This is the form ``AdamS`` keeps in its state.
    """
    n, m = parse_pattern(pattern)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    check_plain_tensor(x, "x")
    d = _normalize_dim(dim, x.dim())
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
    return ops.nm_mask_packed.default(x.detach(), n, m, d, generic_path_forced())


def unpack_mask(bits: torch.Tensor, shape: Union[torch.Size, Tuple[int, ...]]) -> torch.Tensor:
    """Inverse of :func:`nm_mask_packed`: a bool tensor of ``shape`` on ``bits.device``."""
    if not isinstance(bits, torch.Tensor):
        raise TypeError(f"bits: expected a torch.Tensor, got {type(bits).__name__}")
    check_plain_tensor(bits, "bits")
    return ops.unpack_mask.default(bits, list(shape))


def group_dim_size(shape: Tuple[int, ...], dim: int) -> Optional[int]:
    """Size of the group dimension (``dim`` is -1 or 0), None for a 0-d shape."""
    if len(shape) == 0:
        return None
    return shape[-1] if dim == -1 else shape[0]
