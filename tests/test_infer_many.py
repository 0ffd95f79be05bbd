"""`hsiedge infer-many` on a Dask LocalCluster of 2 worker processes: six real AVIRIS scenes of
mixed sizes give the maps six separate `hsiedge infer` runs give (byte for byte); a worker
killed mid-scene, a corrupt scene and a killed client change nothing in the maps."""

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
from conftest import write_geotiff
from typer.testing import CliRunner

from hsiedge.bundle import open_bundle, sha256_file
from hsiedge.cli import app

pytest.importorskip("distributed", reason="infer-many needs the `cluster` extra (Dask)")

EPOCH = "1700000000"  # SOURCE_DATE_EPOCH: separate runs write byte-identical maps
# (file, array key, rows, cols): real AVIRIS scenes, cropped to mixed sizes, first 198 bands
SCENES = {"jasper": None,
          "santa-barbara": ("aviris_santa_barbara/a_hsi_img_for_VI_demo.mat", "hsi_img", 90, 90),
          "airport-2": ("abu/abu-airport-2.mat", "data", 100, 64),
          "urban-1": ("abu/abu-urban-1.mat", "data", 72, 100),
          "urban-2": ("abu/abu-urban-2.mat", "data", 50, 50),
          "urban-4": ("abu/abu-urban-4.mat", "data", 37, 81)}
SIZES = [(100, 100), (90, 90), (100, 64), (72, 100), (50, 50), (37, 81)]
# Many small tiles (up to 49 a scene) on the patch-by-patch runtime, so a scene can be interrupted
# (with torch's SpectralMamba tile form every scene was done before the client could be killed).
SLOW = ["--tile", "16", "--batch", "64", "--runtime", "onnxruntime"]


@pytest.fixture(scope="module")
def scenes(datasets, jasper_cube, tmp_path_factory) -> list[Path]:
    import scipy.io as sio

    out = tmp_path_factory.mktemp("many-scenes")
    paths = []
    for name, spec in SCENES.items():
        if spec is None:
            cube = jasper_cube
        else:
            f, key, h, w = spec
            cube = sio.loadmat(datasets / f)[key][:h, :w, :198]
        paths.append(write_geotiff(out / f"{name}.tif", np.ascontiguousarray(cube)))
    return paths


@pytest.fixture(scope="module")
def reference(scenes, sm_bundle, tmp_path_factory) -> dict[str, bytes]:
    """Each scene's map from its own `hsiedge infer` run."""
    out = tmp_path_factory.mktemp("many-ref")
    old = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = EPOCH
    try:
        maps = {}
        for s in scenes:
            res = CliRunner().invoke(app, ["infer", str(s), "--bundle", str(sm_bundle), "-o",
                                           str(out / f"{s.stem}.classes.tif"), *SLOW])
            assert res.exit_code == 0, res.output
            maps[s.stem] = (out / f"{s.stem}.classes.tif").read_bytes()
    finally:
        if old is None:
            del os.environ["SOURCE_DATE_EPOCH"]
        else:
            os.environ["SOURCE_DATE_EPOCH"] = old
    return maps


def many(args: list[str], **kw) -> subprocess.Popen:
    """`hsiedge infer-many ... --json` in its own process, the local cluster's 2 workers under it."""
    env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH, "HSIEDGE_PROGRESS_SECONDS": "1000"}
    return subprocess.Popen([sys.executable, "-m", "hsiedge.cli", "infer-many", *args, "--workers", "2",
                             "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kw)


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, dict, str]:
    out, err = proc.communicate(timeout=timeout)
    try:
        return proc.returncode, json.loads(out), err
    except ValueError:
        pytest.fail(f"no JSON report (exit {proc.returncode}): {err[-3000:]}")


def assert_maps(out_dir: Path, reference: dict[str, bytes]) -> None:
    for stem, ref in reference.items():
        got = (out_dir / f"{stem}.classes.tif").read_bytes()
        assert got == ref, f"{stem}: the map differs from the separate `hsiedge infer` run's"


def by_stem(report: dict) -> dict[str, dict]:
    return {Path(e["scene"]).stem: e for e in report["scenes"]}


def wait_for(predicate, what: str, timeout: float = 120.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        found = predicate()
        if found:
            return found
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def unlocked(lock: Path) -> bool:
    """No live process holds this run lock (a killed one leaves the file, not the lock)."""
    import fcntl

    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def test_maps_identical_to_separate_infer_runs(scenes, sm_bundle, reference, tmp_path):
    rc, report, err = finish(many([*map(str, scenes), "--bundle", str(sm_bundle), "--out-dir", str(tmp_path),
                                   *SLOW]))
    assert rc == 0, err
    assert_maps(tmp_path, reference)
    assert report["totals"]["done"] == 6 and report["totals"]["failed"] == 0
    assert report["totals"]["pixels_classified"] == sum(
        e["pixels"] for e in report["scenes"]) == sum(h * w for h, w in SIZES)
    assert json.loads((tmp_path / "hsiedge-run.json").read_text())["scenes"] == report["scenes"]
    for e in report["scenes"]:
        assert e["status"] == "done" and e["error"] is None and e["pixels_per_second"] > 0
        assert e["worker"].startswith("tcp://")
        assert e["outputs_sha256"][e["output"]] == sha256_file(e["output"])
        assert e["scene_files_sha256"] == {e["scene"]: sha256_file(e["scene"])}
    assert len({e["worker"] for e in report["scenes"]}) == 2, "both workers should have taken scenes"
    assert not list(tmp_path.glob(".*")), "staging, journals or locks were left behind"


def test_worker_killed_mid_scene(scenes, sm_bundle, reference, tmp_path):
    proc = many([*map(str, scenes), "--bundle", str(sm_bundle), "--out-dir", str(tmp_path), *SLOW])

    def kill_a_writer():
        """SIGKILL the worker process writing a scene that has journaled 2 tiles (its pid is in the lock)."""
        for journal in tmp_path.glob(".*.journal"):
            try:
                if len(journal.read_text().splitlines()) >= 3:
                    pid = int(journal.with_name(journal.name[:-len(".journal")] + ".lock").read_text())
                    os.kill(pid, signal.SIGKILL)
                    return journal.name[1:-len(".classes.tif.journal")]
            except (OSError, ValueError):
                continue  # finished (and cleaned up) in between: try the next
        return None

    killed = wait_for(kill_a_writer, "a scene in progress")
    rc, report, err = finish(proc)
    assert rc == 0, err
    assert_maps(tmp_path, reference)
    entry = by_stem(report)[killed]
    assert entry["status"] == "done" and entry["tiles_resumed"] >= 2, entry  # continued, not restarted
    assert report["totals"]["done"] == 6


def test_corrupt_scene_is_reported_and_the_rest_complete(scenes, sm_bundle, reference, tmp_path):
    bad = tmp_path / "in" / "damaged.tif"
    bad.parent.mkdir()
    bad.write_bytes(scenes[0].read_bytes()[:5000])  # a GeoTIFF cut short
    wrong = write_geotiff(tmp_path / "in" / "wrong-bands.tif", np.ones((8, 8, 50), np.uint16))
    out = tmp_path / "out"
    rc, report, err = finish(many([str(scenes[0]), str(bad), *map(str, scenes[1:]), str(wrong), "--bundle",
                                   str(sm_bundle), "--out-dir", str(out), *SLOW]))
    assert rc == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "2 of 8 scenes failed" in lines[0], err
    assert_maps(out, reference)
    got = by_stem(report)
    assert got["damaged"]["status"] == "failed" and str(bad) in got["damaged"]["error"]
    assert got["wrong-bands"]["status"] == "failed" and "expects 198 bands, the scene has 50" in \
        got["wrong-bands"]["error"]
    assert not (out / "damaged.classes.tif").exists() and not (out / "wrong-bands.classes.tif").exists()
    assert report["totals"] == {**report["totals"], "done": 6, "failed": 2}


def test_resume_after_killing_the_client(scenes, sm_bundle, reference, tmp_path):
    args = [*map(str, scenes), "--bundle", str(sm_bundle), "--out-dir", str(tmp_path), *SLOW]
    proc = many(args, start_new_session=True)

    def two_done():
        try:
            doc = json.loads((tmp_path / "hsiedge-run.json").read_text())
        except (OSError, ValueError):
            return None
        done = [e for e in doc["scenes"] if e["status"] == "done"]
        return done if len(done) >= 2 else None

    two_done_first = wait_for(two_done, "two finished scenes in the report")
    os.kill(proc.pid, signal.SIGKILL)  # the client only; its local workers notice and stop
    proc.communicate(timeout=60)
    recorded = json.loads((tmp_path / "hsiedge-run.json").read_text())["scenes"]
    finished = {Path(e["scene"]).stem: e for e in recorded if e["status"] == "done"}
    assert len(finished) >= len(two_done_first) and len(finished) < 6, "the client should die mid-run"
    stamps = {stem: os.stat(tmp_path / f"{stem}.classes.tif").st_mtime_ns for stem in finished}
    # one finished map damaged afterwards: it exists, but its sha256 no longer matches, so it is redone
    damaged = sorted(finished)[0]
    (tmp_path / f"{damaged}.classes.tif").write_bytes(b"not the map")

    wait_for(lambda: all(map(unlocked, tmp_path.glob(".*.lock"))), "the killed client's workers to stop", 60)
    rc, report, err = finish(many([*args, "--resume"]))
    assert rc == 0, err
    assert_maps(tmp_path, reference)
    got = by_stem(report)
    for stem in finished:
        if stem == damaged:
            assert got[stem]["status"] == "done", got[stem]
        else:
            assert got[stem]["status"] == "skipped", got[stem]
            assert os.stat(tmp_path / f"{stem}.classes.tif").st_mtime_ns == stamps[stem]
    assert report["totals"]["skipped"] == len(finished) - 1
    assert report["totals"]["done"] == 6 - len(finished) + 1


def test_without_resume_an_interrupted_scene_is_not_touched(scenes, sm_bundle, tmp_path):
    journal = tmp_path / f".{scenes[0].stem}.classes.tif.journal"
    journal.write_text("{}\n")
    res = CliRunner().invoke(app, ["infer-many", str(scenes[0]), "--bundle", str(sm_bundle), "--out-dir",
                                   str(tmp_path)])
    assert res.exit_code == 1
    assert "interrupted run" in res.output and "--resume" in res.output
    assert journal.read_text() == "{}\n"


def test_unreadable_report_on_resume(scenes, sm_bundle, tmp_path):
    (tmp_path / "hsiedge-run.json").write_text("[1, 2")
    res = CliRunner().invoke(app, ["infer-many", str(scenes[0]), "--bundle", str(sm_bundle), "--out-dir",
                                   str(tmp_path), "--resume"])
    assert res.exit_code == 1
    assert "hsiedge-run.json: cannot read the previous run's report" in " ".join(res.output.split())


def test_each_worker_opens_the_runner_once(scenes, sm_bundle, tmp_path, monkeypatch):
    """Workers in this process (threads), so that the runtime registry's opener can be counted."""
    from distributed import LocalCluster

    import hsiedge.runtimes as runtimes
    from hsiedge.many.run import infer_many

    opened = []
    real = runtimes.open_runner
    monkeypatch.setattr(runtimes, "open_runner", lambda *a, **k: opened.append(a) or real(*a, **k))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        report = infer_many(scenes, open_bundle(sm_bundle), tmp_path, scheduler=cluster.scheduler_address)
    assert report["totals"]["done"] == 6
    assert len(opened) == 2, "one runner per worker, for all six scenes"


def test_a_worker_verifies_the_bundle_itself(sm_bundle, tmp_path):
    """A worker whose bundle is not the one the client verified classifies nothing."""
    import shutil

    from hsiedge.many.worker import BundleService

    copy = tmp_path / "bundle"
    shutil.copytree(sm_bundle, copy)
    good = open_bundle(copy).manifest_sha256
    other = BundleService(str(copy), "0" * 64, [], None, 1)
    other.setup()
    assert "differs from the one the client verified" in other.error and other.runner is None
    onnx = next(copy.glob("*.onnx"))
    onnx.write_bytes(onnx.read_bytes() + b"\0")  # changed after the client checked it
    tampered = BundleService(str(copy), good, [], None, 1)
    tampered.setup()
    assert f"{onnx}: sha256 is" in tampered.error and tampered.runner is None


# The catalogue: what the SCENES arguments name (no cluster needed).

def test_scene_lists_globs_and_stac(tmp_path):
    from hsiedge.many.catalogue import expand_scenes

    (tmp_path / "a").mkdir()
    for name in ("x.tif", "y.tif", "z.img"):
        (tmp_path / "a" / name).write_bytes(b"")
    listing = tmp_path / "scenes.txt"
    listing.write_text("# night passes\na/z.img\n\n  a/x.tif  \n")
    stac = tmp_path / "items.json"
    stac.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "id": "one", "assets": {"thumb": {"href": "t.png", "type": "image/png"},
                                                    "cube": {"href": "a/y.tif", "roles": ["data"]}}},
        {"type": "Feature", "id": "two", "assets": {"hsi": {"href": f"file://{tmp_path}/a/z.img",
                                                            "type": "image/tiff; application=geotiff"}}}]}))
    got = expand_scenes([str(tmp_path / "a" / "*.tif"), str(listing), str(stac)])
    assert got == [tmp_path / "a" / "x.tif", tmp_path / "a" / "y.tif", tmp_path / "a" / "z.img"]


@pytest.mark.parametrize("doc, asset, message", [
    ({"type": "Feature", "assets": {"cube": {"href": "https://example.com/x.tif", "roles": ["data"]}}}, None,
     "a URL; infer-many reads local or mounted files only"),
    ({"type": "Feature", "assets": {"a": {"href": "a.tif", "roles": ["data"]},
                                    "b": {"href": "b.tif", "roles": ["data"]}}},
     None, "name it with --asset"),
    ({"type": "Feature", "assets": {"a": {"href": "a.tif"}}}, "cube", "has no asset 'cube' (it has: a)"),
    ({"type": "Catalog", "links": []}, None, "expected a STAC ItemCollection or Item"),
])
def test_stac_refusals(tmp_path, doc, asset, message):
    from hsiedge.many.catalogue import CatalogueError, expand_scenes

    f = tmp_path / "items.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(CatalogueError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        expand_scenes([str(f)], asset)
    assert str(f) in str(e.value)


def test_two_scenes_with_one_map_name_are_refused(tmp_path, sm_bundle):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.tif").write_bytes(b"")
    res = CliRunner().invoke(app, ["infer-many", str(tmp_path / "a" / "x.tif"), str(tmp_path / "b" / "x.tif"),
                                   "--bundle", str(sm_bundle), "--out-dir", str(tmp_path / "out")])
    assert res.exit_code == 1
    assert "would both be written to" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["infer-many", str(tmp_path / "none-*.tif"), "--bundle", str(sm_bundle),
                                   "--out-dir", str(tmp_path / "out")])
    assert res.exit_code == 1 and "no file matches this pattern" in res.output


def test_without_dask_one_line_names_the_extra(scenes, sm_bundle, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.startswith(("hsiedge.many.run", "hsiedge.many.worker"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "distributed", None)  # what an install without the extra has
    res = CliRunner().invoke(app, ["infer-many", str(scenes[0]), "--bundle", str(sm_bundle), "--out-dir",
                                   str(tmp_path)])
    assert res.exit_code == 1
    assert "pip install 'hsiedge[cluster]'" in " ".join(res.output.split())
