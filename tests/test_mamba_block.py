"""The Mamba block: mamba-ssm's layout and initialisation, and its forward in float64 NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import np_selective_scan

from hsiedge.models import Mamba
from hsiedge.models.mamba import SHORT_SEQUENCE


def np_mamba_forward(m: Mamba, x: np.ndarray) -> np.ndarray:
    """Independent float64 forward of the block, from its parameters."""
    p = {k: v.detach().double().numpy() for k, v in m.state_dict().items()}
    batch, L, _ = x.shape
    di, K = m.d_inner, m.d_conv
    xz = x @ p["in_proj.weight"].T + p.get("in_proj.bias", 0.0)
    xi, z = xz[..., :di], xz[..., di:]
    w = p["conv1d.weight"][:, 0, :]  # (di, K)
    padded = np.concatenate([np.zeros((batch, K - 1, di)), xi], axis=1)
    conv = sum(padded[:, k:k + L, :] * w[:, k] for k in range(K)) + p.get("conv1d.bias", 0.0)
    xc = conv / (1.0 + np.exp(-conv))
    dbl = xc @ p["x_proj.weight"].T
    r, n = m.dt_rank, m.d_state
    dt = dbl[..., :r] @ p["dt_proj.weight"].T
    B, C = dbl[..., r:r + n], dbl[..., r + n:]
    y = np_selective_scan(xc.transpose(0, 2, 1), dt.transpose(0, 2, 1), -np.exp(p["A_log"]),
                          B.transpose(0, 2, 1), C.transpose(0, 2, 1), p["D"],
                          z.transpose(0, 2, 1), p["dt_proj.bias"], delta_softplus=True)
    return y.transpose(0, 2, 1) @ p["out_proj.weight"].T + p.get("out_proj.bias", 0.0)


def test_layout_matches_mamba_ssm():
    m = Mamba(d_model=40, d_state=16, d_conv=4, expand=2)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "A_log": (80, 16), "D": (80,), "in_proj.weight": (160, 40),
        "conv1d.weight": (80, 1, 4), "conv1d.bias": (80,),
        "x_proj.weight": (3 + 32, 80), "dt_proj.weight": (80, 3), "dt_proj.bias": (80,),
        "out_proj.weight": (40, 80),
    }
    assert m.dt_rank == math.ceil(40 / 16)


def test_initialisation():
    torch.manual_seed(0)
    m = Mamba(d_model=64, d_state=8, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4)
    assert m.A_log.dtype == torch.float32
    torch.testing.assert_close(m.A_log, torch.log(torch.arange(1, 9.0)).repeat(128, 1))
    torch.testing.assert_close(m.D, torch.ones(128))
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-4 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    std = m.dt_rank**-0.5
    assert m.dt_proj.weight.abs().max() <= std


def test_forward_matches_numpy_float64():
    torch.manual_seed(1)
    m = Mamba(d_model=24, d_state=16).eval()
    with torch.no_grad():  # a trained-looking dt range, so the test is not dominated by D*u
        m.dt_proj.bias.add_(2.0)
    x = np.random.default_rng(0).standard_normal((3, 45, 24))
    with torch.no_grad():
        y = m(torch.from_numpy(x).float()).double().numpy()
    ref = np_mamba_forward(m, x)
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("length", [1, 3, 4, 6, 8, 9])
@pytest.mark.parametrize("bias,conv_bias", [(False, True), (True, True), (True, False), (False, False)])
def test_short_and_long_token_sequences_match_numpy_float64(length, bias, conv_bias):
    """Short sequences (L <= SHORT_SEQUENCE: MambaHSI's spectral tokens, SpectralMamba's pieces)
    take in_proj and the causal convolution as one block-triangular matrix product, longer
    ones the shifted form; both against the float64 reference, biases on and off, on random
    taps and biases (the initialisation's would hide a misplaced tap)."""
    torch.manual_seed(10 + length)
    m = Mamba(d_model=12, d_state=8, bias=bias, conv_bias=conv_bias).eval()
    with torch.no_grad():
        m.dt_proj.bias.add_(2.0)
        m.conv1d.weight.copy_(torch.randn_like(m.conv1d.weight))
        for b in (m.in_proj.bias, m.conv1d.bias):
            if b is not None:
                b.copy_(torch.randn_like(b))
    assert (length <= SHORT_SEQUENCE) == (length != 9)
    x = np.random.default_rng(length).standard_normal((5, length, 12))
    with torch.no_grad():
        y = m(torch.from_numpy(x).float()).double().numpy()
    ref = np_mamba_forward(m, x)
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


def test_short_sequences_train_like_the_shifted_form():
    """The matrix form is built from the parameters on every call, so gradients reach in_proj
    and the convolution's taps and bias exactly as through the shifted form (float64)."""
    torch.manual_seed(3)
    m = Mamba(d_model=8, d_state=4, bias=True).double()
    x = torch.randn(6, 4, 8, dtype=torch.float64)
    w_x, _ = m.in_proj.weight.chunk(2, dim=0)
    b_x, _ = m.in_proj.bias.chunk(2)
    short = m._project_conv_short(x, w_x, b_x)
    shifted = m._conv_tokens(torch.nn.functional.linear(x, w_x, b_x))
    torch.testing.assert_close(short, shifted, rtol=1e-12, atol=1e-12)
    params = (m.in_proj.weight, m.in_proj.bias, m.conv1d.weight, m.conv1d.bias)
    g_short = torch.autograd.grad(short.square().sum(), params)
    g_shifted = torch.autograd.grad(shifted.square().sum(), params)
    for a, b in zip(g_short, g_shifted, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_channels_first_forward_matches_numpy_float64():
    """The channel-first path (MambaHSI's spatial scan) is the same block: one (d_model, L)
    sequence in, compared with the float64 reference on the transposed sequence."""
    torch.manual_seed(2)
    m = Mamba(d_model=32, d_state=16).eval()
    with torch.no_grad():
        m.dt_proj.bias.add_(2.0)
    x = np.random.default_rng(1).standard_normal((32, 300))
    with torch.no_grad():
        y = m.forward_channels_first(torch.from_numpy(x).float()).double().numpy()
    ref = np_mamba_forward(m, x.T[None])[0].T
    assert y.shape == (32, 300)
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()
