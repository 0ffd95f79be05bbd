"""ENVI rasters (`.hdr` + binary BSQ / BIL / BIP), read through a memory map.

The header parser is ours because the field's library (spectral.envi) refuses headers
without `byte order`, which real files (the PlantCV cube in the datasets) lack: such a header
is read as little-endian, with a warning.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from hsiedge.io.scene import ArrayScene, SceneInfo, SceneReadError

DTYPES = {1: "u1", 2: "i2", 3: "i4", 4: "f4", 5: "f8", 12: "u2", 13: "u4", 14: "i8", 15: "u8"}
AXES = {"bsq": "brc", "bil": "rbc", "bip": "rcb"}
# Where the data file next to a header may be, searched in this order.
DATA_SUFFIXES = ("", ".raw", ".img", ".dat", ".bsq", ".bil", ".bip", ".RAW", ".IMG", ".DAT")


def parse_header(path: Path) -> dict[str, str]:
    """ENVI header fields, lower-cased keys, values as text (braced lists kept with braces)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        raise SceneReadError(f"{path}: could not read the ENVI header ({e.strerror})") from e
    if not text.lstrip().startswith("ENVI"):
        raise SceneReadError(f"{path}: expected an ENVI header starting with 'ENVI', found "
                             f"{text[:20].strip()!r}")
    fields: dict[str, str] = {}
    for m in re.finditer(r"^\s*([^=;\n]+?)\s*=\s*(\{[^}]*\}|[^\n]*)", text, flags=re.M):
        fields[m.group(1).strip().lower()] = m.group(2).strip()
    return fields


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.strip("{} \n").split(",") if v.strip()]


def data_file_for(header: Path) -> Path:
    for suffix in DATA_SUFFIXES:
        candidate = header.with_suffix(suffix)
        if candidate.is_file() and candidate != header:
            return candidate
    raise SceneReadError(f"{header}: no data file next to the header (looked for "
                         f"{', '.join(header.with_suffix(s).name for s in DATA_SUFFIXES)})")


def _geo(fields: dict[str, str]) -> tuple[str | None, tuple | None]:
    crs = fields.get("coordinate system string", "").strip("{} ") or None
    transform = None
    if "map info" in fields:
        v = _list(fields["map info"])
        try:  # projection, ref x, ref y (1-based pixel), easting, northing, x size, y size, ...
            px, py, e, n, sx, sy = (float(x) for x in v[1:7])
            transform = (sx, 0.0, e - (px - 1) * sx, 0.0, -sy, n + (py - 1) * sy)
        except (ValueError, IndexError):
            transform = None
    return crs, transform


def open_envi_scene(path: Path) -> ArrayScene:
    """Open `path` (the header, or the data file next to one) as a memory-mapped Scene."""
    header = path if path.suffix.lower() == ".hdr" else path.with_suffix(".hdr")
    if not header.is_file():
        raise SceneReadError(f"{path}: expected an ENVI header at {header.name}, found none")
    f = parse_header(header)
    try:
        cols, rows, bands = int(f["samples"]), int(f["lines"]), int(f["bands"])
        code = int(f["data type"])
    except KeyError as e:
        raise SceneReadError(f"{header}: ENVI header lacks the required field {e.args[0]!r}") from None
    except ValueError as e:
        raise SceneReadError(f"{header}: ENVI header has a non-integer size or data type ({e})") from None
    if code not in DTYPES:
        raise SceneReadError(f"{header}: ENVI data type {code} is not supported (expected one of "
                             f"{sorted(DTYPES)})")
    interleave = f.get("interleave", "bsq").lower()
    if interleave not in AXES:
        raise SceneReadError(f"{header}: expected interleave bsq, bil or bip, found {interleave!r}")
    if "byte order" in f:
        order = "<" if f["byte order"].strip() == "0" else ">"
    else:
        warnings.warn(f"{header.name}: no 'byte order' in the ENVI header; reading little-endian",
                      stacklevel=3)
        order = "<"
    dtype = np.dtype(order + DTYPES[code])
    offset = int(f.get("header offset", "0"))
    data = path if path != header else data_file_for(header)
    expected = offset + rows * cols * bands * dtype.itemsize
    size = data.stat().st_size
    if size < expected:
        raise SceneReadError(f"{data}: expected at least {expected} bytes for {rows} x {cols} x {bands} "
                             f"{dtype.name} ({interleave}), found {size} (truncated?)")
    shape = {"bsq": (bands, rows, cols), "bil": (rows, bands, cols), "bip": (rows, cols, bands)}[interleave]
    mm = np.memmap(data, dtype=dtype, mode="r", offset=offset, shape=shape)
    wl = None
    if "wavelength" in f:
        try:
            wl = np.array([float(x) for x in _list(f["wavelength"])])
        except ValueError:
            wl = None
        if wl is not None and wl.size != bands:
            wl = None
    nodata = float(f["data ignore value"]) if "data ignore value" in f else None
    crs, transform = _geo(f)
    info = SceneInfo(data, rows, cols, bands, dtype.newbyteorder("="), wavelengths=wl,
                     wavelength_units=f.get("wavelength units"), crs=crs, transform=transform,
                     nodata=nodata, layout=f"ENVI {interleave}")
    return ArrayScene(info, mm, axes=AXES[interleave])
