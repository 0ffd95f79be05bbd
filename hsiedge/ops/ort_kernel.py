"""The CPU kernel as an ONNX Runtime custom operator (`csrc/selective_scan_ort.c`).

ONNX Runtime has no kernel for `hsiedge:SelectiveScan`; without one it runs the node's
model-local function, the portable decomposition, which materialises (dim, N) states and is
several times slower than the C kernel torch uses.  This library gives ONNX Runtime that C
kernel: `SessionOptions.register_custom_ops_library(str(library()))` adds the `hsiedge`
domain, and the nodes bind to it instead of their function bodies.

It is compiled on first use with the system C compiler, like the `cpu` backend, from the
kernel's source and a small C glue file that declares the part of ONNX Runtime's stable C ABI
it needs (ONNX Runtime's wheels carry no headers).  float32 scans (the runner casts float16
ones to it); ONNX Runtime 1.16 or later.  No torch import: runtimes without torch use it too.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from hsiedge.ops import cpu
from hsiedge.ops.native import NativeLibrary

SOURCES = (cpu.SOURCE, cpu.SOURCE.with_name("selective_scan_ort.c"))
MIN_ONNXRUNTIME = (1, 16)  # the glue asks ONNX Runtime for its C API version 16


def library_path() -> Path:
    """Path of the custom-op library for this host (it may not be built yet)."""
    return cpu.cache_dir() / "ops" / f"libhsiedge_scan_ort-{cpu.host_key(SOURCES)}.so"


def _check_entry_point(lib: ctypes.CDLL) -> None:
    lib.RegisterCustomOps  # noqa: B018 - raises AttributeError when the symbol is missing


_LIBRARY = NativeLibrary(library_path, lambda target: cpu.compile_library(SOURCES, target),
                         _check_entry_point, cpu.ScanBuildError)


def library() -> Path:
    """The built library (built here on first use); raises `cpu.ScanBuildError` when it cannot be."""
    _LIBRARY.load()
    return library_path()


def set_threads(n: int | None) -> None:
    """Threads each scan of this process uses (None: one per online CPU).  The library ONNX
    Runtime loaded is the one loaded here (same path, same handle), so open sessions follow."""
    _LIBRARY.load().hsiedge_scan_ort_set_threads(int(n or 0))
