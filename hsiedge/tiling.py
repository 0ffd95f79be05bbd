"""Cutting scenes into the pieces a model consumes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_patches(padded: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                   patch_size: int) -> torch.Tensor:
    """Neighbourhoods of the given pixels: (bands, H + 2r, W + 2r) padded image -> (n, bands, p, p).

    `rows`, `cols` are pixel coordinates in the unpadded image (r = patch_size // 2).
    """
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
