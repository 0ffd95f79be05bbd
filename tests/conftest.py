"""Shared fixtures: the real datasets folder, a float64 NumPy selective scan, Jasper Ridge as a
GeoTIFF and a small trained bundle."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from rasterio.transform import from_origin

REPO = Path(__file__).resolve().parents[1]
CRS = "EPSG:32610"  # UTM 10N, where Jasper Ridge is
TRANSFORM = from_origin(560000.0, 4140000.0, 20.0, 20.0)  # 20 m pixels
SCAN_CALLS = {"spectralmamba": 1, "md2f-mamba": 1, "mambahsi": 6}  # scan calls per seed model
EPOCHS = {"spectralmamba": 5, "md2f-mamba": 1, "mambahsi": 30}


def datasets_dir() -> Path:
    return Path(os.environ.get("HSIEDGE_DATASETS", REPO.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def datasets() -> Path:
    d = datasets_dir()
    if not (d / "README.md").is_file():
        pytest.fail(f"real datasets not found at {d}: set HSIEDGE_DATASETS to the shared/datasets folder")
    return d


@pytest.fixture(scope="session")
def jasper_cube(datasets: Path) -> np.ndarray:
    """Jasper Ridge (100, 100, 198) uint16, unfolded independently of hsiedge.io."""
    import scipy.io as sio

    d = sio.loadmat(datasets / "jasper_ridge" / "JasperRidge2_R198.mat")
    nr, nc = int(d["nRow"][0, 0]), int(d["nCol"][0, 0])
    return d["Y"].reshape(-1, nr, nc, order="F").transpose(1, 2, 0)


def np_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Independent float64 recurrence of Contract 1, written for the tests."""
    f = lambda t: None if t is None else np.asarray(t, dtype=np.float64)  # noqa: E731
    u, delta, A, B, C, D, z, delta_bias = map(f, (u, delta, A, B, C, D, z, delta_bias))
    batch, dim, L = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = np.logaddexp(0.0, delta)
    if B.ndim == 3:
        B, C = B[:, None], C[:, None]
    group_of = np.arange(dim) // (dim // B.shape[1])
    h = np.zeros((batch, dim, A.shape[1]))
    y = np.empty((batch, dim, L))
    for t in range(L):
        dt = delta[:, :, t][..., None]
        h = np.exp(dt * A[None]) * h + dt * u[:, :, t][..., None] * B[..., t][:, group_of]
        y[:, :, t] = np.einsum("bdn,bdn->bd", h, C[..., t][:, group_of])
    if D is not None:
        y = y + D[None, :, None] * u
    if z is not None:
        y = y * z / (1.0 + np.exp(-z))
    return y


@pytest.fixture(scope="session")
def checkpoints(datasets, tmp_path_factory) -> dict[str, Path]:
    """One checkpoint per model, trained by `hsiedge train` on the whole Jasper Ridge scene."""
    from typer.testing import CliRunner

    from hsiedge.cli import app

    jasper = datasets / "jasper_ridge"
    out = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for model, epochs in EPOCHS.items():
        path = out / f"{model}.pt"
        res = CliRunner().invoke(app, ["train", model, "--scene", str(jasper / "JasperRidge2_R198.mat"),
                                       "--labels", str(jasper / "_EndJasperRidge2_R198.mat"),
                                       "--epochs", str(epochs), "-o", str(path)])
        assert res.exit_code == 0, res.output
        paths[model] = path
    return paths


@pytest.fixture(scope="session")
def exported(checkpoints, tmp_path_factory):
    """Export each (model, scan, precision) bundle once: the parity and engine tests share them."""
    from hsiedge.export.bundle_export import export_bundle

    made: dict[tuple[str, str, str], tuple[Path, dict]] = {}

    def get(model: str, scan: str, precision: str) -> tuple[Path, dict]:
        if (model, scan, precision) not in made:
            out = tmp_path_factory.mktemp(f"{model}-{scan}-{precision}") / "b"
            made[model, scan, precision] = out, export_bundle(checkpoints[model], out, scan=scan,
                                                              precision=precision)
        return made[model, scan, precision]

    return get


@pytest.fixture(scope="session")
def trt_plugin_library(tmp_path_factory) -> Path:
    """libhsiedge_trt_plugins.so: $HSIEDGE_TRT_PLUGINS, else built here where TensorRT headers are found."""
    from hsiedge.export.plugin_library import PluginBuildError, build_plugin_library, tensorrt_include

    given = os.environ.get("HSIEDGE_TRT_PLUGINS")
    if given:
        return Path(given)
    if tensorrt_include() is None:
        pytest.skip("no TensorRT headers here (set TENSORRT_ROOT to a folder with include/NvInfer.h): "
                    "the plugin library cannot be compiled")
    out = tmp_path_factory.mktemp("plugin")
    try:
        return build_plugin_library(out / "libhsiedge_trt_plugins.so", archs=["89"], build_dir=out / "build")
    except PluginBuildError as e:
        pytest.fail(f"the plugin library does not build: {e}")


def write_geotiff(path: Path, cube: np.ndarray, nodata: float | None = None) -> Path:
    """A (rows, cols, bands) cube as a georeferenced GeoTIFF, band-interleaved by pixel."""
    import rasterio

    h, w, b = cube.shape
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=b, dtype=cube.dtype.name,
                       crs=CRS, transform=TRANSFORM, nodata=nodata, interleave="pixel") as dst:
        dst.write(cube.transpose(2, 0, 1))
    return path


def trained_bundle(model: str, datasets: Path, out: Path) -> Path:
    """`model` trained for 3 epochs on Jasper Ridge by `hsiedge train` and exported (fp32, plugin scan)."""
    from typer.testing import CliRunner

    from hsiedge.cli import app
    from hsiedge.export.bundle_export import export_bundle

    jasper = datasets / "jasper_ridge"
    res = CliRunner().invoke(app, ["train", model, "--scene", str(jasper / "JasperRidge2_R198.mat"),
                                   "--labels", str(jasper / "_EndJasperRidge2_R198.mat"), "--epochs", "3",
                                   "-o", str(out / f"{model}.pt")])
    assert res.exit_code == 0, res.output
    export_bundle(out / f"{model}.pt", out / "bundle")
    return out / "bundle"


@pytest.fixture(scope="session")
def sm_bundle(datasets, tmp_path_factory) -> Path:
    """SpectralMamba, trained briefly and exported: the bundle the infer and safety tests share."""
    return trained_bundle("spectralmamba", datasets, tmp_path_factory.mktemp("sm"))


@pytest.fixture(scope="session")
def scene_tif(jasper_cube, tmp_path_factory) -> Path:
    """Jasper Ridge as a georeferenced GeoTIFF (100 x 100 x 198)."""
    return write_geotiff(tmp_path_factory.mktemp("scene") / "jasper.tif", jasper_cube)


@pytest.fixture(scope="session")
def hsiedge_wheel(tmp_path_factory) -> Path:
    """A wheel of this checkout, built offline (no build isolation: setuptools comes from the venv)."""
    import shutil
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("wheel")
    # from a copy of the files git would commit: setuptools builds in place, and a build/ left in the
    # checkout would carry stale files into the wheel
    src = tmp_path_factory.mktemp("wheel-src") / "hsiedge"
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                          "--no-build-isolation", "--no-index", "-w", str(out), str(src)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "PIP_NO_INPUT": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = out.glob("hsiedge-*.whl")
    return wheel
