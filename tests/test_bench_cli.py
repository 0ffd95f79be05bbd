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
    (["--tile", "32"], "give --batch, not --tile"),
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
