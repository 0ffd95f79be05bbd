"""The lane kernels of the CPU backend (channels in vector lanes, inline exp).

Built where the compiler targets AVX-512F/DQ (16 lanes) or AVX2 with FMA (8 lanes), with
`-march=native` on such a host; the checks that need their test entry points skip
elsewhere, the scan checks run on any build.
"""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import np_selective_scan
from test_selective_scan import make_inputs, rel_err

from hsiedge.ops import cpu as cpu_kernel


def test_the_forward_is_the_lane_kernel_the_cpu_allows():
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = [ln for ln in info.splitlines() if ln.startswith("flags")]
    flags = set(lines[0].split(":", 1)[1].split()) if lines else set()
    has = flags.__contains__
    if platform.machine() != "x86_64" or os.environ.get("HSIEDGE_SCAN_PORTABLE") == "1":
        expected = "portable"
    elif has("avx512f") and has("avx512dq"):
        expected = "AVX-512 lanes (16)"
    elif has("avx2") and has("fma"):
        expected = "AVX2 lanes (8)"
    else:
        expected = "portable"
    assert cpu_kernel.forward_kind() == expected


def _lane_fn(name: str):
    lib = cpu_kernel.load()
    try:
        fn = getattr(lib, name)
    except AttributeError:
        pytest.skip("no lane kernel is built on this host (neither AVX-512F/DQ nor AVX2 with FMA)")
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    return fn


def _apply(name: str, x: np.ndarray, mode: int) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    assert _lane_fn(name)(x.ctypes.data, out.ctypes.data, x.size, mode) == 0
    return out


SCALE = np.float32(46.166241308446828)  # the kernel's 32 / ln 2: it computes 2^(x * SCALE / 32)


def _exp_ref(x: np.ndarray) -> np.ndarray:
    """exp of x as the kernel sees it: after its float32 scaling of the argument (which any
    float32 exp(dt*A) shares: dt*A is itself rounded), so this measures the exp alone."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.exp2((x.astype(np.float32) * SCALE).astype(np.float64) / 32.0)


def _ulp_err(got: np.ndarray, ref: np.ndarray) -> float:
    ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    return float((np.abs(got.astype(np.float64) - ref) / ulp).max())


def test_fast_exp_is_accurate_over_its_range():
    # dt*A <= 0 in practice; the fast path covers exp(x) for x in [-87.3, 88)
    x = np.concatenate([np.linspace(-87.0, 0.0, 1 << 20), np.linspace(0.0, 88.0, 1 << 16),
                        -np.logspace(-8, 1.9, 1 << 16)]).astype(np.float32)
    got = _apply("hsiedge_lane_exp_f32", x, 0)
    assert _ulp_err(got, _exp_ref(x)) <= 4
    # and against exp of the unscaled argument: within the rounding of x * SCALE
    ref = np.exp(x.astype(np.float64))
    assert np.all(np.abs(got - ref) <= (4 + np.abs(x)) * 2.0**-23 * ref)


def test_safe_exp_handles_every_float():
    x = np.concatenate([np.linspace(-103.0, 88.0, 1 << 18),
                        [-1e4, -1e30, -np.inf, -200.0, 0.0, -0.0, 89.0, 1e30, np.inf, np.nan]
                        + [0.0] * 6]).astype(np.float32)
    ref = _exp_ref(x)
    got = _apply("hsiedge_lane_exp_f32", x, 1)
    normal = (ref > 1.2e-38) & (ref < 3.4e38)
    assert _ulp_err(got[normal], ref[normal]) <= 4
    tiny = np.isfinite(x) & (ref <= 1.2e-38)
    assert np.all(np.abs(got[tiny]) <= 1.2e-38)
    assert np.all(got[x == -np.inf] == 0) and np.all(got[x <= -200] == 0)
    assert np.all(np.isinf(got[(x >= 89) & ~np.isnan(x)]))
    assert np.isnan(got[np.isnan(x)]).all()


def test_softplus_and_silu():
    x = np.concatenate([np.linspace(-60.0, 60.0, 1 << 18), [-1e30, 1e30, 0.0, -0.0]
                        + [1.0] * 12]).astype(np.float32)
    xd = x.astype(np.float64)
    with np.errstate(over="ignore"):
        sp_ref = np.logaddexp(0.0, xd)
        silu_ref = xd / (1.0 + np.exp(-xd))
    sp = _apply("hsiedge_lane_act_f32", x, 1)
    silu = _apply("hsiedge_lane_act_f32", x, 2)
    # a few ulp, plus the float32 rounding of the exp's scaled argument (|x| 2^-23 relative)
    tol = 4e-7 + np.minimum(np.abs(xd), 100.0) * 2.0**-23
    assert np.all(np.abs(sp - sp_ref) <= tol * sp_ref + 1e-45)
    assert np.all(np.abs(silu - silu_ref) <= tol * np.abs(silu_ref) + 1e-37)


@pytest.mark.parametrize("N", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("dim,L,grouped", [(1, 5, False), (5, 33, False), (18, 4, True),
                                           (34, 300, True), (48, 17, False)])
def test_any_dim_and_state_size_matches_float64(N, dim, L, grouped):
    a = make_inputs(N * 1000 + dim, 2, dim, L, N, grouped, True, True, True, True)
    ref = np_selective_scan(**a)
    n = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    one = cpu_kernel.scan_numpy(**n, n_threads=1)
    assert rel_err(torch.from_numpy(one), ref) <= 1e-5
    for threads in (2, 3, 5):
        np.testing.assert_array_equal(one, cpu_kernel.scan_numpy(**n, n_threads=threads))


def test_out_of_range_decay_takes_the_safe_path():
    # A so negative that exp(dt*A) underflows (and some tiles do not): exact zeros, no NaN
    a = make_inputs(11, 2, 20, 600, 16, False, True, True, True, True)
    A = a["A"].clone()
    A[3] = -1e6
    A[7, :5] = -50.0
    a["A"] = A
    ref = np_selective_scan(**a)
    n = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    y = cpu_kernel.scan_numpy(**n, n_threads=1)
    assert np.isfinite(y).all()
    assert rel_err(torch.from_numpy(y), ref) <= 1e-5
    np.testing.assert_array_equal(y, cpu_kernel.scan_numpy(**n, n_threads=2))


_PORTABLE_CHILD = """
import ctypes, sys
import numpy as np
from hsiedge.ops import cpu
a = dict(np.load(sys.argv[1]))
softplus = bool(a.pop("delta_softplus"))
np.save(sys.argv[2], cpu.scan_numpy(**a, delta_softplus=softplus, n_threads=2))
print(cpu.library_path().name, hasattr(cpu.load(), "hsiedge_lane_exp_f32"), cpu.forward_kind())
"""


@pytest.mark.parametrize("N,dim,L", [(16, 20, 300), (5, 10, 4)])
def test_portable_forward_still_matches_float64(tmp_path, N, dim, L):
    """HSIEDGE_SCAN_PORTABLE=1 builds the forward without lanes: on hosts with a lane kernel,
    that is the only way the portable path is checked (elsewhere it is the default)."""
    a = make_inputs(N * 7 + L, 3, dim, L, N, True, True, True, True, True)
    ref = np_selective_scan(**a)
    np.savez(tmp_path / "in.npz", **{k: (v.numpy() if isinstance(v, torch.Tensor) else v)
                                     for k, v in a.items() if v is not None})
    env = {**os.environ, "HSIEDGE_SCAN_PORTABLE": "1"}
    r = subprocess.run([sys.executable, "-c", _PORTABLE_CHILD, str(tmp_path / "in.npz"),
                        str(tmp_path / "y.npy")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    name, has_lanes, kind = r.stdout.split()
    assert name != cpu_kernel.library_path().name  # a build of its own, cached apart
    assert (has_lanes, kind) == ("False", "portable")
    assert rel_err(torch.from_numpy(np.load(tmp_path / "y.npy")), ref) <= 1e-5
