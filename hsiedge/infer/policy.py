"""Tile geometry and memory policy: how a bundle's model consumes a scene, tile by tile.

Patch and pixel models classify every pixel from its own neighbourhood, so tiles give exactly
the whole-scene result.  MambaHSI's spatial scan runs over the whole tile, so its tiles overlap
and only their centres are kept; the tile is the largest the memory budget allows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hsiedge.bundle import Bundle
from hsiedge.infer.errors import InferError
from hsiedge.io.raster import block_cache_mib
from hsiedge.tiling import IMAGE_MULTIPLE, Tile, halo_padded, image_batch, plan_tiles, tile_patch_batches

if TYPE_CHECKING:
    from hsiedge.runtimes.base import Runner

# Patch / pixel models take 128 x 128-pixel cores.  MambaHSI takes the largest tile the memory
# budget allows (the whole scene when it fits), overlapping by a quarter of its side; see
# README "Streaming inference" for the agreement and memory measurements behind this.
DEFAULT_CORE = 128
DEFAULT_MEMORY_MIB = 900
MIN_IMAGE_TILE = 64
QUEUE_DEPTH = 2
# Patches per runner call.  hsiedge 0.1.0's MD2F-Mamba cost ~0.75 MB per patch in torch and
# ~1.6 MB in ONNX Runtime (its portable scan materialises (dim, L, N) per patch), so 256 took a
# streamed run past 1 GB; 128 cost torch at most a tenth of its speed and made ONNX Runtime
# faster.  (0.2.0's MD2F-Mamba, after the paper, runs one scan where that one ran three.)
# 64 since: at 128, 0.2.0's MD2F-Mamba frees tensors over 32 MiB at every call in ONNX Runtime,
# which glibc maps afresh each time (hsiedge.memory keeps its mmap threshold at 32 MiB), so a
# call page-faulted ~65 MB: `infer` on the 160 x 160 mosaic of bench/infer.py made 3.3 M page
# faults at 128 and 0.07-0.28 M at 64, 1,157 against 1,715 px/s (medians of 5 interleaved runs,
# peak memory alike); SpectralMamba's patch form in ONNX Runtime was within the noise.
DEFAULT_BATCH = 64
# Peak memory of a streamed MambaHSI run, per runtime: (fixed MiB, bytes per tile pixel at
# hidden_dim 128), measured on CPU with `hsiedge infer` on a 4.4 GB scene at tiles of 64-192
# (README "Streaming inference").  The fixed part is the process with torch, onnxruntime,
# rasterio, a runner and the pipeline's threads (an ONNX Runtime session holds more); the
# GDAL block cache comes on top.  ONNX Runtime with hsiedge's scan kernel costs about what
# torch does (peaks of 517 / 793 / 964 MiB at tiles 64 / 128 / 192 on the 610 x 340 mosaic of
# bench/infer.py, torch 504 / 728 / 1005); where its scans run as the portable body instead
# ("onnxruntime-portable": portable-scan bundles, no C compiler) it
# materialises (dim, L, N) tensors.
# Other runtimes keep activations on the GPU: the torch figures are used.
IMAGE_MEMORY = {"torch": (400, 22_000), "onnxruntime": (440, 22_000), "onnxruntime-portable": (480, 52_000)}


@dataclass(frozen=True)
class Geometry:
    """How a bundle's model consumes a scene: tile cores, margins, and how inputs are built."""

    kind: str
    patch: int
    core: int
    margin: int

    @classmethod
    def for_bundle(cls, bundle: Bundle, tile: int | None = None, overlap: int | None = None, *,
                   runtime: str = "torch", memory_mib: float = DEFAULT_MEMORY_MIB,
                   scene_shape: tuple[int, int] = (0, 0)) -> Geometry:
        """The geometry `infer` uses; an image model without `tile` gets the tile the memory
        budget allows for `runtime` on a scene of `scene_shape` (rows, cols)."""
        kind, patch = bundle.input_kind, bundle.patch_size
        if kind == "image":
            if tile is None:
                tile, chosen_overlap = image_tile_for_budget(bundle, runtime, memory_mib, *scene_shape)
                overlap = chosen_overlap if overlap is None or chosen_overlap == 0 else overlap
            overlap = tile // 4 // (2 * IMAGE_MULTIPLE) * (2 * IMAGE_MULTIPLE) if overlap is None else overlap
            if tile % IMAGE_MULTIPLE or overlap % (2 * IMAGE_MULTIPLE):
                raise InferError(f"MambaHSI tiles need sides that are multiples of {IMAGE_MULTIPLE} and an "
                                 f"overlap that is a multiple of {2 * IMAGE_MULTIPLE}; got --tile {tile}, "
                                 f"--overlap {overlap}")
            if overlap >= tile:
                raise InferError(f"--overlap {overlap} must be smaller than --tile {tile}")
            return cls(kind, 0, tile - overlap, overlap // 2)
        if overlap:
            raise InferError("--overlap is for image models (MambaHSI); patch models need none")
        core = DEFAULT_CORE if tile is None else tile
        if core < 1:
            raise InferError(f"--tile must be at least 1, got {core}")
        return cls(kind, patch, core, patch // 2)

    def tiles(self, height: int, width: int) -> list[Tile]:
        return plan_tiles(height, width, self.core, self.margin)

    def inputs(self, image: np.ndarray, tile: Tile, batch: int) -> Iterator[np.ndarray]:
        """Model inputs for one tile's preprocessed read window (C, h, w), cut when iterated."""
        if self.kind == "image":
            return iter([image_batch(image)])
        patch = self.patch if self.kind == "patch" else 0
        return tile_patch_batches(image, tile, patch, batch)

    def run(self, runner: Runner, image: np.ndarray, tile: Tile, batch: int,
            after_batch: Callable[[], object] | None = None) -> np.ndarray:
        """(K, core h, core w) logits of one tile from its preprocessed read window (C, h, w);
        `after_batch` runs after each runner call.  A runner that runs a patch model's tiles gets
        the tile, in blocks of at most DEFAULT_CORE x DEFAULT_CORE core pixels (a larger --tile
        would otherwise hold every pixel's activations at once)."""
        if self.kind == "patch" and runner.runs_tiles:
            return self._run_tile_form(runner, image, tile, after_batch)
        outputs = []
        for x in self.inputs(image, tile, batch):
            outputs.append(runner.run(x))
            if after_batch is not None:
                after_batch()
        return self.logits(outputs, tile)

    def _run_tile_form(self, runner: Runner, image: np.ndarray, tile: Tile,
                       after_batch: Callable[[], object] | None) -> np.ndarray:
        r = self.patch // 2
        padded = halo_padded(image, tile, r)
        h, w = tile.core.height, tile.core.width
        rows = []
        for r0 in range(0, h, DEFAULT_CORE):
            row = []
            for c0 in range(0, w, DEFAULT_CORE):
                bh, bw = min(DEFAULT_CORE, h - r0), min(DEFAULT_CORE, w - c0)
                row.append(runner.run_tile(padded[:, r0:r0 + bh + 2 * r, c0:c0 + bw + 2 * r]))
                if after_batch is not None:
                    after_batch()
            rows.append(np.concatenate(row, axis=2))
        return np.concatenate(rows, axis=1)

    def logits(self, outputs: list[np.ndarray], tile: Tile) -> np.ndarray:
        """(K, core h, core w) logits of the tile's core."""
        h, w = tile.core.height, tile.core.width
        if self.kind == "image":
            top, _, left, _ = tile.margins()
            return outputs[0][0, :, top:top + h, left:left + w]
        return np.concatenate(outputs).T.reshape(-1, h, w)


def _memory_profile(bundle: Bundle, runtime: str) -> str:
    """The IMAGE_MEMORY entry for `runtime` running `bundle`."""
    if runtime == "onnxruntime":
        from hsiedge.runtimes.onnxruntime import runs_scan_kernel

        return runtime if runs_scan_kernel(bundle) else "onnxruntime-portable"
    return runtime


def _image_memory(bundle: Bundle, runtime: str) -> tuple[float, float]:
    """(MiB resident before any tile, bytes per tile pixel) of a streamed image-model run."""
    artifacts = bundle.manifest["artifacts"].values()
    fixed_mib, pixel_bytes = IMAGE_MEMORY.get(_memory_profile(bundle, runtime), IMAGE_MEMORY["torch"])
    resident = fixed_mib + 3 * sum(a.get("bytes", 0) for a in artifacts) / 2**20 + block_cache_mib()
    hidden = bundle.manifest["model"]["config"].get("hidden_dim", 128)
    bands = bundle.preprocessing.out_bands
    # the forward pass, plus the input tiles the queues hold (float32)
    per_pixel = pixel_bytes * hidden / 128
    per_pixel += (QUEUE_DEPTH + 2) * bands * 4
    return resident, per_pixel


def kept_heap_mib(bundle: Bundle, runtime: str, memory_mib: float, tile: int) -> float:
    """Resident MiB up to which an image-model run keeps its freed heap between tiles (the
    next tile reuses it; hsiedge.memory.release_free_heap): the budget less half of one tile's
    modelled memory, room for what a tile takes beyond the kept heap (up to 116 MiB of a
    128 x 128 tile's modelled 369 MiB on the 4.4 GB scene, ONNX Runtime)."""
    return memory_mib - tile * tile * _image_memory(bundle, runtime)[1] / 2 / 2**20


def image_tile_for_budget(bundle: Bundle, runtime: str, memory_mib: float, height: int,
                          width: int) -> tuple[int, int]:
    """(tile, overlap) for an image model: the whole scene when it fits in `memory_mib`, else
    the largest multiple of 32 that fits, overlapping by a quarter of its side.  Larger tiles
    agree better with a whole-scene run.  The estimate depends only on its arguments, so a
    resumed run picks the same tiles."""
    resident, per_pixel = _image_memory(bundle, runtime)
    room = (memory_mib - resident) * 2**20 / per_pixel  # tile pixels that fit
    mult = IMAGE_MULTIPLE
    # a TensorRT engine takes tiles up to its optimisation profile's largest (the smallest such
    # bound over the bundle's engines, whichever of them the runner loads)
    largest = min((e["profile"]["max"][-1] for e in bundle.engines.values()), default=0)
    cap = largest if runtime == "tensorrt" and largest else None
    whole_h, whole_w = -(-height // mult) * mult, -(-width // mult) * mult
    if whole_h * whole_w <= room and (cap is None or max(whole_h, whole_w) <= cap):
        return max(whole_h, whole_w), 0
    side = int(np.sqrt(max(room, 0)) // 32 * 32)
    side = side if cap is None else min(side, cap // 32 * 32)
    if side < MIN_IMAGE_TILE:
        need = resident + MIN_IMAGE_TILE ** 2 * per_pixel / 2**20
        raise InferError(f"a memory budget of {memory_mib:.0f} MiB leaves no room for a "
                         f"{MIN_IMAGE_TILE} x {MIN_IMAGE_TILE} tile with the {runtime} runtime "
                         f"({resident:.0f} MiB go to the process and its caches before any tile); "
                         f"give --memory {need:.0f} or more, or --tile")
    return side, side // 4 // (2 * mult) * (2 * mult)


def tiled_logits(runner: Runner, geometry: Geometry, image: np.ndarray, batch: int = 256) -> np.ndarray:
    """(K, H, W) logits of a preprocessed (C, H, W) image in memory, run tile by tile exactly as
    `infer_scene` runs a scene (used to measure what tiling changes)."""
    _, h, w = image.shape
    out = None
    for t in geometry.tiles(h, w):
        rows, cols = t.read.slices()
        logits = geometry.run(runner, image[:, rows, cols], t, batch)
        if out is None:
            out = np.empty((logits.shape[0], h, w), dtype=np.float32)
        rows, cols = t.core.slices()
        out[:, rows, cols] = logits
    return out
