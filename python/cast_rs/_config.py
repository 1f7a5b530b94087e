"""Process-wide switches of the kernel layer.

The only one today selects the kernel path. Every kernel has a CPU fast path (contiguous
tensors as raw slices, parallel, GIL released: float32 for every kernel, also bf16/fp16 for
the AdamS step and float64 for weight scaling) and a generic path built from tensor ops that
runs for any dtype, strides and device. Forcing the generic path is how the test
suite proves that both give the same numbers on CPU; users never need it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

_force_generic: bool = os.environ.get("CAST_RS_FORCE_GENERIC", "") not in ("", "0")


def generic_path_forced() -> bool:
    """True when every kernel call takes the generic (tensor-op) path."""
    return _force_generic


@contextlib.contextmanager
def force_generic_path(enabled: bool = True) -> Iterator[None]:
    """Within the block, run every kernel on the generic path (``enabled=True``).

    Also settable for a whole process with the environment variable
    ``CAST_RS_FORCE_GENERIC=1``.
    """
    global _force_generic
    previous = _force_generic
    _force_generic = bool(enabled)
    try:
        yield
    finally:
        _force_generic = previous
