"""The project's CUDA kernel as the `cuda` backend of `hsiedge.ops.selective_scan`.

The kernel is `selective_scan/selective_scan.cu` of the `hsiedge.plugins` package (shipped in
the wheel; `plugins/` in a checkout), the same source the TensorRT plugin is built from.  Here
it is compiled with `nvcc` into a small shared library (on first use, or with `make cuda-ext`),
cached next to the CPU kernel, and called through
`ctypes` with the tensors' device pointers and PyTorch's current CUDA stream: no PyTorch C++
extension toolchain is needed, and the library does not depend on the PyTorch build.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from hsiedge.ops.cpu import cache_dir
from hsiedge.ops.native import NativeLibrary, nvcc
from hsiedge.plugins import source_dir

SOURCE_DIR = source_dir() / "selective_scan"
SOURCES = (SOURCE_DIR / "selective_scan.cu", SOURCE_DIR / "selective_scan.h")
NVCC_FLAGS = ["-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC"]


class CudaBuildError(RuntimeError):
    """The CUDA kernel could not be compiled or loaded here."""


def _arch_flags() -> list[str]:
    """Code for the GPU in this machine (its compute capability), else for sm_87 / 89 / 90."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return [f"-arch=sm_{major}{minor}"]
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in (87, 89, 90)]


def _check_sources() -> None:
    missing = [src for src in SOURCES if not src.is_file()]
    if missing:
        raise CudaBuildError(f"{missing[0]}: the CUDA kernel source is not there, so this hsiedge install is "
                             "incomplete; reinstall hsiedge")


def library_path() -> Path:
    """Where the library for this source, compiler and GPU is (it may not be built yet)."""
    _check_sources()
    h = hashlib.sha256()
    for src in SOURCES:
        h.update(src.read_bytes())
    h.update(" ".join([*NVCC_FLAGS, *_arch_flags(), str(nvcc())]).encode())
    return cache_dir() / "ops" / f"libhsiedge_scan_cuda-{h.hexdigest()[:16]}.so"


def build(target: Path | None = None) -> Path:
    """Compile the kernel into a shared library; raise CudaBuildError with nvcc's complaint."""
    compiler = nvcc()
    if compiler is None:
        raise CudaBuildError("no nvcc found (set CUDA_HOME or put nvcc on PATH)")
    _check_sources()
    target = target or library_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        lib = Path(tmp) / target.name
        r = subprocess.run([compiler, *NVCC_FLAGS, *_arch_flags(), f"-I{SOURCE_DIR}", str(SOURCES[0]),
                            "-o", str(lib)], capture_output=True, text=True)
        if r.returncode != 0:
            raise CudaBuildError(f"nvcc failed on {SOURCES[0].name}: {r.stderr.strip()[-2000:]}")
        os.replace(lib, target)
    return target


def _configure(lib: ctypes.CDLL) -> None:
    lib.hsiedge_scan_cuda.restype = ctypes.c_int32
    lib.hsiedge_scan_cuda.argtypes = ([ctypes.c_void_p] * 9 + [ctypes.c_int64] * 5
                                      + [ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32,
                                         ctypes.c_void_p])
    lib.hsiedge_scan_cuda_workspace.restype = ctypes.c_size_t
    lib.hsiedge_scan_cuda_workspace.argtypes = [ctypes.c_int64] * 5 + [ctypes.c_int32]
    lib.hsiedge_scan_cuda_status.restype = ctypes.c_char_p
    lib.hsiedge_scan_cuda_status.argtypes = [ctypes.c_int32]


_LIBRARY = NativeLibrary(library_path, build, _configure, CudaBuildError)


def load() -> ctypes.CDLL:
    """Build (first time) and load the library; raise CudaBuildError if impossible."""
    return _LIBRARY.load()


def available() -> bool:
    """A CUDA GPU is visible to PyTorch and the kernel can be built or is built."""
    if not torch.cuda.is_available():
        return False
    try:
        load()
        return True
    except CudaBuildError:
        return False


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def run(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
        delta_softplus: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """Contract 1 on CUDA tensors: float16 inputs stay float16 (float32 state), others run in float32.

    `out`: a contiguous tensor shaped and typed like the result to write into (tests poison it
    to catch elements the kernel leaves unwritten)."""
    lib = load()
    dtype = torch.float16 if u.dtype == torch.float16 else torch.float32
    act = [None if t is None else t.to(dtype).contiguous() for t in (u, delta, B, C, z)]
    u_, delta_, B_, C_, z_ = act
    A_, D_, bias_ = (None if t is None else t.float().contiguous() for t in (A, D, delta_bias))
    batch, dim, L = u_.shape
    N = A_.shape[1]
    groups = 1 if B_.dim() == 3 else B_.shape[1]
    y = torch.empty_like(u_) if out is None else out
    if y.shape != u_.shape or y.dtype != dtype or not y.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(u_.shape)}")
    device = u_.device
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    ws_bytes = lib.hsiedge_scan_cuda_workspace(batch, dim, L, N, groups, sms)
    workspace = torch.empty(max(ws_bytes, 1), dtype=torch.uint8, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream
    with torch.cuda.device(device):
        status = lib.hsiedge_scan_cuda(*(_ptr(t) for t in (u_, delta_, A_, B_, C_, D_, z_, bias_, y)),
                                       batch, dim, L, N, groups, int(delta_softplus),
                                       1 if dtype == torch.float16 else 0, _ptr(workspace), sms, stream)
    if status < 0:
        raise ValueError(f"selective scan (cuda): {lib.hsiedge_scan_cuda_status(status).decode()}")
    if status > 0:
        raise RuntimeError(f"selective scan (cuda): CUDA error {status} at launch")
    return y.to(u.dtype)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hsiedge.ops.cuda` (`make cuda-ext`): build the library unless it is built; print its
    path and sha256 as `hsiedge plugin build` does."""
    from hsiedge.bundle import sha256_file

    ap = argparse.ArgumentParser(prog="python -m hsiedge.ops.cuda", description=main.__doc__)
    ap.add_argument("--force", action="store_true", help="rebuild even when the library is built")
    args = ap.parse_args(argv)
    try:
        target = library_path()
        rebuilt = args.force or not target.is_file()
        if rebuilt:
            build(target)
    except CudaBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {cache_dir()}: cannot build the library there ({e.strerror or e}); set "
              "HSIEDGE_CACHE_DIR to a writable folder", file=sys.stderr)
        return 1
    print(f"built {target}" if rebuilt else f"already built: {target}; --force rebuilds it")
    print(f"sha256 {sha256_file(target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
