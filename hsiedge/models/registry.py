"""Names of the seed models, how to build them, and what each takes as input."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from hsiedge.models.mambahsi import MambaHSI
from hsiedge.models.md2f_mamba import MD2FMamba
from hsiedge.models.spectralmamba import SpectralMamba


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its constructor, default config and a one-line input description."""

    name: str
    factory: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    input_desc: str = ""
    summary: str = ""


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("mambahsi", MambaHSI, {"in_channels": 103, "num_classes": 9},
                  "whole image or tile (B, bands, H, W) -> logits at H/4 x W/4",
                  "MambaHSI, Li et al. TGRS 2024 (official structure and keys)"),
        ModelSpec("spectralmamba", SpectralMamba, {"in_channels": 145, "num_classes": 14, "patch_size": 7},
                  "patch (B, bands, 7, 7), or spectrum (B, bands) with patch_size=0",
                  "SpectralMamba, Yao et al. 2024 (reconstruction)"),
        ModelSpec("md2f-mamba", MD2FMamba, {"in_channels": 30, "num_classes": 9, "patch_size": 13},
                  "PCA patch (B, 30, 13, 13)",
                  "MD2F-Mamba, Wan et al. 2026 (reconstruction)"),
    )
}


def build_model(name: str, **config: Any) -> nn.Module:
    """Build a seed model by name; `config` overrides its defaults (bands, classes, ...)."""
    try:
        spec = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}") from None
    return spec.factory(**{**spec.defaults, **config})


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
