"""Cutting scenes into the pieces a model consumes."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pixel_patches(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Every pixel's neighbourhood: (bands, H, W) -> (H*W, bands, p, p), raster order.

    Scene edges are reflect-padded, as patch-based HSI classifiers are trained.
    """
    if patch_size % 2 == 0:
        raise ValueError(f"patch_size must be odd, got {patch_size}")
    bands, h, w = image.shape
    r = patch_size // 2
    padded = F.pad(image.unsqueeze(0), (r, r, r, r), mode="reflect")
    cols = F.unfold(padded, patch_size)  # (1, bands*p*p, H*W)
    return cols.transpose(1, 2).reshape(h * w, bands, patch_size, patch_size)
