"""The scene interface every reader implements: metadata plus windowed reads."""

from __future__ import annotations

import mmap
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np


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
        super().__init__(info)
        self._data, self._axes, self._on_close = data, axes, on_close

    def close(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    def _read(self, window: Window) -> np.ndarray:
        rows, cols = window.slices()
        index = tuple({"r": rows, "c": cols, "b": slice(None)}[a] for a in self._axes)
        block = np.ascontiguousarray(np.transpose(np.asarray(self._data[index]),
                                                  [self._axes.index(a) for a in "rcb"]))
        _unmap_pages(self._data)
        return block


def _unmap_pages(data) -> None:
    """Drop the pages a memory-mapped scene has touched from this process (they stay in the
    page cache): otherwise every page read counts as resident until the run ends, and a
    streamed 4 GB ENVI scene would show as 4 GB of resident memory."""
    mm = getattr(data, "_mmap", None)  # numpy.memmap's underlying mmap.mmap
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mm.madvise(mmap.MADV_DONTNEED)
