"""Process memory for long streaming runs: keep glibc's heap from hoarding freed tiles.

A streamed run allocates and frees the same large buffers (a tile, a batch of patches, the
activations of a forward pass) thousands of times from several threads.  Left alone, glibc
(1) raises its mmap threshold to the largest block freed so far, (2) gives each thread an arena
of its own, and (3) keeps freed memory for reuse; on the 4.4 GB benchmark scene this held
300-700 MB beyond what was in use.  Returning every freed block to the system instead costs a
page fault per page on the next allocation (a fifth to a half of MambaHSI's speed on CPU).
So: blocks up to 32 MB stay on a heap shared by two arenas, and the heap is trimmed between
batches only when its free memory passes a bound and, in a run with a memory budget, resident
memory passes what the budget leaves for it (README, "Streaming inference").  32 MB is the most
glibc's mmap threshold can be raised to; a run whose larger blocks come back every call
(MambaHSI's tiles) keeps those on the heap too (`large_blocks`: M_MMAP_MAX = 0), or each is
mapped afresh and page-faulted every time (a 128 x 128 MambaHSI tile in ONNX Runtime: 33,800
faults and 295-304 ms a call; without them 223-232 ms).  A thread's own arena still maps a block
larger than its 64 MB heap.  glibc reads the same settings from MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_ / MALLOC_ARENA_MAX / MALLOC_MMAP_MAX_, which win when set.  Python has
no binding for mallopt or mallinfo2, hence the few lines of ctypes here.
glibc before 2.33 (JetPack 5 has 2.31) lacks mallinfo2: mallinfo serves instead, and without
either the heap is trimmed on resident-memory growth; `heap_warning` says what is off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8
MIB = 2**20
SETTINGS = (  # (mallopt option, environment variable that overrides it, value)
    (M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", 32 * MIB),
    (M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_", 1024 * MIB),  # trimming is ours, below
    (M_ARENA_MAX, "MALLOC_ARENA_MAX", 2),
)
MMAP_MAX_DEFAULT = 65536  # glibc's own: blocks over the threshold are mapped on their own
FREE_HEAP_BOUND = 256 * MIB  # trim once this much heap sits free
MALLINFO_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                   "fordblks", "keepcost")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in MALLINFO_FIELDS]


class _MallInfo(ctypes.Structure):
    # glibc's fields are int; read as unsigned they are exact up to 4 GiB (then they wrap)
    _fields_ = [(name, ctypes.c_uint) for name in MALLINFO_FIELDS]


@dataclass(frozen=True)
class Heap:
    """glibc's heap controls as found in this process's C library."""

    lib: Any  # has mallopt and malloc_trim
    free_bytes: Callable[[], int] | None  # free heap bytes by mallinfo2 (2.33+) or mallinfo; None: neither
    source: str  # "mallinfo2", "mallinfo" or "" (trimming then follows resident-memory growth)


def open_heap(lib: Any) -> Heap | None:
    """The heap controls `lib` offers; None without mallopt / malloc_trim (not glibc)."""
    try:
        lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
    except AttributeError:
        return None
    for name, struct in (("mallinfo2", _MallInfo2), ("mallinfo", _MallInfo)):
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype = struct
            return Heap(lib, lambda fn=fn: int(fn().fordblks), name)
    return Heap(lib, None, "")


_heap: Heap | bool | None = False
_trimmed_at_rss: float | None = None  # resident MiB after the last trim (when no mallinfo)


def _glibc_heap() -> Heap | None:
    """This process's heap controls (looked up once), None where the C library is not glibc."""
    global _heap
    if _heap is False:
        try:
            _heap = open_heap(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"))
        except OSError:
            _heap = None
    return _heap  # type: ignore[return-value]


def heap_warning() -> str | None:
    """One line saying what of the heap bounding is off here, None when all of it works."""
    heap = _glibc_heap()
    if heap is None:
        return ("heap bounding is off: the C library is not glibc (no mallopt / malloc_trim), so freed "
                "tiles may stay resident and memory can grow past the budget on long runs")
    if heap.free_bytes is None:
        return ("this glibc has neither mallinfo2 nor mallinfo: the free heap is trimmed when resident "
                f"memory has grown by {FREE_HEAP_BOUND // MIB} MiB instead of when it sits free")
    return None


def bound_heap(large_blocks: bool = False) -> bool:
    """Apply SETTINGS to this process (idempotent); with `large_blocks`, blocks over 32 MB stay
    on the heap too (until then, and after a call without it, glibc maps each on its own).
    False where the C library is not glibc."""
    heap = _glibc_heap()
    if heap is None:
        return False
    mmap_max = (M_MMAP_MAX, "MALLOC_MMAP_MAX_", 0 if large_blocks else MMAP_MAX_DEFAULT)
    for option, env, value in (*SETTINGS, mmap_max):
        if env not in os.environ:
            heap.lib.mallopt(option, value)
    return True


def free_heap_bytes() -> int | None:
    """Bytes the heap holds free (all arenas); None where glibc cannot say."""
    heap = _glibc_heap()
    return None if heap is None or heap.free_bytes is None else heap.free_bytes()


def release_free_heap(bound: int = FREE_HEAP_BOUND, within_mib: float | None = None) -> bool:
    """Give free heap pages back to the system when more than `bound` bytes sit free (where
    glibc cannot say, when resident memory grew by `bound` since the last trim); called between
    batches.  True when it trimmed.

    With `within_mib` (what a run's memory budget leaves for kept heap: hsiedge.infer.policy.
    kept_heap_mib), nothing is given back while resident memory is at most that: the free pages
    are the last tile's tensors, which the next tile takes again, and pages given back cost a
    fault each when it does (MambaHSI in ONNX Runtime, 610 x 340 mosaic, 128 x 128 tiles:
    0.5-0.7 M page faults and 21-25 k px/s trimmed at 256 MiB free, 0.13 M and 35-37 k kept up
    to 900 MiB, peaks 543-638 against 623-650 MiB)."""
    global _trimmed_at_rss
    heap = _glibc_heap()
    if heap is None:
        return False
    if within_mib is not None and (now := rss_mib()) is not None and now <= within_mib:
        return False
    if heap.free_bytes is not None:
        if heap.free_bytes() <= bound:
            return False
        heap.lib.malloc_trim(0)
        return True
    rss = rss_mib()
    if rss is None:
        return False
    if _trimmed_at_rss is None or rss < _trimmed_at_rss:  # the baseline: the lowest since a trim
        _trimmed_at_rss = rss
    if (rss - _trimmed_at_rss) * MIB <= bound:
        return False
    heap.lib.malloc_trim(0)
    _trimmed_at_rss = rss_mib()
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
