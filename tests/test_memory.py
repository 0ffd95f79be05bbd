"""hsiedge.memory: glibc heap settings for streamed runs, trimming between tiles, peak RSS."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hsiedge import memory

pytestmark = pytest.mark.skipif(memory._glibc() is None or not Path("/proc/self/status").exists(),
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


def test_peak_rss_is_at_least_the_current_rss():
    current = next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
    assert memory.peak_rss_mib() >= current > 10
