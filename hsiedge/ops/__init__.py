"""The selective-scan op (Contract 1) and its backends, kept apart from the models that use it.

The torch-facing names load on first use (PEP 562), so the C kernel's loader
(`hsiedge.ops.cpu`), which ONNX Runtime sessions use too, imports without PyTorch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ScanBackend": "hsiedge.ops.backends",
    "available_backends": "hsiedge.ops.backends",
    "register_backend": "hsiedge.ops.backends",
    "scan_backend": "hsiedge.ops.backends",
    "selective_scan": "hsiedge.ops.selective_scan",
    "selective_scan_reference": "hsiedge.ops.reference",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
