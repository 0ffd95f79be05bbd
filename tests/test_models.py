"""The three seed models on real data: structure, sizes, shapes and export as one op per scan."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import SCAN_CALLS
from torch.export import Dim

from hsiedge.models import MODELS, Mamba, build_model, count_parameters
from hsiedge.preprocess import PCA, Chain, Standardize
from hsiedge.tiling import pixel_patches

MAMBA_KEYS = ["in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
              "dt_proj.bias", "A_log", "D", "out_proj.weight"]


def mamba_params(d: int, n: int = 16, k: int = 4, e: int = 2) -> int:
    di, r = e * d, math.ceil(d / 16)
    return d * 2 * di + (di * k + di) + di * (r + 2 * n) + (r * di + di) + di * n + di + di * d


@pytest.fixture(scope="module")
def scene(jasper_cube) -> torch.Tensor:
    """A standardised 24 x 28 window of Jasper Ridge, (bands, H, W)."""
    crop = jasper_cube[30:54, 40:68].astype(np.float32)
    x, _ = Chain([Standardize()]).fit(crop.reshape(-1, crop.shape[-1])).apply(crop)
    return torch.from_numpy(x).permute(2, 0, 1).contiguous()


def scan_nodes(ep) -> int:
    return sum(1 for n in ep.graph.nodes if n.op == "call_function"
               and n.target is torch.ops.hsiedge.selective_scan.default)


def n_mamba(model) -> int:
    return sum(isinstance(m, Mamba) for m in model.modules())


def test_registry_and_unknown_name():
    assert list(MODELS) == ["mambahsi", "spectralmamba", "md2f-mamba"]
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model("nope")


def test_mambahsi_parameter_count_by_hand():
    bands, classes, hid = 103, 9, 128
    embed = bands * hid + hid + 2 * hid
    spa = mamba_params(hid) + 2 * hid
    spe = mamba_params(math.ceil(hid / 4)) + 2 * hid
    both = spa + spe + 2
    head = hid * 128 + 128 + 2 * 128 + 128 * classes + classes
    expected = embed + 3 * both + head
    assert expected == 412_239  # "about 412 thousand" in the issue
    assert count_parameters(build_model("mambahsi", in_channels=bands, num_classes=classes)) == expected


def test_mambahsi_official_state_dict_keys():
    sd = build_model("mambahsi", in_channels=103, num_classes=9).state_dict()
    expected = {f"patch_embedding.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    for i in (0, 2, 4):
        expected.add(f"mamba.{i}.weights")
        for br in ("spa_mamba", "spe_mamba"):
            expected |= {f"mamba.{i}.{br}.mamba.{k}" for k in MAMBA_KEYS}
            expected |= {f"mamba.{i}.{br}.proj.0.{p}" for p in ("weight", "bias")}
    expected |= {f"cls_head.{i}.{p}" for i in (0, 1, 3) for p in ("weight", "bias")}
    assert set(sd) == expected
    assert sd["mamba.0.spa_mamba.mamba.in_proj.weight"].shape == (512, 128)
    assert sd["mamba.2.spe_mamba.mamba.in_proj.weight"].shape == (128, 32)
    assert sd["mamba.2.spe_mamba.proj.0.weight"].shape == (128,)
    assert sd["cls_head.3.bias"].shape == (9,)
    torch.testing.assert_close(sd["mamba.4.weights"], torch.tensor([0.5, 0.5]))


def test_paper_parameter_budgets():
    """SpectralMamba is sized like its paper reports on Botswana (MD2F-Mamba: test_md2f_mamba)."""
    patch = count_parameters(build_model("spectralmamba", in_channels=145, num_classes=14))
    pixel = count_parameters(build_model("spectralmamba", in_channels=145, num_classes=14, patch_size=0))
    assert abs(patch - 34_960) / 34_960 < 0.10 and abs(pixel - 12_330) / 12_330 < 0.10
    assert patch - pixel == 145 * 9 + 145 + 145 * 145 + 145 + 7 * 7  # GSSM convolutions + merge weights


def test_mambahsi_on_real_scene(scene):
    bands = scene.shape[0]
    model = build_model("mambahsi", in_channels=bands, num_classes=4).eval()
    with torch.no_grad():
        low = model(scene[None])
        full = model.full_resolution_logits(scene[None])
        odd = model(scene[None, :, :22, :27])
    assert low.shape == (1, 4, 6, 7) and full.shape == (1, 4, 24, 28) and odd.shape == (1, 4, 5, 6)
    assert torch.isfinite(low).all()
    # align_corners=True keeps the four corner logits of the 1/4 map exactly.
    for (i, j), (a, b) in zip([(0, 0), (0, -1), (-1, 0), (-1, -1)], [(0, 0), (0, -1), (-1, 0), (-1, -1)],
                              strict=True):
        torch.testing.assert_close(full[..., i, j], low[..., a, b])


def test_mambahsi_spatial_scan_runs_over_the_raster_sequence(scene):
    """The spatial Mamba scans the batch's feature maps as ONE raster-order (b, h, w) sequence,
    as the official code does with permute/reshape; ours takes the channel-first path."""
    from hsiedge.models.mambahsi import SpaMamba

    torch.manual_seed(3)
    spa = SpaMamba(scene.shape[0], group_num=1).eval()
    x = torch.stack([scene, scene.flip(-1)])  # (2, C, H, W)
    b, c, h, w = x.shape
    with torch.no_grad():
        got = spa(x)
        seq = x.permute(0, 2, 3, 1).reshape(1, b * h * w, c)
        ref = spa.mamba(seq).reshape(b, h, w, c).permute(0, 3, 1, 2)
        ref = spa.proj(ref) + x
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_patch_models_on_real_scene(scene):
    bands, h, w = scene.shape
    sm = build_model("spectralmamba", in_channels=bands, num_classes=4).eval()
    smp = build_model("spectralmamba", in_channels=bands, num_classes=4, patch_size=0).eval()
    hwc = scene.permute(1, 2, 0).numpy()
    pca = PCA(30).fit(hwc.reshape(-1, bands).astype(np.float64))
    pca_img = torch.from_numpy(pca.apply(hwc)).permute(2, 0, 1)
    md = build_model("md2f-mamba", in_channels=30, num_classes=4).eval()
    with torch.no_grad():
        p7 = torch.from_numpy(pixel_patches(scene.numpy(), 7))
        out_sm = sm(p7)
        out_px = smp(scene.reshape(bands, -1).T)
        p13 = torch.from_numpy(pixel_patches(pca_img.numpy(), 13))
        out_md = md(p13)
        # Results do not depend on what else is in the batch.
        torch.testing.assert_close(sm(p7[5:9]), out_sm[5:9], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(md(p13[100:103]), out_md[100:103], rtol=1e-4, atol=1e-5)
    assert out_sm.shape == out_px.shape == out_md.shape == (h * w, 4)
    assert all(torch.isfinite(t).all() for t in (out_sm, out_px, out_md))


def test_pixel_patches_match_explicit_loop(scene):
    img = scene[:5, :9, :11]
    p = pixel_patches(img.numpy(), 5)
    padded = np.pad(img.numpy(), ((0, 0), (2, 2), (2, 2)), mode="reflect")
    for idx, (i, j) in enumerate([(0, 0), (4, 7), (8, 10), (3, 0)]):
        np.testing.assert_array_equal(p[i * 11 + j], padded[:, i:i + 5, j:j + 5], err_msg=str(idx))


def test_mambahsi_exports_with_dynamic_batch_and_size(scene):
    bands = scene.shape[0]
    model = build_model("mambahsi", in_channels=bands, num_classes=4).eval()
    dyn = {"x": {0: Dim("batch", min=1, max=64), 2: 4 * Dim("h4", min=1, max=512),
                 3: 4 * Dim("w4", min=1, max=512)}}
    example = torch.stack([scene[:, :16, :20], scene[:, 4:20, 8:28]])  # batch 2: 1 would specialise
    ep = torch.export.export(model, (example,), dynamic_shapes=dyn)
    assert scan_nodes(ep) == n_mamba(model) == 6
    x = torch.stack([scene, scene.flip(-1), scene.flip(-2)])  # other batch size and image size
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,cfg,shape", [
    ("spectralmamba", {"in_channels": 198, "num_classes": 4}, (3, 198, 7, 7)),
    ("spectralmamba", {"in_channels": 198, "num_classes": 4, "patch_size": 0}, (3, 198)),
    ("md2f-mamba", {"in_channels": 30, "num_classes": 4}, (3, 30, 13, 13)),
])
def test_patch_models_export_with_dynamic_batch(name, cfg, shape):
    model = build_model(name, **cfg).eval()
    ep = torch.export.export(model, (torch.randn(*shape),),
                             dynamic_shapes={"x": {0: Dim("batch", min=1, max=1 << 20)}})
    assert scan_nodes(ep) == SCAN_CALLS[name]
    x = torch.randn(11, *shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-5, atol=1e-5)
