"""ENVI rasters (`.hdr` + binary BSQ / BIL / BIP), read by GDAL's ENVI driver through rasterio.

GDAL parses the header: size, data type, byte order, header offset, wavelengths, `data ignore
value`, and georeferencing from `coordinate system string` or from `map info` alone (UTM and
the other projections ENVI names), which a hand-written reader easily gets wrong.  Reads are
windowed through GDAL's bounded block cache, like every other raster (`hsiedge.io.raster`).
This module only finds the data file next to a header, checks what GDAL leaves open (the
interleave, whole-number header fields, a data file of exactly the size the header gives),
and says in one sentence why a file cannot be read.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from hsiedge.io.raster import RasterScene
from hsiedge.io.scene import SceneReadError, require_regular_file

INTERLEAVES = ("bsq", "bil", "bip")
# Where the data file next to a header may be, searched in this order.
DATA_SUFFIXES = ("", ".raw", ".img", ".dat", ".bsq", ".bil", ".bip", ".RAW", ".IMG", ".DAT")
# Header fields that must be whole numbers, with their smallest and largest allowed value
# (GDAL reads "1e3" samples as 1, a byte order of 7 as big-endian, a negative offset cryptically).
WHOLE_FIELDS = {"samples": (1, None), "lines": (1, None), "bands": (1, None), "data type": (1, None),
                "header offset": (0, None), "byte order": (0, 1)}


def data_file_for(header: Path) -> Path:
    """The data file next to `header`; one that is there but not a regular file is refused."""
    for suffix in DATA_SUFFIXES:
        candidate = header.with_suffix(suffix)
        if candidate != header and candidate.exists() and not candidate.is_dir():
            require_regular_file(candidate, f"ENVI data file described by {header.name}")
            return candidate
    raise SceneReadError(f"{header}: no data file next to the header (looked for "
                         f"{', '.join(header.with_suffix(s).name for s in DATA_SUFFIXES)})")


def check_header_fields(header: Path, text: str) -> None:
    """Refuse a header whose WHOLE_FIELDS are not whole numbers in range, before GDAL reads it."""
    text = re.sub(r"\{[^}]*\}", "{}", text)  # brace values (wavelengths...) may span lines
    for line in text.splitlines()[1:]:
        key, sep, value = line.partition("=")
        key = " ".join(key.lower().replace("_", " ").split())  # GDAL reads "header_offset" too
        if sep and key in WHOLE_FIELDS:
            _whole_number(header, key, value.strip())


def _whole_number(header: Path, key: str, value: str) -> int:
    least, most = WHOLE_FIELDS[key]
    if (not re.fullmatch(r"[0-9]+", value) or int(value) < least
            or (most is not None and int(value) > most)):
        wanted = f"{least} or {most}" if most is not None else f"a whole number >= {least}"
        raise SceneReadError(f"{header}: expected {wanted} for '{key}', found {value!r}")
    return int(value)


def open_envi_scene(path: Path) -> RasterScene:
    """Open `path` (the header, or the data file next to one) for windowed reads."""
    header = path if path.suffix.lower() == ".hdr" else path.with_suffix(".hdr")
    if not header.exists():
        raise SceneReadError(f"{path}: expected an ENVI header at {header.name}, found none")
    require_regular_file(header, "ENVI header")
    try:
        text = header.read_bytes().decode("latin-1")
    except OSError as e:
        raise SceneReadError(f"{header}: could not read the ENVI header ({e.strerror})") from e
    if not text.startswith("ENVI"):
        raise SceneReadError(f"{header}: expected an ENVI header starting with 'ENVI', found "
                             f"{text[:4].encode('latin-1')!r}")
    check_header_fields(header, text)
    data = path if path != header else data_file_for(header)
    scene = RasterScene(data, what=f"an ENVI raster described by {header.name}")
    fields = scene.tags("ENVI")
    interleave = fields.get("interleave", "bsq").strip().lower()
    try:
        if interleave not in INTERLEAVES:
            raise SceneReadError(f"{header}: expected interleave bsq, bil or bip, found {interleave!r}")
        _check_data_size(scene, header, fields)
    except SceneReadError:
        scene.close()
        raise
    if "byte_order" not in fields:
        warnings.warn(f"{header.name}: no 'byte order' in the ENVI header; GDAL reads it as byte order 0 "
                      "(little-endian)", stacklevel=3)
    scene.info.layout = f"ENVI {interleave}"
    return scene


def _check_data_size(scene: RasterScene, header: Path, fields: dict[str, str]) -> None:
    """Refuse a data file smaller or larger than the header says (GDAL would read part of it,
    or fill the missing part), from the size, data type and offset GDAL read (`fields`: its
    ENVI metadata)."""
    if scene.info.layout != "ENVI":
        return  # GDAL read the file as its own format, not through this header
    offset = _whole_number(header, "header offset", fields.get("header_offset", "0").strip())
    h, w, b, size = scene.height, scene.width, scene.bands, scene.dtype.itemsize
    expected, found = offset + h * w * b * size, os.stat(scene.path).st_size
    if found != expected:
        raise SceneReadError(
            f"{scene.path}: expected {expected} bytes ({offset} header bytes + {h} lines x {w} samples x "
            f"{b} bands x {size} bytes of {scene.dtype}) as {header.name} says, found {found} bytes "
            f"(the data file is too {'small' if found < expected else 'large'})")
