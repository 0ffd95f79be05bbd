"""ONNX graph -> serialised TensorRT engine, with one builder for TensorRT 10, 11 and TensorRT for RTX.

The three libraries share one Python API family; `tensorrt_library` picks the module for a
target at run time:

- `rtx`: TensorRT for RTX (`tensorrt_rtx_bindings` from the package index, or `tensorrt_rtx`).
  It builds ahead of time on any machine, CPU-only ones included, for the compute
  capabilities asked for (default: `PORTABLE_CCS`).
- `trt`: TensorRT 10 / 11 (`tensorrt`), on the device itself (Jetson Orin with JetPack 6,
  workstations): it builds for the GPU it runs on.

Networks are strongly typed: precision comes from the graph itself (fp16 graphs carry
float16 tensors and casts, int8 graphs explicit Q/DQ pairs), never from builder flags,
which TensorRT 11 and TensorRT for RTX no longer have.  A plugin-mode graph needs the
hsiedge plugin library in the builder's plugin registry, so the ONNX parser maps each
`SelectiveScan` node (Contract 2) to the plugin.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx

from hsiedge.bundle import INPUT_NAME
from hsiedge.export import scan_node
from hsiedge.runtimes.trt_library import (
    PORTABLE_CCS,
    TensorRTLibrary,
    TensorRTUnavailableError,
    native_stdout_to_stderr,
    stderr_logger,
    tensorrt_library,
)

# `hsiedge infer`'s defaults: patch batches of up to 128; MambaHSI tiles of 32..512 pixels a side,
# tuned for 256 (the activations of the largest tile must fit in an edge GPU's memory).
ENGINE_BATCH = 128
ENGINE_TILES = (32, 256, 512)


class EngineBuildError(RuntimeError):
    """TensorRT could not build the engine, or is not here; one sentence says why."""


@dataclass(frozen=True)
class Profile:
    """The input shapes an engine accepts: (min, opt, max), each a full input shape."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @classmethod
    def for_input(cls, kind: str, bands: int, patch: int, batch: int = ENGINE_BATCH,
                  min_tile: int = ENGINE_TILES[0], opt_tile: int = ENGINE_TILES[1],
                  max_tile: int = ENGINE_TILES[2]) -> Profile:
        """Patch / pixel models: 1..batch inputs; image models: one tile of min_tile..max_tile a side."""
        if kind == "image":
            return cls((1, bands, min_tile, min_tile), (1, bands, opt_tile, opt_tile),
                       (1, bands, max_tile, max_tile))
        tail = (bands, patch, patch) if kind == "patch" else (bands,)
        return cls((1, *tail), (batch, *tail), (batch, *tail))

    def check(self, fixed: tuple[int | None, ...]) -> None:
        """ValueError unless each shape has the input's rank and static dimensions, and min <= opt <= max."""
        for what, shape in (("min", self.min), ("opt", self.opt), ("max", self.max)):
            if len(shape) != len(fixed):
                raise ValueError(f"the {what} shape {_fmt(shape)} has {len(shape)} dimensions, the model "
                                 f"input has {len(fixed)} ({_fmt(fixed)})")
            for i, (s, f) in enumerate(zip(shape, fixed, strict=True)):
                if s < 1 or (f is not None and s != f):
                    raise ValueError(f"the {what} shape {_fmt(shape)}: dimension {i} must be "
                                     f"{f if f is not None else 'at least 1'}, got {s}")
        if not all(a <= b <= c for a, b, c in zip(self.min, self.opt, self.max, strict=True)):
            raise ValueError(f"the profile needs min <= opt <= max in every dimension, got min "
                             f"{_fmt(self.min)}, opt {_fmt(self.opt)}, max {_fmt(self.max)}")

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def parse_shape(text: str) -> tuple[int, ...]:
    """"1x198x7x7" -> (1, 198, 7, 7); ValueError with the text otherwise."""
    try:
        shape = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"expected a shape like 1x198x7x7, got {text!r}") from None
    return shape


def _fmt(shape: tuple) -> str:
    return "x".join("?" if s is None else str(s) for s in shape)


@dataclass(frozen=True)
class BuiltEngine:
    """A serialised engine and what the manifest records about it."""

    data: bytes
    info: dict[str, Any]


class _Progress:
    """Adapts TensorRT's IProgressMonitor to a plain `on_phase(text)` callback."""

    @staticmethod
    def monitor(trt: ModuleType, on_phase: Callable[[str], None]) -> Any:
        class Monitor(trt.IProgressMonitor):
            def __init__(self) -> None:
                trt.IProgressMonitor.__init__(self)

            def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
                on_phase(phase_name)

            def step_complete(self, phase_name: str, step: int) -> bool:
                return True  # never cancel

            def phase_finish(self, phase_name: str) -> None:
                pass

        return Monitor()


def _network_summary(trt: ModuleType, network: Any) -> dict[str, int]:
    """Layer counts of the parsed network: all, plugin layers (our SelectiveScan), and loops."""
    kinds = [network.get_layer(i).type for i in range(network.num_layers)]
    plugin = {getattr(trt.LayerType, k) for k in ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3")
              if hasattr(trt.LayerType, k)}
    return {"layers": len(kinds), "plugin_layers": sum(k in plugin for k in kinds),
            "loops": sum(k == trt.LayerType.TRIP_LIMIT for k in kinds)}


def build_engine(onnx_bytes: bytes, profile: Profile, *, target: str = "rtx",
                 compute_capabilities: tuple[int, ...] | None = None, plugin_library: Path | None = None,
                 on_phase: Callable[[str], None] | None = None) -> BuiltEngine:
    """Parse the ONNX graph into a strongly typed network and serialise an engine for `target`."""
    try:
        lib = tensorrt_library(target)
    except TensorRTUnavailableError as e:
        raise EngineBuildError(str(e)) from None
    trt = lib.module
    if target == "trt" and compute_capabilities:
        raise EngineBuildError("--compute-capability applies to --target rtx only: TensorRT 10/11 builds "
                               "for the GPU it runs on")
    ccs = tuple(compute_capabilities or PORTABLE_CCS) if target == "rtx" else ()
    known = {int(n[2:]) for n in trt.ComputeCapability.__members__ if n[2:].isdigit()} if ccs else set()
    if set(ccs) - known:
        raise EngineBuildError(f"TensorRT for RTX {lib.version} cannot build for compute capability "
                               f"{', '.join(str(c) for c in sorted(set(ccs) - known))}; it supports "
                               f"{', '.join(str(c) for c in sorted(known))}")
    with native_stdout_to_stderr():  # TensorRT's graph compiler prints some warnings to fd 1
        return _build(lib, onnx_bytes, profile, target, ccs, plugin_library, on_phase)


def _build(lib: TensorRTLibrary, onnx_bytes: bytes, profile: Profile, target: str, ccs: tuple[int, ...],
           plugin_library: Path | None, on_phase: Callable[[str], None] | None) -> BuiltEngine:
    trt = lib.module
    logger = stderr_logger(trt)
    builder = trt.Builder(logger)
    if plugin_library is not None and builder.get_plugin_registry().load_library(str(plugin_library)) is None:
        raise EngineBuildError(f"{plugin_library}: {lib.name} {lib.version} could not load it as a plugin "
                               "library (built against another TensorRT, or not an hsiedge plugin build?)")
    model = onnx.load_from_string(onnx_bytes)
    try:
        if scan_node.for_tensorrt_parser(model):  # no empty input names for the parser
            onnx_bytes = model.SerializeToString()
    except ValueError as e:
        raise EngineBuildError(str(e)) from None
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        hint = "" if plugin_library else (" (a plugin-mode graph needs the hsiedge plugin library: run "
                                          "`hsiedge plugin build` or pass --plugins)")
        raise EngineBuildError(f"the {lib.name} {lib.version} ONNX parser rejected the graph: {errors}{hint}")

    network_info = _network_summary(trt, network)
    config = builder.create_builder_config()
    # No workspace cap: TensorRT's default is the device's memory.  A 2 GiB cap made MambaHSI's
    # spatial scans (tiles up to 512 x 512) fail with "OutOfMemory" in TensorRT for RTX 1.7.
    if ccs:
        config.num_compute_capabilities = len(ccs)
        for i, cc in enumerate(ccs):
            config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{cc}"), i)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(INPUT_NAME, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(opt_profile)
    if on_phase is not None:
        config.progress_monitor = _Progress.monitor(trt, on_phase)

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise EngineBuildError(f"{lib.name} {lib.version} could not build an engine from the graph "
                               "(its log above says why)")
    info = {"target": target, "library": lib.name, "version": lib.version,
            "compute_capabilities": list(ccs) if ccs else "the GPU it was built on",
            "profile": profile.to_dict(), "network": network_info, "build_seconds": round(seconds, 2)}
    return BuiltEngine(bytes(memoryview(serialized)), info)
