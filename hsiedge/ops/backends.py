"""Backends of the selective scan, and how one is chosen for a call.

Each backend takes the arguments of Contract 1 as tensors and returns y.  The order tried
for each device type is fixed below; `HSIEDGE_SCAN_BACKEND=name` or the `scan_backend(name)`
context manager pins one (used by tests and benchmarks to compare backends side by side).

- ``reference``  sequential PyTorch loop, any device (hsiedge.ops.reference)
- ``cpu``        compiled C kernel, chunked over time, threaded (hsiedge.ops.cpu)
- ``mamba_ssm``  mamba-ssm's CUDA kernel, when that package is installed
- ``cuda``       the project's own CUDA kernel from ``plugins/`` (hsiedge.ops.cuda), built
                 with nvcc on first use where PyTorch sees a GPU; preferred on CUDA tensors
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from hsiedge.ops import cpu as _cpu
from hsiedge.ops import cuda as _cuda
from hsiedge.ops.reference import selective_scan_reference

ScanFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class ScanBackend:
    """A named implementation, the device types it serves, and a cheap availability probe.

    `backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, grad)` returns the
    gradients of the eight tensor inputs (None for absent ones); without it, gradients are
    taken through the differentiable reference.
    """

    name: str
    devices: tuple[str, ...]
    run: ScanFn
    available: Callable[[], bool]
    backward: Callable[..., tuple[torch.Tensor | None, ...]] | None = None


_REGISTRY: dict[str, ScanBackend] = {}
_PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "mamba_ssm", "reference")}
_pinned: contextvars.ContextVar[str | None] = contextvars.ContextVar("hsiedge_scan_backend", default=None)


def register_backend(backend: ScanBackend) -> None:
    """Add or replace a backend (the CUDA extension calls this when it is built)."""
    _REGISTRY[backend.name] = backend


def _np32(t: torch.Tensor | None):
    return None if t is None else t.detach().to(torch.float32).contiguous().numpy()


def _run_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    y = _cpu.scan_numpy(*(_np32(t) for t in (u, delta, A, B, C, D, z, delta_bias)),
                        delta_softplus=delta_softplus, n_threads=torch.get_num_threads())
    return torch.from_numpy(y).to(u.dtype)


def _backward_cpu(u, delta, A, B, C, D, z, delta_bias, delta_softplus, grad):
    inputs = (u, delta, A, B, C, D, z, delta_bias)
    grads = _cpu.scan_numpy_backward(*(_np32(t) for t in inputs), delta_softplus,
                                     _np32(grad), n_threads=torch.get_num_threads())
    return tuple(None if g is None else torch.from_numpy(g).to(t.dtype)
                 for g, t in zip(grads, inputs, strict=True))


def _run_mamba_ssm(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    return selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def _has_mamba_ssm() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("mamba_ssm") is not None


register_backend(ScanBackend("reference", ("cpu", "cuda"), selective_scan_reference, lambda: True))
register_backend(ScanBackend("cpu", ("cpu",), _run_cpu, _cpu.available, _backward_cpu))
register_backend(ScanBackend("mamba_ssm", ("cuda",), _run_mamba_ssm, _has_mamba_ssm))
register_backend(ScanBackend("cuda", ("cuda",), _cuda.run, _cuda.available))


def available_backends(device_type: str = "cpu") -> list[str]:
    """Names of the backends that can run on this device type here, in preference order."""
    order = _PREFERENCE.get(device_type, ("reference",))
    return [n for n in order if n in _REGISTRY and _REGISTRY[n].available()]


def choose_backend(device_type: str) -> ScanBackend:
    """The backend for a call on `device_type`: the pinned one, else the first available."""
    pinned = _pinned.get() or os.environ.get("HSIEDGE_SCAN_BACKEND") or None
    if pinned:
        if pinned not in _REGISTRY:
            raise ValueError(f"unknown selective-scan backend '{pinned}'; known: {sorted(_REGISTRY)}")
        b = _REGISTRY[pinned]
        if device_type not in b.devices or not b.available():
            raise RuntimeError(f"selective-scan backend '{pinned}' cannot run on {device_type} here")
        return b
    names = available_backends(device_type)
    return _REGISTRY[names[0] if names else "reference"]


@contextlib.contextmanager
def scan_backend(name: str) -> Iterator[None]:
    """Pin the backend used by `selective_scan` inside the block."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown selective-scan backend '{name}'; known: {sorted(_REGISTRY)}")
    token = _pinned.set(name)
    try:
        yield
    finally:
        _pinned.reset(token)
