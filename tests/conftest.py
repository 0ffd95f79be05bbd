"""Shared fixtures: the real datasets folder and a float64 NumPy selective scan."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def datasets_dir() -> Path:
    return Path(os.environ.get("HSIEDGE_DATASETS", REPO.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def datasets() -> Path:
    d = datasets_dir()
    if not (d / "README.md").is_file():
        pytest.fail(f"real datasets not found at {d}: set HSIEDGE_DATASETS to the shared/datasets folder")
    return d


@pytest.fixture(scope="session")
def jasper_cube(datasets: Path) -> np.ndarray:
    """Jasper Ridge (100, 100, 198) uint16, unfolded independently of hsiedge.io."""
    import scipy.io as sio

    d = sio.loadmat(datasets / "jasper_ridge" / "JasperRidge2_R198.mat")
    nr, nc = int(d["nRow"][0, 0]), int(d["nCol"][0, 0])
    return d["Y"].reshape(-1, nr, nc, order="F").transpose(1, 2, 0)


def np_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Independent float64 recurrence of Contract 1, written for the tests."""
    f = lambda t: None if t is None else np.asarray(t, dtype=np.float64)  # noqa: E731
    u, delta, A, B, C, D, z, delta_bias = map(f, (u, delta, A, B, C, D, z, delta_bias))
    batch, dim, L = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = np.logaddexp(0.0, delta)
    if B.ndim == 3:
        B, C = B[:, None], C[:, None]
    group_of = np.arange(dim) // (dim // B.shape[1])
    h = np.zeros((batch, dim, A.shape[1]))
    y = np.empty((batch, dim, L))
    for t in range(L):
        dt = delta[:, :, t][..., None]
        h = np.exp(dt * A[None]) * h + dt * u[:, :, t][..., None] * B[..., t][:, group_of]
        y[:, :, t] = np.einsum("bdn,bdn->bd", h, C[..., t][:, group_of])
    if D is not None:
        y = y + D[None, :, None] * u
    if z is not None:
        y = y * z / (1.0 + np.exp(-z))
    return y
