"""The selective-scan op against an independent float64 NumPy recurrence (Contract 1)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import np_selective_scan

from hsiedge.ops import available_backends, scan_backend, selective_scan
from hsiedge.ops import cpu as cpu_kernel

BACKENDS = ["reference", "cpu"]
OPTIONS = list(itertools.product([False, True], repeat=4))  # (z, D, delta_bias, softplus)
GRID = list(itertools.product([1, 4, 37, 1000, 5000], [24, 64, 256], [1, 16], [False, True]))


def make_inputs(seed, batch, dim, L, N, grouped, use_z, use_D, use_bias, softplus,
                dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    G = 2 if grouped else None
    bc_shape = (batch, G, N, L) if grouped else (batch, N, L)
    delta = r(batch, dim, L) if softplus else 0.5 * torch.rand(batch, dim, L, generator=g)
    args = dict(
        u=r(batch, dim, L).to(dtype), delta=delta.to(dtype),
        A=-torch.exp(0.5 * r(dim, N)), B=r(*bc_shape).to(dtype), C=r(*bc_shape).to(dtype),
        D=r(dim) if use_D else None, z=r(batch, dim, L).to(dtype) if use_z else None,
        delta_bias=(0.3 * torch.rand(dim, generator=g)) if use_bias else None, delta_softplus=softplus)
    return args


def rel_err(y: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(y.double().numpy() - ref).max() / max(np.abs(ref).max(), 1e-30))


def test_backends_available():
    assert available_backends("cpu")[0] == "cpu", "the compiled CPU kernel must build on this machine"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(GRID)), ids=lambda i: "L{}-d{}-N{}-{}".format(
    *GRID[i][:3], "grouped" if GRID[i][3] else "var"))
def test_float32_matches_float64_reference(backend, case):
    L, dim, N, grouped = GRID[case]
    opts = OPTIONS[(case * 7 + (backend == "cpu") * 3) % len(OPTIONS)]  # every option set is met
    a = make_inputs(case, 2, dim, L, N, grouped, *opts)
    ref = np_selective_scan(**a)
    with scan_backend(backend):
        y = selective_scan(**a)
    assert y.shape == a["u"].shape and y.dtype == torch.float32
    assert rel_err(y, ref) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "z{}D{}b{}sp{}".format(*map(int, o)))
def test_every_option_combination(backend, opts):
    a = make_inputs(99, 3, 40, 53, 16, True, *opts)
    with scan_backend(backend):
        assert rel_err(selective_scan(**a), np_selective_scan(**a)) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("L,grouped", [(4, False), (300, True)])
def test_half_inputs(backend, dtype, L, grouped):
    a = make_inputs(7, 2, 64, L, 16, grouped, True, True, True, True, dtype=dtype)
    ref = np_selective_scan(**{k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in a.items()})
    with scan_backend(backend):
        y = selective_scan(**a)
    assert y.dtype == dtype
    # Inputs are compared in their rounded form; the output's own rounding is the error left
    # (at most 2^-9 of a value for bfloat16, 2^-12 for float16).
    assert rel_err(y.float(), ref) <= 2e-3


def test_odd_sizes_and_large_state():
    """dim not a multiple of anything convenient, N up to 256, G = dim."""
    for dim, N, G, L in [(7, 256, 7, 9), (130, 3, 10, 17), (5, 16, 1, 1)]:
        a = make_inputs(dim, 2, dim, L, N, False, True, True, True, True)
        a["B"] = torch.randn(2, G, N, L)
        a["C"] = torch.randn(2, G, N, L)
        with scan_backend("cpu"):
            assert rel_err(selective_scan(**a), np_selective_scan(**a)) <= 1e-5


def test_non_contiguous_inputs():
    a = make_inputs(3, 2, 32, 50, 16, False, True, True, True, True)
    ref = np_selective_scan(**a)
    a["u"] = a["u"].transpose(1, 2).contiguous().transpose(1, 2)
    a["B"] = a["B"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not a["u"].is_contiguous()
    with scan_backend("cpu"):
        assert rel_err(selective_scan(**a), ref) <= 1e-5


@pytest.mark.parametrize("dim,L", [(96, 700), (98, 5)])  # long; short with uneven channel blocks
def test_threading_does_not_change_results(dim, L):
    a = make_inputs(5, 3, dim, L, 16, True, True, True, True, True)
    n = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    one = cpu_kernel.scan_numpy(**n, n_threads=1)
    many = cpu_kernel.scan_numpy(**n, n_threads=7)
    np.testing.assert_array_equal(one, many)


def test_empty_sequences():
    for shape in [(0, 8, 5), (2, 8, 0)]:
        u = torch.randn(*shape)
        bc = torch.randn(shape[0], 4, shape[2])
        with scan_backend("cpu"):
            assert selective_scan(u, u.abs(), -torch.ones(8, 4), bc, bc).shape == shape


@pytest.mark.parametrize("bad,match", [
    (dict(u=torch.randn(2, 8)), "u must be"),
    (dict(delta=torch.randn(2, 8, 6)), "delta must"),
    (dict(A=torch.randn(7, 4)), "A must"),
    (dict(B=torch.randn(2, 3, 4, 5)), "B must"),
    (dict(C=torch.randn(2, 5, 5)), "C must"),
    (dict(D=torch.randn(9)), "D must"),
])
def test_bad_shapes_are_named(bad, match):
    a = dict(u=torch.randn(2, 8, 5), delta=torch.rand(2, 8, 5), A=-torch.rand(8, 4),
             B=torch.randn(2, 4, 5), C=torch.randn(2, 4, 5))
    a.update(bad)
    with pytest.raises(ValueError, match=match):
        selective_scan(**a)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown selective-scan backend"), scan_backend("nope"):
        pass


class _Scan(torch.nn.Module):
    def forward(self, u, delta, A, B, C, D):
        return selective_scan(u, delta, A, B, C, D, z=u, delta_softplus=True)


def test_export_records_one_node():
    a = make_inputs(1, 2, 16, 10, 4, False, False, True, False, True)
    args = (a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"])
    ep = torch.export.export(_Scan(), args)
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    scans = [n for n in calls if n.target is torch.ops.hsiedge.selective_scan.default]
    assert len(scans) == 1
    torch.testing.assert_close(ep.module()(*args), _Scan()(*args))


def test_gradients_match_float64_autograd():
    a = make_inputs(11, 1, 6, 7, 3, True, True, True, True, True)
    a = {k: (v.double().requires_grad_() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]

    def f(*xs):
        return selective_scan(**{**a, **dict(zip(tensors, xs, strict=True))})

    with scan_backend("reference"):
        assert torch.autograd.gradcheck(f, tuple(a[k] for k in tensors))


def test_cuda_dispatch_order(monkeypatch):
    """On CUDA tensors: the project's kernel when registered, else mamba-ssm, else the reference."""
    from hsiedge.ops import backends

    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    monkeypatch.setitem(backends._REGISTRY, "mamba_ssm", backends.ScanBackend(
        "mamba_ssm", ("cuda",), backends._run_mamba_ssm, lambda: False))
    assert backends.choose_backend("cuda").name == "reference"
    monkeypatch.setitem(backends._REGISTRY, "mamba_ssm", backends.ScanBackend(
        "mamba_ssm", ("cuda",), backends._run_mamba_ssm, lambda: True))
    assert backends.choose_backend("cuda").name == "mamba_ssm"
    backends.register_backend(backends.ScanBackend("cuda", ("cuda",), backends._run_cpu, lambda: True))
    assert backends.choose_backend("cuda").name == "cuda"
    assert backends.choose_backend("cpu").name == "cpu"
    with pytest.raises(RuntimeError, match="cannot run on cpu"), scan_backend("mamba_ssm"):
        selective_scan(torch.randn(1, 2, 3), torch.rand(1, 2, 3), -torch.ones(2, 1),
                       torch.randn(1, 1, 3), torch.randn(1, 1, 3))


GRAD_NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def _cpu_grads(a: dict, g: torch.Tensor) -> dict:
    leaves = {k: (v.detach().float().requires_grad_() if k in GRAD_NAMES and v is not None else v)
              for k, v in a.items()}
    with scan_backend("cpu"):
        y = selective_scan(**leaves)
    keys = [k for k in GRAD_NAMES if leaves[k] is not None]
    return dict(zip(keys, torch.autograd.grad(y, [leaves[k] for k in keys], g), strict=True))


@pytest.mark.parametrize("opts", [(True, True, True, True), (False, False, False, False),
                                  (True, False, True, False)], ids=["all", "none", "z+bias"])
@pytest.mark.parametrize("grouped", [False, True])
def test_cpu_backward_matches_numpy_finite_differences(opts, grouped):
    a = make_inputs(21, 2, 6, 7, 3, grouped, *opts)
    a = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    g = torch.randn(2, 6, 7, generator=torch.Generator().manual_seed(3)).double()
    got = _cpu_grads(a, g.float())
    base = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    eps = 1e-6
    for name, grad in got.items():
        fd = np.zeros(base[name].shape)
        for idx in np.ndindex(base[name].shape):
            plus, minus = dict(base), dict(base)
            plus[name], minus[name] = base[name].copy(), base[name].copy()
            plus[name][idx] += eps
            minus[name][idx] -= eps
            fd[idx] = ((np_selective_scan(**plus) - np_selective_scan(**minus)) * g.numpy()).sum() / (2 * eps)
        err = np.abs(grad.double().numpy() - fd).max() / max(np.abs(fd).max(), 1e-12)
        assert err <= 1e-4, f"d{name}: relative error {err:.2e}"


@pytest.mark.parametrize("batch,L,grouped", [(1, 900, False), (1, 300, True), (64, 4, True), (3, 37, False)])
def test_cpu_backward_matches_float64_autograd(batch, L, grouped):
    """Both work splits of the kernel: whole groups (many sequences) and channel blocks (batch 1)."""
    a = make_inputs(L, batch, 48, L, 16, grouped, True, True, True, True)
    a = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    g = torch.randn(batch, 48, L, generator=torch.Generator().manual_seed(4)).double()
    ref_leaves = {k: (v.clone().requires_grad_() if k in GRAD_NAMES and v is not None else v)
                  for k, v in a.items()}
    with scan_backend("reference"):
        y = selective_scan(**ref_leaves)
    keys = [k for k in GRAD_NAMES if ref_leaves[k] is not None]
    ref = dict(zip(keys, torch.autograd.grad(y, [ref_leaves[k] for k in keys], g), strict=True))
    got = _cpu_grads(a, g.float())
    for k in keys:
        err = float((got[k].double() - ref[k]).abs().max() / ref[k].abs().max())
        assert err <= 1e-4, f"d{k}: relative error {err:.2e}"
