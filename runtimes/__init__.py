"""Runners (installed as `hsiedge.runtimes`): torch, onnxruntime and tensorrt behind one small
interface (DESIGN.md Contract 4).  The runtime stage fills this package."""
