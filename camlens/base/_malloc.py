"""glibc allocator settings for tensor work on CPU, applied by camlens' own processes (the CLI, the
web app), never by ``import camlens``.

glibc serves allocations above ``M_MMAP_THRESHOLD`` (128 KiB at start, adjusted upwards as large
blocks are freed) with fresh ``mmap`` pages, and returns free heap tops above ``M_TRIM_THRESHOLD``
to the kernel. A CNN forward allocates and frees activations of several MiB each: as fresh pages
every time, each one page-faults and is zeroed by the kernel. How often that happens depends on
what the process did before (the dynamic threshold), which made the same forward 1× or 2× as fast
on this project's 2-core CI machine (EfficientNet-Lite0, batch 16: 42 vs 88 images/s, the second
after one forward with gradients). Fixing the thresholds — buffers up to 32 MiB (glibc's maximum)
come from the heap, and up to 256 MiB of freed heap is kept — makes it the fast case from the
start: ``camlens explain DIR`` (500 photos, batch 16) 36.5–39.9 → 47.6–49.7 images/s in three
pairs of runs, peak RSS 1.33 → 1.40–1.53 GB.

A user's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (or ``CAMLENS_MALLOC=default``)
is respected: nothing is changed then. Not glibc (macOS, Windows, musl): nothing to do.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # the largest value glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 256 * 2**20
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def tune_malloc() -> bool:
    """Set glibc's mmap and trim thresholds for tensor work (see the module docstring). Returns
    whether they were set (``False``: not glibc, or the user chose their own settings)."""
    if os.environ.get("CAMLENS_MALLOC", "").lower() == "default" or any(k in os.environ for k in USER_SETTINGS):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def tuned_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ``os.environ``) with the same settings as environment variables, for child
    processes that should allocate as camlens does (benchmarks); the user's own settings win."""
    out = dict(os.environ if env is None else env)
    if out.get("CAMLENS_MALLOC", "").lower() == "default" or any(k in out for k in USER_SETTINGS):
        return out
    out["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    out["MALLOC_TRIM_THRESHOLD_"] = str(TRIM_THRESHOLD)
    return out


__all__ = ["tune_malloc", "tuned_env"]
