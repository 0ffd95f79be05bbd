"""The PyTorch original's logits that parity compares against: run now from the bundle's
checkpoint (needs torch), or as `hsiedge export` stored them in the bundle (the `reference`
artifact), so that a device without PyTorch proves its engine or ONNX Runtime against them.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hsiedge.bundle import Bundle
from hsiedge.parity import ParityData, pixel_logits, run_batches, tiling_effect

REFERENCE = "reference"  # the artifact kind
REFERENCE_INFO = {"runtime": "stored reference", "device": "at export", "precision": "fp32",
                  "artifact": REFERENCE, "notes": "the PyTorch original's logits, stored at export"}


class ReferenceError(ValueError):
    """The bundle's stored reference cannot be used for this check; one sentence says why."""


@dataclass
class Original:
    """The original's (n_pixels, K) logits at `data.pixels`, what produced them, and its raw
    per-batch outputs where it was run here (None when read from the bundle)."""

    logits: np.ndarray
    info: dict[str, Any]
    outputs: list[np.ndarray] | None


def run_original(bundle: Bundle, data: ParityData, on_batch: Callable[[int], None] | None = None,
                 tiling: Any = None) -> Original:
    """Run the `torch` runtime on the bundle's checkpoint (`tiling`: its Geometry, for an image
    model's tiling effect)."""
    from hsiedge.runtimes import open_runner

    with open_runner(bundle, "torch") as runner:
        t0 = time.perf_counter()
        outs = run_batches(runner, data, on_batch, tiles=False)  # the original: patch by patch
        info = {"runtime": "torch", "device": runner.device, "precision": runner.precision,
                "artifact": runner.artifact, "notes": runner.notes,
                "seconds": round(time.perf_counter() - t0, 3)}
        logits = pixel_logits(outs, data)
        if tiling is not None and data.kind == "image":
            info["tiling_effect"] = tiling_effect(runner, data, logits, tiling)
    return Original(logits, info, outs)


def reference_npz(original: Original, data: ParityData) -> bytes:
    """The `reference` artifact: the original's logits and the pixels they belong to, compressed."""
    buf = io.BytesIO()
    np.savez_compressed(buf, pixels=data.pixels.astype(np.int64), logits=original.logits.astype(np.float32))
    return buf.getvalue()


def stored_original(bundle: Bundle, data: ParityData) -> Original:
    """The logits `hsiedge export` stored, checked to be for exactly `data.pixels`."""
    if not bundle.has(REFERENCE):
        raise ReferenceError(f"{bundle.path}: the bundle stores no reference logits (exported by an "
                             "older hsiedge); check it where PyTorch is installed, with --original torch")
    path = bundle.artifact(REFERENCE)
    try:
        with np.load(path, allow_pickle=False) as npz:
            pixels, logits = npz["pixels"], npz["logits"]
    except (ValueError, OSError, KeyError, EOFError) as e:
        raise ReferenceError(f"{path}: expected the original's logits and their pixels, reading failed "
                             f"({str(e).splitlines()[0][:100]})") from None
    if logits.ndim != 2 or logits.dtype != np.float32 or logits.shape[0] != pixels.shape[0]:
        raise ReferenceError(f"{path}: expected float32 logits of shape (pixels, classes) for "
                             f"{pixels.shape[0]} pixels, found {logits.dtype} {tuple(logits.shape)}")
    if not np.array_equal(pixels, data.pixels):
        raise ReferenceError(f"{path}: the stored logits are for {pixels.size} pixels, not the "
                             f"{data.pixels.size} being checked; check on the held-out pixels of the export "
                             "scene, or pass --original torch")
    return Original(logits, dict(REFERENCE_INFO), None)
