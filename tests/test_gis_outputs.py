"""Class maps and probabilities as GIS tools read them: Cloud-Optimized GeoTIFFs with overviews,
the colour table, class names as GDAL categories and a raster attribute table, probabilities
without nodata and without colour (alpha) interpretation, provenance tags.  Read back with
rasterio, and with GDAL's own C API (the library rasterio ships) for what rasterio does not
expose: category names and the attribute table, which QGIS and ArcGIS build legends from."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp

from hsiedge.io.writer import write_class_map, write_probabilities

TABLE = [{"id": i, "name": n, "colour": [40 * i, 200 - 30 * i, 17 * i]}
         for i, n in enumerate(["water", "trees", "soil", "road"], 1)]
TRANSFORM = (1.3, 0.0, 510000.0, 0.0, -1.3, 5010000.0)


def gdal() -> ctypes.CDLL:
    """GDAL's C library as bundled with rasterio (skip where rasterio uses a system GDAL)."""
    libs = sorted((Path(rasterio.__file__).parent.parent / "rasterio.libs").glob("libgdal*.so*"))
    if not libs:
        pytest.skip("rasterio here does not bundle libgdal; category names are read through it")
    lib = ctypes.CDLL(str(libs[0]))
    lib.GDALAllRegister()
    for name, res, args in [
        ("GDALOpen", ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_int]),
        ("GDALClose", None, [ctypes.c_void_p]),
        ("GDALGetMetadata", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
        ("GDALGetRasterBand", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int]),
        ("GDALGetRasterCategoryNames", ctypes.c_void_p, [ctypes.c_void_p]),
        ("GDALGetDefaultRAT", ctypes.c_void_p, [ctypes.c_void_p]),
        ("GDALRATGetRowCount", ctypes.c_int, [ctypes.c_void_p]),
        ("GDALRATGetColumnCount", ctypes.c_int, [ctypes.c_void_p]),
        ("GDALRATGetUsageOfCol", ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
        ("GDALRATGetValueAsString", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]),
        ("CSLCount", ctypes.c_int, [ctypes.c_void_p]),
        ("CSLGetField", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int]),
    ]:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def categories_and_rat(path: Path) -> tuple[list[str], list[int], list[list[str]]]:
    """Category names, the attribute table's column usages, and its rows, as GDAL reads them."""
    lib = gdal()
    ds = lib.GDALOpen(str(path).encode(), 0)
    assert ds, f"GDAL cannot open {path}"
    try:
        lib.GDALGetMetadata(ds, None)  # as GIS tools do first; GDAL reads the sidecar lazily
        band = lib.GDALGetRasterBand(ds, 1)
        names = lib.GDALGetRasterCategoryNames(band)
        cats = [lib.CSLGetField(names, i).decode() for i in range(lib.CSLCount(names))] if names else []
        rat = lib.GDALGetDefaultRAT(band)
        assert rat, f"GDAL finds no raster attribute table for {path}"
        cols = lib.GDALRATGetColumnCount(rat)
        usages = [lib.GDALRATGetUsageOfCol(rat, c) for c in range(cols)]
        rows = [[lib.GDALRATGetValueAsString(rat, r, c).decode() for c in range(cols)]
                for r in range(lib.GDALRATGetRowCount(rat))]
        return cats, usages, rows
    finally:
        lib.GDALClose(ds)


@pytest.fixture(scope="module")
def class_map(tmp_path_factory) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(4)
    # 2 x 2 blocks of one class, so that every first-level overview pixel has one right answer
    coarse = rng.integers(0, 5, (700, 650)).astype(np.uint8)
    classes = np.repeat(np.repeat(coarse, 2, axis=0), 2, axis=1)
    path = tmp_path_factory.mktemp("gis") / "map.tif"
    write_class_map(path, classes, TABLE, "EPSG:32632", TRANSFORM,
                    provenance={"model": "mambahsi", "created": "2026-12-01T00:00:00Z"})
    return path, classes


def test_class_map_is_a_cog_with_mode_overviews(class_map):
    path, classes = class_map
    with rasterio.open(path) as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.block_shapes[0] == (256, 256) and src.compression.name == "deflate"
        assert src.overviews(1) == [2, 4, 8]
        assert src.crs.to_epsg() == 32632 and src.transform.c == 510000.0
        assert src.nodata == 0
        assert np.array_equal(src.read(1), classes)
        half = src.read(1, out_shape=(700, 650))  # the first overview
        assert np.array_equal(half, classes[::2, ::2])
    assert not list(path.parent.glob(".*"))  # no stage or partial file left behind
    # the COG layout as GDAL's validator checks it: the structural-metadata ghost header right
    # after the TIFF header, saying IFDS_BEFORE_DATA, and the main IFD next
    head = path.read_bytes()[:512]
    assert head[:4] == b"II*\0"
    size = int(head[8:].split(b"\n", 1)[0].split(b"=")[1].split()[0])
    ghost = head[8:8 + len("GDAL_STRUCTURAL_METADATA_SIZE=000000 bytes\n") + size]
    assert ghost.startswith(b"GDAL_STRUCTURAL_METADATA_SIZE=") and b"LAYOUT=IFDS_BEFORE_DATA" in ghost
    assert int.from_bytes(head[4:8], "little") == 8 + len(ghost) + len(ghost) % 2  # word-aligned


def test_class_map_colours_names_and_provenance(class_map):
    path, _ = class_map
    with rasterio.open(path) as src:
        cmap = src.colormap(1)
        assert cmap[0][3] == 0  # nodata transparent
        assert all(cmap[c["id"]] == (*c["colour"], 255) for c in TABLE)
        assert src.tags(1)["CLASS_3"] == "soil"
        tags = src.tags()
        assert tags["HSIEDGE_MODEL"] == "mambahsi" and tags["HSIEDGE_CREATED"] == "2026-12-01T00:00:00Z"


def test_gdal_reads_category_names_and_the_attribute_table(class_map):
    path, classes = class_map
    cats, usages, rows = categories_and_rat(path)
    assert cats == ["nodata", "water", "trees", "soil", "road"]
    assert usages == [5, 2, 1, 6, 7, 8]  # value (min-max), name, pixel count, red, green, blue
    counts = np.bincount(classes.ravel(), minlength=5)
    assert rows == [[str(c["id"]), c["name"], str(counts[c["id"]]), *map(str, c["colour"])] for c in TABLE]


def test_probabilities_have_no_nodata_and_no_colour_bands(tmp_path):
    rng = np.random.default_rng(1)
    probs = rng.integers(0, 256, (4, 900, 700)).astype(np.uint8)
    probs[:, :10, :10] = 0  # a probability of 0 is data, not a hole
    path = write_probabilities(tmp_path / "m.probs.tif", probs, [c["name"] for c in TABLE], "EPSG:32632",
                               TRANSFORM, provenance={"model": "mambahsi"})
    with rasterio.open(path) as src:
        assert src.nodata is None and src.count == 4
        assert np.array_equal(src.read(), probs)
        assert src.dataset_mask()[:10, :10].all()  # nothing masked
        # band 1 gray, the others TIFF extra samples: never RGB or alpha
        assert src.colorinterp[0] == ColorInterp.gray
        colour = {ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha}
        assert not colour & set(src.colorinterp)
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and src.overviews(1) == [2, 4]
        assert src.descriptions[3] == "P(road) x 255" and src.tags()["HSIEDGE_MODEL"] == "mambahsi"
