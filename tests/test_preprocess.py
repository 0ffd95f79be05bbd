"""Preprocessing chains: numerics against NumPy written here, serialisation, windows, nodata."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hsiedge.preprocess import PCA, BandSelect, Chain, PercentileStretch, Standardize, valid_mask


@pytest.fixture(scope="module")
def cube(jasper_cube) -> np.ndarray:
    return jasper_cube[:60, :50].astype(np.float32)


def test_percentile_stretch_is_mambahsis(cube):
    flat = cube.reshape(-1, cube.shape[-1]).astype(np.float64)
    y, ok = Chain([PercentileStretch()]).fit(flat).apply(cube)
    lo, hi = np.percentile(flat, 2, axis=0), np.percentile(flat, 98, axis=0)
    expected = (np.clip((cube - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8) / 255.0  # uint8 and back
    assert ok.all() and y.dtype == np.float32
    np.testing.assert_allclose(y, expected, atol=1e-6)
    assert len(np.unique(y)) <= 256


def test_standardize_and_pca_against_numpy(cube):
    flat = cube.reshape(-1, cube.shape[-1]).astype(np.float64)
    train = flat[::7]
    y, _ = Chain([Standardize(), PCA(10)]).fit(flat, train).apply(cube)
    z = (flat - flat.mean(0)) / flat.std(0)
    zt = (train - flat.mean(0)) / flat.std(0)
    cov = np.cov(zt - zt.mean(0), rowvar=False)
    evals, evecs = np.linalg.eigh(cov)
    top = evecs[:, ::-1][:, :10]
    proj = (z - zt.mean(0)) @ top
    got = y.reshape(-1, 10).astype(np.float64)
    for k in range(10):  # same components up to sign
        assert abs(abs(np.corrcoef(got[:, k], proj[:, k])[0, 1]) - 1) < 1e-6
    np.testing.assert_allclose(np.var(got[::7], axis=0, ddof=1), evals[::-1][:10], rtol=1e-4)


def test_pca_is_fitted_on_training_pixels_only(cube):
    flat = cube.reshape(-1, cube.shape[-1]).astype(np.float64)
    a = Chain([PCA(5)]).fit(flat, flat[:100])
    b = Chain([PCA(5)]).fit(flat, flat[100:300])
    np.testing.assert_allclose(a.transforms[0].mean, flat[:100].mean(0))
    assert not np.allclose(a.transforms[0].components, b.transforms[0].components)
    with pytest.raises(ValueError, match="training pixels only"):
        Chain([PCA(5)]).fit(flat)


def test_serialisation_round_trip_through_json(cube):
    flat = cube.reshape(-1, cube.shape[-1]).astype(np.float64)
    steps = [BandSelect(range(0, 198, 2)), PercentileStretch(), Standardize(), PCA(12)]
    chain = Chain(steps).fit(flat, flat[::5])
    again = Chain.from_dict(json.loads(json.dumps(chain.to_dict())))
    assert again.out_bands == chain.out_bands == 12
    np.testing.assert_array_equal(again.apply(cube)[0], chain.apply(cube)[0])
    with pytest.raises(ValueError, match="unknown preprocessing step 'blur'"):
        Chain.from_dict({"version": 1, "transforms": [{"kind": "blur"}]})


def test_window_by_window_equals_whole(cube):
    flat = cube.reshape(-1, cube.shape[-1]).astype(np.float64)
    chain = Chain([Standardize(), PCA(8)]).fit(flat, flat[::3])
    whole, _ = chain.apply(cube)
    rows = [np.concatenate([chain.apply(cube[r:r + 20, c:c + 25])[0] for c in (0, 25)], axis=1)
            for r in (0, 20, 40)]
    tiles = np.concatenate(rows, axis=0)
    np.testing.assert_array_equal(tiles, whole)


def test_nan_and_nodata_are_masked_not_propagated(cube):
    bad = cube.copy()
    bad[3, 4, 10] = np.nan
    bad[5, 6, :] = 0.0  # nodata in every band
    flat = bad.reshape(-1, bad.shape[-1])
    ok = valid_mask(flat, nodata=0.0)
    assert ok.sum() == flat.shape[0] - 2
    chain = Chain([Standardize()]).fit(flat[ok])
    y, mask = chain.apply(bad, nodata=0.0)
    assert np.isfinite(y).all() and not mask[3, 4] and not mask[5, 6] and mask.sum() == mask.size - 2
    assert (y[3, 4] == 0).all() and (y[5, 6] == 0).all()
    # Fitting skips invalid pixels by itself: same statistics as fitting on the valid ones.
    fitted = Chain([Standardize()]).fit(flat, nodata=0.0).transforms[0]
    np.testing.assert_allclose(fitted.mean, chain.transforms[0].mean)


def test_band_count_is_checked(cube):
    chain = Chain([Standardize()]).fit(cube.reshape(-1, cube.shape[-1]))
    with pytest.raises(ValueError, match="expects 198 bands, got 100"):
        chain.apply(cube[..., :100])


@pytest.mark.parametrize("seed", [0, 1])
def test_stretch_and_standardize_bit_for_bit_against_float64(seed):
    """Fresh random uint16 windows with a flat band (hi == lo), an inverted one and nodata pixels:
    every value exactly what the plain float64 formulas give (training used them, so the
    in-place forms must not move a single 1/255 step)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 9000, size=(33, 21, 12)).astype(np.uint16)
    x[4, 5, :] = 7  # nodata in every band
    lo = rng.uniform(0, 3000, 12)
    hi = lo + rng.uniform(1, 6000, 12)
    hi[2] = lo[2]  # flat band
    hi[7] = lo[7] - 5.0  # inverted: treated as flat
    lo[9] = 1234.0  # hits exact 1/255 steps: integers on a span of 255 * 3
    hi[9] = lo[9] + 765.0
    mean, std = rng.uniform(0, 5000, 12), rng.uniform(10, 900, 12)

    chain = Chain([PercentileStretch(lo=lo, hi=hi)], in_bands=12)
    y, ok = chain.apply(x, nodata=7)
    x64 = x.astype(np.float64)
    span = hi - lo
    ref = np.where(span > 0, (x64 - lo) / np.where(span > 0, span, 1.0), 0.0)
    ref = (np.floor(np.clip(ref, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)
    ref[4, 5] = 0.0
    assert not ok[4, 5] and ok.sum() == ok.size - 1
    np.testing.assert_array_equal(y, ref)
    assert (y[..., 2] == 0).all() and (y[..., 7] == 0).all()

    y, _ = Chain([Standardize(mean=mean, std=std)], in_bands=12).apply(x)
    np.testing.assert_array_equal(y, ((x64 - mean) / std).astype(np.float32))
