"""The selective-scan op (Contract 1) and its backends, kept apart from the models that use it."""

from hsiedge.ops.backends import ScanBackend, available_backends, register_backend, scan_backend
from hsiedge.ops.reference import selective_scan_reference
from hsiedge.ops.selective_scan import selective_scan

__all__ = [
    "ScanBackend",
    "available_backends",
    "register_backend",
    "scan_backend",
    "selective_scan",
    "selective_scan_reference",
]
