"""SpectralMamba's tile form: a whole tile of patches classified at once must give what every
patch gives on its own (float64 NumPy reference of the gated merge, the model's own patch
forward, and `hsiedge infer` / parity through the torch runner)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io as sio
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsiedge.bundle import open_bundle
from hsiedge.infer import Geometry, tiled_logits
from hsiedge.models.registry import build_model, has_tile_form
from hsiedge.models.spectralmamba import GatedSpatialSpectralMerging
from hsiedge.parity import parity_data, pixel_logits, run_batches
from hsiedge.runtimes import default_runtime, open_runner
from hsiedge.runtimes.base import Runner, RuntimeUnavailableError
from hsiedge.tiling import pixel_patches


def np_gated_merge(tile: np.ndarray, dw_w, dw_b, pw_w, pw_b, merge_logits) -> np.ndarray:
    """Float64 reference of the patch form: (C, h + 2r, w + 2r) -> (C, h, w), each core pixel's
    p x p patch cut out, its 'same' zero-padded depthwise conv, 1x1 conv, sigmoid, and the
    softmax-weighted sum of gate * patch."""
    f64 = lambda a: np.asarray(torch.as_tensor(a).detach(), dtype=np.float64)  # noqa: E731
    tile, dw_w, dw_b, pw_w, pw_b, merge_logits = map(f64, (tile, dw_w, dw_b, pw_w, pw_b, merge_logits))
    c, rows, cols = tile.shape
    p, k = merge_logits.shape[0], dw_w.shape[-1]
    hk, h, w = k // 2, rows - 2 * (p // 2), cols - 2 * (p // 2)
    e = np.exp(merge_logits - merge_logits.max())
    weights = e / e.sum()
    out = np.empty((c, h, w))
    for y in range(h):
        for x in range(w):
            patch = np.pad(tile[:, y:y + p, x:x + p], ((0, 0), (hk, hk), (hk, hk)))
            dw = np.full((c, p, p), 0.0) + dw_b[:, None, None]
            for a in range(k):
                for b in range(k):
                    dw += dw_w[:, 0, a, b][:, None, None] * patch[:, a:a + p, b:b + p]
            z = np.einsum("oc,cij->oij", pw_w[:, :, 0, 0], dw) + pw_b[:, None, None]
            gate = 1.0 / (1.0 + np.exp(-z))
            out[:, y, x] = (gate * tile[:, y:y + p, x:x + p] * weights).sum(axis=(1, 2))
    return out


def randomised(module: torch.nn.Module, seed: int, scale: float = 0.5) -> torch.nn.Module:
    """The module with every parameter moved by fresh noise, so gates and weights are not at init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for q in module.parameters():
            q.add_(scale * torch.randn(q.shape, generator=g))
    return module.eval()


def patches_of(tile: torch.Tensor, p: int) -> torch.Tensor:
    """(1, C, h + 2r, w + 2r) -> (h * w, C, p, p), the core pixels' patches in raster order."""
    c = tile.shape[1]
    return tile.unfold(2, p, 1).unfold(3, p, 1)[0].permute(1, 2, 0, 3, 4).reshape(-1, c, p, p)


@settings(max_examples=25, deadline=None)
@given(p=st.sampled_from([1, 3, 5, 7, 9]), k=st.sampled_from([1, 3, 5]), c=st.integers(1, 9),
       h=st.integers(1, 7), w=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_gated_merge_of_a_tile_matches_the_float64_patch_reference(p, k, c, h, w, seed):
    gssm = randomised(GatedSpatialSpectralMerging(c, p, kernel_size=k), seed)
    r = p // 2
    tile = np.random.default_rng(seed).standard_normal((c, h + 2 * r, w + 2 * r)).astype(np.float32)
    with torch.inference_mode():
        got = gssm.merge_tile(torch.from_numpy(tile)[None])[0].numpy()
    want = np_gated_merge(tile, gssm.depthwise.weight, gssm.depthwise.bias, gssm.pointwise.weight,
                          gssm.pointwise.bias, gssm.merge_logits)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def pavia_tile(datasets, side: int) -> np.ndarray:
    """A standardised (103, side, side) window of the real Pavia University crop."""
    cube = sio.loadmat(datasets / "pavia_university" / "paviaU_subimg.mat")["paviaU_subimg"][:side, :side]
    x = cube.astype(np.float64)
    x = (x - x.mean(axis=(0, 1))) / x.std(axis=(0, 1))
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def test_gated_merge_of_a_real_tile_matches_the_float64_patch_reference(datasets):
    tile = pavia_tile(datasets, 26)  # a 20 x 20 core of 7 x 7 patches
    gssm = randomised(GatedSpatialSpectralMerging(103, 7), seed=3, scale=0.1)
    with torch.inference_mode():
        got = gssm.merge_tile(torch.from_numpy(tile)[None])[0].numpy()
    want = np_gated_merge(tile, gssm.depthwise.weight, gssm.depthwise.bias, gssm.pointwise.weight,
                          gssm.pointwise.bias, gssm.merge_logits)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_model_tile_form_gives_the_patch_forward_logits(datasets):
    tile = torch.from_numpy(pavia_tile(datasets, 50))  # a 44 x 44 core
    model = randomised(build_model("spectralmamba", in_channels=103, num_classes=9, patch_size=7), 5, 0.1)
    with torch.inference_mode():
        got = model.forward_tile(tile[None])[0]
        want = model(patches_of(tile[None], 7)).T.reshape(9, 44, 44)
    assert got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=2e-5 * want.abs().max().item())
    assert (got.argmax(0) == want.argmax(0)).float().mean() == 1.0


def test_tile_form_refusals():
    assert has_tile_form("spectralmamba") and not has_tile_form("md2f-mamba") and not has_tile_form("nope")
    with pytest.raises(ValueError, match="pixel-wise"):
        pixelwise = build_model("spectralmamba", in_channels=8, num_classes=3, patch_size=0)
        pixelwise.forward_tile(torch.zeros(1, 8, 3, 3))
    with pytest.raises(ValueError, match="no core"):
        GatedSpatialSpectralMerging(8, 7).merge_tile(torch.zeros(1, 8, 6, 9))


class WindowSumRunner(Runner):
    """A runner whose tile form gives each core pixel the sums of its r-halo window in bands 0
    and 1 (a patch function that sees the halo), recording each tile's shape."""

    name = "window-sum"
    device = "cpu"
    precision = "fp32"
    runs_tiles = True

    def __init__(self, r: int) -> None:
        self.r, self.shapes = r, []

    def run(self, x: np.ndarray) -> np.ndarray:
        raise AssertionError("a tile-form runner gets tiles, not patches")

    def run_tile(self, tile: np.ndarray) -> np.ndarray:
        self.shapes.append(tile.shape)
        p = 2 * self.r + 1
        return np.lib.stride_tricks.sliding_window_view(tile[:2], (p, p), axis=(1, 2)).sum(axis=(3, 4))


def test_infer_gives_a_large_tile_to_the_tile_form_in_blocks_with_reflected_halo():
    image = np.random.default_rng(0).standard_normal((3, 300, 170)).astype(np.float32)
    runner = WindowSumRunner(3)
    got = tiled_logits(runner, Geometry("patch", 7, 260, 3), image)
    want = pixel_patches(image, 7)[:, :2].sum(axis=(2, 3)).T.reshape(2, 300, 170)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert max(s[1] for s in runner.shapes) == 128 + 6 and max(s[2] for s in runner.shapes) == 128 + 6
    assert len(runner.shapes) == 3 * 2 + 2  # a 260 x 170 core in 3 x 2 blocks, a 40 x 170 one in 1 x 2


def test_torch_runs_spectralmamba_tiles_in_infer_and_parity(sm_bundle, jasper_cube):
    bundle = open_bundle(sm_bundle)
    assert default_runtime(bundle) == "torch"
    data = parity_data(bundle.preprocessing, jasper_cube, bundle.input_kind, bundle.patch_size, batch=256,
                       pixels=np.random.default_rng(1).choice(100 * 100, 3000, replace=False))
    with open_runner(bundle, "torch") as runner:
        assert runner.runs_tiles and "tile form" in runner.notes
        patches = pixel_logits(run_batches(runner, data, tiles=False), data)
        counted = []
        outs = run_batches(runner, data, counted.append)
    tiles = pixel_logits(outs, data)
    assert [o.shape[0] for o in outs] == [len(b) for b in data.batches] and sum(counted) == 3000
    np.testing.assert_allclose(tiles, patches, rtol=1e-4, atol=1e-4 * np.abs(patches).max())
    assert (tiles.argmax(1) == patches.argmax(1)).all()
    with open_runner(bundle, "onnxruntime") as ort:
        assert not ort.runs_tiles
        with pytest.raises(RuntimeUnavailableError, match="patches in batches, not whole tiles"):
            ort.run_tile(np.zeros((bundle.preprocessing.out_bands, 10, 10), np.float32))
