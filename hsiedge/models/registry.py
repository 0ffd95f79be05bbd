"""Names of the seed models, how to build them, and what each takes as input."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from hsiedge.models.mambahsi import MambaHSI
from hsiedge.models.md2f_mamba import MD2FMamba
from hsiedge.models.spectralmamba import SpectralMamba

# Every integer config value lies in [1, MAX_CONFIG_INT] unless a model's `int_ranges` says
# otherwise: bands, classes, widths, states and patch sides of hyperspectral models are far
# below it, and a stored config outside it is damage or an attack, refused before any build.
MAX_CONFIG_INT = 65_536
MAX_CONFIG_STR = 64  # characters of a string option (e.g. MD2F-Mamba's pooling)


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its constructor, default config and a one-line input description.

    `int_ranges` narrows or widens the [1, MAX_CONFIG_INT] range of named integer options."""

    name: str
    factory: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    input_desc: str = ""
    summary: str = ""
    int_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("mambahsi", MambaHSI, {"in_channels": 103, "num_classes": 9},
                  "whole image or tile (B, bands, H, W) -> logits at H/4 x W/4",
                  "MambaHSI, Li et al. TGRS 2024 (official structure and keys)"),
        ModelSpec("spectralmamba", SpectralMamba, {"in_channels": 145, "num_classes": 14, "patch_size": 7},
                  "patch (B, bands, 7, 7), or spectrum (B, bands) with patch_size=0",
                  "SpectralMamba, Yao et al. 2024 (reconstruction)",
                  # patch 0 is pixel-wise; each block of depth costs ~2 ms to build even on "meta"
                  {"patch_size": (0, MAX_CONFIG_INT), "depth": (1, 64)}),
        ModelSpec("md2f-mamba", MD2FMamba, {"in_channels": 30, "num_classes": 9, "patch_size": 13},
                  "PCA patch (B, 30, 13, 13)",
                  "MD2F-Mamba, Wan et al. 2026 (paper's blocks and equations)"),
    )
}


def has_tile_form(name: str) -> bool:
    """Whether model `name` classifies a whole tile of patches at once (`forward_tile`)."""
    spec = MODELS.get(name)
    return spec is not None and callable(getattr(spec.factory, "forward_tile", None))


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


def model_parameters(name: str) -> Mapping[str, inspect.Parameter]:
    """The parameters of `name`'s constructor (its config keys), by name."""
    return inspect.signature(MODELS[name].factory).parameters


def check_config(name: str, config: Mapping[Any, Any]) -> None:
    """Check a config for `name` before anything is built, from the constructor's signature.

    Keys must be constructor parameters; a value must have its default's type (bool, int,
    number or string) and integers must lie in their range (see MAX_CONFIG_INT).  Raises
    ValueError with one sentence naming the first fault."""
    spec = MODELS[name]
    params = model_parameters(name)
    for key, value in config.items():
        if key not in params:
            raise ValueError(f"{name} has no option {key!r}; it takes {', '.join(params)}")
        default = params[key].default
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{name} option {key} takes true or false, got {short_repr(value)}")
        elif isinstance(default, int):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} option {key} takes an integer, got {short_repr(value)}")
            low, high = spec.int_ranges.get(key, (1, MAX_CONFIG_INT))
            if not low <= value <= high:
                raise ValueError(f"{name} option {key} must be between {low} and {high}, "
                                 f"got {short_repr(value)}")
        elif isinstance(default, float):
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"{name} option {key} takes a finite number, got {short_repr(value)}")
        elif isinstance(default, str):
            if not isinstance(value, str) or len(value) > MAX_CONFIG_STR:
                raise ValueError(f"{name} option {key} takes a short string, got {short_repr(value)}")
        else:
            raise ValueError(f"{name} option {key} cannot be set from a config")


def short_repr(value: Any) -> str:
    """`value` for a one-line message: its repr when short, else what it is."""
    if isinstance(value, int) and not -10**12 < value < 10**12:
        return "an integer of over 12 digits"
    if isinstance(value, str) and len(value) > 40:
        return f"a string of {len(value)} characters"
    text = repr(value) if isinstance(value, int | float | str | type(None)) else ""
    return text if 0 < len(text) <= 40 else f"a {type(value).__name__}"


def parse_model_options(name: str, items: Iterable[str]) -> dict[str, Any]:
    """KEY=VALUE strings -> a config for `name`'s constructor (ints, floats, true/false, else strings).

    Keys must be arguments of the model's constructor other than those training takes from
    the data; raises ValueError naming the allowed ones otherwise, and as `check_config` for
    a value of the wrong type or out of range."""
    params = model_parameters(name)
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
        if isinstance(params[key].default, bool) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(value)
                    break
                except ValueError:
                    pass
        config[key] = value
    check_config(name, config)
    return config
