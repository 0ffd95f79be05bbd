"""ENVI rasters (`.hdr` + binary BSQ / BIL / BIP), read by GDAL's ENVI driver through rasterio.

GDAL parses the header: size, data type, byte order, header offset, wavelengths, `data ignore
value`, and georeferencing from `coordinate system string` or from `map info` alone (UTM and
the other projections ENVI names), which a hand-written reader easily gets wrong.  Reads are
windowed through GDAL's bounded block cache, like every other raster (`hsiedge.io.raster`).
This module only finds the data file next to a header, checks what GDAL leaves open (the
interleave), and says in one sentence why a file cannot be read.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from hsiedge.io.raster import RasterScene
from hsiedge.io.scene import SceneReadError

INTERLEAVES = ("bsq", "bil", "bip")
# Where the data file next to a header may be, searched in this order.
DATA_SUFFIXES = ("", ".raw", ".img", ".dat", ".bsq", ".bil", ".bip", ".RAW", ".IMG", ".DAT")


def data_file_for(header: Path) -> Path:
    for suffix in DATA_SUFFIXES:
        candidate = header.with_suffix(suffix)
        if candidate.is_file() and candidate != header:
            return candidate
    raise SceneReadError(f"{header}: no data file next to the header (looked for "
                         f"{', '.join(header.with_suffix(s).name for s in DATA_SUFFIXES)})")


def open_envi_scene(path: Path) -> RasterScene:
    """Open `path` (the header, or the data file next to one) for windowed reads."""
    header = path if path.suffix.lower() == ".hdr" else path.with_suffix(".hdr")
    if not header.is_file():
        raise SceneReadError(f"{path}: expected an ENVI header at {header.name}, found none")
    try:
        with header.open("rb") as f:
            first = f.read(4)
    except OSError as e:
        raise SceneReadError(f"{header}: could not read the ENVI header ({e.strerror})") from e
    if first != b"ENVI":
        raise SceneReadError(f"{header}: expected an ENVI header starting with 'ENVI', found {first!r}")
    data = path if path != header else data_file_for(header)
    scene = RasterScene(data, what=f"an ENVI raster described by {header.name}")
    fields = scene.tags("ENVI")
    interleave = fields.get("interleave", "bsq").strip().lower()
    if interleave not in INTERLEAVES:
        scene.close()
        raise SceneReadError(f"{header}: expected interleave bsq, bil or bip, found {interleave!r}")
    if "byte_order" not in fields:
        warnings.warn(f"{header.name}: no 'byte order' in the ENVI header; GDAL reads it as byte order 0 "
                      "(little-endian)", stacklevel=3)
    scene.info.layout = f"ENVI {interleave}"
    return scene
