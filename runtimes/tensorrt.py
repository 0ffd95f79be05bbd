"""The `tensorrt` runtime: the bundle's TensorRT engine, with the hsiedge plugin library loaded.

Written against the TensorRT 10 Python API (tensor-name I/O, `execute_async_v3`) with
NVIDIA's cuda-python for the host side: device buffers and pinned host buffers that grow
with the batch, one stream, asynchronous copies.  TensorRT is not installable on the
machines this project is developed on, so this module has not run there; its tests run
where `tensorrt` imports and a GPU exists and are skipped elsewhere with that reason.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from hsiedge.bundle import INPUT_NAME, OUTPUT_NAME, Bundle
from hsiedge.runtimes.base import Runner, RuntimeSpec, RuntimeUnavailableError, register_runtime

PLUGIN_ENV = "HSIEDGE_TRT_PLUGINS"


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA runtime call failed: {err}")
    return rest[0] if len(rest) == 1 else tuple(rest)


def _pinned(ptr: int, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 NumPy view of pinned host memory."""
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=shape)


def plugin_library(bundle: Bundle) -> str | None:
    """The plugin library to load: $HSIEDGE_TRT_PLUGINS, else the one next to the bundle's engine."""
    env = os.environ.get(PLUGIN_ENV)
    if env:
        return env
    return str(bundle.artifact("plugin")) if bundle.has("plugin") else None


class TensorRTRunner(Runner):
    name = "tensorrt"

    def __init__(self, bundle: Bundle, device: str | None = None) -> None:
        super().__init__(bundle)
        import tensorrt as trt
        from cuda.bindings import runtime as cudart

        self._trt, self._cudart = trt, cudart
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        lib = plugin_library(bundle)
        if bundle.manifest.get("plugin"):
            if lib is None:
                raise RuntimeUnavailableError(f"{bundle.path}: the engine needs the hsiedge plugin library; "
                                         f"set {PLUGIN_ENV} to libhsiedge_trt_plugins.so")
            self._runtime.get_plugin_registry().load_library(lib)
        self.engine = self._runtime.deserialize_cuda_engine(bundle.artifact("engine").read_bytes())
        if self.engine is None:
            raise RuntimeUnavailableError(
                f"{bundle.artifact('engine')}: TensorRT could not deserialise the engine "
                "(built by another TensorRT version or for another GPU?)")
        self.context = self.engine.create_execution_context()
        self._max_batch = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0]  # (min, opt, max)
        self.stream = _check(cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self._host: dict[str, tuple[int, int]] = {}  # name -> (pinned pointer, bytes)

    @property
    def device(self) -> str:
        props = _check(self._cudart.cudaGetDeviceProperties(0))
        return f"cuda:0 ({props.name.decode(errors='replace').strip(chr(0))})"

    @property
    def precision(self) -> str:
        return self.bundle.precision

    @property
    def artifact(self) -> str:
        return "engine"

    def _grow(self, table: dict, name: str, nbytes: int, pinned: bool) -> int:
        ptr, size = table.get(name, (0, 0))
        if size >= nbytes:
            return ptr
        if ptr:
            _check(self._cudart.cudaFreeHost(ptr) if pinned else self._cudart.cudaFree(ptr))
        ptr = _check(self._cudart.cudaMallocHost(nbytes) if pinned else self._cudart.cudaMalloc(nbytes))
        table[name] = (ptr, nbytes)
        return ptr

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits of a batch; batches larger than the engine's profile allows run in parts."""
        most = int(self._max_batch)
        if x.shape[0] > most:
            return np.concatenate([self._run(x[i:i + most]) for i in range(0, x.shape[0], most)])
        return self._run(x)

    def _run(self, x: np.ndarray) -> np.ndarray:
        cudart = self._cudart
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.context.set_input_shape(INPUT_NAME, x.shape)
        out_shape = tuple(self.context.get_tensor_shape(OUTPUT_NAME))
        out_bytes = int(np.prod(out_shape)) * 4
        d_in = self._grow(self._buffers, INPUT_NAME, x.nbytes, pinned=False)
        d_out = self._grow(self._buffers, OUTPUT_NAME, out_bytes, pinned=False)
        h_in = self._grow(self._host, INPUT_NAME, x.nbytes, pinned=True)
        h_out = self._grow(self._host, OUTPUT_NAME, out_bytes, pinned=True)
        _pinned(h_in, x.shape)[...] = x
        kind = cudart.cudaMemcpyKind
        _check(cudart.cudaMemcpyAsync(d_in, h_in, x.nbytes, kind.cudaMemcpyHostToDevice, self.stream))
        self.context.set_tensor_address(INPUT_NAME, d_in)
        self.context.set_tensor_address(OUTPUT_NAME, d_out)
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        _check(cudart.cudaMemcpyAsync(h_out, d_out, out_bytes, kind.cudaMemcpyDeviceToHost, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return _pinned(h_out, out_shape).copy()

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self._cudart.cudaFree(ptr)
        for ptr, _ in self._host.values():
            self._cudart.cudaFreeHost(ptr)
        self._buffers, self._host = {}, {}
        if getattr(self, "stream", None) is not None:
            self._cudart.cudaStreamDestroy(self.stream)
            self.stream = None
        self.context = self.engine = None


def why_not_here() -> str | None:
    """None when TensorRT and cuda-python import and a GPU is visible, else the reason."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed here (`import tensorrt` fails)"
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return "cuda-python is not installed here (`pip install hsiedge[trt]`)"
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        return "no CUDA GPU is visible here"
    return None


def _available(bundle: Bundle) -> str | None:
    if not bundle.has("engine"):
        return f"{bundle.path}: the bundle carries no TensorRT engine (export with --engine)"
    return why_not_here()


register_runtime(RuntimeSpec("tensorrt", TensorRTRunner, _available, speed_rank=0))
