"""The AVX-512 lane kernel of the CPU backend (channels in vector lanes, inline exp).

Built only where the compiler targets AVX-512F/DQ (`-march=native` on such a host); the
checks that need its test entry points skip elsewhere, the scan checks run on any build.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from conftest import np_selective_scan
from test_selective_scan import make_inputs, rel_err

from hsiedge.ops import cpu as cpu_kernel


def _lane_fn(name: str):
    lib = cpu_kernel.load()
    try:
        fn = getattr(lib, name)
    except AttributeError:
        pytest.skip("the lane kernel is not built on this host (no AVX-512F/DQ)")
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
