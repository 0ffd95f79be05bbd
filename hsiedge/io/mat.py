"""MATLAB `.mat` hyperspectral cubes: cube layout (rows, cols, bands) and the column-major
(bands, pixels) unmixing layout with `nRow` / `nCol` (Jasper Ridge and the other Zhu files).

v5 files are read with scipy, v7.3 (HDF5) files with h5py.  Errors are one sentence naming
the file, what was expected and what was found.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import scipy.io as sio


class SceneReadError(ValueError):
    """A scene or label file could not be read as asked; the message says why."""


def _arrays_v5(path: Path) -> dict[str, np.ndarray]:
    try:
        data = sio.loadmat(path)
    except Exception as e:  # scipy raises several types for corrupt or truncated files
        raise SceneReadError(f"{path}: expected a MATLAB .mat file, but it could not be read ({e})") from e
    return {k: v for k, v in data.items() if not k.startswith("__") and isinstance(v, np.ndarray)}


def _arrays_v73(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        for k, v in f.items():
            if isinstance(v, h5py.Dataset) and v.ndim >= 2:
                out[k] = np.asarray(v).T  # MATLAB stores column-major; HDF5 sees it transposed
    return out


def read_mat_cube(path: str | Path, key: str | None = None) -> np.ndarray:
    """Read a hyperspectral cube from a `.mat` file as (rows, cols, bands).

    With several arrays in the file, the single 3-D one is taken, or the one named `key`.
    The unmixing layout (`Y` of shape (bands, rows*cols) with `nRow`, `nCol`) is unfolded
    in MATLAB's column-major pixel order.
    """
    path = Path(path)
    if not path.is_file():
        raise SceneReadError(f"{path}: file not found")
    arrays = _arrays_v73(path) if h5py.is_hdf5(path) else _arrays_v5(path)

    if key is None and "Y" in arrays and "nRow" in arrays and "nCol" in arrays:
        key = "Y"
    if key is not None:
        if key not in arrays:
            raise SceneReadError(f"{path}: expected an array named '{key}', found {sorted(arrays)}")
        arr = arrays[key]
    else:
        cubes = [k for k, v in arrays.items() if v.ndim == 3]
        if len(cubes) != 1:
            found = ", ".join(f"{k} {v.shape}" for k, v in arrays.items()) or "no arrays"
            what = "several" if cubes else "no"
            raise SceneReadError(f"{path}: expected one 3-D (rows, cols, bands) array, found {what} "
                                 f"({found}); pass key= to choose one")
        arr = arrays[cubes[0]]

    if arr.ndim == 2 and "nRow" in arrays and "nCol" in arrays:
        rows = int(np.asarray(arrays["nRow"]).ravel()[0])
        cols = int(np.asarray(arrays["nCol"]).ravel()[0])
        if arr.shape[1] != rows * cols:
            raise SceneReadError(
                f"{path}: expected '{key}' of shape (bands, {rows}*{cols}), found {arr.shape}")
        return arr.reshape(-1, rows, cols, order="F").transpose(1, 2, 0)
    if arr.ndim != 3:
        raise SceneReadError(f"{path}: expected a 3-D (rows, cols, bands) cube, found a {arr.ndim}-D "
                             f"array of shape {arr.shape}")
    return arr
