"""MambaHSI (Li et al., IEEE TGRS 2024): image-level spatial-spectral Mamba classifier.

Structure and state_dict keys follow the official implementation, so its published
checkpoints load as they are:

- ``patch_embedding``: Conv2d 1x1 (bands -> hidden) -> GroupNorm(group_num) -> SiLU
- ``mamba``: Sequential(BothMamba, AvgPool2d(2), BothMamba, AvgPool2d(2), BothMamba)
- ``cls_head``: Conv2d 1x1 (hidden -> 128) -> GroupNorm(group_num, 128) -> SiLU -> Conv2d 1x1

The forward pass returns logits at 1/4 of the input resolution; `full_resolution_logits`
upsamples them bilinearly with ``align_corners=True``, as the official training does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hsiedge.models.mamba import Mamba


class SpaMamba(nn.Module):
    """Spatial Mamba: the feature maps of the whole batch form ONE raster-order sequence."""

    def __init__(self, channels: int, group_num: int = 4, use_residual: bool = True) -> None:
        super().__init__()
        self.use_residual = use_residual
        self.mamba = Mamba(d_model=channels, d_state=16, d_conv=4, expand=2)
        self.proj = nn.Sequential(nn.GroupNorm(group_num, channels), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # channel-first (C, b*h*w): a view of the feature map when b == 1
        seq = x.transpose(0, 1).reshape(c, b * h * w)
        out = self.mamba.forward_channels_first(seq).reshape(c, b, h, w).transpose(0, 1)
        out = self.proj(out)
        return out + x if self.use_residual else out


class SpeMamba(nn.Module):
    """Spectral Mamba: each pixel's channels, zero-padded, become `token_num` short tokens."""

    def __init__(self, channels: int, token_num: int = 4, group_num: int = 4,
                 use_residual: bool = True) -> None:
        super().__init__()
        self.use_residual = use_residual
        self.token_num = token_num
        self.group_channel_num = math.ceil(channels / token_num)
        self.channel_num = token_num * self.group_channel_num
        self.mamba = Mamba(d_model=self.group_channel_num, d_state=16, d_conv=4, expand=2)
        self.proj = nn.Sequential(nn.GroupNorm(group_num, self.channel_num), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        xp = F.pad(x, (0, 0, 0, 0, 0, self.channel_num - c)) if c < self.channel_num else x
        tokens = xp.permute(0, 2, 3, 1).reshape(b * h * w, self.token_num, self.group_channel_num)
        out = self.mamba(tokens).reshape(b, h, w, self.channel_num).permute(0, 3, 1, 2)
        out = self.proj(out)
        return out + x if self.use_residual else out


class BothMamba(nn.Module):
    """Spatial and spectral Mamba in parallel, fused by softmax weights, plus a residual."""

    def __init__(self, channels: int, token_num: int = 4, group_num: int = 4,
                 use_residual: bool = True, use_att: bool = True) -> None:
        super().__init__()
        self.use_residual, self.use_att = use_residual, use_att
        if use_att:
            self.weights = nn.Parameter(torch.ones(2) / 2)
        self.spa_mamba = SpaMamba(channels, group_num=group_num, use_residual=use_residual)
        self.spe_mamba = SpeMamba(channels, token_num=token_num, group_num=group_num,
                                  use_residual=use_residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spa, spe = self.spa_mamba(x), self.spe_mamba(x)
        if self.use_att:
            w = torch.softmax(self.weights, dim=0)
            fused = spa * w[0] + spe * w[1]
        else:
            fused = spa + spe
        return fused + x if self.use_residual else fused


class MambaHSI(nn.Module):
    """Whole image (batch, bands, H, W) in, logits (batch, classes, H/4, W/4) out."""

    input_kind = "image"

    def __init__(self, in_channels: int = 103, num_classes: int = 9, hidden_dim: int = 128,
                 token_num: int = 4, group_num: int = 4, use_residual: bool = True,
                 use_att: bool = True) -> None:
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        self.patch_embedding = nn.Sequential(
            nn.Conv2d(in_channels, hidden_dim, kernel_size=1),
            nn.GroupNorm(group_num, hidden_dim),
            nn.SiLU(),
        )

        def both() -> BothMamba:
            return BothMamba(hidden_dim, token_num=token_num, group_num=group_num,
                             use_residual=use_residual, use_att=use_att)

        self.mamba = nn.Sequential(both(), nn.AvgPool2d(2, 2), both(), nn.AvgPool2d(2, 2), both())
        self.cls_head = nn.Sequential(
            nn.Conv2d(hidden_dim, 128, kernel_size=1),
            nn.GroupNorm(group_num, 128),
            nn.SiLU(),
            nn.Conv2d(128, num_classes, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_head(self.mamba(self.patch_embedding(x)))

    def full_resolution_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input's H x W (bilinear, align_corners=True, as officially trained)."""
        return F.interpolate(self(x), size=x.shape[-2:], mode="bilinear", align_corners=True)
