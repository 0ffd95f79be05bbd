"""`hsiedge bench`: the figures it prints hang together, its input is what it says, bad options
get one line.  (Speed itself is never asserted.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from typer.testing import CliRunner

from hsiedge.benchmark import bench_input
from hsiedge.bundle import open_bundle
from hsiedge.cli import app


def _bench(*args: str) -> dict:
    res = CliRunner().invoke(app, ["bench", *args, "--seconds", "0.2", "--warmup", "0", "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _consistent(report: dict, pixels_per_call: int, runtimes: set[str]) -> None:
    assert {r["runtime"] for r in report["results"]} == runtimes
    assert report["input"]["pixels_per_call"] == pixels_per_call
    assert len(report["machine"]["load_average"]) == 3
    for r in report["results"]:
        assert r["calls"] >= 3 and r["warmup_calls"] >= 1
        assert r["pixels_per_second"] == pytest.approx(pixels_per_call * r["calls"] / r["seconds"], rel=2e-3)
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["median"] <= lat["p90"] <= lat["p99"]
        assert lat["min"] <= lat["mean"] and lat["mean"] * r["calls"] <= r["seconds"] * 1e3 * 1.001
        assert r["peak_rss_mib"] >= r["rss_before_mib"] > 0


def test_patch_model_on_a_scene(sm_bundle, scene_tif):
    report = _bench(str(sm_bundle), "--batch", "50", "--scene", str(scene_tif))
    _consistent(report, 50, {"torch", "onnxruntime"})
    assert report["input"]["shape"] == [50, 198, 7, 7]
    assert "jasper.tif" in report["input"]["source"]


def test_patch_model_tile_as_infer_runs_it(sm_bundle, scene_tif):
    """--tile on a patch model: one 16 x 16 core with its halo per call; torch runs SpectralMamba's
    tile form on it, ONNX Runtime the tile's patches in batches of 50."""
    report = _bench(str(sm_bundle), "--tile", "16", "--batch", "50", "--scene", str(scene_tif))
    _consistent(report, 16 * 16, {"torch", "onnxruntime"})
    assert report["input"]["shape"] == [198, 22, 22]  # 16 + 2 x 3 halo pixels a side
    notes = {r["runtime"]: r["notes"] for r in report["results"]}
    assert "tile form" in notes["torch"] and "tile form" not in notes["onnxruntime"]


def test_a_patch_tile_runs_the_same_pixels_either_way(sm_bundle, scene_tif):
    """What a tile call computes: the tile form's logits equal the patch batches' (rounding aside),
    and both are the core pixels' patches cut from the window (scene edges play no part)."""
    from hsiedge.runtimes import open_runner

    bundle = open_bundle(sm_bundle)
    x = bench_input(bundle, batch=7, tile=5, scene=scene_tif)
    assert x.pixels == 25 and x.array.shape == (198, 11, 11) and x.batch == 7
    with rasterio.open(scene_tif) as src:  # the middle 11 x 11 window: (100 - 11) // 2 = 44
        cube = src.read().transpose(1, 2, 0)
    window, _ = bundle.preprocessing.apply(cube[44:55, 44:55], None)
    np.testing.assert_array_equal(x.array, window.transpose(2, 0, 1).astype(np.float32))
    with open_runner(bundle, "torch") as runner:
        assert runner.runs_tiles
        tiled = x.geometry.run(runner, x.array, x.tile, x.batch)
        want = runner.run(_pixel_batch_of_core(x.array, 3))
    np.testing.assert_allclose(tiled.reshape(tiled.shape[0], -1).T, want, rtol=1e-4, atol=1e-4)


def _pixel_batch_of_core(window: np.ndarray, r: int) -> np.ndarray:
    """Each core pixel's (2r + 1)^2 patch of a window with an r-pixel halo, by a plain loop."""
    _, rows, cols = window.shape
    return np.stack([window[:, i - r:i + r + 1, j - r:j + r + 1]
                     for i in range(r, rows - r) for j in range(r, cols - r)])


def test_the_scene_input_is_the_middle_window_preprocessed(sm_bundle, scene_tif):
    """Against patches cut by a plain loop from the scene's middle 8 x 8 pixels."""
    bundle = open_bundle(sm_bundle)
    got = bench_input(bundle, batch=60, scene=scene_tif).array  # an 8 x 8 window, first 60 pixels
    with rasterio.open(scene_tif) as src:
        cube = src.read().transpose(1, 2, 0)
    x, _ = bundle.preprocessing.apply(cube[46:54, 46:54], None)  # (100 - 8) // 2 = 46
    padded = np.pad(x, ((3, 3), (3, 3), (0, 0)), mode="reflect")
    want = np.stack([padded[i // 8:i // 8 + 7, i % 8:i % 8 + 7].transpose(2, 0, 1) for i in range(60)])
    np.testing.assert_array_equal(got, want.astype(np.float32))


def test_image_model_tile(exported):
    path, _ = exported("mambahsi", "plugin", "fp32")
    report = _bench(str(path), "--tile", "32", "--runtime", "onnxruntime")
    _consistent(report, 32 * 32, {"onnxruntime"})
    assert report["input"]["shape"][2:] == [32, 32] and report["input"]["source"] == "standard-normal values"


@pytest.mark.parametrize(("args", "says"), [
    (["--tile", "0"], "--tile must be at least 1"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--runtime", "tensorflow"], "expected one of"),
    (["--seconds", "0"], "--seconds"),
])
def test_bad_options_get_one_line(sm_bundle, args, says):
    res = CliRunner().invoke(app, ["bench", str(sm_bundle), *args])
    assert res.exit_code != 0
    assert says in " ".join(res.output.split())


def test_a_scene_with_other_bands_is_refused(sm_bundle, tmp_path, jasper_cube):
    from conftest import write_geotiff

    scene = write_geotiff(tmp_path / "50.tif", jasper_cube[:, :, :50])
    res = CliRunner().invoke(app, ["bench", str(sm_bundle), "--scene", str(scene)])
    assert res.exit_code == 1
    assert "expects 198 bands, the scene has 50" in " ".join(res.output.split())
