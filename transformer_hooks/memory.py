"""The process's heap: hand freed memory back to the OS (after loading), or keep it for
reuse (when every forward stores gigabytes of activations).

glibc serves each block of 128 KiB or more with its own ``mmap`` and unmaps it on
``free``, so a tensor allocated again after being freed is fresh memory: the kernel
faults it in 4 KiB at a time, zero-filling every page. Caching every site of
SmolLM2-135M at 1 x 1024 tokens stores 3.5 GB per forward, about 900k page faults; in a
VM that is half the run's CPU time (see ``benchmarks/RESULTS.md``). ``keep_freed_memory()``
tells glibc to keep freed blocks on its heap instead, so the next run reuses pages
that are already mapped. On other C libraries and systems these functions do nothing.

``run_with_cache`` turns this on the first time it runs (``keep_freed_memory_by_default``),
unless the process already chose: ``keep_freed_memory(False)`` called before (or at any
time after, which also restores glibc's thresholds), ``TRANSFORMER_HOOKS_KEEP_FREED_MEMORY=0``
in the environment, or glibc's own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
set. The cost is memory held, not memory lost: after a cache is deleted the resident set
stays at its peak (freed heap is never trimmed automatically), and that memory serves the
next cache instead of being faulted in again; ``return_freed_memory()`` hands it back on
demand. (A bounded amount does not work: glibc's ``mallopt`` takes an int, so the largest
finite trim threshold is 2 GiB, and once the free top of the heap passes it glibc returns
all of it: a 3.5 GB cache was faulted in afresh on every call.) Reuse never touches a live tensor: the allocator
only hands out blocks that were freed, so a cache the user holds is never overwritten.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from typing import Any

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024


def _glibc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (glibc has both; musl has neither)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()
OPT_OUT_VARIABLE = "TRANSFORMER_HOOKS_KEEP_FREED_MEMORY"  # "0": run_with_cache leaves glibc's defaults alone
_GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_chosen = False  # the process chose (a call of keep_freed_memory, or the default applied once)


def return_freed_memory() -> None:
    """Hand the heap pages freed so far back to the OS (glibc's ``malloc_trim``)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def keep_freed_memory(keep: bool = True) -> bool:
    """Let glibc keep freed memory for reuse (``keep=False`` restores its 128 KiB thresholds).

    Affects the whole process, as ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
    do (set those before Python starts for the same effect): blocks up to 1 GiB come from
    the heap, and free heap is kept instead of being returned (``return_freed_memory()``
    returns it on demand). The resident set then stays at its peak after a large cache is
    deleted; that memory serves the next one. Returns whether the setting took effect (False without glibc).
    """
    global _chosen
    _chosen = True
    if _LIBC is None:
        warnings.warn("keep_freed_memory: this process does not use glibc's malloc; nothing was changed", stacklevel=2)
        return False
    return _set_thresholds(keep)


def keep_freed_memory_by_default() -> bool:
    """``keep_freed_memory()``, once per process, unless the process chose otherwise (see the
    module docstring): what ``run_with_cache`` calls. Returns whether freed memory is now kept
    by this call."""
    global _chosen
    if _chosen:
        return False
    _chosen = True
    if _LIBC is None or os.environ.get(OPT_OUT_VARIABLE, "1") == "0" or any(v in os.environ for v in _GLIBC_VARIABLES):
        return False
    return _set_thresholds(True)


def _set_thresholds(keep: bool) -> bool:
    # -1 as mallopt's int is SIZE_MAX as glibc's size_t threshold: never trim on free.
    mmap_threshold, trim_threshold = (1 << 30, -1) if keep else (_GLIBC_DEFAULT_THRESHOLD,) * 2
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        _LIBC.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )
