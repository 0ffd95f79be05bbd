"""GeoTIFF and every other raster GDAL reads, through rasterio, window by window."""

from __future__ import annotations

import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window as RioWindow

from hsiedge.io.scene import (
    Scene,
    SceneInfo,
    SceneReadError,
    Window,
    gdal_reason,
    one_line,
    require_regular_file,
)

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


def check_sidecars(path: Path) -> None:
    """Refuse a scene next to a FIFO, socket or device named like its sidecar files (`s.tif.aux.xml`,
    `s.tfw`, `s.hdr`, `s_rpc.txt`...): GDAL opens those while opening the scene and would block."""
    stem = path.stem.lower()
    try:
        siblings = [e for e in os.scandir(path.parent) if e.name.lower().startswith((f"{stem}.", f"{stem}_"))]
    except OSError:
        return  # an unlistable folder: GDAL cannot list it either
    for entry in siblings:
        try:
            mode = os.stat(entry.path).st_mode
        except OSError:
            continue  # a dangling link or an unreadable entry: GDAL skips it
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            require_regular_file(Path(entry.path), f"sidecar file of {path.name}")  # says what it is


class RasterScene(Scene):
    """A rasterio dataset; reads only the asked window."""

    def __init__(self, path: Path, what: str = "a raster GDAL can read") -> None:
        """`what` names the expected file in the one-sentence error when GDAL cannot open it."""
        check_sidecars(path)
        try:
            with warnings.catch_warnings():  # a scene without georeferencing is fine: maps say so
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._src = rasterio.open(path)
        except RasterioError as e:
            raise SceneReadError(f"{path}: expected {what}, but opening failed "
                                 f"({one_line(gdal_reason(e))})") from e
        src = self._src
        try:
            dtypes = set(src.dtypes)
            if len(dtypes) > 1:
                raise SceneReadError(f"{path}: expected one data type for all bands, found {sorted(dtypes)}")
            wl, units = _wavelengths(src)
            dtype = src.dtypes[0] if src.count else "uint8"  # a raster of no bands is refused as such
            info = SceneInfo(path, src.height, src.width, src.count, dtype, wavelengths=wl,
                             wavelength_units=units, crs=src.crs.to_wkt() if src.crs else None,
                             transform=tuple(src.transform)[:6] if not src.transform.is_identity else None,
                             nodata=src.nodata, layout=src.driver)
        except SceneReadError:
            src.close()
            raise
        except (RasterioError, ValueError) as e:  # a CRS or transform GDAL parsed but cannot express
            src.close()
            raise SceneReadError(f"{path}: expected {what}, but its metadata could not be read "
                                 f"({one_line(e)})") from e
        super().__init__(info)  # checks the size and data type, closing `src` on failure

    def tags(self, namespace: str | None = None) -> dict[str, str]:
        """The dataset's metadata items (of one GDAL metadata domain, e.g. "ENVI")."""
        return self._src.tags(ns=namespace)

    def _read(self, window: Window) -> np.ndarray:
        try:
            block = self._src.read(window=RioWindow(window.col, window.row, window.width, window.height))
        except RasterioError as e:
            raise SceneReadError(f"{self.path}: reading window {tuple(window)} failed "
                                 f"({one_line(gdal_reason(e))})") from e
        return np.ascontiguousarray(block.transpose(1, 2, 0))

    def close(self) -> None:
        self._src.close()
