"""Cutting scenes into the pieces a model consumes (NumPy arrays; no PyTorch, so bundles run
without it: the torch side for training is `hsiedge.tensor_inputs`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from hsiedge.io.scene import Window


def gather_patches(padded: np.ndarray, rows: np.ndarray, cols: np.ndarray, patch_size: int) -> np.ndarray:
    """Neighbourhoods of the given pixels: (bands, H + 2r, W + 2r) padded image -> (n, bands, p, p).

    `rows`, `cols` are pixel coordinates in the unpadded image (r = patch_size // 2).  The
    patches are taken in one copy from NumPy's window view of the image, whose (row, col) axes
    index the windows: a 128-patch batch of 103-band 7 x 7 patches costs about a tenth of
    gathering every (band, i, j) element with index tensors (bench/gather.py).
    """
    windows = np.lib.stride_tricks.sliding_window_view(padded, (patch_size, patch_size),
                                                       axis=(1, 2))  # (bands, H, W, p, p), a view
    return np.ascontiguousarray(windows.transpose(1, 2, 0, 3, 4)[rows, cols])


def reflect_pad(image: np.ndarray, top: int, bottom: int, left: int, right: int) -> np.ndarray:
    """(C, H, W) -> (C, top + H + bottom, left + W + right), mirrored about the edge pixels
    (which are not repeated), as patch-based HSI classifiers are trained."""
    if not (top or bottom or left or right):
        return image
    return np.pad(image, ((0, 0), (top, bottom), (left, right)), mode="reflect")


def pixel_patches(image: np.ndarray, patch_size: int) -> np.ndarray:
    """Every pixel's neighbourhood: (bands, H, W) -> (H*W, bands, p, p), raster order.

    Scene edges are reflect-padded, as patch-based HSI classifiers are trained.
    """
    if patch_size % 2 == 0:
        raise ValueError(f"patch_size must be odd, got {patch_size}")
    _, h, w = image.shape
    r = patch_size // 2
    idx = np.arange(h * w)
    return gather_patches(reflect_pad(image, r, r, r, r), idx // w, idx % w, patch_size)


def check_pixel_kind(kind: str) -> None:
    """Per-pixel inputs exist for patch and pixel models only (image models take whole tiles)."""
    if kind not in ("patch", "pixel"):
        raise ValueError(f"per-pixel inputs are for patch or pixel models, not {kind!r}")


class PixelInputs:
    """Model inputs for flat pixel indices (row * W + col) of one preprocessed image (C, H, W).

    kind "patch": each pixel's p x p neighbourhood, edges reflect-padded as in training;
    "pixel": each pixel's spectrum.  (Image models take whole tiles: see `pad_to_multiple`.)
    """

    def __init__(self, image: np.ndarray, kind: str, patch_size: int = 0) -> None:
        check_pixel_kind(kind)
        self.image, self.kind, self.patch = image, kind, patch_size
        r = patch_size // 2
        self.padded = reflect_pad(image, r, r, r, r) if kind == "patch" else image

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        w = self.image.shape[2]
        rows, cols = idx // w, idx % w
        if self.kind == "pixel":
            return np.ascontiguousarray(self.image[:, rows, cols].T)
        return gather_patches(self.padded, rows, cols, self.patch)


IMAGE_MULTIPLE = 4  # image models (MambaHSI) embed at 1/4 resolution: tile sides are multiples of 4


def image_batch(image: np.ndarray) -> np.ndarray:
    """An image model's input for one preprocessed image or tile (C, H, W): (1, C, H', W'),
    padded to multiples of IMAGE_MULTIPLE."""
    return np.ascontiguousarray(pad_to_multiple(image, IMAGE_MULTIPLE)[None])


def padding_to_multiple(height: int, width: int, multiple: int) -> tuple[int, int, str]:
    """(rows, cols, mode) that `pad_to_multiple` adds at the bottom / right: "reflect" where the
    image is larger than the padding, else "edge" (the edge pixel repeated)."""
    ph, pw = -height % multiple, -width % multiple
    return ph, pw, "reflect" if ph < height and pw < width else "edge"


def pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """(C, H, W) -> (C, H', W') with H', W' the next multiples, reflect-padded at the bottom/right."""
    ph, pw, mode = padding_to_multiple(image.shape[1], image.shape[2], multiple)
    if not (ph or pw):
        return image
    return np.pad(image, ((0, 0), (0, ph), (0, pw)), mode=mode)


@dataclass(frozen=True)
class Tile:
    """One step of a streamed scene: the output pixels it decides (`core`) and what it reads."""

    index: int
    core: Window
    read: Window

    def margins(self) -> tuple[int, int, int, int]:
        """Pixels read beyond the core: top, bottom, left, right."""
        c, r = self.core, self.read
        return (c.row - r.row, r.row + r.height - c.row - c.height,
                c.col - r.col, r.col + r.width - c.col - c.width)


def plan_tiles(height: int, width: int, core: int, margin: int) -> list[Tile]:
    """Cores of `core` x `core` pixels in raster order; each reads `margin` more pixels on every
    side, clipped to the scene (a patch model's halo, or an image model's overlap / 2)."""
    if core < 1:
        raise ValueError(f"tile core must be at least 1 pixel, got {core}")
    tiles = []
    for row in range(0, height, core):
        for col in range(0, width, core):
            c = Window(row, col, min(core, height - row), min(core, width - col))
            r0, c0 = max(0, row - margin), max(0, col - margin)
            r1, c1 = min(height, row + c.height + margin), min(width, col + c.width + margin)
            tiles.append(Tile(len(tiles), c, Window(r0, c0, r1 - r0, c1 - c0)))
    return tiles


def halo_padded(image: np.ndarray, tile: Tile, r: int) -> np.ndarray:
    """The tile's preprocessed read window (C, h, w) as its core with an `r`-pixel halo on every
    side: where the window was clipped by the scene edge, the halo is reflect-padded exactly as
    `pixel_patches` pads the whole scene (needs margins of at most `r`)."""
    top, bottom, left, right = tile.margins()
    return reflect_pad(image, r - top, r - bottom, r - left, r - right) if r else image


def tile_patch_batches(image: np.ndarray, tile: Tile, patch_size: int, batch: int) -> Iterator[np.ndarray]:
    """Every core pixel's neighbourhood from the tile's preprocessed read window (C, h, w),
    `batch` pixels at a time in raster order (patch_size 0: the pixels' spectra).

    Batches are cut when asked for, so a tile never holds all its patches at once (a 128 x 128
    core of 13 x 13 patches of 30 bands would be 330 MB).  Where the read window was clipped by
    the scene edge, the missing halo is reflect-padded exactly as `pixel_patches` pads the
    whole scene, so a tiled run sees the same patches.
    """
    padded = halo_padded(image, tile, patch_size // 2)
    top, _, left, _ = tile.margins()
    h, w = tile.core.height, tile.core.width
    for i in range(0, h * w, batch):
        idx = np.arange(i, min(i + batch, h * w))
        rows, cols = idx // w, idx % w
        if patch_size == 0:
            yield np.ascontiguousarray(image[:, top + rows, left + cols].T)
        else:
            yield gather_patches(padded, rows, cols, patch_size)
