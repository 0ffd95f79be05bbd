"""`pip install hsiedge[edge]`: a device that only runs bundles has no PyTorch.

A fresh venv gets the wheel of this checkout and exactly the distributions its base and `edge`
requirements pull in, transitively (linked from this venv's installs: tests never download).
There `hsiedge infer`, `parity-check` (against the logits the bundle stores) and `bench` run on
an ONNX bundle, torch is not importable, and what needs torch says so in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import rasterio
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

TORCH_DISTS = {"torch", "onnxscript", "onnx-ir"}


def _wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return [Requirement(r) for r in Parser().parsestr(text).get_all("Requires-Dist") or []]


def _closure(requirements: list[Requirement], extras: set[str]) -> dict[str, metadata.Distribution]:
    """The installed distributions `requirements` need (markers evaluated for `extras`), transitively."""
    found: dict[str, metadata.Distribution] = {}
    todo = [(r, extras) for r in requirements]
    while todo:
        req, wanted = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in wanted | {""}):
            continue
        name = canonicalize_name(req.name)
        if name in found:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f"{req.name} (needed by the edge install) is not installed in this venv")
        found[name] = dist
        todo += [(Requirement(r), set(req.extras)) for r in dist.requires or []]
    return found


def _link_into(site: Path, dist: metadata.Distribution) -> None:
    """Make `dist` importable from `site` by linking its top-level files and folders."""
    home = Path(str(dist.locate_file("")))
    for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
        if not (site / top).exists() and (home / top).exists():
            (site / top).symlink_to(home / top)


@pytest.fixture(scope="module")
def edge_venv(hsiedge_wheel: Path, tmp_path_factory) -> Path:
    requirements = _wheel_requirements(hsiedge_wheel)
    dists = _closure(requirements, {"edge"})
    assert not TORCH_DISTS & set(dists), f"the edge install pulls in {sorted(TORCH_DISTS & set(dists))}"
    venv = tmp_path_factory.mktemp("edge") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    for dist in dists.values():
        _link_into(site, dist)
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                          "--quiet", "--no-deps", "--no-index", str(hsiedge_wheel)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return venv


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / "hsiedge"), *args], capture_output=True, text=True, cwd=cwd,
                          env={**env, "COLUMNS": "200"}, timeout=600)


def export_scene(bundle: Path) -> list[str]:
    """--scene (and --key) of the scene `bundle` was exported on: its held-out pixels are checked."""
    held = json.loads((bundle / "manifest.json").read_text())["heldout"]
    return ["--scene", held["scene"], *(["--key", held["key"]] if held.get("key") else [])]


def _one_line(res: subprocess.CompletedProcess) -> str:
    return " ".join(res.stderr.split())


def test_the_edge_requirements_leave_torch_out(hsiedge_wheel):
    requirements = _wheel_requirements(hsiedge_wheel)
    torch_extra = {canonicalize_name(r.name) for r in requirements
                   if r.marker is not None and r.marker.evaluate({"extra": "torch"})}
    assert torch_extra >= TORCH_DISTS  # training and export get them from hsiedge[torch]
    assert not TORCH_DISTS & set(_closure(requirements, {"edge"}))


def test_an_edge_install_runs_bundles_without_torch(edge_venv, sm_bundle, scene_tif, tmp_path):
    py = edge_venv / "bin" / "python"
    probe = subprocess.run([str(py), "-c", "import importlib.util, hsiedge; "
                            "print(importlib.util.find_spec('torch') is None, hsiedge.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    torch_absent, where = probe.stdout.split()
    assert torch_absent == "True" and Path(where).is_relative_to(edge_venv)  # the wheel, not the checkout

    res = _run(edge_venv, "infer", str(scene_tif), "--bundle", str(sm_bundle), "-o",
               str(tmp_path / "map.tif"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    from hsiedge.bundle import open_bundle
    from hsiedge.infer import infer_scene

    infer_scene(scene_tif, open_bundle(sm_bundle), tmp_path / "here.tif", runtime="onnxruntime")
    with rasterio.open(tmp_path / "map.tif") as a, rasterio.open(tmp_path / "here.tif") as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))  # the same map as the full install's

    res = _run(edge_venv, "parity-check", str(sm_bundle), *export_scene(sm_bundle), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["original"]["runtime"] == "stored reference" and report["passed"]
    (ort,) = report["results"]
    assert ort["runtime"] == "onnxruntime" and ort["figures"]["agreement"] >= 0.9999

    res = _run(edge_venv, "bench", str(sm_bundle), "--seconds", "0.2", "--warmup", "0", "--json",
               cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert [r["runtime"] for r in json.loads(res.stdout)["results"]] == ["onnxruntime"]


@pytest.mark.parametrize("args", [
    ["train", "spectralmamba", "--scene", "{scene}", "--labels", "{scene}", "-o", "m.pt"],
    ["export", "m.pt", "-o", "b"],
    ["infer", "{scene}", "--bundle", "{bundle}", "-o", "t.tif", "--runtime", "torch"],
    ["parity-check", "{bundle}", "--scene", "{scene}", "--every-pixel"],
], ids=["train", "export", "infer-torch", "parity-new-scene"])
def test_what_needs_torch_says_so_in_one_line(edge_venv, sm_bundle, scene_tif, tmp_path, args):
    args = [a.format(bundle=sm_bundle, scene=scene_tif) for a in args]
    res = _run(edge_venv, *args, cwd=tmp_path)
    assert res.returncode == 1
    said = _one_line(res)
    assert "needs PyTorch, which is not installed here" in said and "pip install 'hsiedge[torch]'" in said
    assert "Traceback" not in res.stderr and said.startswith("error:")
