"""ONNX graph -> TensorRT engine with the TensorRT 10 Python API (`hsiedge export --engine`).

The hsiedge plugin library is loaded into the builder's plugin registry first, so the ONNX
parser maps each `SelectiveScan` node (Contract 2) to the plugin.  The graph's precision is
already in it: fp16 graphs are fp16, int8 graphs carry explicit Q/DQ pairs; the builder gets
the matching flags (FP16; INT8 plus FP16 for the layers between Q/DQ pairs).  One optimisation
profile covers the shapes `hsiedge infer` feeds: batches of 1 to `batch` patches, or image
tiles from `min_tile` to `max_tile` pixels a side.  A timing cache next to the bundle makes
rebuilds fast.

No machine this project is developed on has TensorRT: this module has not run; its test runs
where `tensorrt` imports and a GPU exists and is skipped elsewhere with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsiedge.atomic import atomic_path
from hsiedge.bundle import INPUT_NAME

WORKSPACE_BYTES = 2 * 2**30


class EngineBuildError(RuntimeError):
    """TensorRT could not build the engine; one sentence says why."""


@dataclass(frozen=True)
class Profile:
    """The input shapes an engine accepts: (min, opt, max), each (N, C, H, W)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    @classmethod
    def for_input(cls, kind: str, bands: int, patch: int, batch: int, min_tile: int, opt_tile: int,
                  max_tile: int) -> Profile:
        """Patch models: 1..batch patches; image models: one tile of min_tile..max_tile a side."""
        if kind == "image":
            return cls((1, bands, min_tile, min_tile), (1, bands, opt_tile, opt_tile),
                       (1, bands, max_tile, max_tile))
        tail = (bands, patch, patch) if kind == "patch" else (bands,)
        return cls((1, *tail), (batch, *tail), (batch, *tail))

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def build_engine(onnx_bytes: bytes, profile: Profile, precision: str, plugin_library: Path | None,
                 timing_cache: Path | None = None) -> tuple[bytes, dict[str, Any]]:
    """Serialised engine and what to record about it in the manifest."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if plugin_library is not None:
        builder.get_plugin_registry().load_library(str(plugin_library))
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        hint = "" if plugin_library else " (is the hsiedge plugin library needed and missing?)"
        raise EngineBuildError(f"the TensorRT ONNX parser rejected the graph: {errors}{hint}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # scales come from the graph's Q/DQ nodes
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(INPUT_NAME, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(opt_profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError("TensorRT could not build an engine from the graph (its log above says why)")
    if timing_cache is not None:
        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    info = {"tensorrt": trt.__version__, "profile": profile.to_dict(), "precision_flags":
            {"fp32": [], "fp16": ["FP16"], "int8": ["FP16", "INT8"]}[precision],
            "timing_cache": None if timing_cache is None else timing_cache.name}
    return bytes(memoryview(serialized)), info
