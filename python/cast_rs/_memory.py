"""Memory for compressed weights: 2 MiB pages where Linux hands them out.

A compressed layer's decoding call is one pass over its values, so its speed is the rate at
which a core streams memory. With 4 KiB pages that stream takes a TLB miss every 4 KiB, and on
some CPUs (measured on a Xeon with 480 MiB of L3) the page walks cost the (4096, 4096) float32
layer about 8 % of its rate at batch 1 (14.4 GB/s against 15.6 GB/s with 2 MiB pages, one
thread; torch's dense ``F.linear`` read 16.0 GB/s either way). So :class:`cast_rs.NMLinear`
allocates its ``values`` and ``index`` buffers here: an anonymous mapping advised with
``MADV_HUGEPAGE``, the tensor starting on a 2 MiB boundary, so the kernel backs it with
transparent huge pages when the layer is filled (the pages are untouched until then).

Only on Linux with transparent huge pages in ``always`` or ``madvise`` mode, for buffers of
at least 2 MiB, on the CPU as the default device; ``CAST_RS_NO_HUGEPAGES=1`` turns it off.
Everything else gets ``torch.zeros``. The tensor owns its mapping (``torch.frombuffer`` keeps
it alive; it is unmapped when the tensor is freed); copies (``clone``, ``deepcopy``,
``torch.save``/``load``) are ordinary tensors.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys

import torch

#: The size of a transparent huge page on x86-64 and of the alignment the mapping gets.
HUGE_PAGE = 2 << 20

_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode() -> str:
    """The bracketed word of the THP ``enabled`` file (``always``, ``madvise``, ``never``), or
    ``""`` when it cannot be read."""
    try:
        with open(_THP_ENABLED) as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


@functools.lru_cache(maxsize=None)
def huge_pages_available() -> bool:
    """Whether :func:`zeros` maps its large buffers for huge pages here (see the module doc)."""
    if os.environ.get("CAST_RS_NO_HUGEPAGES", "") not in ("", "0"):
        return False
    return sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE") and _thp_mode() in ("always", "madvise")


def zeros(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A 1-d tensor of ``numel`` zeros of ``dtype``: for at least 2 MiB on the CPU where
    :func:`huge_pages_available`, in its own mapping advised for huge pages, starting on a
    2 MiB boundary; otherwise ``torch.zeros``."""
    nbytes = numel * dtype.itemsize
    if nbytes < HUGE_PAGE or not huge_pages_available() or torch.get_default_device().type != "cpu":
        return torch.zeros(numel, dtype=dtype)
    size = nbytes + HUGE_PAGE
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # The mapping's address (the ctypes view is dropped at once: it would pin the mapping).
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    offset = -address % HUGE_PAGE
    try:
        buf.madvise(mmap.MADV_HUGEPAGE, offset, size - offset)
    except OSError:
        # A kernel that refuses the advice still gives ordinary (zeroed) pages.
        pass
    # Anonymous pages read as zeros: nothing to fill.
    return torch.frombuffer(buf, dtype=dtype, count=numel, offset=offset)


def copy_of(t: torch.Tensor) -> torch.Tensor:
    """A 1-d CPU tensor ``t`` copied into :func:`zeros`' memory; ``t`` itself elsewhere."""
    if t.device.type != "cpu":
        return t
    return zeros(t.numel(), t.dtype).copy_(t.reshape(-1))
