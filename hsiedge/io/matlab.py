"""MATLAB `.mat` files: cubes (rows, cols, bands), the column-major (bands, pixels) unmixing
layout with `nRow` / `nCol` (Jasper Ridge), and 2-D label maps.

v7.3 files are HDF5 and are read window by window with h5py.  v5 files have no random access,
so scipy loads the array once (memory = the array's size).  scipy's v5 reader crashes the
process on some damaged files, so their data elements are checked first and such
a file is refused in one sentence instead (`hsiedge.io.mat_v5_guard`).
"""

from __future__ import annotations

import mmap
import re
from pathlib import Path

import h5py
import numpy as np
import scipy.io as sio

from hsiedge.io.mat_v5_guard import v5_crash
from hsiedge.io.scene import READ_ERRORS, ArrayScene, SceneInfo, SceneReadError, one_line

_WAVELENGTH_KEYS = ("wavelengths", "wavelength", "wavlength", "waveLength")


def _loadmat(path: Path) -> dict:
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            crash = v5_crash(buf)
    except ValueError:  # an empty file cannot be mapped: scipy says what is wrong
        crash = None
    except (OSError, MemoryError) as e:
        raise SceneReadError(f"{path}: expected a MATLAB .mat file, but it could not be read "
                             f"({one_line(e)})") from e
    if crash is not None:
        raise SceneReadError(f"{path}: expected a MATLAB .mat file, but it is damaged ({crash})")
    try:
        return sio.loadmat(path)
    except Exception as e:  # scipy raises several types for corrupt or truncated files
        raise SceneReadError(f"{path}: expected a MATLAB .mat file, but it could not be read "
                             f"({one_line(e)})") from e


def _printable(name: str | bytes) -> str:
    """An array's name fit for a one-line message (a damaged file's names may hold anything)."""
    name = name if isinstance(name, str) else name.decode("utf-8", "replace")
    return name if name.isprintable() else ascii(name)[1:-1]


def _numeric(raw: dict) -> dict[str, np.ndarray]:
    """The numeric arrays of a v5 file, complex ones included (the dtype rule refuses those)."""
    return {_printable(k): v for k, v in raw.items() if not k.startswith("__")
            and isinstance(v, np.ndarray) and v.dtype.kind in "uifbc"}


def load_v5(path: Path) -> dict[str, np.ndarray]:
    """All numeric arrays of a v5 `.mat` file."""
    return _numeric(_loadmat(path))


def _is_hdf5(path: Path) -> bool:
    try:
        return h5py.is_hdf5(path)
    except OSError as e:
        raise SceneReadError(f"{path}: expected a MATLAB .mat file, but it could not be read "
                             f"({one_line(e)})") from e


def _h5_dtype(ds: h5py.Dataset) -> np.dtype:
    """A dataset's dtype; MATLAB stores complex numbers as (real, imag) records."""
    if ds.dtype.names == ("real", "imag"):
        return np.result_type(ds.dtype["real"], np.complex64)
    return ds.dtype


def _h5_arrays(f: h5py.File) -> dict[str, h5py.Dataset]:
    """The numeric datasets of a v7.3 file, complex ones included (the dtype rule refuses those)."""
    return {_printable(k): v for k, v in f.items()
            if isinstance(v, h5py.Dataset) and _h5_dtype(v).kind in "uifbc"}


def _h5_read(ds: h5py.Dataset) -> np.ndarray:
    """A whole dataset in MATLAB's axis order, (real, imag) records as complex numbers."""
    a = np.asarray(ds)
    if a.dtype.names == ("real", "imag"):
        a = a["real"] + 1j * a["imag"]
    return a.T


def mat_count(path: Path, arrays: dict, key: str) -> int:
    """The positive whole number a `.mat` file stores in `key` (`nRow`, `nCol`)."""
    a = np.asarray(arrays[key]).ravel()
    if (a.size != 1 or a.dtype.kind not in "uif" or not np.isfinite(a[0]) or a[0] != np.floor(a[0])
            or a[0] < 1):
        found = a.tolist() if a.size <= 3 else f"{a.size} values"
        raise SceneReadError(f"{path}: expected one positive whole number in '{key}', found {found}")
    return int(a[0])


def _looks_like(arrays: dict) -> str | None:
    """What a `.mat` file holds when it is not what was asked for: a cube, abundances, labels."""
    if {"Y", "nRow", "nCol"} <= arrays.keys() or any(v.ndim == 3 for v in arrays.values()):
        return "a hyperspectral cube: pass it as --scene"
    if {"A", "M"} <= arrays.keys():
        return "reference abundances (A, M): pass it as --labels"
    if any(v.ndim == 2 and v.dtype.kind in "uib" for v in arrays.values()):
        return "a label map: pass it as --labels"
    return None


def _pick(path: Path, arrays: dict, ndim: int, key: str | None, what: str) -> str:
    if key is not None:
        if key not in arrays:
            raise SceneReadError(f"{path}: expected an array named '{key}', found {sorted(arrays)}")
        return key
    found = [k for k, v in arrays.items() if v.ndim == ndim]
    if len(found) != 1:
        listing = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items()) or "no numeric arrays"
        looks = _looks_like(arrays)
        if not found and looks is not None:
            raise SceneReadError(f"{path}: expected a {what}, but the file looks like {looks} ({listing})")
        raise SceneReadError(f"{path}: expected one {what}, found {'several' if found else 'none'} "
                             f"({listing}); choose one with --key")
    return found[0]


def open_mat_scene(path: Path, key: str | None = None) -> ArrayScene:
    """Open a `.mat` cube as a Scene (see the module docstring for the layouts)."""
    if _is_hdf5(path):
        return _open_h5_scene(path, key)

    arrays = load_v5(path)
    wl = next((np.asarray(arrays[k], dtype=np.float64).ravel() for k in _WAVELENGTH_KEYS
               if k in arrays and arrays[k].dtype.kind in "uif"), None)
    if key is None and {"Y", "nRow", "nCol"} <= arrays.keys():
        key = "Y"
    k = _pick(path, arrays, 3, key, "3-D (rows, cols, bands) array")
    arr = arrays[k]
    if arr.ndim == 2 and {"nRow", "nCol"} <= arrays.keys():
        rows, cols = mat_count(path, arrays, "nRow"), mat_count(path, arrays, "nCol")
        if arr.shape[1] != rows * cols:
            raise SceneReadError(f"{path}: expected '{k}' of shape (bands, {rows}*{cols}), found {arr.shape}")
        arr = arr.reshape(-1, cols, rows)  # pixels are column-major: p = col * nRow + row
        info = SceneInfo(path, rows, cols, arr.shape[0], arr.dtype, layout=f"MATLAB (bands, pixels) '{k}'")
        return ArrayScene(info, arr, axes="bcr")
    if arr.ndim != 3:
        raise SceneReadError(f"{path}: expected a 3-D (rows, cols, bands) cube in '{k}', found a "
                             f"{arr.ndim}-D array of shape {arr.shape}")
    if wl is not None and wl.size != arr.shape[2]:
        wl = None
    info = SceneInfo(path, arr.shape[0], arr.shape[1], arr.shape[2], arr.dtype, wavelengths=wl,
                     layout=f"MATLAB cube '{k}'")
    return ArrayScene(info, arr)


def _open_h5_scene(path: Path, key: str | None) -> ArrayScene:
    """A v7.3 cube, read window by window; a damaged file is a SceneReadError at open or read."""
    try:
        f = h5py.File(path, "r")
    except READ_ERRORS as e:
        raise SceneReadError(f"{path}: expected a MATLAB v7.3 (HDF5) .mat file, but it could not be read "
                             f"({one_line(e)})") from e
    try:
        arrays = _h5_arrays(f)
        k = _pick(path, arrays, 3, key, "3-D (rows, cols, bands) array")
        ds = arrays[k]
        if ds.ndim != 3:
            raise SceneReadError(f"{path}: expected a 3-D (rows, cols, bands) cube in '{k}', found a "
                                 f"{ds.ndim}-D array of shape {ds.shape}")
        bands, cols, rows = ds.shape  # HDF5 sees MATLAB's column-major array transposed
        info = SceneInfo(path, rows, cols, bands, _h5_dtype(ds), layout=f"MATLAB v7.3 '{k}'")
    except SceneReadError:
        f.close()
        raise
    except READ_ERRORS as e:
        f.close()
        raise SceneReadError(f"{path}: expected a MATLAB v7.3 (HDF5) .mat file, but reading its arrays "
                             f"failed ({one_line(e)})") from e
    return ArrayScene(info, ds, axes="bcr", on_close=f.close)


def _endmember_name(cell) -> str:
    """Zhu's names look like '1-tree': keep the name, not its number."""
    a = np.asarray(cell).ravel()
    return re.sub(r"^\s*\d+\s*[-_:.]\s*", "", str(a[0]) if a.size else "").strip()


def read_mat_labels(path: Path, key: str | None = None
                    ) -> tuple[np.ndarray | None, dict[str, np.ndarray], list[str] | None]:
    """(2-D label map, every numeric array, endmember names) of a `.mat` file.

    For a reference-abundance file (arrays `A` and `M`, no key) the map is None: the caller
    takes the argmax of `A`.  Names come from Zhu's `cood` cell array when present.
    """
    names = None
    if _is_hdf5(path):
        try:
            with h5py.File(path, "r") as f:
                arrays = {k: _h5_read(v) for k, v in _h5_arrays(f).items()}
        except READ_ERRORS as e:
            raise SceneReadError(f"{path}: expected a MATLAB v7.3 (HDF5) .mat file, but it could not be "
                                 f"read ({one_line(e)})") from e
    else:
        raw = _loadmat(path)
        arrays = _numeric(raw)
        if "cood" in raw:
            names = [_endmember_name(x) for x in np.asarray(raw["cood"]).ravel()]
    if key is None and "A" in arrays and "M" in arrays:
        return None, arrays, names
    if key is None and (looks := _looks_like(arrays)) and looks.startswith("a hyperspectral cube"):
        listing = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items())
        raise SceneReadError(f"{path}: expected a label map, but the file looks like {looks} ({listing})")
    k = _pick(path, arrays, 2, key, "2-D label map")
    return arrays[k], arrays, None
