"""The compiled CPU backend: builds `csrc/selective_scan_cpu.c` once per machine and calls it.

No maintained library offers a CPU selective scan (mamba-ssm ships CUDA kernels only and a
slow reference), so hsiedge compiles its own small C kernel on first use with the system C
compiler, tuned for the host (`-march=native`; `-mcpu=native` first on Arm, where it also sets
the tuning and where clang before 15 knows only that form), and caches the shared library under
`$HSIEDGE_CACHE_DIR` (default `~/.cache/hsiedge`).  It is called through `ctypes` on NumPy
or torch buffers, so the same kernel also serves runtimes that do not import torch.
`HSIEDGE_SCAN_PORTABLE=1` builds the portable forward even where a lane kernel (AVX-512 or
AVX2) would be chosen: to compare the two, or to rule the lane kernel out.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hsiedge.ops.native import NativeLibrary

SOURCE = Path(__file__).with_name("csrc") / "selective_scan_cpu.c"
_COMPILE_FLAGS = ["-O3", "-ffast-math", "-fPIC", "-std=c11", "-Wall"]
PORTABLE_ENV = "HSIEDGE_SCAN_PORTABLE"


def compile_flags() -> list[str]:
    """The C flags of every kernel build (plus -DHSI_PORTABLE where $HSIEDGE_SCAN_PORTABLE=1)."""
    return [*_COMPILE_FLAGS, *(["-DHSI_PORTABLE"] if os.environ.get(PORTABLE_ENV) == "1" else [])]

# Host-tuning flags, tried in order until the compiler takes one; the portable build otherwise.
_NATIVE_FLAGS = (("-mcpu=native",), ("-march=native",)) \
    if platform.machine().lower() in ("aarch64", "arm64") else (("-march=native",), ("-mcpu=native",))


class ScanBuildError(RuntimeError):
    """The C kernel could not be compiled or loaded on this machine."""


def cache_dir() -> Path:
    """Where built kernels are kept (`$HSIEDGE_CACHE_DIR`, else `~/.cache/hsiedge`)."""
    root = os.environ.get("HSIEDGE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "hsiedge"


def host_key(sources: Sequence[Path]) -> str:
    """Identify sources, compiler and CPU, since the build is tuned for the host CPU."""
    h = hashlib.sha256()
    for src in sources:
        h.update(src.read_bytes())
    h.update(" ".join(compile_flags()).encode())
    h.update(repr(_NATIVE_FLAGS).encode())
    h.update(os.environ.get("CC", "cc").encode())
    h.update(platform.machine().encode())
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = [ln for ln in lines if ln.startswith(("flags", "Features"))]
        h.update((flags[0] if flags else "").encode())
    except OSError:
        pass
    return h.hexdigest()[:16]


def compile_library(sources: Sequence[Path], target: Path) -> None:
    """Compile C `sources` into the shared library `target`, atomically (ScanBuildError if not)."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise ScanBuildError(f"no C compiler '{cc}' on PATH (set CC or install gcc)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objs, lib = [Path(tmp) / f"{src.stem}.o" for src in sources], Path(tmp) / target.name
        for src, obj in zip(sources, objs, strict=True):
            last = ""
            for arch in (*_NATIVE_FLAGS, ()):
                r = subprocess.run([cc, *compile_flags(), *arch, "-c", str(src), "-o", str(obj)],
                                   capture_output=True, text=True)
                if r.returncode == 0:
                    break
                last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
            else:
                raise ScanBuildError(f"compiling {src.name} failed: {last}")
        # Linked without -ffast-math, so the library does not switch the process to flush-to-zero.
        r = subprocess.run([cc, "-shared", "-pthread", *map(str, objs), "-o", str(lib), "-lm"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise ScanBuildError(f"linking {lib.name} failed: {r.stderr.strip()}")
        os.replace(lib, target)  # atomic: other processes see the whole library or none


def library_path() -> Path:
    """Path of the shared library for this host (it may not be built yet)."""
    return cache_dir() / "ops" / f"libhsiedge_scan_cpu-{host_key([SOURCE])}.so"


def _configure(lib: ctypes.CDLL) -> None:
    fn = lib.hsiedge_selective_scan_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 5 + [ctypes.c_int, ctypes.c_int]
    lib.hsiedge_scan_lanes.restype = ctypes.c_int
    lib.hsiedge_scan_lanes.argtypes = []
    bwd = lib.hsiedge_selective_scan_bwd_f32
    bwd.restype = ctypes.c_int
    bwd.argtypes = [ctypes.c_void_p] * 17 + [ctypes.c_int64] * 5 + [ctypes.c_int, ctypes.c_int]


_LIBRARY = NativeLibrary(library_path, lambda target: compile_library([SOURCE], target), _configure,
                         ScanBuildError)


def load() -> ctypes.CDLL:
    """Build (first time on this host) and load the kernel; raise ScanBuildError if impossible."""
    return _LIBRARY.load()


def forward_kind() -> str:
    """Which forward this host's build runs: 'AVX-512 lanes (16)', 'AVX2 lanes (8)' or 'portable'."""
    lanes = int(load().hsiedge_scan_lanes())
    return {16: "AVX-512 lanes (16)", 8: "AVX2 lanes (8)"}.get(lanes, "portable")


def available() -> bool:
    """True when the kernel is built or can be built here."""
    try:
        load()
        return True
    except ScanBuildError:
        return False


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _f32(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else np.ascontiguousarray(a, dtype=np.float32)


def scan_numpy(
    u: np.ndarray,
    delta: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    C: np.ndarray,
    D: np.ndarray | None = None,
    z: np.ndarray | None = None,
    delta_bias: np.ndarray | None = None,
    delta_softplus: bool = False,
    n_threads: int | None = None,
) -> np.ndarray:
    """Run the kernel on NumPy arrays (shapes of Contract 1); returns float32 (batch, dim, L)."""
    u, delta, A, B, C, D, z, delta_bias = map(_f32, (u, delta, A, B, C, D, z, delta_bias))
    batch, dim, L = u.shape
    N = A.shape[1]
    groups = B.shape[1] if B.ndim == 4 else 1
    y = np.empty((batch, dim, L), dtype=np.float32)
    threads = n_threads or os.cpu_count() or 1
    rc = load().hsiedge_selective_scan_f32(
        _ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(C), _ptr(D), _ptr(z), _ptr(delta_bias),
        _ptr(y), batch, dim, L, N, groups, int(bool(delta_softplus)), threads)
    if rc != 0:
        raise RuntimeError(f"selective scan kernel failed (code {rc}) for u of shape {u.shape}")
    return y


def scan_numpy_backward(
    u: np.ndarray,
    delta: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    C: np.ndarray,
    D: np.ndarray | None,
    z: np.ndarray | None,
    delta_bias: np.ndarray | None,
    delta_softplus: bool,
    grad: np.ndarray,
    n_threads: int | None = None,
) -> tuple[np.ndarray | None, ...]:
    """Gradients of `scan_numpy`'s output w.r.t. (u, delta, A, B, C, D, z, delta_bias), float32.

    Entries are None where the input was None.  Sums over the batch and over the channels of a
    group are done in a fixed order, so the result does not depend on the thread count.
    """
    u, delta, A, B, C, D, z, delta_bias, grad = map(
        _f32, (u, delta, A, B, C, D, z, delta_bias, grad))
    batch, dim, L = u.shape
    N = A.shape[1]
    groups = B.shape[1] if B.ndim == 4 else 1
    grads = [np.empty_like(u), np.empty_like(delta), np.empty_like(A), np.empty_like(B),
             np.empty_like(C), None if D is None else np.empty_like(D),
             None if z is None else np.empty_like(z),
             None if delta_bias is None else np.empty_like(delta_bias)]
    du, ddelta, dA, dB, dC, dD, dz, dbias = grads
    threads = n_threads or os.cpu_count() or 1
    rc = load().hsiedge_selective_scan_bwd_f32(
        _ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(C), _ptr(D), _ptr(z), _ptr(delta_bias),
        _ptr(grad), _ptr(du), _ptr(ddelta), _ptr(dA), _ptr(dB), _ptr(dC), _ptr(dD), _ptr(dz),
        _ptr(dbias), batch, dim, L, N, groups, int(bool(delta_softplus)), threads)
    if rc != 0:
        raise RuntimeError(f"selective scan backward kernel failed (code {rc}) for u of shape {u.shape}")
    return tuple(grads)
