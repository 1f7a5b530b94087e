"""Peak resident memory of this process, for the benchmarks that report it (Linux; imports no
torch, so that a llama.cpp timing child stays free of it)."""

from __future__ import annotations

import gc


def reset_peak_rss() -> None:
    """Free what can be freed, return it to the OS, and reset the kernel's peak-RSS counter
    (Linux: clear_refs 5), so that VmHWM is the peak from here on."""
    gc.collect()
    try:  # return the freed heap pages to the OS (glibc keeps them resident otherwise)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Bytes: VmHWM, this process's peak resident set since start or the last
    :func:`reset_peak_rss` (getrusage's ru_maxrss, the fallback off Linux, cannot be reset and
    carries a parent's peak over a fork + exec)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    return rss
