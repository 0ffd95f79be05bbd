"""Scene readers (the first stage of the pipeline): one `Scene` interface, one module per format.

`open_scene(path)` picks the reader from the file: `.mat` (v5 and v7.3), `.npy`, ENVI (`.hdr`
or its data file), and anything else rasterio/GDAL opens (GeoTIFF first of all).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hsiedge.io.labels import LabelMap, read_labels
from hsiedge.io.scene import (
    ArrayScene,
    Scene,
    SceneInfo,
    SceneReadError,
    Window,
    load_npy,
    require_regular_file,
)

# Data files that an ENVI header next to them describes (anything else goes to GDAL).
ENVI_DATA_SUFFIXES = ("", ".raw", ".img", ".dat", ".bsq", ".bil", ".bip")


def open_scene(path: str | Path, key: str | None = None) -> Scene:
    """Open a hyperspectral scene for windowed reads; `key` picks the array of a `.mat` file.

    Every fault of the file is a `SceneReadError` with one sentence; a FIFO, socket or device is
    refused before anything opens it."""
    path = Path(path)
    require_regular_file(path, "scene file")
    suffix = path.suffix.lower()
    if suffix == ".mat":
        from hsiedge.io.matlab import open_mat_scene

        return open_mat_scene(path, key)
    if suffix == ".npy":
        arr = load_npy(path)
        if arr.ndim != 3:
            raise SceneReadError(f"{path}: expected a 3-D (rows, cols, bands) array, found shape {arr.shape}")
        return ArrayScene(SceneInfo(path, *arr.shape, arr.dtype, layout="npy (rows, cols, bands)"), arr)
    if suffix == ".hdr" or (suffix in ENVI_DATA_SUFFIXES and path.with_suffix(".hdr").exists()):
        from hsiedge.io.envi import open_envi_scene

        return open_envi_scene(path)
    from hsiedge.io.raster import RasterScene

    return RasterScene(path)


def read_cube(path: str | Path, key: str | None = None) -> np.ndarray:
    """The whole scene as (rows, cols, bands): for small scenes and tests."""
    with open_scene(path, key) as s:
        return s.read()


__all__ = ["ArrayScene", "LabelMap", "Scene", "SceneInfo", "SceneReadError", "Window", "open_scene",
           "read_cube", "read_labels"]
