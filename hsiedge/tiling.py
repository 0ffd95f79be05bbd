"""Cutting scenes into the pieces a model consumes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hsiedge.io.scene import Window


def gather_patches(padded: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                   patch_size: int) -> torch.Tensor:
    """Neighbourhoods of the given pixels: (bands, H + 2r, W + 2r) padded image -> (n, bands, p, p).

    `rows`, `cols` are pixel coordinates in the unpadded image (r = patch_size // 2).

    On the CPU the patches are taken in one copy from NumPy's window view of the image, whose
    (row, col) axes index the windows: a 128-patch batch of 103-band 7 x 7 patches costs about
    a tenth of gathering every (band, i, j) element with index tensors (bench/gather.py).
    """
    if padded.device.type == "cpu" and not padded.requires_grad:
        windows = np.lib.stride_tricks.sliding_window_view(padded.numpy(), (patch_size, patch_size),
                                                           axis=(1, 2))  # (bands, H, W, p, p), a view
        return torch.from_numpy(windows.transpose(1, 2, 0, 3, 4)[rows.numpy(), cols.numpy()])
    return gather_patches_indexed(padded, rows, cols, patch_size)


def gather_patches_indexed(padded: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                           patch_size: int) -> torch.Tensor:
    """`gather_patches` by index tensors, on any device and differentiable."""
    offsets = torch.arange(patch_size, device=padded.device)
    r_idx = (rows.to(padded.device)[:, None] + offsets)[:, :, None]  # (n, p, 1)
    c_idx = (cols.to(padded.device)[:, None] + offsets)[:, None, :]  # (n, 1, p)
    return padded[:, r_idx, c_idx].permute(1, 0, 2, 3).contiguous()


def pixel_patches(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Every pixel's neighbourhood: (bands, H, W) -> (H*W, bands, p, p), raster order.

    Scene edges are reflect-padded, as patch-based HSI classifiers are trained.
    """
    if patch_size % 2 == 0:
        raise ValueError(f"patch_size must be odd, got {patch_size}")
    _, h, w = image.shape
    r = patch_size // 2
    padded = F.pad(image[None], (r, r, r, r), mode="reflect")[0]
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return gather_patches(padded, rows, cols, patch_size)


class PixelInputs:
    """Model inputs for flat pixel indices (row * W + col) of one preprocessed image (C, H, W).

    kind "patch": each pixel's p x p neighbourhood, edges reflect-padded as in training;
    "pixel": each pixel's spectrum.  (Image models take whole tiles: see `pad_to_multiple`.)
    """

    def __init__(self, image: torch.Tensor, kind: str, patch_size: int = 0) -> None:
        if kind not in ("patch", "pixel"):
            raise ValueError(f"per-pixel inputs are for patch or pixel models, not {kind!r}")
        self.image, self.kind, self.patch = image, kind, patch_size
        r = patch_size // 2
        self.padded = F.pad(image[None], (r, r, r, r), mode="reflect")[0] if kind == "patch" and r else image

    def __call__(self, idx: np.ndarray) -> torch.Tensor:
        w = self.image.shape[2]
        rows, cols = torch.from_numpy(idx // w), torch.from_numpy(idx % w)
        if self.kind == "pixel":
            return self.image[:, rows, cols].T.contiguous()
        return gather_patches(self.padded, rows, cols, self.patch)


IMAGE_MULTIPLE = 4  # image models (MambaHSI) embed at 1/4 resolution: tile sides are multiples of 4


def image_batch(image: torch.Tensor) -> np.ndarray:
    """An image model's input for one preprocessed image or tile (C, H, W): (1, C, H', W'),
    padded to multiples of IMAGE_MULTIPLE."""
    return pad_to_multiple(image, IMAGE_MULTIPLE)[None].numpy()


def image_logits(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """(K, H, W) full-resolution logits of an image model on one (C, H, W) image or tile, at the
    geometry every deployment uses: padded as `image_batch` pads it, then cropped back.

    Training scores (and trains) through this too, so the model that was validated is the one
    export, parity-check and infer run (MambaHSI's scan runs over the padded raster, so a
    different padding would change the sequence and the labels)."""
    _, h, w = image.shape
    return model.full_resolution_logits(pad_to_multiple(image, IMAGE_MULTIPLE)[None])[0, :, :h, :w]


def pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    """(C, H, W) -> (C, H', W') with H', W' the next multiples, reflect-padded at the bottom/right."""
    _, h, w = image.shape
    ph, pw = -h % multiple, -w % multiple
    if not (ph or pw):
        return image
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(image[None], (0, pw, 0, ph), mode=mode)[0]


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


def tile_patch_batches(image: torch.Tensor, tile: Tile, patch_size: int,
                       batch: int) -> Iterator[torch.Tensor]:
    """Every core pixel's neighbourhood from the tile's preprocessed read window (C, h, w),
    `batch` pixels at a time in raster order (patch_size 0: the pixels' spectra).

    Batches are cut when asked for, so a tile never holds all its patches at once (a 128 x 128
    core of 13 x 13 patches of 30 bands would be 330 MB).  Where the read window was clipped by
    the scene edge, the missing halo is reflect-padded exactly as `pixel_patches` pads the
    whole scene, so a tiled run sees the same patches.
    """
    r = patch_size // 2
    top, bottom, left, right = tile.margins()
    padded = F.pad(image[None], (r - left, r - right, r - top, r - bottom), mode="reflect")[0] if r else image
    h, w = tile.core.height, tile.core.width
    for i in range(0, h * w, batch):
        idx = torch.arange(i, min(i + batch, h * w))
        rows, cols = idx // w, idx % w
        if patch_size == 0:
            yield image[:, top + rows, left + cols].T.contiguous()
        else:
            yield gather_patches(padded, rows, cols, patch_size)
