"""The `tensorrt` runtime: one of the bundle's TensorRT engines, with its plugin library loaded.

One runner for TensorRT 10, 11 and TensorRT for RTX (the same Python API family: tensor-name
I/O, `execute_async_v3`).  It runs the bundle's `trt` engine where `tensorrt` is installed,
else its `rtx` engine where TensorRT for RTX is, and loads the plugin library recorded with
that engine (inside the bundle) before deserialising.  The host side is NVIDIA's
cuda-python: device buffers and pinned host buffers that grow with the batch, one stream,
asynchronous copies.  No machine this project is developed on has a GPU TensorRT can run
on, so this module has not run; its tests skip elsewhere, naming what is missing.
"""

from __future__ import annotations

import ctypes

import numpy as np

from hsiedge.bundle import INPUT_NAME, OUTPUT_NAME, Bundle
from hsiedge.runtimes.base import Runner, RuntimeSpec, RuntimeUnavailableError, register_runtime
from hsiedge.runtimes.trt_library import (
    MODULES,
    TensorRTUnavailableError,
    installed,
    stderr_logger,
    tensorrt_library,
)


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA runtime call failed: {err}")
    return rest[0] if len(rest) == 1 else tuple(rest)


def _pinned(ptr: int, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 NumPy view of pinned host memory."""
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=shape)


def engine_target(bundle: Bundle) -> str | None:
    """The bundle engine this machine's TensorRT can load: `trt` with tensorrt, else `rtx`."""

    for target in ("trt", "rtx"):
        if target in bundle.engines and installed(target):
            return target
    return None


class TensorRTRunner(Runner):
    name = "tensorrt"

    def __init__(self, bundle: Bundle, device: str | None = None, threads: int | None = None) -> None:
        """`threads` is accepted for the interface; the engine computes on the GPU."""
        super().__init__(bundle)
        from cuda.bindings import runtime as cudart

        self.target = engine_target(bundle)
        if self.target is None:
            raise RuntimeUnavailableError(_available(bundle) or f"{bundle.path}: no engine to run")
        entry = bundle.engines[self.target]
        try:
            trt = tensorrt_library(self.target).module
        except TensorRTUnavailableError as e:
            raise RuntimeUnavailableError(str(e)) from None
        self._trt, self._cudart = trt, cudart
        self._logger = stderr_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        plugin = entry.get("plugin")
        lib = bundle.artifact(plugin["artifact"]) if plugin else None
        if lib is not None and self._runtime.get_plugin_registry().load_library(str(lib)) is None:
            raise RuntimeUnavailableError(f"{lib}: {entry['library']} could not load this plugin library")
        engine_file = bundle.artifact(entry["artifact"])
        self.engine = self._runtime.deserialize_cuda_engine(engine_file.read_bytes())
        if self.engine is None:
            raise RuntimeUnavailableError(
                f"{engine_file}: {entry['library']} could not deserialise the engine (it was built by "
                f"{entry['library']} {entry['version']} for {entry['compute_capabilities']})")
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
        return f"engine-{self.target}"

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


def why_not_here(target: str | None = None) -> str | None:
    """None when a TensorRT library (for `target`, or any), cuda-python and a GPU are here, else why not."""

    targets = [target] if target else list(MODULES)
    if not any(installed(t) for t in targets):
        return (f"no TensorRT library to run engines is installed here (tried the modules "
                f"{', '.join(m for t in targets for m in MODULES[t])})")
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return "cuda-python is not installed here (`pip install hsiedge[trt]`)"
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        return "no CUDA GPU is visible here"
    return None


def _available(bundle: Bundle) -> str | None:
    if not bundle.engines:
        return f"{bundle.path}: the bundle carries no TensorRT engine (`hsiedge engine` adds one)"
    target = engine_target(bundle)
    if target is None:
        return (f"{bundle.path}: its engines ({', '.join(sorted(bundle.engines))}) need a TensorRT library "
                "that is not installed here")
    return why_not_here(target)


register_runtime(RuntimeSpec("tensorrt", TensorRTRunner, _available, speed_rank=0))
