"""Process memory for long streaming runs: keep glibc's heap from hoarding freed tiles.

A streamed run allocates and frees the same large buffers (a tile, a batch of patches, the
activations of a forward pass) thousands of times from several threads.  Left alone, glibc
(1) raises its mmap threshold to the largest block freed so far, (2) gives each thread an arena
of its own, and (3) keeps freed memory for reuse; on the 4.4 GB benchmark scene this held
300-700 MB beyond what was in use.  Returning every freed block to the system instead costs a
page fault per page on the next allocation (a fifth to a half of MambaHSI's speed on CPU).
So: blocks up to 32 MB stay on a heap shared by two arenas, and the heap is trimmed between
batches only when its free memory passes a bound (README, "Streaming inference").  glibc reads
the same settings from MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ / MALLOC_ARENA_MAX, which
win when set.  Python has no binding for mallopt or mallinfo2, hence the few lines of ctypes here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MIB = 2**20
SETTINGS = (  # (mallopt option, environment variable that overrides it, value)
    (M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", 32 * MIB),
    (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", 1024 * MIB),  # trimming is ours, below
    (M_ARENA_MAX, "MALLOC_ARENA_MAX", 2),
)
FREE_HEAP_BOUND = 256 * MIB  # trim once this much heap sits free


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


_libc: ctypes.CDLL | bool | None = False


def _glibc() -> ctypes.CDLL | None:
    """glibc with mallopt/malloc_trim/mallinfo2 (2.33+), else None."""
    global _libc
    if _libc is False:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.mallinfo2.restype = _MallInfo2
            lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc = lib
        except (OSError, AttributeError):
            _libc = None
    return _libc


def bound_heap() -> bool:
    """Apply SETTINGS to this process (idempotent); False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    for option, env, value in SETTINGS:
        if env not in os.environ:
            libc.mallopt(option, value)
    return True


def free_heap_bytes() -> int:
    """Bytes the heap holds free (all arenas), 0 where unknown."""
    libc = _glibc()
    return 0 if libc is None else int(libc.mallinfo2().fordblks)


def release_free_heap(bound: int = FREE_HEAP_BOUND) -> bool:
    """Give free heap pages back to the system when more than `bound` bytes sit free; called
    between batches.  True when it trimmed."""
    libc = _glibc()
    if libc is None or free_heap_bytes() <= bound:
        return False
    libc.malloc_trim(0)
    return True


def _status_mib(field: str) -> float | None:
    """A memory field of /proc/self/status (Linux) in MiB; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far (Linux), for summaries and benchmarks."""
    return _status_mib("VmHWM")


def rss_mib() -> float | None:
    """This process's resident memory now (Linux)."""
    return _status_mib("VmRSS")


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory to its current size (Linux 4.0+, writing 5 to
    /proc/self/clear_refs), so the next `peak_rss_mib` covers only what ran since; False where
    that cannot be done (the peak then covers the whole process)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
