"""The scene interface every reader implements: metadata plus windowed reads."""

from __future__ import annotations

import mmap
import os
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from hsiedge.files import file_kind


class SceneReadError(ValueError):
    """A scene or label file could not be read as asked; the message says why in one sentence."""


def gdal_reason(error: BaseException) -> str:
    """The useful text of a rasterio/GDAL error: rasterio often says only "See previous
    exception for details", and the detail is in the error it was raised from."""
    text = str(error)
    cause = error.__cause__ or error.__context__
    if "previous exception" in text and cause is not None:
        return f"{text.split('.')[0]}: {cause}"
    return text


def one_line(error: BaseException | str) -> str:
    """A library error's text as one clause for a one-sentence message: its first line and first
    sentence, without the final full stop (numpy's, h5py's and GDAL's texts may run to several)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text.split(". ")[0].rstrip(".")


# What NumPy, h5py and scipy raise for a damaged file, at open or at a later read.
READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, MemoryError)


def require_regular_file(path: Path, what: str) -> None:
    """Refuse `path` unless it is a regular file (links followed), before anything opens it: a
    FIFO would block the reader forever and a device never ends.  `what` names the file
    without an article ("scene file")."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise SceneReadError(f"{path}: {what} not found") from None
    except OSError as e:
        raise SceneReadError(f"{path}: expected a {what}, but it cannot be examined ({e.strerror})") from e
    if stat.S_ISDIR(mode):
        raise SceneReadError(f"{path}: expected a {what}, found a directory")
    if not stat.S_ISREG(mode):
        raise SceneReadError(f"{path}: expected a {what} as a regular file, found {file_kind(mode)}")


_KIND_WORDS = {"U": "text", "S": "bytes", "O": "Python objects", "V": "raw or record data", "M": "dates",
               "m": "time spans"}


def checked_dtype(path: Path, dtype: object, what: str = "bands", kinds: str = "uif") -> np.dtype:
    """The one rule for the pixel type of every scene and label map: a real integer or floating
    type of at most 8 bytes (`kinds` "uifb" also lets labels be bool), in native byte order.
    Anything else (complex, text, records, dates, float128, a GDAL type NumPy lacks) is refused."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt, found = None, str(dtype)  # e.g. rasterio's "complex_int16"
    else:
        found = (f"a structured (record) type {dt}" if dt.names else dt.name if dt.kind in "biufc"
                 else f"{_KIND_WORDS.get(dt.kind, 'data')} ({dt})")
    if dt is None or dt.kind not in kinds or dt.names or dt.itemsize > 8:
        expected = "integer or floating-point" + (" (or boolean)" if "b" in kinds else "")
        raise SceneReadError(f"{path}: expected real-valued {expected} {what}, found {found}")
    return dt.newbyteorder("=")


def check_scene_info(info: SceneInfo) -> None:
    """Refuse a scene with no pixels or no bands, or with a pixel type `checked_dtype` refuses;
    normalise `info.dtype` to a NumPy dtype in native byte order."""
    info.dtype = checked_dtype(info.path, info.dtype)
    if min(info.height, info.width, info.bands) <= 0:
        raise SceneReadError(f"{info.path}: expected a scene of at least 1 row, 1 column and 1 band, found "
                             f"{info.height} x {info.width} x {info.bands}")


def load_npy(path: Path) -> np.ndarray:
    """A `.npy` file memory-mapped (no pixel is read), its size checked against its header."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:  # empty, cut short, pickled objects, bad header
        raise SceneReadError(f"{path}: expected a NumPy .npy array, but reading failed "
                             f"({one_line(e)})") from e
    if isinstance(arr, np.memmap):
        expected, found = arr.offset + arr.nbytes, os.stat(path).st_size
        if found != expected:
            raise SceneReadError(f"{path}: expected {expected} bytes for a {arr.dtype} array of shape "
                                 f"{arr.shape}, found {found} bytes")
    return arr


class Window(NamedTuple):
    """A rectangle of pixels: first row, first column, number of rows, number of columns."""

    row: int
    col: int
    height: int
    width: int

    def slices(self) -> tuple[slice, slice]:
        return slice(self.row, self.row + self.height), slice(self.col, self.col + self.width)


@dataclass
class SceneInfo:
    """What a reader knows about a scene without reading its pixels."""

    path: Path
    height: int
    width: int
    bands: int
    dtype: np.dtype
    wavelengths: np.ndarray | None = None  # (bands,), units as the file gives them
    wavelength_units: str | None = None
    crs: str | None = None  # WKT
    transform: tuple[float, float, float, float, float, float] | None = None  # affine a, b, c, d, e, f
    nodata: float | None = None
    layout: str = ""  # how the file stores the cube, for messages


class Scene(ABC):
    """An open hyperspectral scene.  `read(window)` returns (rows, cols, bands) for that window only."""

    def __init__(self, info: SceneInfo) -> None:
        """Check `info` (see `check_scene_info`); a failing reader is closed before the error."""
        try:
            check_scene_info(info)
        except SceneReadError:
            self.close()
            raise
        self.info = info

    # Attribute-style access to the metadata.
    path = property(lambda self: self.info.path)
    height = property(lambda self: self.info.height)
    width = property(lambda self: self.info.width)
    bands = property(lambda self: self.info.bands)
    dtype = property(lambda self: self.info.dtype)
    wavelengths = property(lambda self: self.info.wavelengths)
    crs = property(lambda self: self.info.crs)
    transform = property(lambda self: self.info.transform)
    nodata = property(lambda self: self.info.nodata)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.height, self.width, self.bands

    def read(self, window: Window | None = None) -> np.ndarray:
        """Pixels of `window` (the whole scene if None) as a (rows, cols, bands) array."""
        w = Window(0, 0, self.height, self.width) if window is None else Window(*window)
        if (w.height <= 0 or w.width <= 0 or w.row < 0 or w.col < 0
                or w.row + w.height > self.height or w.col + w.width > self.width):
            raise SceneReadError(f"{self.path}: window {tuple(w)} (row, col, height, width) is outside "
                                 f"the {self.height} x {self.width} scene")
        return self._read(w)

    @abstractmethod
    def _read(self, window: Window) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027 - readers holding handles override it
        """Release file handles (memory maps and in-memory readers hold none)."""

    def __enter__(self) -> Scene:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.path.name}: {self.height} x {self.width} x {self.bands} "
                f"{self.dtype}, {self.info.layout})")


class ArrayScene(Scene):
    """A scene backed by an array-like (rows, cols, bands): in memory, memory-mapped or HDF5."""

    def __init__(self, info: SceneInfo, data, axes: str = "rcb", on_close=None) -> None:
        """`axes` names the order of data's axes: r(ows), c(ols), b(ands); `on_close` releases
        whatever holds `data` (an HDF5 file, say)."""
        self._data, self._axes, self._on_close = data, axes, on_close
        super().__init__(info)

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def _read(self, window: Window) -> np.ndarray:
        rows, cols = window.slices()
        index = tuple({"r": rows, "c": cols, "b": slice(None)}[a] for a in self._axes)
        try:  # a damaged HDF5 chunk fails only when it is read
            block = np.asarray(self._data[index])
        except READ_ERRORS as e:
            raise SceneReadError(f"{self.path}: reading window {tuple(window)} failed ({one_line(e)})") from e
        finally:
            _unmap_pages(self._data)
        block = np.transpose(block, [self._axes.index(a) for a in "rcb"])
        return np.ascontiguousarray(block, dtype=self.dtype)


def _unmap_pages(data) -> None:
    """Drop the pages a memory-mapped scene has touched from this process (they stay in the
    page cache): otherwise every page read counts as resident until the run ends, and a
    streamed 4 GB ENVI scene would show as 4 GB of resident memory."""
    mm = getattr(data, "_mmap", None)  # numpy.memmap's underlying mmap.mmap
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)
