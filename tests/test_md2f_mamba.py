"""MD2F-Mamba block by block against the paper: structure, size, and float64 NumPy references
of MS-LFEM, HSM-GFE (the selective scan read of stage 2) and CSFF on random and real patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import np_selective_scan
from torch import nn

from hsiedge.models import build_model, count_parameters
from hsiedge.models.md2f_mamba import HSMGFE, MSLFEM, ChannelModulation, MDConv
from hsiedge.preprocess import PCA, Chain, Standardize
from hsiedge.tiling import pixel_patches


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def np_conv2d(x: np.ndarray, w: np.ndarray, bias: np.ndarray | None = None, groups: int = 1) -> np.ndarray:
    """Zero-padded 'same' 2-D convolution (odd kernels), dense or depthwise, in float64."""
    b, _, h, wd = x.shape
    cout, _, kh, kw = w.shape
    ph, pw = kh // 2, kw // 2
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out = np.zeros((b, cout, h, wd))
    for i in range(kh):
        for j in range(kw):
            window = xp[:, :, i:i + h, j:j + wd]
            if groups == 1:
                out += np.einsum("bchw,oc->bohw", window, w[:, :, i, j])
            else:  # depthwise: one filter per channel
                out += window * w[None, :, 0, i, j, None, None]
    return out if bias is None else out + bias[None, :, None, None]


def np_unit(x: np.ndarray, seq: nn.Sequential) -> np.ndarray:
    """Conv -> BatchNorm (eval statistics) -> ReLU."""
    conv, bn = seq[0], seq[1]
    y = np_conv2d(x, f64(conv.weight), groups=conv.groups)
    scale = f64(bn.weight) / np.sqrt(f64(bn.running_var) + bn.eps)
    shift = f64(bn.bias) - f64(bn.running_mean) * scale
    y = y * scale[None, :, None, None] + shift[None, :, None, None]
    return np.maximum(y, 0.0)


def np_gelu(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def np_silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def np_mslfem(m: MSLFEM, x: np.ndarray) -> np.ndarray:
    x = np_unit(x + f64(m.pos_v), m.project)
    b0 = np_unit(x, m.b0)
    b1 = np_unit(np_unit(x, m.b1[0]), m.b1[1])
    b2 = np_unit(np_unit(x, m.b2[0]), m.b2[1])
    agg = np_unit(x, m.b3.aggregate)
    transformed = np_conv2d(agg, f64(m.b3.transform.weight), f64(m.b3.transform.bias))
    b3 = agg + f64(m.b3.delta) * (agg - np_gelu(transformed))
    return np_unit(np.concatenate([b0, b1, b2, b3], 1), m.fuse)


def np_hsmgfe(m: HSMGFE, x: np.ndarray) -> np.ndarray:
    b, c, h, w = x.shape
    f = x + f64(m.pos_h)
    mu, var = f.mean(1, keepdims=True), f.var(1, keepdims=True)
    f_bar = (f - mu) / np.sqrt(var + m.norm.eps) * f64(m.norm.weight)[None, :, None, None] \
        + f64(m.norm.bias)[None, :, None, None]
    refined = np_conv2d(np_conv2d(f_bar, f64(m.expand.weight), f64(m.expand.bias)),
                        f64(m.local.weight), f64(m.local.bias), groups=3 * c)
    theta, lam, psi = refined[:, :c], refined[:, c:2 * c], refined[:, 2 * c:]
    bc = np.einsum("bchw,nc->bnhw", f_bar, f64(m.state_proj.weight)).reshape(b, -1, h * w)
    n = m.d_state
    y = np_selective_scan(np_silu(theta).reshape(b, c, -1), lam.reshape(b, c, -1), -np.exp(f64(m.omega)),
                          bc[:, :n], bc[:, n:], f64(m.D), delta_bias=f64(m.dt_bias), delta_softplus=True)
    hz = np_conv2d(y.reshape(b, c, h, w), f64(m.gate.weight), f64(m.gate.bias))
    hidden, z = hz[:, :c], hz[:, c:]
    f_tilde = (hidden * np_silu(z) + hidden * f64(m.phi)) * psi
    return np_conv2d(f_tilde, f64(m.out.weight), f64(m.out.bias))


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Non-trivial values for everything at its initial constant (BN statistics, Delta, Phi, D, ...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            at_constant = name.endswith(("delta", "phi", "D")) or name.split(".")[-2:-1] == ["1"]  # BN affine
            if at_constant:
                p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm3d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return module.eval()


@pytest.fixture(scope="module")
def pca_patches(jasper_cube) -> torch.Tensor:
    """13 x 13 PCA-30 patches around the pixels of a real Jasper Ridge crop (reflect padding)."""
    crop = jasper_cube[20:32, 50:60].astype(np.float64)
    flat = crop.reshape(-1, crop.shape[-1])
    chain = Chain([Standardize(), PCA(30)]).fit(flat, training_pixels=flat)
    img, _ = chain.apply(crop)
    return torch.from_numpy(pixel_patches(img.astype(np.float32).transpose(2, 0, 1), 13))


def test_parameter_count_by_hand_pavia():
    """Pavia University: 103 bands -> PCA 30, patch 13, 9 classes; paper: 92.4 K."""
    c, p, k, n, f, bands, classes = 64, 13, 16, 16, 8, 30, 9
    bn = lambda ch: 2 * ch  # noqa: E731
    extractor = f * 27 + bn(f) + f * bands * c + bn(c)
    mdconv = c * 9 + c * 3 + c * 3 + 4 * c * c + bn(c)
    mslfem = (c * p                                   # E_v
              + c * c + bn(c)                         # shared 1x1
              + c * k * 9 + bn(k)                     # B0 3x3
              + 2 * (c * k * 3 + bn(k) + k * k * 3 + bn(k))  # B1, B2
              + c * k + bn(k) + k * k + k + k         # B3: aggregation, Conv1x1, Delta
              + 4 * k * c + bn(c))                    # back to C
    hsmgfe = (c * p + 2 * c                           # E_h, LayerNorm
              + c * 3 * c + 3 * c + 3 * c * 9 + 3 * c  # 1x1 expansion, depthwise 3x3
              + c * 2 * n + c * n + c + c             # B/C projection, Omega, dt bias, D
              + c * 2 * c + 2 * c + c                 # [H, Z], Phi
              + c * c + c)                            # 1x1 out
    head = c * classes + classes
    expected = extractor + mdconv + mslfem + hsmgfe + head
    model = build_model("md2f-mamba", in_channels=bands, num_classes=classes, patch_size=p)
    assert count_parameters(model) == expected == 92_561
    assert abs(expected - 92_400) / 92_400 < 0.05
    centre = build_model("md2f-mamba", in_channels=bands, num_classes=classes, pooling="centre-weighted")
    assert count_parameters(centre) == expected + p * p


def test_directional_kernels():
    md = MDConv(64)
    assert (md.square.weight.shape, md.horizontal.weight.shape, md.vertical.weight.shape) == (
        (64, 1, 3, 3), (64, 1, 1, 3), (64, 1, 3, 1))
    assert md.fuse[0].weight.shape == (64, 256, 1, 1)
    ms = MSLFEM(64, 13)
    assert ms.pos_v.shape == (1, 64, 13, 1)
    assert ms.b0[0].weight.shape == (16, 64, 3, 3)
    assert [u[0].weight.shape[2:] for u in ms.b1] == [(1, 3), (3, 1)]  # horizontal then vertical
    assert [u[0].weight.shape[2:] for u in ms.b2] == [(3, 1), (1, 3)]  # vertical then horizontal
    assert ms.fuse[0].weight.shape == (64, 64, 1, 1)
    gfe = HSMGFE(64, 13)
    assert gfe.pos_h.shape == (1, 64, 1, 13)
    assert gfe.expand.weight.shape == (192, 64, 1, 1) and gfe.local.weight.shape == (192, 1, 3, 3)
    assert gfe.gate.weight.shape == (128, 64, 1, 1)


def test_delta_omega_phi_are_trainable():
    torch.manual_seed(0)
    model = build_model("md2f-mamba", in_channels=30, num_classes=9)
    named = dict(model.named_parameters())
    for name, shape in [("local_branch.b3.delta", (1, 16, 1, 1)), ("global_branch.omega", (64, 16)),
                        ("global_branch.phi", (1, 64, 1, 1)), ("local_branch.pos_v", (1, 64, 13, 1)),
                        ("global_branch.pos_h", (1, 64, 1, 13))]:
        assert named[name].shape == shape and named[name].requires_grad, name
    loss = nn.functional.cross_entropy(model(torch.randn(6, 30, 13, 13)), torch.arange(6))
    loss.backward()
    paper = ("local_branch.b3.delta", "global_branch.omega", "global_branch.phi")
    for name in (*paper, "global_branch.dt_bias"):
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
    before = {n: named[n].detach().clone() for n in paper}
    torch.optim.Adam(model.parameters(), lr=1e-2).step()
    assert all(not torch.equal(before[n], named[n]) for n in before)


def test_pooling_choice():
    avg = build_model("md2f-mamba", in_channels=30, num_classes=4)
    assert avg.pooling == "average" and not hasattr(avg, "pool_logits")
    with pytest.raises(ValueError, match="pooling must be one of average, centre-weighted"):
        build_model("md2f-mamba", in_channels=30, num_classes=4, pooling="max")


@pytest.mark.parametrize("seed", [0, 1])
def test_blocks_match_float64_reference_on_random_inputs(seed):
    torch.manual_seed(seed)
    x = torch.randn(3, 64, 13, 13)
    ms, gfe = randomise(MSLFEM(64, 13), seed), randomise(HSMGFE(64, 13), seed)
    cm = randomise(ChannelModulation(64, 16), seed)
    with torch.no_grad():
        got_ms, got_gfe = ms(x), gfe(x)
    np.testing.assert_allclose(f64(got_ms), np_mslfem(ms, f64(x)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(f64(got_gfe), np_hsmgfe(gfe, f64(x)), rtol=1e-4, atol=1e-4)
    assert float(cm.delta.detach().std()) > 0  # Delta randomised, so the reference above saw a real one


def test_whole_model_matches_reference_on_real_patches(pca_patches):
    """Both branches, CSFF and each head on PCA patches of a real scene."""
    torch.manual_seed(5)
    x = pca_patches[::7]
    for pooling in ("average", "centre-weighted"):
        model = randomise(build_model("md2f-mamba", in_channels=30, num_classes=4, pooling=pooling), 5)
        with torch.no_grad():
            f = model.mdconv(model.extractor(x))
            got = model(x)
        f = f64(f)
        f_l, f_g = np_mslfem(model.local_branch, f), np_hsmgfe(model.global_branch, f)
        s = (f_l * f_g).sum(1, keepdims=True) / (np.linalg.norm(f_l, axis=1, keepdims=True)
                                                  * np.linalg.norm(f_g, axis=1, keepdims=True) + 1e-8)
        fused = np.maximum(f_g + f_l * s, 0.0)
        if pooling == "average":
            pooled = fused.mean((2, 3))
        else:
            wts = np.exp(f64(model.pool_logits))
            pooled = (fused * (wts / wts.sum())).sum((2, 3))
        ref = pooled @ f64(model.head.weight).T + f64(model.head.bias)
        np.testing.assert_allclose(f64(got), ref, rtol=1e-4, atol=1e-4)


def test_scan_runs_over_the_patch_in_raster_order():
    """Changing pixel (4, 4) of a 9 x 9 patch reaches, through the 3x3 depthwise convolution,
    pixel (3, 3) at the earliest, raster index 30: every output before it is unchanged, every
    output from it on changes, however far away (the scan carries it)."""
    torch.manual_seed(2)
    gfe = HSMGFE(16, 9).eval()
    x = torch.randn(1, 16, 9, 9)
    x2 = x.clone()
    x2[0, :, 4, 4] += 3.0 * torch.randn(16)  # not a constant shift, which LayerNorm removes
    with torch.no_grad():
        d = (gfe(x2) - gfe(x)).abs().amax(1)[0].flatten()
    assert torch.all(d[:30] == 0)
    assert torch.all(d[30:] > 1e-6)
