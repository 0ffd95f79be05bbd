"""`hsiedge infer`: stream a scene of any size tile by tile through a bundle, to a class map.

A pipeline, not a loop: a reader thread reads each tile's window (with the patch halo or
the image-model overlap), applies the bundle's fitted preprocessing and builds the model
inputs; the calling thread runs the runner; a writer thread stores finished tiles.  Bounded
queues between them keep memory to a few tiles whatever the scene size.

Finished tiles go to memory-mapped staging files next to the output plus a journal, flushed
tile by tile, so a killed run continues with `--resume` and gives the same file as an
uninterrupted one.  The GeoTIFF is written under a temporary name and renamed when complete.

Patch and pixel models classify every pixel from its own neighbourhood, so tiles give
exactly the whole-scene result.  MambaHSI's spatial scan runs over the whole tile, so tiles
overlap and only their centres are kept (`tiling_agreement` measures what tiling changes).
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hsiedge import __version__
from hsiedge.bundle import MANIFEST, Bundle, sha256_file
from hsiedge.io import Scene, SceneReadError, open_scene
from hsiedge.io.raster import block_cache_mib
from hsiedge.io.writer import class_dtype, write_class_map, write_probabilities
from hsiedge.memory import bound_heap, peak_rss_mib, release_free_heap
from hsiedge.tiling import IMAGE_MULTIPLE, Tile, image_batch, plan_tiles, tile_patch_batches

if TYPE_CHECKING:
    from hsiedge.preprocess import Chain
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
DEFAULT_BATCH = 128
# Peak memory of a streamed MambaHSI run, per runtime: (fixed MiB, bytes per tile pixel at
# hidden_dim 128), measured on CPU with `hsiedge infer` on a 4.4 GB scene at tiles of 64-192
# (README "Streaming inference").  The fixed part is the process with torch, onnxruntime,
# rasterio, a runner and the pipeline's threads (an ONNX Runtime session holds more); the
# GDAL block cache comes on top.  ONNX Runtime with hsiedge's scan kernel costs about what
# torch does (peaks of 517 / 793 / 964 MiB at tiles 64 / 128 / 192 on the 610 x 340 mosaic of
# bench/infer.py, torch 504 / 728 / 1005); where its scans run as the portable body instead
# ("onnxruntime-portable": portable-scan bundles, float16 scans, no C compiler) it
# materialises (dim, L, N) tensors.
# Other runtimes keep activations on the GPU: the torch figures are used.
IMAGE_MEMORY = {"torch": (400, 22_000), "onnxruntime": (440, 22_000), "onnxruntime-portable": (480, 52_000)}
JOURNAL_VERSION = 1


class InferError(RuntimeError):
    """Inference cannot start or finish; one sentence says why."""


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

    def inputs(self, image: torch.Tensor, tile: Tile, batch: int) -> Iterator[np.ndarray]:
        """Model inputs for one tile's preprocessed read window (C, h, w), cut when iterated."""
        if self.kind == "image":
            return iter([image_batch(image)])
        patch = self.patch if self.kind == "patch" else 0
        return (x.numpy() for x in tile_patch_batches(image, tile, patch, batch))

    def run(self, runner: Runner, image: torch.Tensor, tile: Tile, batch: int,
            after_batch: Callable[[], object] | None = None) -> np.ndarray:
        """(K, core h, core w) logits of one tile from its preprocessed read window (C, h, w);
        `after_batch` runs after each runner call."""
        outputs = []
        for x in self.inputs(image, tile, batch):
            outputs.append(runner.run(x))
            if after_batch is not None:
                after_batch()
        return self.logits(outputs, tile)

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


def image_tile_for_budget(bundle: Bundle, runtime: str, memory_mib: float, height: int,
                          width: int) -> tuple[int, int]:
    """(tile, overlap) for an image model: the whole scene when it fits in `memory_mib`, else
    the largest multiple of 32 that fits, overlapping by a quarter of its side.  Larger tiles
    agree better with a whole-scene run.  The estimate depends only on its arguments, so a
    resumed run picks the same tiles."""
    artifacts = bundle.manifest["artifacts"].values()
    fixed_mib, pixel_bytes = IMAGE_MEMORY.get(_memory_profile(bundle, runtime), IMAGE_MEMORY["torch"])
    resident = fixed_mib + 3 * sum(a.get("bytes", 0) for a in artifacts) / 2**20 + block_cache_mib()
    hidden = bundle.manifest["model"]["config"].get("hidden_dim", 128)
    bands = bundle.preprocessing.out_bands
    # the forward pass, plus the input tiles the queues hold (float32)
    per_pixel = pixel_bytes * hidden / 128
    per_pixel += (QUEUE_DEPTH + 2) * bands * 4
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


def tiled_logits(runner: Runner, geometry: Geometry, image: torch.Tensor, batch: int = 256) -> np.ndarray:
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


def _nm(wl: np.ndarray) -> np.ndarray:
    """Wavelengths in nanometres (values below 100 are taken as micrometres)."""
    wl = np.asarray(wl, dtype=np.float64)
    return wl * 1000.0 if np.nanmax(wl) < 100 else wl


def check_scene(bundle: Bundle, scene: Scene, tolerance_nm: float = 1.0) -> None:
    """The scene's band count (and wavelengths, when both sides know them) against the manifest."""
    want = bundle.manifest["input"]["scene_bands"]
    if scene.bands != want:
        raise InferError(f"{scene.path}: the bundle's {bundle.model_name} model expects {want} bands, "
                         f"the scene has {scene.bands}")
    ours = bundle.manifest["input"].get("wavelengths")
    if ours is not None and scene.wavelengths is not None:
        diff = np.abs(_nm(scene.wavelengths) - _nm(np.asarray(ours)))
        if np.nanmax(diff) > tolerance_nm:
            band = int(np.nanargmax(diff))
            raise InferError(f"{scene.path}: band {band + 1} is at {_nm(scene.wavelengths)[band]:.1f} nm "
                             f"but the bundle was trained at {_nm(np.asarray(ours))[band]:.1f} nm "
                             f"(tolerance {tolerance_nm} nm)")


def _defining(header: dict[str, Any]) -> dict[str, Any]:
    """The journal header without its creation time: what a resumed run must match."""
    return {k: v for k, v in header.items() if k != "created"}


def creation_time() -> str:
    """When a map is made, in UTC to the second: `$SOURCE_DATE_EPOCH` when set (the
    reproducible-builds convention, for byte-identical outputs of separate runs), else now."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    try:
        t = time.gmtime(int(epoch)) if epoch else time.gmtime()
    except ValueError:
        raise InferError(f"SOURCE_DATE_EPOCH must be whole seconds since 1970, got {epoch!r}") from None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", t)


class Staging:
    """Finished tiles on disk: class ids (and probabilities) as memory maps, plus a journal."""

    def __init__(self, output: Path, header: dict[str, Any], shape: tuple[int, int], num_classes: int,
                 probs: bool, resume: bool) -> None:
        self.classes_path = output.with_name(f".{output.name}.classes.npy")
        self.probs_path = output.with_name(f".{output.name}.probs.npy") if probs else None
        self.journal_path = output.with_name(f".{output.name}.journal")
        self.done: set[int] = set()
        dtype = class_dtype(num_classes)
        if self.journal_path.exists():
            if not resume:
                raise InferError(f"{self.journal_path}: an interrupted run of this output is here; pass "
                                 "--resume to continue it, or delete the file to start over")
            lines = self.journal_path.read_text().splitlines()
            found = json.loads(lines[0]) if lines else None
            if found is None or _defining(found) != _defining(header):
                diff = sorted(k for k in _defining(header) if found is None or found.get(k) != header[k])
                raise InferError(f"{self.journal_path}: written by a different run ({', '.join(diff)} "
                                 "differ); rerun with the same arguments or delete it")
            for line in lines[1:]:
                try:
                    self.done.add(int(json.loads(line)["tile"]))
                except (ValueError, KeyError):
                    break  # a line torn by the crash: that tile runs again
            mode = "r+"
            # the interrupted run's creation time, so that the resumed map is the same file
            self.created = found.get("created", header.get("created"))
        else:
            mode = "w+"
            self.created = header.get("created")
        open_map = np.lib.format.open_memmap
        try:
            self.classes = open_map(self.classes_path, mode=mode, dtype=dtype, shape=shape)
            self.probs = None if not probs else open_map(self.probs_path, mode=mode, dtype=np.uint8,
                                                          shape=(num_classes, *shape))
        except (OSError, ValueError) as e:
            raise InferError(f"{self.classes_path}: cannot use the staging file ({e})") from None
        if mode == "w+":
            self._journal = open(self.journal_path, "w")  # noqa: SIM115 - kept open for the run
            self._append(header)
        else:
            self._journal = open(self.journal_path, "a")  # noqa: SIM115

    def _append(self, record: dict[str, Any]) -> None:
        self._journal.write(json.dumps(record) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def record(self, tile: Tile, classes: np.ndarray, probs: np.ndarray | None) -> None:
        """Store one tile's results, make them durable, then journal the tile as done."""
        rows, cols = tile.core.slices()
        self.classes[rows, cols] = classes
        self.classes.flush()
        if self.probs is not None and probs is not None:
            self.probs[:, rows, cols] = probs
            self.probs.flush()
        self._append({"tile": tile.index})

    def close(self) -> None:
        self._journal.close()

    def remove(self) -> None:
        self.close()
        for p in (self.classes_path, self.probs_path, self.journal_path):
            if p is not None:
                p.unlink(missing_ok=True)


_DONE = object()


@dataclass
class _Failure:
    error: BaseException


def _softmax_u8(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=0, keepdims=True)
    e = np.exp(z)
    return np.rint(255.0 * e / e.sum(axis=0, keepdims=True)).astype(np.uint8)


def default_output(scene: Path) -> Path:
    """`.../scene.tif` -> `scene.classes.tif` in the current directory (a data folder is often
    shared or read-only, and outputs do not belong among the inputs)."""
    return Path.cwd() / f"{scene.stem}.classes.tif"


def infer_scene(
    scene_path: str | Path,
    bundle: Bundle,
    output: str | Path | None = None,
    *,
    key: str | None = None,
    runtime: str | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    batch: int = DEFAULT_BATCH,
    probs: bool = False,
    quicklook: str | Path | None = None,
    resume: bool = False,
    memory_mib: float | None = None,
    on_start: Callable[[int, int, int], None] | None = None,
    on_tile: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Classify a whole scene with `bundle`; return a summary (pixels, seconds, pixels/s, ...)."""
    from hsiedge.runtimes import RuntimeUnavailableError, default_runtime, open_runner

    scene_path = Path(scene_path)
    output = Path(output) if output is not None else default_output(scene_path)
    bound_heap()
    if batch < 1:
        raise InferError(f"--batch must be at least 1, got {batch}")
    created = creation_time()
    try:
        runtime = runtime or default_runtime(bundle)
    except RuntimeUnavailableError as e:
        raise InferError(str(e)) from None
    if bundle.input_kind != "image" or tile is not None:  # bad arguments fail before any reading
        Geometry.for_bundle(bundle, tile, overlap)
    try:
        scene = open_scene(scene_path, key=key)
    except SceneReadError as e:
        raise InferError(str(e)) from None
    with scene:
        check_scene(bundle, scene)
        geometry = Geometry.for_bundle(bundle, tile, overlap, runtime=runtime,
                                       memory_mib=DEFAULT_MEMORY_MIB if memory_mib is None else memory_mib,
                                       scene_shape=(scene.height, scene.width))
        chain = bundle.preprocessing
        num_classes = len(bundle.manifest["classes"])
        tiles = geometry.tiles(scene.height, scene.width)
        try:
            runner = open_runner(bundle, runtime)
        except RuntimeUnavailableError as e:
            raise InferError(str(e)) from None
        header = {"version": JOURNAL_VERSION, "scene": str(scene_path.resolve()),
                  "scene_bytes": scene_path.stat().st_size, "bundle_onnx": bundle.manifest["artifacts"].get(
                      "onnx", {}).get("sha256"), "runtime": runner.name, "core": geometry.core,
                  "margin": geometry.margin, "batch": batch, "probs": probs, "created": created}
        try:
            staging = Staging(output, header, (scene.height, scene.width), num_classes, probs, resume)
        except BaseException:
            runner.close()
            raise
        ran_on = {"runtime": runner.name, "device": runner.device, "precision": runner.precision}
        todo = [t for t in tiles if t.index not in staging.done]
        if on_start:  # (scene pixels, pixels already done by an interrupted run, tiles left)
            on_start(scene.height * scene.width,
                     sum(t.core.height * t.core.width for t in tiles if t.index in staging.done), len(todo))
        t0 = time.perf_counter()
        try:
            with runner:
                _run_pipeline(scene, chain, geometry, runner, todo, batch, staging, probs, on_tile)
            compute_seconds = time.perf_counter() - t0
            staging.close()
            classes = staging.classes
            table = bundle.manifest["classes"]
            provenance = {"model": bundle.model_name, **ran_on,
                          "bundle_manifest_sha256": sha256_file(bundle.path / MANIFEST),
                          "version": __version__, "created": staging.created,
                          "scene": scene_path.name}
            write_class_map(output, classes, table, scene.crs, scene.transform, provenance)
            probs_path = None
            if probs:
                probs_path = output.with_name(f"{output.stem}.probs.tif")
                write_probabilities(probs_path, staging.probs, [c["name"] for c in table], scene.crs,
                                    scene.transform, provenance)
            if quicklook is not None:
                from hsiedge.io.quicklook import write_quicklook

                write_quicklook(quicklook, classes, table,
                                title=f"{scene_path.name} - {bundle.model_name} ({bundle.precision})")
        except OSError as e:
            staging.close()
            raise InferError(f"writing {output} failed ({e.strerror or e}); finished tiles are kept, "
                             "rerun with --resume once fixed") from None
        except SceneReadError as e:
            staging.close()
            raise InferError(f"{e}; finished tiles are kept, rerun with --resume once fixed") from None
        except BaseException:
            staging.close()
            raise
        staging.remove()
    pixels = scene.height * scene.width
    seconds = time.perf_counter() - t0
    done_pixels = sum(t.core.height * t.core.width for t in todo)
    warnings = [] if scene.crs is not None else [
        f"{scene_path.name} has no georeferencing (no CRS), so neither has the map: its pixels have no "
        f"position on the ground"]
    return {"output": str(output), "probs": None if probs_path is None else str(probs_path),
            "georeferenced": scene.crs is not None, "warnings": warnings,
            "quicklook": None if quicklook is None else str(quicklook), "pixels": pixels,
            "scene": str(scene_path),
            "pixels_this_run": done_pixels, "tiles": len(tiles), "tiles_resumed": len(tiles) - len(todo),
            "tile": geometry.core + 2 * geometry.margin if geometry.kind == "image" else geometry.core,
            "overlap": 2 * geometry.margin if geometry.kind == "image" else 0,
            "seconds": round(seconds, 3),
            "pixels_per_second": round(done_pixels / max(compute_seconds, 1e-9)),
            "peak_memory_mib": None if (peak := peak_rss_mib()) is None else round(peak),
            **ran_on}


def _run_pipeline(scene: Scene, chain: Chain, geometry: Geometry, runner: Runner, tiles: list[Tile],
                  batch: int, staging: Staging, probs: bool, on_tile: Callable[[int], None] | None) -> None:
    """Reader thread -> this thread (runner) -> writer thread, with bounded queues."""
    q_in: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
    q_out: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
    stop = threading.Event()
    writer_error: list[BaseException] = []

    def put(q: queue.Queue, item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for t in tiles:
                raw = scene.read(t.read)
                x, valid = chain.apply(raw, scene.nodata)
                image = torch.from_numpy(x).permute(2, 0, 1).contiguous()
                top, _, left, _ = t.margins()
                core_valid = valid[top:top + t.core.height, left:left + t.core.width]
                if not put(q_in, (t, image, core_valid)):
                    return
            put(q_in, _DONE)
        except BaseException as e:
            put(q_in, _Failure(e))

    def write() -> None:
        while True:
            item = q_out.get()
            if item is _DONE:
                return
            if writer_error:
                continue  # keep draining so the runner never blocks
            t, classes, p = item
            try:
                staging.record(t, classes, p)
                if on_tile:
                    on_tile(t.core.height * t.core.width)
            except BaseException as e:
                writer_error.append(e)
                stop.set()

    reader = threading.Thread(target=read, name="hsiedge-read", daemon=True)
    writer = threading.Thread(target=write, name="hsiedge-write", daemon=True)
    reader.start()
    writer.start()
    try:
        while True:
            item = q_in.get()
            if item is _DONE:
                break
            if isinstance(item, _Failure):
                raise item.error
            t, image, valid = item
            # trim between batches, not tiles: a tile of MD2F-Mamba runs 128 of them
            logits = geometry.run(runner, image, t, batch, after_batch=release_free_heap)
            classes = (logits.argmax(axis=0) + 1).astype(staging.classes.dtype)
            classes[~valid] = 0
            p = None
            if probs:
                p = _softmax_u8(logits)
                p[:, ~valid] = 0
            if writer_error or not put(q_out, (t, classes, p)):
                break
            del logits, image
    finally:
        q_out.put(_DONE)  # the writer drains everything, so this never blocks for long
        writer.join()
        stop.set()
        reader.join(timeout=5)
    if writer_error:
        raise writer_error[0]
