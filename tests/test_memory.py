"""hsiedge.memory: glibc heap settings for streamed runs, trimming between tiles, peak RSS."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hsiedge import memory

pytestmark = pytest.mark.skipif(memory._glibc_heap() is None or not Path("/proc/self/status").exists(),
                                reason="needs glibc and /proc (Linux)")


def run_python(code: str, env: dict[str, str] | None = None) -> str:
    """Run `code` in a fresh interpreter (heap settings are per process); its stdout."""
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    full_env.update(env or {})
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=full_env, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


HEAP_PROBE = """
    import numpy as np
    from pathlib import Path
    from hsiedge import memory

    def anon_mib():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024

    print(memory.bound_heap())
    free0 = memory.free_heap_bytes()
    blocks = [np.ones(4 * 2**20 // 8) for _ in range(24)]  # 24 blocks of 4 MiB, written
    del blocks
    free1 = memory.free_heap_bytes()
    anon1 = anon_mib()
    print((free1 - free0) / 2**20)
    print(memory.release_free_heap(bound=free1 + 1), memory.release_free_heap(bound=0))
    print(anon1 - anon_mib())
"""


def test_freed_tiles_stay_on_the_heap_and_trimming_returns_them():
    ok, kept, trimmed, returned = run_python(HEAP_PROBE).split("\n")[:4]
    assert ok == "True"
    # 96 MiB of 4 MiB blocks freed: with the fixed 32 MiB threshold they were heap blocks, now free
    assert float(kept) >= 90
    # below the bound nothing happens; above it, the free pages go back to the system
    assert trimmed == "False True"
    assert float(returned) >= 80


def test_the_environment_overrides_the_settings():
    # with MALLOC_MMAP_THRESHOLD_ set by the user, glibc's value (128 KiB) stands: each 4 MiB
    # block is its own mapping, returned on free, so the heap never holds them
    out = run_python(HEAP_PROBE, env={"MALLOC_MMAP_THRESHOLD_": "131072"}).split("\n")
    assert float(out[1]) < 8


LARGE_BLOCK_PROBE = """
    import resource
    from hsiedge import memory

    # bytearray: plain malloc, written (NumPy asks large arrays for huge pages, ONNX Runtime not)
    print(memory.bound_heap(large_blocks={large}))
    free0 = memory.free_heap_bytes()
    block = bytearray(64 * 2**20)  # one 64 MiB block, written, freed
    del block
    print((memory.free_heap_bytes() - free0) / 2**20)
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = bytearray(64 * 2**20)  # the same again
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0)
"""


@pytest.mark.parametrize("large", [True, False])
def test_large_blocks_stay_on_the_heap_only_when_asked(large):
    """Blocks over 32 MiB (MambaHSI's tiles) are mapped afresh, and page-faulted page by page,
    unless `large_blocks`: then the freed block is reused without a fault."""
    ok, kept, faults = run_python(LARGE_BLOCK_PROBE.format(large=large)).split("\n")[:3]
    assert ok == "True"
    if large:
        assert float(kept) >= 60 and int(faults) < 1000
    else:  # 16,384 pages of 4 KiB
        assert float(kept) < 8 and int(faults) > 10_000


BUDGET_PROBE = """
    from hsiedge import memory

    memory.bound_heap()
    blocks = [bytearray(4 * 2**20) for _ in range(24)]  # 96 MiB in 4 MiB blocks, written, freed
    del blocks
    rss = memory.rss_mib()
    print(memory.release_free_heap(bound=0, within_mib=rss + 64),
          memory.release_free_heap(bound=0, within_mib=rss - 64))
    print(rss - memory.rss_mib())
"""


def test_within_its_budget_a_run_keeps_its_free_heap():
    kept_then_trimmed, returned = run_python(BUDGET_PROBE).split("\n")[:2]
    assert kept_then_trimmed == "False True"
    assert float(returned) >= 80


def test_peak_rss_is_at_least_the_current_rss():
    current = next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
    assert memory.peak_rss_mib() >= current > 10



FALLBACK_PROBE = """
    import ctypes, ctypes.util
    import numpy as np
    from pathlib import Path
    from hsiedge import memory

    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    hidden = {hidden!r}

    class Hiding:  # the C library with symbols gone, as glibc 2.31 (JetPack 5) lacks mallinfo2
        def __getattr__(self, name):
            if name in hidden:
                raise AttributeError(name)
            return getattr(lib, name)

    def anon_mib():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024

    memory._heap = memory.open_heap(Hiding())
    print(memory._heap.source or "none", memory.bound_heap(), sep=",")
    print(memory.heap_warning())
    first = memory.release_free_heap(bound=32 * 2**20)  # without mallinfo: the baseline
    blocks = [np.ones(4 * 2**20 // 8) for _ in range(24)]  # 96 MiB in 4 MiB blocks, freed
    del blocks
    print(memory.free_heap_bytes())
    anon = anon_mib()
    print(first, memory.release_free_heap(bound=200 * 2**20), memory.release_free_heap(bound=32 * 2**20))
    print(anon - anon_mib())
"""


@pytest.mark.parametrize("hidden", [{"mallinfo2"}, {"mallinfo2", "mallinfo"}], ids=["glibc-2.31", "neither"])
def test_without_mallinfo2_the_heap_is_still_bounded(hidden):
    """glibc 2.31 has mallinfo only: it measures the free heap as mallinfo2 does; with neither,
    trimming follows resident-memory growth, and a warning says so."""
    found, warning, free, trims, returned = run_python(FALLBACK_PROBE.format(hidden=hidden)).split("\n")[:5]
    if "mallinfo" not in hidden:
        assert (found, warning) == ("mallinfo,True", "None")
        assert int(free) >= 90 * 2**20  # the 96 MiB freed sit on the heap, and mallinfo sees them
    else:
        assert (found, free) == ("none,True", "None")
        assert "neither mallinfo2 nor mallinfo" in warning and "resident memory" in warning
    # below the bound nothing happens; above it the free pages go back to the system
    assert trims == "False False True"
    assert float(returned) >= 80


def test_a_heap_that_cannot_be_bounded_is_said_in_the_run_summary(sm_bundle, scene_tif, tmp_path,
                                                                   monkeypatch):
    from hsiedge.bundle import open_bundle
    from hsiedge.infer import infer_scene

    monkeypatch.setattr(memory, "_heap", None)  # a C library without mallopt (musl)
    assert not memory.bound_heap() and not memory.release_free_heap(bound=0)
    summary = infer_scene(scene_tif, open_bundle(sm_bundle), tmp_path / "map.tif", runtime="onnxruntime")
    said = "heap bounding is off: the C library is not glibc"
    assert [w for w in summary["warnings"] if w.startswith(said)]
