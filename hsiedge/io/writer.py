"""Writing class maps: Cloud-Optimized GeoTIFFs that GIS tools open directly (rasterio/GDAL).

The map carries the scene's CRS and transform (when it has them), class ids with 0 as
nodata, a colour table, the class names (band description, tags, and GDAL category names plus
a raster attribute table in the `.aux.xml` sidecar, which is where GDAL keeps them for
GeoTIFFs and where QGIS and ArcGIS read legends from) and provenance tags.  Probabilities are
one gray band per class with no nodata (0 is a probability).

Each file is first written block by block as a tiled GeoTIFF, then GDAL's COG driver copies it
into a COG with overviews (mode resampling for class ids, average for probabilities), reading
through GDAL's bounded block cache: the whole map is never in memory.  Both steps use
temporary names in the target folder; the final name appears only when the file is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio._err import CPLE_BaseError  # GDAL errors rasterio raises as they are (not RasterioError)
from rasterio.enums import ColorInterp
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
             transform: tuple | None, nodata: int | None) -> dict[str, Any]:
    profile = {"driver": "GTiff", "height": height, "width": width, "count": count, "dtype": dtype.name,
               "tiled": True, "blockxsize": BLOCK, "blockysize": BLOCK, "compress": "deflate",
               "predictor": 2 if dtype.kind in "ui" else 1, "nodata": nodata, "BIGTIFF": "IF_SAFER"}
    if count > 1:
        profile["photometric"] = "MINISBLACK"  # K gray bands, never RGB(A) however many
    if crs:
        profile["crs"] = crs
    if transform:
        profile["transform"] = Affine(*transform)
    return profile


def _read_back(path: Path, expected: Callable[[slice, slice], np.ndarray]) -> None:
    """Read every block of the finished file and compare it with `expected(rows, cols)`, then
    flush it to disk: GDAL can leave a short file on a full disk without an error."""
    with rasterio.open(path) as src:
        for rows, cols, window in _blocks(src.height, src.width):
            want = expected(rows, cols)
            if not np.array_equal(src.read(window=window).reshape(want.shape), want):
                raise OSError(f"{path.name} does not read back as written (block at row {rows.start}, "
                              f"column {cols.start})")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_cog(path: Path, profile: dict[str, Any], fill, resampling: str,
                expected: Callable[[slice, slice], np.ndarray]) -> Path:
    """Write a tiled GeoTIFF next to `path` with `fill(dst)`, copy it into a COG with overviews
    (`resampling`), read it back against `expected`, rename it to `path`.

    GDAL's write errors (a full disk, a file-size limit) and a file that does not read back as
    written come out as OSError with their reason; nothing then appears under `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, stage = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".stage.tif", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(stage, "w", **profile) as dst:
                fill(dst)
            with atomic_path(path, ".partial.tif") as tmp:
                rasterio.shutil.copy(stage, tmp, driver="COG", COMPRESS="DEFLATE", PREDICTOR="YES",
                                     BLOCKSIZE=BLOCK, OVERVIEW_RESAMPLING=resampling, BIGTIFF="IF_SAFER")
                _read_back(tmp, expected)
    except (RasterioError, CPLE_BaseError, OSError) as e:
        free = shutil.disk_usage(path.parent).free
        reason = gdal_reason(e) if isinstance(e, RasterioError | CPLE_BaseError) else (e.strerror or str(e))
        raise OSError(f"{reason}; {free / 2**20:,.0f} MiB free in {path.parent}") from e
    finally:
        Path(stage).unlink(missing_ok=True)
    return path


def _provenance_tags(provenance: dict[str, Any] | None) -> dict[str, str]:
    return {f"HSIEDGE_{k.upper()}": str(v) for k, v in (provenance or {}).items()}


def _write_categories(map_path: Path, classes_table: list[dict[str, Any]], counts: np.ndarray) -> Path:
    """The map's `.aux.xml` sidecar: GDAL category names (index = class id) and a thematic
    raster attribute table (value, name, colour, pixel count), written atomically."""
    root = ET.Element("PAMDataset")
    band = ET.SubElement(root, "PAMRasterBand", band="1")
    names = {c["id"]: c["name"] for c in classes_table}
    cats = ET.SubElement(band, "CategoryNames")
    for i in range(max(names, default=0) + 1):
        ET.SubElement(cats, "Category").text = "nodata" if i == 0 else names.get(i, "")
    rat = ET.SubElement(band, "GDALRasterAttributeTable", tableType="thematic")
    # (name, type: 0 integer / 2 string, GDAL field usage: 5 min-max, 2 name, 1 pixel count, 6-8 RGB)
    fields = [("Value", 0, 5), ("Class", 2, 2), ("Count", 0, 1),
              ("Red", 0, 6), ("Green", 0, 7), ("Blue", 0, 8)]
    for i, (name, kind, usage) in enumerate(fields):
        field = ET.SubElement(rat, "FieldDefn", index=str(i))
        ET.SubElement(field, "Name").text = name
        ET.SubElement(field, "Type").text = str(kind)
        ET.SubElement(field, "Usage").text = str(usage)
    for row, c in enumerate(classes_table):
        r = ET.SubElement(rat, "Row", index=str(row))
        count = int(counts[c["id"]]) if c["id"] < len(counts) else 0
        for value in (c["id"], c["name"], count, *c["colour"]):
            ET.SubElement(r, "F").text = str(value)
    sidecar = map_path.with_name(map_path.name + ".aux.xml")
    with atomic_path(sidecar, ".partial") as tmp:
        ET.ElementTree(root).write(tmp, encoding="UTF-8", xml_declaration=False)
    return sidecar


def write_class_map(path: str | Path, classes: np.ndarray, classes_table: list[dict[str, Any]],
                    crs: str | None = None, transform: tuple | None = None,
                    provenance: dict[str, Any] | None = None) -> Path:
    """A (rows, cols) array of class ids (0 nodata) -> COG with colour table, class names
    (tags, and categories in the `.aux.xml` sidecar) and provenance tags."""
    height, width = classes.shape
    counts = np.zeros(int(np.iinfo(classes.dtype).max) + 1, dtype=np.int64)

    def fill(dst) -> None:
        for rows, cols, window in _blocks(height, width):
            block = np.ascontiguousarray(classes[rows, cols])
            counts[:] += np.bincount(block.ravel(), minlength=len(counts))
            dst.write(block, 1, window=window)
        if classes.dtype == np.uint8:
            cmap = {0: (0, 0, 0, 0)}
            cmap.update({c["id"]: (*c["colour"], 255) for c in classes_table})
            dst.write_colormap(1, cmap)
        dst.set_band_description(1, "class id (0 = nodata)")
        dst.update_tags(1, **{f"CLASS_{c['id']}": c["name"] for c in classes_table})
        dst.update_tags(CLASS_NAMES=",".join(c["name"] for c in classes_table),
                        **_provenance_tags(provenance))

    path = Path(path)
    _atomic_cog(path, _profile(height, width, 1, classes.dtype, crs, transform, nodata=0), fill, "MODE",
                lambda rows, cols: np.asarray(classes[rows, cols]))
    _write_categories(path, classes_table, counts)
    return path


def write_probabilities(path: str | Path, probs: np.ndarray, class_names: list[str], crs: str | None = None,
                        transform: tuple | None = None, provenance: dict[str, Any] | None = None) -> Path:
    """(K, rows, cols) uint8 probabilities (255 = 1.0) -> a K-band gray COG, one band per class,
    with no nodata value (0 is a probability)."""
    k, height, width = probs.shape

    def fill(dst) -> None:
        for rows, cols, window in _blocks(height, width):
            dst.write(np.ascontiguousarray(probs[:, rows, cols]), window=window)
        dst.colorinterp = [ColorInterp.gray] * k
        for i, name in enumerate(class_names):
            dst.set_band_description(i + 1, f"P({name}) x 255")
        dst.update_tags(SCALE="probability = value / 255", **_provenance_tags(provenance))

    profile = _profile(height, width, k, np.dtype(np.uint8), crs, transform, nodata=None)
    return _atomic_cog(Path(path), profile, fill, "AVERAGE",
                       lambda rows, cols: np.asarray(probs[:, rows, cols]))
