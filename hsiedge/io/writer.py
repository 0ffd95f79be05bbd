"""Writing class maps: tiled, compressed GeoTIFFs that GIS tools open directly (rasterio).

The map carries the scene's CRS and transform (when it has them), class ids with 0 as
nodata, a colour table and the class names (band description and tags).  Files are written
under a temporary name in the target folder and renamed only when complete.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.transform import Affine
from rasterio.windows import Window as RioWindow

from hsiedge.atomic import atomic_path
from hsiedge.io.scene import gdal_reason

BLOCK = 256


def class_dtype(num_classes: int) -> np.dtype:
    """uint8 for up to 255 classes (0 is nodata), uint16 above."""
    return np.dtype(np.uint8 if num_classes <= 255 else np.uint16)


def _blocks(height: int, width: int, block: int = BLOCK * 4) -> Iterator[tuple[slice, slice, RioWindow]]:
    """Row slice, column slice and rasterio window of each block of the map, in raster order."""
    for r in range(0, height, block):
        for c in range(0, width, block):
            h, w = min(block, height - r), min(block, width - c)
            yield slice(r, r + h), slice(c, c + w), RioWindow(c, r, w, h)


def _profile(height: int, width: int, count: int, dtype: np.dtype, crs: str | None,
             transform: tuple | None) -> dict[str, Any]:
    profile = {"driver": "GTiff", "height": height, "width": width, "count": count, "dtype": dtype.name,
               "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK, "compress": "deflate",
               "predictor": 2 if dtype.kind in "ui" else 1, "nodata": 0, "BIGTIFF": "IF_SAFER"}
    if crs:
        profile["crs"] = crs
    if transform:
        profile["transform"] = Affine(*transform)
    return profile


def _atomic_geotiff(path: Path, profile: dict[str, Any], fill) -> Path:
    """Create a GeoTIFF under a temporary name next to `path`, let `fill(dst)` write it, rename.

    GDAL's write errors (a full disk, a file-size limit) come out as OSError with their reason.
    """
    try:
        with atomic_path(path, ".partial.tif") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(tmp, "w", **profile) as dst:
                fill(dst)
    except RasterioError as e:
        free = shutil.disk_usage(path.parent).free
        raise OSError(f"{gdal_reason(e)}; {free / 2**20:,.0f} MiB free in {path.parent}") from e
    return path


def write_class_map(path: str | Path, classes: np.ndarray, classes_table: list[dict[str, Any]],
                    crs: str | None = None, transform: tuple | None = None) -> Path:
    """A (rows, cols) array of class ids (0 nodata) -> GeoTIFF with colour table and class names."""
    height, width = classes.shape

    def fill(dst) -> None:
        for rows, cols, window in _blocks(height, width):
            dst.write(np.ascontiguousarray(classes[rows, cols]), 1, window=window)
        if classes.dtype == np.uint8:
            cmap = {0: (0, 0, 0, 0)}
            cmap.update({c["id"]: (*c["colour"], 255) for c in classes_table})
            dst.write_colormap(1, cmap)
        dst.set_band_description(1, "class id (0 = nodata)")
        dst.update_tags(1, **{f"CLASS_{c['id']}": c["name"] for c in classes_table})
        dst.update_tags(CLASS_NAMES=",".join(c["name"] for c in classes_table))

    return _atomic_geotiff(Path(path), _profile(height, width, 1, classes.dtype, crs, transform), fill)


def write_probabilities(path: str | Path, probs: np.ndarray, class_names: list[str], crs: str | None = None,
                        transform: tuple | None = None) -> Path:
    """(K, rows, cols) uint8 probabilities (255 = 1.0) -> a K-band GeoTIFF, one band per class."""
    k, height, width = probs.shape

    def fill(dst) -> None:
        for rows, cols, window in _blocks(height, width):
            dst.write(np.ascontiguousarray(probs[:, rows, cols]), window=window)
        for i, name in enumerate(class_names):
            dst.set_band_description(i + 1, f"P({name}) x 255")
        dst.update_tags(SCALE="probability = value / 255")

    profile = _profile(height, width, k, np.dtype(np.uint8), crs, transform)
    return _atomic_geotiff(Path(path), profile, fill)
