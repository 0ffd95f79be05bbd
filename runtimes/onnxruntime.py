"""The `onnxruntime` runtime: the bundle's ONNX graph in ONNX Runtime.

Execution providers: TensorRT and CUDA when this onnxruntime build has them, CPU always.
ONNX Runtime has no kernel of its own for the `SelectiveScan` node of plugin-mode graphs.  On
the CPU, hsiedge's C kernel is registered as a custom operator (`hsiedge.ops.ort_kernel`) and
runs every scan node (float16 ones through casts to float32 and back, `half_scans_in_float`).
Otherwise bundles carry the node as a model-local function whose
body is its portable decomposition, which ONNX Runtime inlines, so the graph runs as it is;
older bundles without that function have the node replaced, when the session is created, by the
same decomposition.  The TensorRT provider runs the node through the hsiedge plugin library
instead, when it is given one (`HSIEDGE_TRT_PLUGINS`, or `trt_extra_plugin_lib_paths`).
On the CPU the runner also rewrites its copy of the graph into forms ONNX Runtime's kernels run
faster (`hsiedge.runtimes.ort_graph`).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from hsiedge.bundle import INPUT_NAME, Bundle
from hsiedge.export import portable, scan_functions, scan_node
from hsiedge.ops import cpu, ort_kernel
from hsiedge.runtimes.base import Runner, RuntimeSpec, register_runtime
from hsiedge.runtimes.ort_graph import (
    NCHWC_CHANNELS,
    depthwise_convs_padded,
    half_scans_in_float,
    relus_as_unsigned,
    small_transposes_as_einsum,
)
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


def kernel_unusable(model: onnx.ModelProto) -> str | None:
    """None when hsiedge's CPU kernel can run every SelectiveScan node of `model` in this ONNX
    Runtime, else why not (a float16 scan, ONNX Runtime older than 1.16, no C compiler)."""
    version = tuple(int(p) for p in ort.__version__.split(".")[:2] if p.isdigit())
    if version < ort_kernel.MIN_ONNXRUNTIME:
        return f"ONNX Runtime {ort.__version__} is older than 1.16"
    shapes = portable.tensor_shapes(model)
    for node in scan_node.scan_nodes(model):
        if any(t not in (None, onnx.TensorProto.FLOAT) for t in portable.node_spec(node, shapes).types):
            return f"scan node {node.name or '?'} is not float32"
    try:
        ort_kernel.library()
    except cpu.ScanBuildError as e:
        return str(e)
    return None


def runs_scan_kernel(bundle: Bundle) -> bool:
    """Whether a CPU session of `bundle` runs its scans on hsiedge's kernel: a plugin-mode
    graph the kernel can run (portable-scan bundles carry the decomposition itself).  Asked
    for the default runtime and the memory budget of every run: answered once per graph."""
    onnx_entry = bundle.manifest["artifacts"]["onnx"]
    return _graph_runs_scan_kernel(str(bundle.artifact("onnx")), onnx_entry["sha256"])


@functools.lru_cache(maxsize=16)
def _graph_runs_scan_kernel(path: str, sha256: str) -> bool:
    model = onnx.load(path)
    half_scans_in_float(model)  # as the runner does
    return any(True for _ in scan_node.scan_nodes(model)) and kernel_unusable(model) is None


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, device: str | None = None, threads: int | None = None,
                 scan_kernel: bool = True) -> None:
        """`scan_kernel=False` runs scan nodes as their portable body even where hsiedge's CPU
        kernel could (to compare the two, and to check the body the bundle carries)."""
        super().__init__(bundle)
        model = onnx.load(str(bundle.artifact("onnx")))
        self._plugin_graph = any(True for _ in scan_node.scan_nodes(model))
        providers = _providers(self._plugin_graph)
        if device == "cpu":
            providers = ["CPUExecutionProvider"]
        first = providers[0] if isinstance(providers[0], str) else providers[0][0]
        by_onnxruntime = self._plugin_graph and first != "TensorrtExecutionProvider"
        self._kernel = by_onnxruntime and first == "CPUExecutionProvider" and scan_kernel
        self.half_scans, self.kernel_missing = 0, None
        if self._kernel:  # the graph the kernel would run: float16 scans cast to float32
            as_float = onnx.ModelProto()
            as_float.CopyFrom(model)
            half = half_scans_in_float(as_float)
            self.kernel_missing = kernel_unusable(as_float)
            if self.kernel_missing is None:
                model, self.half_scans = as_float, half
        self._kernel = self._kernel and self.kernel_missing is None
        self._substituted = by_onnxruntime and not self._kernel and not scan_functions.runs_as_is(model)
        self._as_function = by_onnxruntime and not self._kernel and not self._substituted
        if self._substituted:
            model = portable.decompose(model)
        on_cpu = first == "CPUExecutionProvider"
        self.einsum_transposes = small_transposes_as_einsum(model) if on_cpu else 0
        # float depthwise convolutions on whole 16-channel blocks (SpectralMamba's gate over the
        # bands: 64 Pavia patches 3.5 -> 1.3 ms, 2-core AVX2 CPU machine)
        self.padded_depthwise = depthwise_convs_padded(model) if on_cpu else 0
        opts = ort.SessionOptions()
        if self._kernel:
            opts.register_custom_ops_library(str(ort_kernel.library()))
            # The kernel runs its own threads; ONNX Runtime's, spinning after the previous node,
            # would take a core from them (a 128 x 128 MambaHSI tile: 291-321 ms without
            # spinning, 365-392 ms with it, 2-core CPU machine).
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        # ONNX Runtime's CPU arena grows in powers of two and never shrinks (MambaHSI's tiles
        # cost 59 KB/px with it, 39 KB/px without, portable scan); freed buffers go back to the
        # process heap, which hsiedge.memory keeps bounded.  Its effect on speed was lost in the
        # noise of the 2-core machine (a 128 x 128 MambaHSI tile with the scan kernel: 338-630 ms
        # with the arena, 421-516 ms without, three alternating runs each).
        opts.enable_cpu_mem_arena = False
        if threads:
            opts.intra_op_num_threads = threads
            if self._kernel:
                ort_kernel.set_threads(threads)
        # int8 (QDQ) graphs: ONNX Runtime's common subexpression elimination merges the export's
        # dedicated Q/DQ pairs of a tensor read by several quantized layers into one Q feeding
        # several DQs, and then (x86) cannot convert that Q to u8 or fuse those layers into int8
        # kernels; they ran as float Conv between Q/DQ (MD2F-Mamba: 9 of 18 layers fused with it,
        # 16 without; 121 -> 67 ms per batch of 128, 2-core CPU machine, onnxruntime 1.32).
        int8_on_cpu = on_cpu and any(n.op_type == "QuantizeLinear" for n in model.graph.node)
        disabled = ["CommonSubexpressionElimination"] if int8_on_cpu else []
        # ReLUs between the export's symmetric Q/DQ pairs: one unsigned pair each, fused into the
        # layer before (MD2F-Mamba, 7-bit weights, 64 patches: 38.2 -> 36.6 ms a call, 2-core CPU)
        self.unsigned_relus = relus_as_unsigned(model) if int8_on_cpu else 0
        # x86 CPUs without VNNI: the int8 layers as u8 x u8 kernels, which widen before they
        # multiply, with the bundle's own weights, instead of u8 x s8 ones that saturate (a
        # layer with full-range weights and activations at their ends: 25-27 % off) or float
        # between the Q/DQ pairs (what hsiedge did before: int8 0.75-0.89x fp32 per call).
        if int8_on_cpu:
            opts.add_session_config_entry(X64_QUANT_PRECISION, "1")
        # Weights of 7 bits (`hsiedge export --weight-bits 7`) cannot saturate them: ONNX Runtime
        # keeps those layers u8 x s8 under the same option (MD2F-Mamba, batch of 64: int8 0.79-0.87x
        # fp32 with 8-bit weights, 1.11-1.19x with 7-bit ones, 2-core AVX2 CPU machine).
        self._int8_note = ""  # which int8 kernels run, where this CPU lacks VNNI
        if int8_on_cpu and int8_kernels_saturate():
            self._int8_note = U8S8_INT8 if weights_fit_7_bits(model) else U8U8_INT8
        self.session = ort.InferenceSession(model.SerializeToString(), opts, providers=providers,
                                            disabled_optimizers=disabled)

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
        relus = (f"{self.unsigned_relus} ReLUs run as unsigned int8 pairs fused into their layers"
                 if self.unsigned_relus else "")
        padded = (f"depthwise convolutions run on channels padded to whole blocks of {NCHWC_CHANNELS}: "
                  f"{self.padded_depthwise}" if self.padded_depthwise else "")
        return "; ".join(n for n in (self._scan_note(), self._int8_note, relus, padded) if n)

    def _scan_note(self) -> str:
        if self._kernel:
            half = ", float16 inputs cast to float32" if self.half_scans else ""
            return f"SelectiveScan run by hsiedge's CPU kernel (ONNX Runtime custom operator{half})"
        why = f" ({self.kernel_missing})" if self.kernel_missing else ""
        if self._substituted:
            return "SelectiveScan run as its portable decomposition" + why
        if self._as_function:
            return "SelectiveScan run as its model-local function (portable body)" + why
        return ""

    def run(self, x: np.ndarray) -> np.ndarray:
        (y,) = self.session.run(None, {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
        return y.astype(np.float32, copy=False)

    def close(self) -> None:
        self.session = None


# ONNX Runtime's session option that runs u8 x s8 products with constant s8 weights outside
# [-64, 63] as u8 x u8 on x86 CPUs without VNNI; it applies only there, decided by ONNX Runtime.
X64_QUANT_PRECISION = "session.x64quantprecision"
U8U8_INT8 = ("int8 layers run as u8 x u8 kernels (ONNX Runtime's session.x64quantprecision): this x86 CPU "
             "has no VNNI, and its u8 x s8 kernels would saturate the bundle's weights")
U8S8_INT8 = ("int8 layers run as u8 x s8 kernels: this x86 CPU has no VNNI, and the bundle's 7-bit weights "
             "keep them from saturating")


@functools.cache
def int8_kernels_saturate() -> bool:
    """Whether ONNX Runtime's x86 u8 x s8 kernels would saturate here: without VNNI they sum
    pairs of products into 16 bits (vpmaddubsw), which overflows for weights beyond +-64 (MD2F-Mamba
    int8 agreed on 88.6 % of Jasper Ridge's held-out pixels on such a CPU, against >= 99 % with
    VNNI).  Elsewhere (VNNI, Arm's dot products) they do not."""
    import platform
    from pathlib import Path

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return False
    flags = next((line for line in lines if line.startswith("flags")), "").split()
    return not ({"avx512_vnni", "avx_vnni"} & set(flags))


def weights_fit_7_bits(model: onnx.ModelProto) -> bool:
    """Whether every int8 weight of a QDQ graph lies in [-64, 64], where ONNX Runtime's u8 x s8
    kernels cannot saturate even without VNNI (two products of at most 255 x 64 fit 16 bits)."""
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer
               if i.data_type == onnx.TensorProto.INT8 and i.dims]
    return bool(weights) and all(int(np.abs(w.astype(np.int16)).max(initial=0)) <= 64 for w in weights)


def _available(bundle: Bundle) -> str | None:
    return None if bundle.has("onnx") else f"{bundle.path}: the bundle carries no ONNX graph"


register_runtime(RuntimeSpec("onnxruntime", OnnxRuntimeRunner, _available, speed_rank=2))
