"""The native sources (CUDA kernel, TensorRT plugin, CMake build), shipped as package data.

Nothing here is Python: this file makes the folder the `hsiedge.plugins` package, so a wheel
carries the sources and `hsiedge plugin build` and the `cuda` backend find them after a pip
install (`source_dir()`), as they do in a checkout.
"""

from __future__ import annotations

from pathlib import Path


def source_dir() -> Path:
    """The folder holding CMakeLists.txt and selective_scan/ (the package's own folder)."""
    return Path(__file__).resolve().parent
