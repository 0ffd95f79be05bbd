"""The streaming pipeline: reader thread -> runner (this thread) -> writer thread.

The reader reads each tile's window (with its halo or overlap), applies the bundle's fitted
preprocessing and builds the model input; the calling thread runs the runner; the writer
stores finished tiles in the staging.  Bounded queues between them keep memory to a few tiles
whatever the scene size.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hsiedge.infer.policy import QUEUE_DEPTH, Geometry
from hsiedge.memory import release_free_heap

if TYPE_CHECKING:
    from hsiedge.infer.staging import Staging
    from hsiedge.io import Scene
    from hsiedge.preprocess import Chain
    from hsiedge.runtimes.base import Runner
    from hsiedge.tiling import Tile


_DONE = object()


@dataclass
class _Failure:
    error: BaseException


def _softmax_u8(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=0, keepdims=True)
    e = np.exp(z)
    return np.rint(255.0 * e / e.sum(axis=0, keepdims=True)).astype(np.uint8)


def run_pipeline(scene: Scene, chain: Chain, geometry: Geometry, runner: Runner, tiles: list[Tile],
                 batch: int, staging: Staging, probs: bool, on_tile: Callable[[int], None] | None,
                 heap_budget_mib: float | None = None) -> None:
    """Classify `tiles` of `scene` into `staging`: reader thread -> this thread (runner) -> writer
    thread, with bounded queues; the first error of any of them is raised here.  Free heap is
    given back between batches, except while resident memory is within `heap_budget_mib`."""
    trim = functools.partial(release_free_heap, within_mib=heap_budget_mib)
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
                image = np.ascontiguousarray(x.transpose(2, 0, 1))
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
            logits = geometry.run(runner, image, t, batch, after_batch=trim)
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
