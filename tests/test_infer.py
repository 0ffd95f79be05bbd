"""`hsiedge infer`: streamed tiles give the whole-scene answer, georeferenced, resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import CRS, TRANSFORM, trained_bundle, write_geotiff
from typer.testing import CliRunner

from hsiedge.bundle import open_bundle
from hsiedge.cli import app
from hsiedge.parity import parity_data, pixel_logits, run_batches
from hsiedge.runtimes import open_runner

runner = CliRunner()


def whole_scene_classes(bundle_path: Path, cube: np.ndarray, runtime: str) -> np.ndarray:
    """The same runner over every pixel of the scene at once (no tiles): class ids 1..K."""
    bundle = open_bundle(bundle_path)
    data = parity_data(bundle.preprocessing, cube, bundle.input_kind, bundle.patch_size, batch=256)
    with open_runner(bundle, runtime) as r:
        logits = pixel_logits(run_batches(r, data, tiles=False), data)
    return (logits.argmax(1) + 1).reshape(cube.shape[:2])


@pytest.mark.parametrize("runtime,tile", [("onnxruntime", 17), ("torch", 64)])
def test_tiles_equal_the_whole_scene_and_keep_georeferencing(sm_bundle, scene_tif, jasper_cube, tmp_path,
                                                             runtime, tile):
    out = tmp_path / "map.tif"
    res = runner.invoke(app, ["infer", str(scene_tif), "--bundle", str(sm_bundle), "-o", str(out),
                              "--runtime", runtime, "--tile", str(tile), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["pixels"] == 10000 and summary["runtime"] == runtime
    with rasterio.open(out) as m, rasterio.open(scene_tif) as s:
        assert m.crs == s.crs and m.transform == s.transform
        assert m.dtypes == ("uint8",) and m.nodata == 0 and m.count == 1
        assert m.profile["tiled"] and m.compression is not None
        assert m.colormap(1)[1][:3] == tuple(open_bundle(sm_bundle).manifest["classes"][0]["colour"])
        assert m.descriptions[0].startswith("class id")
        got = m.read(1)
    np.testing.assert_array_equal(got, whole_scene_classes(sm_bundle, jasper_cube, runtime))
    # no staging files left; the sidecar holds the class names as GDAL categories
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.tif", "map.tif.aux.xml"]


def test_nodata_pixels_get_class_zero_and_probabilities(sm_bundle, jasper_cube, tmp_path):
    cube = jasper_cube.astype(np.float32)
    cube[10:14, 20:30] = np.nan
    cube[50, :] = -9999.0
    scene = write_geotiff(tmp_path / "holes.tif", cube, nodata=-9999.0)
    out = tmp_path / "map.tif"
    res = runner.invoke(app, ["infer", str(scene), "--bundle", str(sm_bundle), "-o", str(out), "--probs",
                              "--quicklook", str(tmp_path / "map.png")])
    assert res.exit_code == 0, res.output
    with rasterio.open(out) as m:
        classes = m.read(1)
    assert (classes[10:14, 20:30] == 0).all() and (classes[50] == 0).all()
    assert (classes[:10] > 0).all()
    with rasterio.open(tmp_path / "map.probs.tif") as p:
        probs = p.read()
        assert p.count == 4 and p.crs == CRS
    sums = probs.astype(int).sum(0)
    assert (sums[classes > 0] >= 253).all() and (sums[classes > 0] <= 257).all()
    assert (probs.argmax(0)[classes > 0] + 1 == classes[classes > 0]).mean() > 0.99  # ties aside
    assert (tmp_path / "map.png").stat().st_size > 0


def test_outputs_say_what_made_them(sm_bundle, scene_tif, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764547200")
    out = tmp_path / "map.tif"
    res = runner.invoke(app, ["infer", str(scene_tif), "--bundle", str(sm_bundle), "-o", str(out), "--probs",
                              "--runtime", "torch"])
    assert res.exit_code == 0, res.output
    manifest_sha = __import__("hashlib").sha256((sm_bundle / "manifest.json").read_bytes()).hexdigest()
    for path in (out, tmp_path / "map.probs.tif"):
        with rasterio.open(path) as m:
            tags = m.tags()
            assert m.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert tags["HSIEDGE_MODEL"] == open_bundle(sm_bundle).model_name
        assert tags["HSIEDGE_BUNDLE_MANIFEST_SHA256"] == manifest_sha
        ran = (tags["HSIEDGE_RUNTIME"], tags["HSIEDGE_DEVICE"], tags["HSIEDGE_PRECISION"])
        assert ran == ("torch", "cpu", "fp32")
        assert tags["HSIEDGE_CREATED"] == "2025-12-01T00:00:00Z" and tags["HSIEDGE_SCENE"] == scene_tif.name
        assert tags["HSIEDGE_VERSION"] == __import__("hsiedge").__version__
    assert (tmp_path / "map.tif.aux.xml").read_text().count("<Category>") == 1 + 4  # nodata + 4 classes
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "soon")
    res = runner.invoke(app, ["infer", str(scene_tif), "--bundle", str(sm_bundle), "-o", str(tmp_path / "b")])
    assert res.exit_code == 1 and "SOURCE_DATE_EPOCH" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_plain_progress_lines_when_stderr_is_not_a_terminal(sm_bundle, scene_tif, tmp_path, monkeypatch):
    monkeypatch.setenv("HSIEDGE_PROGRESS_SECONDS", "0")  # a line after every tile
    res = runner.invoke(app, ["infer", str(scene_tif), "--bundle", str(sm_bundle), "-o",
                              str(tmp_path / "m.tif"), "--runtime", "torch", "--tile", "25", "--json"])
    assert res.exit_code == 0, res.output
    lines = [x for x in res.stderr.splitlines() if x.startswith("classifying:")]
    assert len(lines) == 16 and "16/16 tiles, 100.0 % of pixels" in lines[-1] and "px/s, about" in lines[-1]
    assert json.loads(res.stdout)["tiles"] == 16  # stdout stays clean JSON


def test_band_mismatch_is_refused_before_any_work(sm_bundle, jasper_cube, tmp_path):
    scene = write_geotiff(tmp_path / "short.tif", jasper_cube[:, :, :197])
    out = tmp_path / "map.tif"
    res = runner.invoke(app, ["infer", str(scene), "--bundle", str(sm_bundle), "-o", str(out)])
    assert res.exit_code == 1 and "expects 198 bands" in res.output and "197" in res.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["short.tif"]


def test_envi_scene(sm_bundle, jasper_cube, tmp_path):
    (tmp_path / "cube.raw").write_bytes(np.ascontiguousarray(jasper_cube.transpose(2, 0, 1)).astype("<u2")
                                        .tobytes())
    (tmp_path / "cube.hdr").write_text(
        "ENVI\nsamples = 100\nlines = 100\nbands = 198\nheader offset = 0\nfile type = ENVI Standard\n"
        "data type = 12\ninterleave = bsq\nbyte order = 0\n"
        "map info = {UTM, 1, 1, 560000, 4140000, 20, 20, 10, North, WGS-84}\n")
    out = tmp_path / "map.tif"
    res = runner.invoke(app, ["infer", str(tmp_path / "cube.raw"), "--bundle", str(sm_bundle),
                              "-o", str(out)])
    assert res.exit_code == 0, res.output
    with rasterio.open(out) as m:
        assert m.transform.c == 560000 and m.transform.a == 20 and m.read(1).min() >= 1
        assert m.crs.to_epsg() == 32610  # from `map info` alone: UTM zone 10 North, WGS-84


def test_resume_after_kill_gives_an_identical_file(sm_bundle, scene_tif, tmp_path, monkeypatch):
    # separate runs give identical files at one SOURCE_DATE_EPOCH; the resumed run below is
    # given another and must keep the interrupted run's creation time
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764547200")
    whole = tmp_path / "whole.tif"
    args = ["--bundle", str(sm_bundle), "--tile", "8", "--runtime", "torch"]
    res = runner.invoke(app, ["infer", str(scene_tif), "-o", str(whole), *args])
    assert res.exit_code == 0, res.output

    out = tmp_path / "map.tif"
    journal = tmp_path / ".map.tif.journal"
    cmd = [sys.executable, "-m", "hsiedge.cli", "infer", str(scene_tif), "-o", str(out), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) > 20:  # header + 20 tiles
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not out.exists()  # nothing under the final name
    done = len(journal.read_text().splitlines()) - 1
    assert 0 < done < 169

    res = runner.invoke(app, ["infer", str(scene_tif), "-o", str(out), *args])
    assert res.exit_code == 1 and "--resume" in res.output  # an interrupted run is not silently redone
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    res = runner.invoke(app, ["infer", str(scene_tif), "-o", str(out), *args, "--resume", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tiles_resumed"] >= done
    assert out.read_bytes() == whole.read_bytes()
    assert not journal.exists()


@pytest.fixture(scope="module")
def mh_bundle(datasets, tmp_path_factory) -> Path:
    return trained_bundle("mambahsi", datasets, tmp_path_factory.mktemp("mh"))


def test_image_model_runs_the_whole_scene_when_it_fits_the_budget(mh_bundle, scene_tif, jasper_cube,
                                                                  tmp_path):
    out = tmp_path / "map.tif"
    res = runner.invoke(app, ["infer", str(scene_tif), "--bundle", str(mh_bundle), "-o", str(out),
                              "--runtime", "torch", "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert (s["tiles"], s["tile"], s["overlap"]) == (1, 100, 0)
    with rasterio.open(out) as m:
        np.testing.assert_array_equal(m.read(1), whole_scene_classes(mh_bundle, jasper_cube, "torch"))


def test_image_model_tile_follows_the_memory_budget(mh_bundle, scene_tif, tmp_path):
    # torch: 400 MiB resident + 3 x the artifacts (~4.5 MB) + 64 MiB GDAL cache, then 22 kB +
    # 4 x 198 x 4 B per tile pixel: 600 MiB leaves room for ~5,400 pixels -> a 64-pixel tile
    # (multiple of 32) overlapping by 16.
    res = runner.invoke(app, ["infer", str(scene_tif), "--bundle", str(mh_bundle), "-o",
                              str(tmp_path / "a.tif"), "--runtime", "torch", "--memory", "600", "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert (s["tile"], s["overlap"]) == (64, 16) and s["tiles"] == 9  # cores of 48: 3 x 3 over 100 x 100
    # onnxruntime needs 80 MiB more and ~2.3x more per pixel: the same budget is too small,
    # said in one line
    res = runner.invoke(app, ["infer", str(scene_tif), "--bundle", str(mh_bundle), "-o",
                              str(tmp_path / "b.tif"), "--runtime", "onnxruntime", "--memory", "600"])
    assert res.exit_code == 1 and "--memory" in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "b.tif").exists()


def test_an_image_model_keeps_its_heap_within_the_memory_budget(mh_bundle, sm_bundle, scene_tif, tmp_path,
                                                                monkeypatch):
    """MambaHSI's run hands its budget, less room for a tile, to the heap trimming and keeps
    large blocks on the heap (hsiedge.memory); a patch model's run trims on free heap alone,
    large blocks mapped."""
    import hsiedge.infer.pipeline as pipeline
    import hsiedge.infer.run as run
    from hsiedge import memory

    seen: dict[str, list] = {"within": [], "large": []}

    def trim(bound=memory.FREE_HEAP_BOUND, within_mib=None):
        seen["within"].append(within_mib)
        return memory.release_free_heap(bound, within_mib)

    def bound(large_blocks=False):
        seen["large"].append(large_blocks)
        return memory.bound_heap(large_blocks)

    monkeypatch.setattr(pipeline, "release_free_heap", trim)
    monkeypatch.setattr(run, "bound_heap", bound)
    from hsiedge.infer.policy import kept_heap_mib

    kept = kept_heap_mib(open_bundle(mh_bundle), "torch", 1500, 64)
    assert 1400 < kept < 1500  # half a 64 x 64 tile's modelled memory is left as room
    for bundle, extra, within, large in ((mh_bundle, ["--tile", "64", "--memory", "1500"], kept, True),
                                         (sm_bundle, [], None, False)):
        seen = {"within": [], "large": []}
        res = runner.invoke(app, ["infer", str(scene_tif), "--bundle", str(bundle), "-o",
                                  str(tmp_path / f"{within}.tif"), "--runtime", "torch", *extra])
        assert res.exit_code == 0, res.output
        assert seen["large"] == [large] and seen["within"] and set(seen["within"]) == {within}
    monkeypatch.undo()
    memory.bound_heap()  # this process's large blocks mapped again


def test_parity_check_reports_the_tiling_effect_apart(mh_bundle, scene_tif, jasper_cube, tmp_path,
                                                      datasets):
    export_scene = ["--scene", str(datasets / "jasper_ridge" / "JasperRidge2_R198.mat")]
    res = runner.invoke(app, ["parity-check", str(mh_bundle), *export_scene, "--tile", "48", "--overlap",
                              "16", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    effect = report["original"]["tiling_effect"]
    assert (effect["tile"], effect["overlap"], effect["tiles"]) == (48, 16, 16)  # cores of 32: 4 x 4 over 100
    assert "tiling_effect" in report["results"][0] and "agreement" not in report["results"][0]["checks"]
    # the same figure, independently: hsiedge infer's map with those tiles vs the whole-scene labels
    out = tmp_path / "map.tif"
    res = runner.invoke(app, ["infer", str(scene_tif), "--bundle", str(mh_bundle), "-o", str(out),
                              "--runtime", "torch", "--tile", "48", "--overlap", "16"])
    assert res.exit_code == 0, res.output
    with rasterio.open(out) as m:
        tiled = m.read(1).reshape(-1)
    whole = whole_scene_classes(mh_bundle, jasper_cube, "torch").reshape(-1)
    with np.load(open_bundle(mh_bundle).artifact("heldout")) as h:
        pixels = h["pixels"]
    assert effect["pixels"] == pixels.size
    assert effect["agreement"] == pytest.approx((tiled[pixels] == whole[pixels]).mean(), abs=1e-12)
    # by default, for each runtime the tiles `hsiedge infer --runtime R` picks on that scene: at
    # 900 MiB the whole scene for both; at 740 MiB the whole scene for torch, tiles for onnxruntime
    for budget in ([], ["--memory", "740"]):
        res = runner.invoke(app, ["parity-check", str(mh_bundle), *export_scene, "--json", *budget])
        assert res.exit_code == 0, res.output
        report = json.loads(res.stdout)
        for runtime, effect in (("torch", report["original"]["tiling_effect"]),
                                ("onnxruntime", report["results"][0]["tiling_effect"])):
            res = runner.invoke(app, ["infer", str(scene_tif), "--bundle", str(mh_bundle), "--runtime",
                                      runtime, "-o", str(tmp_path / f"{runtime}.tif"), "--json", *budget])
            assert res.exit_code == 0, res.output
            picked = json.loads(res.stdout)
            assert picked["tiles"] == (1 if not budget or runtime == "torch" else 4), (runtime, picked)
            assert (effect["tile"], effect["overlap"], effect["tiles"]) == (
                picked["tile"], picked["overlap"], picked["tiles"]), (runtime, budget)
            (tmp_path / f"{runtime}.tif").unlink()
    # a budget the whole scene fits in: one tile, no tiling effect at all
    res = runner.invoke(app, ["parity-check", str(mh_bundle), *export_scene, "--memory", "4000", "--json"])
    assert res.exit_code == 0, res.output
    effect = json.loads(res.stdout)["results"][0]["tiling_effect"]
    assert effect["tiles"] == 1 and effect["agreement"] == 1.0


def _failing_after(n: int, fn, error: BaseException):
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) > n:
            raise error
        return fn(*args, **kwargs)
    return wrapped


def test_full_disk_mid_run_keeps_finished_tiles_and_resumes(sm_bundle, scene_tif, tmp_path, monkeypatch):
    import errno

    from hsiedge.infer.staging import Staging

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764547200")
    args = ["--bundle", str(sm_bundle), "--tile", "25", "--runtime", "torch"]
    whole = tmp_path / "whole.tif"
    assert runner.invoke(app, ["infer", str(scene_tif), "-o", str(whole), *args]).exit_code == 0
    out = tmp_path / "map.tif"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as m:
        m.setattr(Staging, "record", _failing_after(5, Staging.record, full))
        res = runner.invoke(app, ["infer", str(scene_tif), "-o", str(out), *args])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert "No space left on device" in res.output and "--resume" in res.output and str(out) in res.output
    assert not out.exists() and not list(tmp_path.glob("*partial*"))
    journal = tmp_path / ".map.tif.journal"
    assert len(journal.read_text().splitlines()) == 1 + 5  # header + the five tiles that were stored
    res = runner.invoke(app, ["infer", str(scene_tif), "-o", str(out), *args, "--resume", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tiles_resumed"] == 5
    assert out.read_bytes() == whole.read_bytes() and not journal.exists()


def test_failed_map_write_leaves_nothing_under_the_final_name(sm_bundle, scene_tif, tmp_path, monkeypatch):
    from rasterio.errors import RasterioIOError

    import hsiedge.io.writer as writer

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764547200")
    args = ["--bundle", str(sm_bundle), "--runtime", "torch"]
    whole = tmp_path / "whole.tif"
    assert runner.invoke(app, ["infer", str(scene_tif), "-o", str(whole), *args]).exit_code == 0
    out = tmp_path / "map.tif"
    # what rasterio raises when GDAL cannot write a block (seen with a file-size limit)
    err = RasterioIOError("Write failed. See previous exception for details.")
    err.__cause__ = RuntimeError("TIFFAppendToStrip:Write error at scanline 0")
    with monkeypatch.context() as m:
        m.setattr(writer, "_blocks", _failing_after(0, writer._blocks, err))
        res = runner.invoke(app, ["infer", str(scene_tif), "-o", str(out), *args])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert "TIFFAppendToStrip" in res.output and "MiB free" in res.output and "--resume" in res.output
    assert not out.exists() and not list(tmp_path.glob("*partial*")) and not list(tmp_path.glob("*stage*"))
    res = runner.invoke(app, ["infer", str(scene_tif), "-o", str(out), *args, "--resume"])
    assert res.exit_code == 0, res.output
    assert out.read_bytes() == whole.read_bytes()


def test_read_error_names_the_scene_and_keeps_finished_tiles(sm_bundle, jasper_cube, tmp_path):
    scene = tmp_path / "cut.tif"
    with rasterio.open(scene, "w", driver="GTiff", height=100, width=100, count=198, dtype="uint16", crs=CRS,
                       transform=TRANSFORM, interleave="pixel", tiled=True, blockxsize=32,
                       blockysize=32) as dst:
        dst.write(jasper_cube.transpose(2, 0, 1))
    os.truncate(scene, scene.stat().st_size * 6 // 10)  # a download cut short: the last blocks are gone
    out = tmp_path / "map.tif"
    res = runner.invoke(app, ["infer", str(scene), "--bundle", str(sm_bundle), "-o", str(out), "--tile", "16",
                              "--runtime", "torch"])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert str(scene) in res.output and "reading window" in res.output and "--resume" in res.output
    assert not out.exists() and not list(tmp_path.glob("*partial*"))
    assert len((tmp_path / ".map.tif.journal").read_text().splitlines()) > 1  # finished tiles kept


def test_image_tile_stays_within_a_tensorrt_engines_profile(mh_bundle):
    from hsiedge.bundle import Bundle, open_bundle
    from hsiedge.infer import Geometry

    b = open_bundle(mh_bundle)
    with_engine = Bundle(b.path, {**b.manifest, "engines": {"rtx": {"profile": {"max": [1, 198, 64, 64]}}}},
                         b.manifest_sha256)
    # a budget the whole 100 x 100 scene fits in: torch takes it whole, the engine only 64-pixel tiles
    whole = Geometry.for_bundle(with_engine, runtime="torch", memory_mib=4000, scene_shape=(100, 100))
    capped = Geometry.for_bundle(with_engine, runtime="tensorrt", memory_mib=4000, scene_shape=(100, 100))
    assert (whole.core, whole.margin) == (100, 0)
    assert capped.core + 2 * capped.margin == 64 and capped.margin == 8


def test_scene_without_georeferencing_is_said_and_the_map_lands_in_the_working_folder(
        sm_bundle, datasets, tmp_path, monkeypatch):
    """A .mat cube has no CRS: the summary says so; with no -o the map goes to the current
    directory, not into the (shared, often read-only) data folder."""
    monkeypatch.chdir(tmp_path)
    scene = datasets / "jasper_ridge" / "JasperRidge2_R198.mat"
    res = runner.invoke(app, ["infer", str(scene), "--bundle", str(sm_bundle)])
    assert res.exit_code == 0, res.output
    assert "warning: JasperRidge2_R198.mat has no georeferencing (no CRS)" in " ".join(res.output.split())
    out = tmp_path / "JasperRidge2_R198.classes.tif"
    assert out.is_file() and not (scene.parent / out.name).exists()
    with rasterio.open(out) as m:
        assert m.crs is None
    res = runner.invoke(app, ["infer", str(scene), "--bundle", str(sm_bundle), "-o", "again.tif", "--json"])
    summary = json.loads(res.stdout)
    assert summary["georeferenced"] is False and "no georeferencing" in summary["warnings"][0]
