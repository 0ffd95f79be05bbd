"""The `onnxruntime` runtime: the bundle's ONNX graph in ONNX Runtime.

Execution providers: TensorRT and CUDA when this onnxruntime build has them, CPU always.
ONNX Runtime has no kernel for the `SelectiveScan` node of plugin-mode graphs: bundles carry
it as a model-local function whose body is its portable decomposition, which ONNX Runtime
inlines, so the graph runs as it is.  Older bundles without that function have the node
replaced, when the session is created, by the same decomposition.  The TensorRT provider
runs the node through the hsiedge plugin library instead, when it is given one
(`HSIEDGE_TRT_PLUGINS`, or `trt_extra_plugin_lib_paths`).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort

from hsiedge.bundle import INPUT_NAME, Bundle
from hsiedge.export import portable, scan_functions, scan_node
from hsiedge.runtimes.base import Runner, RuntimeSpec, register_runtime
from hsiedge.runtimes.trt_library import PLUGIN_ENV


def _providers(plugin_graph: bool) -> list:
    have = ort.get_available_providers()
    chosen: list = []
    plugins = os.environ.get(PLUGIN_ENV)
    if "TensorrtExecutionProvider" in have and (plugins or not plugin_graph):
        options = {"trt_extra_plugin_lib_paths": plugins} if plugins else {}
        chosen.append(("TensorrtExecutionProvider", options))
    if "CUDAExecutionProvider" in have:
        chosen.append("CUDAExecutionProvider")
    chosen.append("CPUExecutionProvider")
    return chosen


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, device: str | None = None, threads: int | None = None) -> None:
        super().__init__(bundle)
        model = onnx.load(str(bundle.artifact("onnx")))
        self._plugin_graph = any(True for _ in scan_node.scan_nodes(model))
        providers = _providers(self._plugin_graph)
        if device == "cpu":
            providers = ["CPUExecutionProvider"]
        first = providers[0] if isinstance(providers[0], str) else providers[0][0]
        by_onnxruntime = self._plugin_graph and first != "TensorrtExecutionProvider"
        self._substituted = by_onnxruntime and not scan_functions.runs_as_is(model)
        self._as_function = by_onnxruntime and not self._substituted
        if self._substituted:
            model = portable.decompose(model)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # ONNX Runtime's CPU arena grows in powers of two and never shrinks (MambaHSI's tiles
        # cost 59 KB/px with it, 39 KB/px without); freed buffers go back to the process heap,
        # which hsiedge.memory keeps bounded, at no cost in speed (measured on CPU).
        opts.enable_cpu_mem_arena = False
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)

    @property
    def device(self) -> str:
        p = self.session.get_providers()[0]
        return {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda",
                "TensorrtExecutionProvider": "cuda (TensorRT EP)"}.get(p, p)

    @property
    def precision(self) -> str:
        return self.bundle.precision

    @property
    def artifact(self) -> str:
        return "onnx"

    @property
    def notes(self) -> str:
        if self._substituted:
            return "SelectiveScan run as its portable decomposition"
        return "SelectiveScan run as its model-local function (portable body)" if self._as_function else ""

    def run(self, x: np.ndarray) -> np.ndarray:
        (y,) = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
        return y.astype(np.float32, copy=False)

    def close(self) -> None:
        self.session = None


def _available(bundle: Bundle) -> str | None:
    return None if bundle.has("onnx") else f"{bundle.path}: the bundle carries no ONNX graph"


register_runtime(RuntimeSpec("onnxruntime", OnnxRuntimeRunner, _available, speed_rank=2))
