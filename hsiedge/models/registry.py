"""Names of the seed models, how to build them, and what each takes as input."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
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
                  "MD2F-Mamba, Wan et al. 2026 (paper's blocks and equations)"),
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


# Set by training from the data, never by hand.
DATA_OPTIONS = ("in_channels", "num_classes")


def parse_model_options(name: str, items: Iterable[str]) -> dict[str, Any]:
    """KEY=VALUE strings -> a config for `name`'s constructor (ints, floats, else strings).

    Keys must be arguments of the model's constructor other than those training takes from
    the data; raises ValueError naming the allowed ones otherwise."""
    params = inspect.signature(MODELS[name].factory).parameters
    allowed = [p for p in params if p not in DATA_OPTIONS]
    config: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"model option {item!r} is not KEY=VALUE")
        if key not in allowed:
            raise ValueError(f"{name} has no option {key!r}; it takes {', '.join(allowed)}")
        value: Any = raw.strip()
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        default = params[key].default
        if isinstance(default, int | float) and not isinstance(value, type(default)) \
                and not (isinstance(default, float) and isinstance(value, int)):
            kind = "an integer" if isinstance(default, int) else "a number"
            raise ValueError(f"{name} option {key} takes {kind}, got {raw.strip()!r}")
        config[key] = value
    return config
