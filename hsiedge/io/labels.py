"""Ground-truth label maps: `.mat` maps, single-band rasters / `.npy`, and the argmax of
reference abundances (how Jasper Ridge gets its tree / water / soil / road classes).
0 means unlabeled."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hsiedge.io.scene import SceneReadError, checked_dtype, load_npy, require_regular_file

MAX_CLASS_ID = 65535  # maps are kept as uint8 or uint16


@dataclass
class LabelMap:
    """A (rows, cols) integer map, 0 = unlabeled, with class names when the file has them."""

    labels: np.ndarray
    class_names: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return int(self.labels.max())


def _from_abundances(path: Path, arrays: dict, shape: tuple[int, int] | None) -> LabelMap:
    """Class of each pixel = the endmember with the largest reference abundance (1-based)."""
    from hsiedge.io.matlab import mat_count

    A = np.asarray(arrays["A"])
    checked_dtype(path, A.dtype, what="abundances A")
    if A.ndim != 2 or A.size == 0:
        raise SceneReadError(f"{path}: expected abundances A of shape (endmembers, pixels), found {A.shape}")
    A = A.astype(np.float64)
    if "nRow" in arrays and "nCol" in arrays:
        shape = (mat_count(path, arrays, "nRow"), mat_count(path, arrays, "nCol"))
    if shape is None:
        raise SceneReadError(f"{path}: abundances A {A.shape} without nRow / nCol: the scene's rows and "
                             f"columns are needed to lay them out (read them with the scene's shape)")
    if A.shape[1] != shape[0] * shape[1]:
        raise SceneReadError(f"{path}: expected abundances A of shape (endmembers, rows*cols) matching the "
                             f"{shape[0]} x {shape[1]} scene, found {A.shape}")
    rows, cols = shape
    # Column-major pixel order, as in the Zhu cube files: p = col * rows + row.
    labels = (A.argmax(axis=0) + 1).reshape(cols, rows).T.astype(np.uint8)
    return LabelMap(np.ascontiguousarray(labels), None)


def read_labels(path: str | Path, key: str | None = None, shape: tuple[int, int] | None = None) -> LabelMap:
    """Read a label map; `shape` is the scene's (rows, cols), checked against the map.

    Every fault of the file is a `SceneReadError` with one sentence, as for scenes."""
    from hsiedge.io.matlab import read_mat_labels

    path = Path(path)
    require_regular_file(path, "label file")
    suffix = path.suffix.lower()
    names = None
    if suffix == ".mat":
        labels, arrays, endmembers = read_mat_labels(path, key)
        if labels is None:
            labels = _from_abundances(path, arrays, shape).labels
            names = endmembers if endmembers and len(endmembers) == labels.max() else None
    elif suffix == ".npy":
        labels = load_npy(path)
    else:
        from hsiedge.io import open_scene

        with open_scene(path) as s:
            if s.bands != 1:
                raise SceneReadError(f"{path}: expected a single-band label raster, found {s.bands} bands")
            labels = s.read()[..., 0]
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise SceneReadError(f"{path}: expected a 2-D label map, found shape {labels.shape}")
    checked_dtype(path, labels.dtype, what="class ids", kinds="uifb")
    if labels.size == 0:
        raise SceneReadError(f"{path}: expected a label map with at least one pixel, found shape "
                             f"{labels.shape}")
    if labels.dtype.kind == "f" and (not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels))):
        raise SceneReadError(f"{path}: expected integer class ids, found non-integer values")
    if labels.min() < 0 or labels.max() > MAX_CLASS_ID:
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise SceneReadError(f"{path}: expected class ids from 0 (unlabeled) to {MAX_CLASS_ID}, found {bad}")
    labels = labels.astype(np.uint16 if labels.max() > 255 else np.uint8)
    if shape is not None and labels.shape != tuple(shape):
        raise SceneReadError(f"{path}: label map is {labels.shape[0]} x {labels.shape[1]} but the scene is "
                             f"{shape[0]} x {shape[1]}")
    return LabelMap(labels, names)
