"""Nothing is lost: outputs never replace inputs, a full disk is found before work or kept
resumable, a resume continues only the same run, and concurrent runs on one output are told."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import write_geotiff
from test_infer import runner

from hsiedge.bundle import sha256_file
from hsiedge.cli import app
from hsiedge.infer.staging import RunLock


def _one_line(res) -> str:
    out = res.output.strip()
    assert res.exit_code != 0 and "Traceback" not in out and len(out.splitlines()) == 1, out
    return out


def _infer(scene: Path, bundle: Path, out: Path, *extra: str):
    return runner.invoke(app, ["infer", str(scene), "--bundle", str(bundle), "-o", str(out), "--runtime",
                               "torch", *extra])


@pytest.fixture()
def scene(scene_tif, tmp_path) -> Path:
    return Path(shutil.copy(scene_tif, tmp_path / "scene.tif"))


def test_an_output_over_the_scene_is_refused_and_the_scene_kept(sm_bundle, scene, tmp_path):
    before = sha256_file(scene)
    assert "overwrite the scene" in _one_line(_infer(scene, sm_bundle, scene))
    (tmp_path / "link.tif").symlink_to(scene)
    assert "overwrite the scene" in _one_line(_infer(scene, sm_bundle, tmp_path / "link.tif"))
    os.link(scene, tmp_path / "hard.tif")
    assert "overwrite the scene" in _one_line(_infer(scene, sm_bundle, tmp_path / "hard.tif"))
    # `-o X.tif --probs` writes X.probs.tif: a scene of that name is refused the same way
    probs_scene = Path(shutil.copy(scene, tmp_path / "X.probs.tif"))
    assert "probabilities would overwrite" in _one_line(_infer(probs_scene, sm_bundle, tmp_path / "X.tif",
                                                               "--probs"))
    assert "quick look" in _one_line(_infer(scene, sm_bundle, tmp_path / "m.tif", "--quicklook",
                                            str(scene)))
    assert "both the class map and the quick look" in _one_line(
        _infer(scene, sm_bundle, tmp_path / "m.tif", "--quicklook", str(tmp_path / "m.tif")))
    assert "inside the bundle" in _one_line(_infer(scene, sm_bundle, sm_bundle / "map.tif"))
    assert sha256_file(scene) == before and sha256_file(probs_scene) == before
    assert not list(tmp_path.glob(".*journal")) and not (tmp_path / "m.tif").exists()


def _interrupt(scene: Path, bundle: Path, out: Path, monkeypatch, *extra: str) -> None:
    """A run that stops after 3 tiles, as a killed one does, leaving its staging and journal."""
    from hsiedge.infer.staging import Staging

    calls = []
    record = Staging.record

    def dies(self, *a):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return record(self, *a)
    with monkeypatch.context() as m:
        m.setattr(Staging, "record", dies)
        res = _infer(scene, bundle, out, "--tile", "25", *extra)
    assert res.exit_code != 0 and (out.parent / f".{out.name}.journal").is_file()


def test_resume_refuses_another_scene_key_or_bundle(sm_bundle, scene, tmp_path, jasper_cube,
                                                    monkeypatch, datasets):
    out = tmp_path / "map.tif"
    _interrupt(scene, sm_bundle, out, monkeypatch)
    # the same size, other content: the resumed map would mix two scenes
    write_geotiff(scene, jasper_cube[::-1].copy())
    msg = _one_line(_infer(scene, sm_bundle, out, "--tile", "25", "--resume"))
    assert "the scene's content" in msg and "--tile" not in msg.split("differs in")[1].split(";")[0]
    # another tiling, another bundle (its preprocessing too)
    write_geotiff(scene, jasper_cube)
    assert "the tiling" in _one_line(_infer(scene, sm_bundle, out, "--tile", "20", "--resume"))
    other = tmp_path / "other-bundle"
    shutil.copytree(sm_bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["preprocessing"]["transforms"][0]["mean"][0] += 1.0
    (other / "manifest.json").write_text(json.dumps(manifest))
    msg = _one_line(_infer(scene, other, out, "--tile", "25", "--resume"))
    assert "the bundle" in msg and "the preprocessing" in msg
    # the same run continues, and gives the uninterrupted run's file
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764547200")
    res = _infer(scene, sm_bundle, out, "--tile", "25", "--resume", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tiles_resumed"] == 3


def test_resume_refuses_another_key(sm_bundle, tmp_path, monkeypatch, datasets):
    import scipy.io

    cube = scipy.io.loadmat(datasets / "jasper_ridge" / "JasperRidge2_R198.mat")
    y = np.asarray(cube["Y"], dtype=np.float64).reshape(198, 100, 100).transpose(2, 1, 0)[:30, :30]
    mat = tmp_path / "two.mat"
    scipy.io.savemat(mat, {"a": y, "b": y[::-1].copy()})
    out = tmp_path / "map.tif"
    _interrupt(mat, sm_bundle, out, monkeypatch, "--key", "a", "--tile", "8")
    assert "--key" in _one_line(_infer(mat, sm_bundle, out, "--key", "b", "--tile", "8", "--resume"))


def test_a_second_run_on_the_same_output_is_told_who_holds_it(sm_bundle, scene, tmp_path):
    out = tmp_path / "map.tif"
    lock = RunLock(out).acquire()  # as a live run holds it
    try:
        msg = _one_line(_infer(scene, sm_bundle, out))
        assert f"pid {os.getpid()}" in msg and "interrupted" not in msg
    finally:
        lock.release()
    assert not (tmp_path / ".map.tif.lock").exists()
    assert _infer(scene, sm_bundle, out).exit_code == 0  # a lock left by a dead run blocks nothing


def test_leftovers_of_a_killed_write_are_removed(sm_bundle, scene, tmp_path):
    out = tmp_path / "map.tif"
    left = [tmp_path / ".map.tif.k3j2_x.partial.tif", tmp_path / ".map.tif.9a8b.stage.tif",
            tmp_path / ".map.tif.aux.xml.a1b2.partial"]
    keep = [tmp_path / ".map.tif.notes", tmp_path / "map.tif.partial.tif"]  # not ours: kept
    for p in left + keep:
        p.write_bytes(b"")
    assert _infer(scene, sm_bundle, out).exit_code == 0
    assert not any(p.exists() for p in left) and all(p.exists() for p in keep)


def test_no_room_for_staging_is_said_before_any_work(sm_bundle, scene, tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "posix_fallocate", full)
    msg = _one_line(_infer(scene, sm_bundle, tmp_path / "map.tif", "--probs"))
    assert "not enough free disk space" in msg and "MiB" in msg
    assert not list(tmp_path.glob(".map.tif*")) and not (tmp_path / "map.tif").exists()


def test_a_short_final_write_keeps_the_staging(sm_bundle, scene, tmp_path, monkeypatch):
    """GDAL may leave a short file on a full disk without raising: the map is read back first."""
    import rasterio.shutil

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764547200")
    whole = tmp_path / "whole.tif"
    assert _infer(scene, sm_bundle, whole).exit_code == 0
    copy = rasterio.shutil.copy

    def short(src, dst, **kw):
        copy(src, dst, **kw)
        data = Path(dst).read_bytes()
        Path(dst).write_bytes(data[:len(data) // 2])
    out = tmp_path / "map.tif"
    with monkeypatch.context() as m:
        m.setattr(rasterio.shutil, "copy", short)
        msg = _one_line(_infer(scene, sm_bundle, out))
    assert "--resume" in msg and not out.exists() and (tmp_path / ".map.tif.journal").is_file()
    res = _infer(scene, sm_bundle, out, "--resume")
    assert res.exit_code == 0, res.output
    assert out.read_bytes() == whole.read_bytes()


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_real_full_disk(sm_bundle, scene, tmp_path, monkeypatch):
    disk = tmp_path / "small"
    if not _tmpfs(disk, "256k"):
        pytest.skip("mount -t tmpfs is not allowed here")
    try:
        monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764547200")
        whole = tmp_path / "whole.tif"
        assert _infer(scene, sm_bundle, whole, "--probs").exit_code == 0
        # staging (10 kB of class ids, 40 kB of probabilities) does not fit: said before any work
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * (256 - 24) * 1024)
        msg = _one_line(_infer(scene, sm_bundle, disk / "map.tif", "--probs"))
        assert "not enough free disk space" in msg
        assert sorted(p.name for p in disk.iterdir()) == ["ballast"]
        # staging fits, the maps do not: finished tiles are kept, and a resume with room completes
        ballast.write_bytes(b"\0" * (256 - 72) * 1024)
        msg = _one_line(_infer(scene, sm_bundle, disk / "map.tif", "--probs"))
        assert "map.probs.tif failed" in msg and "--resume" in msg and not (disk / "map.probs.tif").exists()
        assert (disk / ".map.tif.journal").is_file()
        assert not [p for p in disk.iterdir() if "partial" in p.name or "stage" in p.name]
        ballast.unlink()
        res = _infer(scene, sm_bundle, disk / "map.tif", "--probs", "--resume")
        assert res.exit_code == 0, res.output
        assert (disk / "map.tif").read_bytes() == whole.read_bytes()
        assert (disk / "map.probs.tif").read_bytes() == (tmp_path / "whole.probs.tif").read_bytes()
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)


def test_train_and_export_never_write_over_their_inputs(datasets, tmp_path, monkeypatch):
    import hsiedge.train
    from hsiedge.export import bundle_export

    monkeypatch.setattr(hsiedge.train, "train_model", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(bundle_export, "export_bundle", lambda *a, **k: pytest.fail("export started"))
    jasper = datasets / "jasper_ridge"
    scene = Path(shutil.copy(jasper / "JasperRidge2_R198.mat", tmp_path / "scene.mat"))
    labels = Path(shutil.copy(jasper / "_EndJasperRidge2_R198.mat", tmp_path / "gt.mat"))
    before = {p: sha256_file(p) for p in (scene, labels)}
    for out in (scene, labels):
        res = runner.invoke(app, ["train", "spectralmamba", "--scene", str(scene), "--labels", str(labels),
                                  "-o", str(out)])
        assert "would overwrite the" in _one_line(res)
    assert "would overwrite the checkpoint" in _one_line(runner.invoke(app, ["export", str(scene), "-o",
                                                                             str(scene)]))
    (tmp_path / "notes").mkdir()
    res = runner.invoke(app, ["export", str(scene), "-o", str(tmp_path / "notes")])
    assert "not a bundle" in _one_line(res)
    assert {p: sha256_file(p) for p in (scene, labels)} == before


def test_train_checks_its_output_before_training(datasets, tmp_path, monkeypatch):
    import hsiedge.train

    monkeypatch.setattr(hsiedge.train, "train_model", lambda *a, **k: pytest.fail("training started"))
    (tmp_path / "file").write_text("")
    jasper = datasets / "jasper_ridge"
    res = runner.invoke(app, ["train", "spectralmamba", "--scene", str(jasper / "JasperRidge2_R198.mat"),
                              "--labels", str(jasper / "_EndJasperRidge2_R198.mat"),
                              "-o", str(tmp_path / "file" / "m.pt")])
    assert "cannot write the checkpoint" in _one_line(res)


@pytest.mark.parametrize("args,option", [
    (["infer", "s.tif", "--bundle", "b", "--overlap", "-1"], "--overlap"),
    (["infer", "s.tif", "--bundle", "b", "--memory", "nan"], "--memory"),
    (["infer", "s.tif", "--bundle", "b", "--memory", "inf"], "--memory"),
    (["infer", "s.tif", "--bundle", "b", "--memory", "0"], "--memory"),
    (["infer", "s.tif", "--bundle", "b", "--batch", "0"], "--batch"),
    (["infer", "s.tif", "--bundle", "b", "--tile", "-5"], "--tile"),
    (["infer", "s.tif", "--bundle", "b", "--runtime", "cuda"], "--runtime"),
    (["export", "c.pt", "-o", "b", "--precision", "fp64"], "--precision"),
    (["export", "c.pt", "-o", "b", "--scan", "loop"], "--scan"),
    (["export", "c.pt", "-o", "b", "--calib-method", "max"], "--calib-method"),
    (["export", "c.pt", "-o", "b", "--weight-bits", "6"], "--weight-bits"),
    (["engine", "b", "--target", "cpu"], "--target"),
    (["parity-check", "b", "--runtime", "torch"], "--runtime"),
    (["parity-check", "b", "--min-agreement", "1.5"], "--min-agreement"),
    (["parity-check", "b", "--max-rel-l2", "nan"], "--max-rel-l2"),
    (["train", "m", "--scene", "s", "--labels", "l", "-o", "o", "--device", "tpu"], "--device"),
    (["train", "m", "--scene", "s", "--labels", "l", "-o", "o", "--epochs", "0"], "--epochs"),
])
def test_bad_options_get_one_sentence_before_anything_is_read(args, option):
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "Traceback" not in res.output and option in res.output, res.output
    sentences = [line for line in res.output.splitlines() if "Invalid value" in line]
    assert len(sentences) == 1, res.output


def test_help_lists_the_choices():
    def text(command: str) -> str:  # Rich wraps help in boxes: words only
        out = runner.invoke(app, [command, "--help"]).output
        return " ".join("".join(c if c.isalnum() or c in ",-" else " " for c in out).split())
    assert "torch, onnxruntime or tensorrt" in text("infer")
    assert "fp32, fp16 or int8" in text("export") and "percentile or entropy" in text("export")
