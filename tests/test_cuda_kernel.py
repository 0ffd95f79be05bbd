"""The CUDA selective-scan kernel (plugins/selective_scan): it compiles wherever nvcc exists,
and on a CUDA GPU it matches the float64 NumPy reference at both shape extremes."""

from __future__ import annotations

import ctypes
import re
import subprocess

import numpy as np
import pytest
import torch
from conftest import np_selective_scan

from hsiedge.ops import cuda

needs_nvcc = pytest.mark.skipif(cuda.nvcc() is None, reason="nvcc is not installed here")
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here (PyTorch sees none)")


@needs_nvcc
def test_kernel_compiles_for_orin_4090_and_hopper(tmp_path):
    archs = (87, 89, 90)
    r = subprocess.run([cuda.nvcc(), "-std=c++17", "-O3", "-c", "-Xptxas", "-v", f"-I{cuda.SOURCE_DIR}",
                        *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs),
                        str(cuda.SOURCES[0]), "-o", str(tmp_path / "scan.o")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # ptxas reports every kernel per architecture: the N = 16 kernels keep their state in registers
    entries, current = [], None  # (kernel, arch, stack bytes) from ptxas's report
    for line in r.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)'", line):
            current = m.groups()
        elif (m := re.search(r"(\d+) bytes stack frame", line)) and current:
            entries.append((*current, int(m.group(1))))
            current = None
    for a in archs:
        here = [(k, s) for k, arch, s in entries if arch == str(a)]
        assert sum("scanChunks" in k for k, _ in here) == 4 and sum("chainChunks" in k for k, _ in here) == 1
        assert [s for k, s in here if "Li16E" in k] == [0, 0], here


@needs_nvcc
def test_library_builds_and_sizes_its_workspace(tmp_path):
    lib = ctypes.CDLL(str(cuda.build(tmp_path / "libscan.so")))
    ws = lib.hsiedge_scan_cuda_workspace
    ws.restype = ctypes.c_size_t
    ws.argtypes = [ctypes.c_int64] * 5 + [ctypes.c_int32]
    # the short extreme (millions of sequences) runs in one pass, without scratch
    assert ws(2_500_000, 64, 4, 16, 1, 132) == 0
    # the long extreme (one sequence per channel) is chunked: end states + carries + dt sums
    long_bytes = ws(1, 256, 200_000, 16, 1, 132)
    chunks = long_bytes / (256 * 4 * (2 * 16 + 1))
    assert 200_000 / 256 < chunks < 200_000 / 100  # chunks of 128 to 256 steps
    # it never shrinks as a dimension grows, so the largest shape of a TensorRT profile covers all
    for axis in range(4):
        sizes = []
        for v in (1, 3, 64, 127, 128, 255, 256, 1000, 4096, 70_000):
            shape = [2, 64, 4096, 16]
            shape[axis] = min(v, 256) if axis == 3 else v
            sizes.append(ws(*shape, 1, 132))
        assert sizes == sorted(sizes), (axis, sizes)
    status = lib.hsiedge_scan_cuda_status
    status.restype = ctypes.c_char_p
    assert b"N must be between 1 and 256" in status(-2)


KEYS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def _inputs(batch, dim, L, N, groups, dtype, seed, z=True, D=True, bias=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc = (batch, N, L) if groups == 0 else (batch, groups, N, L)
    x = {"u": r(batch, dim, L), "delta": r(batch, dim, L) * 0.5 - 1.0,
         "A": -torch.rand(dim, N, generator=g) * 2, "B": r(*bc), "C": r(*bc), "D": r(dim) if D else None,
         "z": r(batch, dim, L) if z else None,
         "delta_bias": r(dim) * 0.1 if bias else None}
    return {k: None if v is None else (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v)
            for k, v in x.items()}


GRID = [  # (batch, dim, L, N, groups): short extreme, model shapes, chunked long sequences, odd sizes
    (20_000, 64, 4, 16, 0), (256, 64, 6, 16, 0), (256, 64, 169, 16, 0), (1, 256, 20_000, 16, 0),
    (2, 48, 3_001, 16, 4), (3, 10, 777, 7, 2), (1, 8, 5_000, 256, 0), (5, 3, 1, 1, 0),
]


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", GRID)
def test_cuda_kernel_matches_the_float64_reference(shape, dtype, tol):
    batch, dim, L = shape[:3]
    x = _inputs(*shape, dtype, seed=sum(shape))
    dev = {k: None if v is None else v.cuda() for k, v in x.items()}
    out = torch.full((batch, dim, L), float("nan"), dtype=dtype, device="cuda")  # poisoned
    y = cuda.run(dev["u"], dev["delta"], dev["A"], dev["B"], dev["C"], dev["D"], dev["z"], dev["delta_bias"],
                 True, out=out)
    torch.cuda.synchronize()
    ref = np_selective_scan(*(None if x[k] is None else x[k].double().numpy() for k in KEYS),
                            delta_softplus=True)
    got = y.double().cpu().numpy()
    assert np.isfinite(got).all(), "elements left unwritten"
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


@gpu
@needs_gpu
@pytest.mark.parametrize("z,D,bias,softplus", [(False, False, False, False), (True, False, True, False),
                                               (False, True, False, True)])
def test_cuda_kernel_optional_inputs(z, D, bias, softplus):
    x = _inputs(2, 32, 1_500, 16, 0, torch.float32, seed=7, z=z, D=D, bias=bias)
    dev = {k: None if v is None else v.cuda() for k, v in x.items()}
    y = cuda.run(*(dev[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")), softplus)
    ref = np_selective_scan(*(None if x[k] is None else x[k].double().numpy()
                              for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
                            delta_softplus=softplus)
    err = np.linalg.norm(y.double().cpu().numpy() - ref) / np.linalg.norm(ref)
    assert err <= 1e-5


@gpu
@needs_gpu
def test_cuda_backend_is_chosen_for_cuda_tensors_and_matches_cpu():
    from hsiedge.ops import selective_scan
    from hsiedge.ops.backends import available_backends

    assert available_backends("cuda")[0] == "cuda"
    x = _inputs(4, 64, 300, 16, 0, torch.float32, seed=3)
    cpu_y = selective_scan(*(x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")),
                           delta_softplus=True)
    gpu_y = selective_scan(*(None if x[k] is None else x[k].cuda() for k in KEYS), delta_softplus=True)
    torch.testing.assert_close(gpu_y.cpu(), cpu_y, rtol=1e-4, atol=1e-5)
