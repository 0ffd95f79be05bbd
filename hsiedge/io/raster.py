"""GeoTIFF and every other raster GDAL reads, through rasterio, window by window."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window as RioWindow

from hsiedge.io.scene import Scene, SceneInfo, SceneReadError, Window, gdal_reason

# GDAL keeps read blocks in a cache of 5 % of the machine's memory by default (1.2 GB here):
# streaming a large scene would fill it and undo bounded memory.  64 MB holds the few blocks
# one tile's window touches; blocks shared by neighbouring tiles may be read twice, which
# costs little next to a forward pass (README, "Streaming inference").  GDAL_CACHEMAX wins.
GDAL_CACHE_MIB = 64
os.environ.setdefault("GDAL_CACHEMAX", str(GDAL_CACHE_MIB))


def block_cache_mib() -> float:
    """The most memory GDAL's block cache will hold, from GDAL_CACHEMAX as GDAL reads it
    (a number below 100,000 is MB, above it bytes; "N%" is a share of physical memory)."""
    value = os.environ.get("GDAL_CACHEMAX", str(GDAL_CACHE_MIB)).strip().upper().removesuffix("MB")
    try:
        if value.endswith("%"):
            return float(value[:-1]) / 100 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
        number = float(value)
    except (ValueError, OSError):
        return GDAL_CACHE_MIB
    return number if number < 100_000 else number / 2**20


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

    def __init__(self, path: Path, what: str = "a raster GDAL can read") -> None:
        """`what` names the expected file in the one-sentence error when GDAL cannot open it."""
        try:
            with warnings.catch_warnings():  # a scene without georeferencing is fine: maps say so
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._src = rasterio.open(path)
        except RasterioError as e:
            raise SceneReadError(f"{path}: expected {what}, but opening failed ({gdal_reason(e)})") from e
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

    def tags(self, namespace: str | None = None) -> dict[str, str]:
        """The dataset's metadata items (of one GDAL metadata domain, e.g. "ENVI")."""
        return self._src.tags(ns=namespace)

    def _read(self, window: Window) -> np.ndarray:
        try:
            block = self._src.read(window=RioWindow(window.col, window.row, window.width, window.height))
        except RasterioError as e:
            raise SceneReadError(f"{self.path}: reading window {tuple(window)} failed "
                                 f"({gdal_reason(e)})") from e
        return np.ascontiguousarray(block.transpose(1, 2, 0))

    def close(self) -> None:
        self._src.close()
