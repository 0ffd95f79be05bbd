"""Runner throughput, in trtexec's spirit: one input batch, warm-up, then timed calls.

`hsiedge bench` measures each runtime of a bundle through the runner interface alone (no
reading, preprocessing or writing: `hsiedge infer --json` reports the whole pipeline), so the
figures compare runtimes and precisions of the same model on the same input.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hsiedge.memory import bound_heap, peak_rss_mib, reset_peak_rss, rss_mib

if TYPE_CHECKING:
    from hsiedge.bundle import Bundle
    from hsiedge.infer.policy import Geometry
    from hsiedge.runtimes.base import Runner
    from hsiedge.tiling import Tile

DEFAULT_SECONDS = 10.0
DEFAULT_WARMUP = 2.0
DEFAULT_IMAGE_TILE = 128
MIN_CALLS = 3  # timed calls, however long each takes
PERCENTILES = (50, 90, 99)


class BenchInputError(ValueError):
    """The options or scene cannot give this bundle's model an input; the message says why."""


@dataclass(frozen=True)
class BenchInput:
    """One model input, reused for every call, and what it stands for.  A patch model's tile
    (`tile` set) is the tile's preprocessed read window, run as `hsiedge infer` runs a tile."""

    array: np.ndarray
    pixels: int  # pixels classified per call
    source: str
    tile: Tile | None = None
    geometry: Geometry | None = None
    batch: int = 0  # patches per runner call within a patch model's tile

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def call(self, runner: Runner) -> None:
        """One timed call: `run` on the array; for a patch model's tile, the runner's tile form
        where it has one, else the tile's patches cut and run `batch` at a time."""
        if self.tile is None or self.geometry is None:
            runner.run(self.array)
        else:
            self.geometry.run(runner, self.array, self.tile, self.batch)


@dataclass(frozen=True)
class BenchResult:
    """One runtime's figures (latencies in milliseconds, memory in MiB)."""

    runtime: str
    device: str
    precision: str
    notes: str
    open_seconds: float
    warmup_calls: int
    calls: int
    seconds: float
    pixels_per_second: float
    latency_ms: dict[str, float]
    rss_before_mib: float | None
    peak_rss_mib: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench_input(bundle: Bundle, batch: int | None = None, tile: int | None = None,
                scene: str | Path | None = None, key: str | None = None, seed: int = 0) -> BenchInput:
    """The input every call gets: `batch` patches or spectra (patch / pixel models), one
    `tile` x `tile` image (image models), or a patch model's `tile` x `tile` core with its halo
    (then `batch` is the patches per runner call, as in `hsiedge infer`); cut from the middle of
    `scene` after the bundle's preprocessing when given, else standard-normal values (what
    standardised bands look like)."""
    from hsiedge.infer.policy import DEFAULT_BATCH
    from hsiedge.tiling import IMAGE_MULTIPLE, image_batch

    image_model = bundle.input_kind == "image"
    if image_model and batch is not None:
        raise BenchInputError(f"{bundle.model_name} classifies whole tiles: give --tile, not --batch")
    if bundle.input_kind == "pixel" and tile is not None:
        raise BenchInputError(f"{bundle.model_name} classifies single pixels' spectra: "
                              "give --batch, not --tile")
    if bundle.input_kind == "patch" and tile is not None:
        return _patch_tile(bundle, tile, DEFAULT_BATCH if batch is None else batch, scene, key, seed)
    if image_model:
        tile = DEFAULT_IMAGE_TILE if tile is None else tile
        if tile < IMAGE_MULTIPLE or tile % IMAGE_MULTIPLE:
            raise BenchInputError(f"--tile must be a multiple of {IMAGE_MULTIPLE}, got {tile}")
        side = tile
    else:
        batch = DEFAULT_BATCH if batch is None else batch
        if batch < 1:
            raise BenchInputError(f"--batch must be at least 1, got {batch}")
        side = math.ceil(math.sqrt(batch))
    image, source = _window(bundle, side, scene, key, seed)
    if image_model:
        x = image_batch(image)
        return BenchInput(x, x.shape[2] * x.shape[3], source)
    x = _pixel_batch(image, bundle.input_kind, bundle.patch_size)[:batch]
    return BenchInput(x, x.shape[0], source)


def _patch_tile(bundle: Bundle, tile: int, batch: int, scene: str | Path | None, key: str | None,
                seed: int) -> BenchInput:
    """A patch model's tile x tile core with its halo of patch // 2 pixels, as `infer` reads it."""
    from hsiedge.infer.policy import Geometry
    from hsiedge.io import Window
    from hsiedge.tiling import Tile

    if tile < 1:
        raise BenchInputError(f"--tile must be at least 1, got {tile}")
    if batch < 1:
        raise BenchInputError(f"--batch must be at least 1, got {batch}")
    r = bundle.patch_size // 2
    side = tile + 2 * r
    image, source = _window(bundle, side, scene, key, seed)
    return BenchInput(image, tile * tile, source, Tile(0, Window(r, r, tile, tile), Window(0, 0, side, side)),
                      Geometry("patch", bundle.patch_size, tile, r), batch)


def _window(bundle: Bundle, side: int, scene: str | Path | None, key: str | None,
            seed: int) -> tuple[np.ndarray, str]:
    """A preprocessed (C, side, side) image: from the middle of `scene`, or standard-normal."""
    if scene is None:
        rng = np.random.default_rng(seed)
        return rng.standard_normal((bundle.preprocessing.out_bands, side, side), dtype=np.float32), \
            "standard-normal values"
    return _scene_window(bundle, Path(scene), key, side)


def _pixel_batch(image: np.ndarray, kind: str, patch_size: int) -> np.ndarray:
    """Every pixel's patch (or spectrum) of a small preprocessed image (C, h, w)."""
    from hsiedge.tiling import PixelInputs

    _, h, w = image.shape
    return PixelInputs(image, kind, patch_size)(np.arange(h * w))


def _scene_window(bundle: Bundle, scene: Path, key: str | None, side: int) -> tuple[np.ndarray, str]:
    """A preprocessed (C, side, side) window from the middle of the scene (smaller where the
    scene is)."""
    from hsiedge.infer.run import check_scene
    from hsiedge.io import Window, open_scene

    with open_scene(scene, key=key) as s:
        check_scene(bundle, s)
        h, w = min(side, s.height), min(side, s.width)
        r0, c0 = (s.height - h) // 2, (s.width - w) // 2
        raw = s.read(Window(r0, c0, h, w))
        nodata = s.nodata
    x, _ = bundle.preprocessing.apply(raw, nodata)
    if h * w < side * side and bundle.input_kind != "image":
        what = "--batch" if bundle.input_kind == "pixel" else "--batch or --tile"
        raise BenchInputError(f"{scene}: {s.height} x {s.width} pixels cannot fill a window of "
                              f"{side} x {side}; give a smaller {what}")
    image = np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)
    return image, f"{scene.name}, rows {r0}-{r0 + h - 1}, columns {c0}-{c0 + w - 1}"


def measure(runner: Runner, x: BenchInput, seconds: float = DEFAULT_SECONDS, warmup: float = DEFAULT_WARMUP,
            open_seconds: float = 0.0, rss_before: float | None = None,
            on_call: Callable[[str, float], None] | None = None) -> BenchResult:
    """Warm up for `warmup` seconds (at least one call), then call for `seconds` (at least
    MIN_CALLS calls); `on_call(phase, elapsed)` after each call, for progress."""
    start = time.perf_counter()
    warm_calls = 0
    while warm_calls < 1 or time.perf_counter() - start < warmup:
        x.call(runner)
        warm_calls += 1
        if on_call:
            on_call("warm-up", time.perf_counter() - start)
    latencies: list[float] = []
    t0 = time.perf_counter()
    while len(latencies) < MIN_CALLS or time.perf_counter() - t0 < seconds:
        c0 = time.perf_counter()
        x.call(runner)
        latencies.append(time.perf_counter() - c0)
        if on_call:
            on_call("timed", time.perf_counter() - t0)
    total = time.perf_counter() - t0
    ms = np.array(latencies) * 1e3
    latency = {"min": float(ms.min()), "mean": float(ms.mean()), "median": statistics.median(ms.tolist()),
               **{f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES}}
    return BenchResult(runner.name, runner.device, runner.precision, runner.notes, round(open_seconds, 6),
                       warm_calls, len(latencies), round(total, 6), x.pixels * len(latencies) / total,
                       {k: round(v, 3) for k, v in latency.items()}, rss_before, _peak_since(rss_before))


def _peak_since(rss_before: float | None) -> float | None:
    """The peak resident memory since `rss_before` was read, at least that reading: Linux counts
    resident pages per thread and folds them in lazily, so a later peak can trail an earlier
    reading by a few pages."""
    peak = peak_rss_mib()
    return peak if peak is None or rss_before is None else max(peak, rss_before)


def bench_runtime(bundle: Bundle, runtime: str, x: BenchInput, seconds: float = DEFAULT_SECONDS,
                  warmup: float = DEFAULT_WARMUP, threads: int | None = None,
                  on_call: Callable[[str, float], None] | None = None) -> BenchResult:
    """Open `runtime` on `bundle`, measure it on `x`, close it.  The peak memory is the
    process's from the opening on (the peak is reset first where Linux allows).  The heap is
    set as `hsiedge infer` sets it for this bundle (hsiedge.memory)."""
    from hsiedge.runtimes import open_runner

    bound_heap(large_blocks=bundle.input_kind == "image")
    reset_peak_rss()
    before = rss_mib()
    t0 = time.perf_counter()
    with open_runner(bundle, runtime, threads=threads) as runner:
        opened = time.perf_counter() - t0
        return measure(runner, x, seconds, warmup, opened, before, on_call)
