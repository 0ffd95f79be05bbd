"""GeoTIFF and every other raster GDAL reads, through rasterio, window by window."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window as RioWindow

from hsiedge.io.scene import Scene, SceneInfo, SceneReadError, Window, gdal_reason

# GDAL keeps read blocks in a cache of 5 % of the machine's memory by default (1.2 GB here):
# streaming a large scene would fill it and undo bounded memory.  256 MB holds a row of
# 256 x 256 blocks of a 4,400-pixel-wide, 103-band uint16 scene; GDAL_CACHEMAX overrides it.
os.environ.setdefault("GDAL_CACHEMAX", "256")


def _wavelengths(src) -> tuple[np.ndarray | None, str | None]:
    envi = src.tags(ns="ENVI")
    if "wavelength" in envi:
        try:
            wl = np.array([float(v) for v in re.split(r"[,{}\s]+", envi["wavelength"]) if v])
            if wl.size == src.count:
                return wl, envi.get("wavelength_units")
        except ValueError:
            pass
    per_band = [src.tags(i + 1).get("wavelength") for i in range(src.count)]
    if all(per_band):
        try:
            return np.array([float(v) for v in per_band]), src.tags(1).get("wavelength_units")
        except ValueError:
            pass
    return None, None


class RasterScene(Scene):
    """A rasterio dataset; reads only the asked window."""

    def __init__(self, path: Path) -> None:
        try:
            self._src = rasterio.open(path)
        except RasterioError as e:
            raise SceneReadError(f"{path}: expected a raster GDAL can read, but opening failed "
                                 f"({gdal_reason(e)})") from e
        src = self._src
        wl, units = _wavelengths(src)
        dtypes = set(src.dtypes)
        if len(dtypes) != 1:
            raise SceneReadError(f"{path}: expected one data type for all bands, found {sorted(dtypes)}")
        super().__init__(SceneInfo(
            path, src.height, src.width, src.count, np.dtype(src.dtypes[0]), wavelengths=wl,
            wavelength_units=units, crs=src.crs.to_wkt() if src.crs else None,
            transform=tuple(src.transform)[:6] if not src.transform.is_identity else None,
            nodata=src.nodata, layout=src.driver))

    def _read(self, window: Window) -> np.ndarray:
        try:
            block = self._src.read(window=RioWindow(window.col, window.row, window.width, window.height))
        except RasterioError as e:
            raise SceneReadError(f"{self.path}: reading window {tuple(window)} failed "
                                 f"({gdal_reason(e)})") from e
        return np.ascontiguousarray(block.transpose(1, 2, 0))

    def close(self) -> None:
        self._src.close()
