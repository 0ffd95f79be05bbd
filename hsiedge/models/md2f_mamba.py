"""MD2F-Mamba (Wan et al., 2026): a reconstruction from the paper's description.

Neither the paper's full text nor code could be consulted here, only its published outline:
a PCA-reduced patch (30 components, 13 x 13, width 64), a Conv3D -> Conv2D extractor, MDConv,
a local branch MS-LFEM with a learnable vertical positional encoding and four parallel
branches, a global branch HSM-GFE with a learnable horizontal positional encoding and three
stages, CSFF fusion ReLU(F_g + F_l * S), a pooled linear head, about 92 K parameters on
Pavia University.  Everything else is our choice, made to fit that outline and budget:

- Extractor: Conv3d 1 -> 8, kernel (7, 3, 3), padding (0, 1, 1), BN, ReLU; the 8 x 24
  spectral maps are folded into 192 channels; Conv2d 1x1 192 -> 64, BN, ReLU.  (A 3x3
  Conv2d alone would cost ~110 K parameters, more than the whole model.)
- MDConv: depthwise 3x3 (square), 1x3 (horizontal) and 3x1 (vertical) branches, concatenated
  with the input (4 x 64 channels), 1x1 conv back to 64, BN, ReLU.
- MS-LFEM: add the vertical positional encoding (1, 64, patch, 1); four branches of 16
  channels each: 1x1; depthwise 3x3 then 1x1; depthwise 3x3 dilation 2 then 1x1; depthwise
  3x3 dilation 3 then 1x1 (each with BN, ReLU); concatenated, 1x1 conv, BN, ReLU, residual.
- HSM-GFE: add the horizontal positional encoding (1, 64, 1, patch); three hierarchical
  stages, each a pre-LayerNorm residual Mamba (d_state 16, expand 1): over every row
  (horizontal sequences), over every column (vertical sequences), over the whole patch in
  raster order.  (expand 2 would put three stages alone above the budget.)
- CSFF: S = cosine similarity of F_g and F_l along channels, per pixel (batch, 1, H, W);
  out = ReLU(F_g + F_l * S).
- Head: global average pooling, Linear(64 -> classes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hsiedge.models.mamba import ResidualMamba


def _conv_bn_relu(cin: int, cout: int, **conv: object) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, **conv), nn.BatchNorm2d(cout), nn.ReLU())


class MDConv(nn.Module):
    """Multidirectional depthwise convolution: [x, square, horizontal, vertical] -> 1x1."""

    def __init__(self, channels: int, k: int = 3) -> None:
        super().__init__()
        self.square = nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels)
        self.horizontal = nn.Conv2d(channels, channels, (1, k), padding=(0, k // 2), groups=channels)
        self.vertical = nn.Conv2d(channels, channels, (k, 1), padding=(k // 2, 0), groups=channels)
        self.fuse = _conv_bn_relu(4 * channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([x, self.square(x), self.horizontal(x), self.vertical(x)], 1))


class MSLFEM(nn.Module):
    """Multi-scale local feature extraction: vertical positional encoding + four branches."""

    def __init__(self, channels: int, patch_size: int) -> None:
        super().__init__()
        c = channels // 4
        self.pos_v = nn.Parameter(torch.zeros(1, channels, patch_size, 1))
        nn.init.trunc_normal_(self.pos_v, std=0.02)

        def dilated(d: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=d, dilation=d, groups=channels),
                _conv_bn_relu(channels, c, kernel_size=1))

        self.branches = nn.ModuleList(
            [_conv_bn_relu(channels, c, kernel_size=1), dilated(1), dilated(2), dilated(3)])
        self.fuse = _conv_bn_relu(4 * c, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_v
        return x + self.fuse(torch.cat([b(x) for b in self.branches], 1))


class HSMGFE(nn.Module):
    """Hierarchical state-space global features: row scans, column scans, whole-patch scan."""

    def __init__(self, channels: int, patch_size: int, d_state: int = 16, expand: int = 1) -> None:
        super().__init__()
        self.pos_h = nn.Parameter(torch.zeros(1, channels, 1, patch_size))
        nn.init.trunc_normal_(self.pos_h, std=0.02)
        self.rows = ResidualMamba(channels, d_state, expand)
        self.cols = ResidualMamba(channels, d_state, expand)
        self.whole = ResidualMamba(channels, d_state, expand)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = (x + self.pos_h).permute(0, 2, 3, 1)  # (b, h, w, c)
        t = self.rows(t.reshape(b * h, w, c)).reshape(b, h, w, c)
        t = self.cols(t.transpose(1, 2).reshape(b * w, h, c)).reshape(b, w, h, c).transpose(1, 2)
        t = self.whole(t.reshape(b, h * w, c)).reshape(b, h, w, c)
        return t.permute(0, 3, 1, 2)


class MD2FMamba(nn.Module):
    """PCA patch (batch, components, p, p) -> logits (batch, classes)."""

    input_kind = "patch"

    def __init__(self, in_channels: int = 30, num_classes: int = 9, patch_size: int = 13,
                 hidden_dim: int = 64, spectral_kernel: int = 7, conv3d_channels: int = 8,
                 d_state: int = 16, expand: int = 1) -> None:
        super().__init__()
        if in_channels < spectral_kernel:
            raise ValueError(f"in_channels ({in_channels}) must be >= spectral_kernel ({spectral_kernel})")
        self.in_channels, self.num_classes, self.patch_size = in_channels, num_classes, patch_size
        self.conv3d = nn.Sequential(
            nn.Conv3d(1, conv3d_channels, (spectral_kernel, 3, 3), padding=(0, 1, 1)),
            nn.BatchNorm3d(conv3d_channels), nn.ReLU())
        folded = conv3d_channels * (in_channels - spectral_kernel + 1)
        self.conv2d = _conv_bn_relu(folded, hidden_dim, kernel_size=1)
        self.mdconv = MDConv(hidden_dim)
        self.local_branch = MSLFEM(hidden_dim, patch_size)
        self.global_branch = HSMGFE(hidden_dim, patch_size, d_state=d_state, expand=expand)
        r = torch.arange(patch_size, dtype=torch.float32) - patch_size // 2
        self.pool_logits = nn.Parameter(-(r[:, None] ** 2 + r[None, :] ** 2) / 2.0)
        self.head = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv3d(x.unsqueeze(1))
        f = self.conv2d(f.flatten(1, 2))
        f = self.mdconv(f)
        f_l, f_g = self.local_branch(f), self.global_branch(f)
        s = F.cosine_similarity(f_g, f_l, dim=1, eps=1e-8).unsqueeze(1)  # CSFF
        fused = F.relu(f_g + f_l * s)
        weights = torch.softmax(self.pool_logits.flatten(), 0).view_as(self.pool_logits)
        return self.head((fused * weights).sum(dim=(2, 3)))
