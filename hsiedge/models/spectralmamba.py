"""SpectralMamba (Yao, Hong, Li, Chanussot, 2024): a reconstruction of the paper.

No official code has been released, so every choice below that the paper does not pin down
is ours; they are listed here and in the README.

Pipeline (patch-wise; pixel-wise skips step 1 and takes a spectrum):

1. Gated Spatial-Spectral Merging (GSSM).  A gate is learned over the patch by an efficient
   convolution pair, a depthwise 3x3 conv over the bands (with bias, 'same' padding) and a
   pointwise 1x1 conv bands -> bands (with bias), then a sigmoid.  The gated patch is merged
   into one spectrum per sample by averaging over the patch's pixels.  [Choices: kernel 3x3
   and the biases make the patch-minus-pixel parameter gap of the paper's Botswana figures
   (34.96 K - 12.33 K) come out exactly; the paper sums over space, we average, which only
   rescales the merged spectrum by 1/patch^2 and keeps its scale independent of the patch.]
2. Piece-wise Sequential Scanning (PSS).  The spectrum is zero-padded to a multiple of R and
   cut into R contiguous pieces (R = 6 by default, the paper's best); each piece is one token,
   so the sequence has R tokens in band order.  [Choice: pieces-as-tokens, the reading that
   makes the sequence length grow with R as the paper's ablation describes.]
3. Token embedding.  A shared linear layer maps each piece (ceil(bands/R) values) to d_model,
   plus a learnable position embedding per piece.  [Choice: width 32 puts the pixel-wise
   Botswana model at about 11.6 K parameters against the paper's 12.33 K.]
4. S6 Mamba.  `depth` pre-LayerNorm residual Mamba blocks (d_state 16, expand 2, d_conv 4;
   depth 1 by default).  [Choice: the paper gives no depth or widths; one block fits the
   parameter budget.]
5. Classifier.  LayerNorm, mean over the R tokens, Linear(d_model -> classes).  [Choice.]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hsiedge.models.mamba import ResidualMamba

# Merged spectra per call of the sequence part in `forward_tile`: its activations stay a few MB.
SPECTRA_PER_CALL = 4096


class GatedSpatialSpectralMerging(nn.Module):
    """Patch (batch, bands, p, p) -> one gated, merged spectrum (batch, bands)."""

    def __init__(self, bands: int, patch_size: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(bands, bands, kernel_size, padding=kernel_size // 2, groups=bands)
        self.pointwise = nn.Conv2d(bands, bands, kernel_size=1)
        # Learnable merge weights over the patch positions, initialised to a centred Gaussian.
        r = torch.arange(patch_size, dtype=torch.float32) - patch_size // 2
        self.merge_logits = nn.Parameter(-(r[:, None] ** 2 + r[None, :] ** 2) / 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.pointwise(self.depthwise(x)))
        weights = torch.softmax(self.merge_logits.flatten(), 0).view_as(self.merge_logits)
        return (gate * x * weights).sum(dim=(2, 3))

    def merge_tile(self, tile: torch.Tensor) -> torch.Tensor:
        """(n, bands, h + 2r, w + 2r), r = patch // 2 -> (n, bands, h, w): `forward` of every core
        pixel's patch, computed once per tile instead of once per patch.

        A patch's gate at one of its pixels depends on the patch only through which kernel taps
        the patch's edge cuts off, so each image pixel has one gate per edge case (9 for a 3 x 3
        kernel: corner, edge or interior in each direction), where the patch form computes it
        p^2 times.  Each edge case's gated pixels are merged by a depthwise convolution with the
        merge weights of the patch positions in that case.  The result differs from `forward`
        only by float rounding (summation order).
        """
        p = self.merge_logits.shape[0]
        k = self.depthwise.kernel_size[0]
        hk, r = k // 2, p // 2
        n, c, rows, cols = tile.shape
        h, w = rows - 2 * r, cols - 2 * r
        if h < 1 or w < 1:
            raise ValueError(f"a tile of {rows} x {cols} pixels holds no core inside its {r}-pixel halo")
        weights = torch.softmax(self.merge_logits.flatten(), 0).view_as(self.merge_logits)
        padded = F.pad(tile, (hk, hk, hk, hk))  # taps a case keeps never reach this zero border
        merged = torch.zeros(n, c, h, w, dtype=tile.dtype, device=tile.device)
        for i0, i1, row_taps in _edge_cases(p, hk):
            for j0, j1, col_taps in _edge_cases(p, hk):
                # tile pixels at patch rows i0..i1, columns j0..j1 of some core pixel's patch
                kept = torch.zeros(k, k, dtype=tile.dtype, device=tile.device)
                kept[row_taps[0] + hk:row_taps[1] + hk + 1, col_taps[0] + hk:col_taps[1] + hk + 1] = 1
                window = padded[:, :, i0:i1 + h + 2 * hk, j0:j1 + w + 2 * hk]
                dw = F.conv2d(window, self.depthwise.weight * kept, self.depthwise.bias, groups=c)
                gated = torch.sigmoid(self.pointwise(dw)).mul_(tile[:, :, i0:i1 + h, j0:j1 + w])
                merge = weights[i0:i1 + 1, j0:j1 + 1].expand(c, 1, -1, -1)
                merged.add_(F.conv2d(gated, merge, groups=c))
        return merged


def _edge_cases(p: int, hk: int) -> list[tuple[int, int, tuple[int, int]]]:
    """Runs of patch rows (or columns) i0..i1 whose 'same' convolution of half-width `hk` keeps
    the same kernel taps (dr_lo, dr_hi): the rows near the patch edge, one by one, and the
    interior."""
    runs: list[tuple[int, int, tuple[int, int]]] = []
    for i in range(p):
        taps = (max(-hk, -i), min(hk, p - 1 - i))
        if runs and runs[-1][2] == taps:
            runs[-1] = (runs[-1][0], i, taps)
        else:
            runs.append((i, i, taps))
    return runs


class SpectralMamba(nn.Module):
    """Patch-wise: (batch, bands, p, p) -> (batch, classes); pixel-wise: (batch, bands) -> same."""

    def __init__(self, in_channels: int = 145, num_classes: int = 14, patch_size: int = 7,
                 pieces: int = 6, d_model: int = 32, depth: int = 1, d_state: int = 16,
                 expand: int = 2) -> None:
        super().__init__()
        if patch_size < 0 or (patch_size and patch_size % 2 == 0):
            raise ValueError(f"patch_size must be odd (patch-wise) or 0 (pixel-wise), got {patch_size}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.patch_size, self.pieces = patch_size, pieces
        self.input_kind = "patch" if patch_size else "pixel"
        self.piece_len = math.ceil(in_channels / pieces)
        self.gssm = GatedSpatialSpectralMerging(in_channels, patch_size) if patch_size else None
        self.embed = nn.Linear(self.piece_len, d_model)
        self.pos_embed = nn.Parameter(torch.zeros(1, pieces, d_model))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[ResidualMamba(d_model, d_state, expand) for _ in range(depth)])
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spectrum = self.gssm(x) if self.gssm is not None else x  # (batch, bands)
        return self.classify_spectra(spectrum)

    def forward_tile(self, tile: torch.Tensor) -> torch.Tensor:
        """Patch-wise only: (n, bands, h + 2r, w + 2r), r = patch // 2 -> (n, classes, h, w), the
        logits of every core pixel from its patch, as `forward` gives them up to float rounding.

        The tile form of the gated merge (`GatedSpatialSpectralMerging.merge_tile`) does per tile
        pixel what the patch form does per patch pixel, about p^2 / 9 times less work (5x at
        patch 7); the spectra then go through the sequence part SPECTRA_PER_CALL at a time."""
        if self.gssm is None:
            raise ValueError("a pixel-wise SpectralMamba (patch_size 0) takes spectra, not tiles")
        merged = self.gssm.merge_tile(tile)
        n, c, h, w = merged.shape
        spectra = merged.permute(0, 2, 3, 1).reshape(n * h * w, c)
        logits = torch.cat([self.classify_spectra(s) for s in spectra.split(SPECTRA_PER_CALL)])
        return logits.view(n, h, w, -1).permute(0, 3, 1, 2)

    def classify_spectra(self, spectrum: torch.Tensor) -> torch.Tensor:
        """(batch, bands) merged spectra -> (batch, classes): pieces, tokens, Mamba, head."""
        pad = self.pieces * self.piece_len - self.in_channels
        if pad:
            spectrum = F.pad(spectrum, (0, pad))
        tokens = self.embed(spectrum.reshape(-1, self.pieces, self.piece_len)) + self.pos_embed
        tokens = self.norm(self.blocks(tokens))
        return self.head(tokens.mean(dim=1))
