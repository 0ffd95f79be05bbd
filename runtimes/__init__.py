"""Runners (installed as `hsiedge.runtimes`): torch, onnxruntime and tensorrt behind one small
interface (DESIGN.md Contract 4).  `open_runner(bundle, name)` is all the rest of hsiedge uses."""

from hsiedge.runtimes import onnxruntime as _onnxruntime  # noqa: F401  (registers itself)
from hsiedge.runtimes import tensorrt as _tensorrt  # noqa: F401
from hsiedge.runtimes import torch as _torch  # noqa: F401
from hsiedge.runtimes.base import (
    Runner,
    RuntimeUnavailableError,
    default_runtime,
    open_runner,
    runtime_names,
    why_unavailable,
)

__all__ = ["Runner", "RuntimeUnavailableError", "default_runtime", "open_runner", "runtime_names",
           "why_unavailable"]
