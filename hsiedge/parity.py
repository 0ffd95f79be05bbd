"""Parity: does an artifact compute what the PyTorch original computes, on the same inputs?

Both sides get identical preprocessed inputs from a real scene.  Per artifact we report the
max and mean absolute logit error (Polygraphy's comparator), relative L2, cosine
similarity, top-1 label agreement and the number of pixels whose label differs; with labels,
OA / AA / kappa of both and their deltas.  Thresholds depend on the precision and are
stored in the manifest; any figure outside them fails the check, by name.  Outputs are kept
as Polygraphy RunResults, so they can be compared later against a TensorRT engine with
`polygraphy run --load-outputs` on a machine that has one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hsiedge.bundle import INPUT_NAME, OUTPUT_NAME, Bundle
from hsiedge.metrics import accuracy_report
from hsiedge.preprocess import Chain
from hsiedge.tiling import PixelInputs, image_batch

# Thresholds per precision (fractions: 0.001 of OA is 0.1 point).
THRESHOLDS: dict[str, dict[str, float]] = {
    "fp32": {"min_agreement": 0.9999, "max_rel_l2": 1e-4},
    "fp16": {"min_agreement": 0.999, "max_abs_delta_oa": 0.001},
    "int8": {"min_agreement": 0.99, "max_abs_delta_oa": 0.005},
}


class PixelBatches(Sequence):
    """The model inputs of `pixels`, `batch` at a time, cut only when asked for: the patches of
    a large held-out set would not fit in memory (16,384 SpectralMamba patches are 636 MB)."""

    def __init__(self, inputs: PixelInputs, pixels: np.ndarray, batch: int) -> None:
        self.inputs, self.pixels, self.batch = inputs, pixels, batch

    def __len__(self) -> int:
        return -(-self.pixels.size // self.batch)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.inputs(self.pixels[i * self.batch:(i + 1) * self.batch])


@dataclass
class ParityData:
    """Preprocessed model inputs covering `pixels` (flat indices) of one scene, and their labels."""

    batches: Sequence[np.ndarray]
    kind: str
    shape: tuple[int, int]
    pixels: np.ndarray
    labels: np.ndarray | None = None  # 0-based class ids at `pixels`, -1 where unlabelled
    source: str = ""


def parity_data(chain: Chain, cube: np.ndarray, kind: str, patch_size: int = 0, *,
                nodata: float | None = None, pixels: np.ndarray | None = None,
                labels: np.ndarray | None = None, batch: int = 256, source: str = "") -> ParityData:
    """Model inputs for a (rows, cols, bands) cube: every valid pixel unless `pixels` is given.

    `labels`: 0-based class ids aligned with `pixels` (or a full (rows, cols) map, 1-based,
    0 unlabelled), used for OA / AA / kappa.
    """
    h, w = cube.shape[:2]
    x, valid = chain.apply(cube, nodata)
    image = np.ascontiguousarray(x.transpose(2, 0, 1))
    if pixels is None:
        pixels = np.flatnonzero(valid.reshape(-1))
    if labels is not None and labels.shape == (h, w):
        labels = labels.reshape(-1)[pixels].astype(np.int64) - 1
    if kind == "image":
        batches = [image_batch(image)]
    else:
        batches = PixelBatches(PixelInputs(image, kind, patch_size), pixels, batch)
    return ParityData(batches, kind, (h, w), pixels, labels, source)


def run_batches(runner: Any, data: ParityData, on_batch: Callable[[int], None] | None = None, *,
                tiles: bool = True) -> list[np.ndarray]:
    """The runner's outputs for every batch of `data`.  A runner that runs a patch model's tiles
    (and `tiles`) is run as `hsiedge infer` runs it, on tiles, its logits cut into the batches."""
    if tiles and data.kind == "patch" and runner.runs_tiles and isinstance(data.batches, PixelBatches):
        return _tile_form_batches(runner, data, data.batches, on_batch)
    out = []
    for x in data.batches:
        out.append(runner.run(x))
        if on_batch:
            on_batch(x.shape[0])
    return out


def _tile_form_batches(runner: Any, data: ParityData, batches: PixelBatches,
                       on_batch: Callable[[int], None] | None) -> list[np.ndarray]:
    """The logits of `data.pixels` from the runner's tile form, over those of infer's tiles that
    hold any of them, cut into `batches`' batches."""
    from hsiedge.infer.policy import DEFAULT_CORE, Geometry

    image, patch = batches.inputs.image, batches.inputs.patch
    geometry = Geometry("patch", patch, DEFAULT_CORE, patch // 2)
    h, w = data.shape
    rows, cols = np.divmod(data.pixels, w)
    tile_of = (rows // DEFAULT_CORE) * -(-w // DEFAULT_CORE) + cols // DEFAULT_CORE  # plan_tiles' order
    order = np.argsort(tile_of, kind="stable")
    starts = np.searchsorted(tile_of[order], np.arange(tile_of.max(initial=-1) + 2))
    out: np.ndarray | None = None
    for t in geometry.tiles(h, w):
        if t.index + 1 >= starts.size or starts[t.index] == starts[t.index + 1]:
            continue
        mine = order[starts[t.index]:starts[t.index + 1]]
        read_rows, read_cols = t.read.slices()
        logits = geometry.run(runner, image[:, read_rows, read_cols], t, batches.batch)
        if out is None:
            out = np.empty((data.pixels.size, logits.shape[0]), dtype=np.float32)
        out[mine] = logits[:, rows[mine] - t.core.row, cols[mine] - t.core.col].T
        if on_batch:
            on_batch(mine.size)
    if out is None:
        return []
    return [out[i * batches.batch:(i + 1) * batches.batch] for i in range(len(batches))]


def pixel_logits(outputs: list[np.ndarray], data: ParityData) -> np.ndarray:
    """(n_pixels, K) logits at `data.pixels`, whatever the model's output layout."""
    if data.kind == "image":
        h, w = data.shape
        full = outputs[0][0, :, :h, :w]
        return full.reshape(full.shape[0], -1).T[data.pixels]
    return np.concatenate(outputs)


@dataclass
class Check:
    figure: str
    value: float | None
    limit: float
    passed: bool

    def describe(self) -> str:
        cmp = ">=" if self.figure.startswith("min") else "<="
        return f"{self.figure.removeprefix('min_').removeprefix('max_')} = {_fmt(self.value)} " \
               f"(needs {cmp} {_fmt(self.limit)})"


@dataclass
class ParityResult:
    artifact: str
    runtime: str
    device: str
    precision: str
    figures: dict[str, Any]
    checks: list[Check] = field(default_factory=list)
    notes: str = ""

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "runtime": self.runtime, "device": self.device,
                "precision": self.precision, "passed": self.passed, "notes": self.notes,
                "figures": self.figures,
                "checks": [{"figure": c.figure, "value": c.value, "limit": c.limit, "passed": c.passed}
                           for c in self.checks]}


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.6g}"


def polygraphy_stats(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max / mean / median absolute and relative error from Polygraphy's simple comparator."""
    from polygraphy.comparator.compare import SimpleCompareFunc
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.logger import G_LOGGER

    compare = SimpleCompareFunc(atol=np.inf, rtol=np.inf, check_shapes=True)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # our own table reports the figures
        res = compare(IterationResult({OUTPUT_NAME: reference}, runner_name="original"),
                      IterationResult({OUTPUT_NAME: candidate}, runner_name="artifact"))[OUTPUT_NAME]
    return {"max_abs_error": res.max_absdiff, "mean_abs_error": res.mean_absdiff,
            "median_abs_error": res.median_absdiff, "max_rel_error": res.max_reldiff}


# The logit error bound is this quantile of the pixels' largest logit error.  Not the maximum:
# a pixel whose margin exceeds twice the maximum error cannot flip, so confident flips would be
# zero by construction and say nothing.
ERROR_BOUND_QUANTILE = 0.99


def flip_figures(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """Label flips split by how sure the original was, for two (n_pixels, K) logit arrays.

    The measured error bound e is the ERROR_BOUND_QUANTILE quantile of each pixel's largest
    |logit error|.  A flip needs the two logits' errors to close the original's top-1/top-2
    margin, so a pixel is a near-tie when its margin is at most 2e: a flip there is what an
    error of the usual size does.  A confident pixel's margin exceeds 2e, and a flip there
    means an error well beyond the usual on that pixel: the figure whose goal is 0."""
    n, k = reference.shape
    if n == 0 or k < 2:
        return {"error_bound": 0.0, "confident_pixels": n, "flips_near_tie": 0, "flips_confident": 0}
    top2 = np.sort(reference, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    bound = float(np.quantile(np.abs(candidate - reference).max(axis=1), ERROR_BOUND_QUANTILE))
    confident = margin > 2 * bound
    flipped = reference.argmax(1) != candidate.argmax(1)
    return {"error_bound": bound, "confident_pixels": int(confident.sum()),
            "flips_near_tie": int((flipped & ~confident).sum()),
            "flips_confident": int((flipped & confident).sum())}


def compare(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None,
            thresholds: dict[str, float]) -> tuple[dict[str, Any], list[Check]]:
    """Figures and threshold checks for two (n_pixels, K) logit arrays."""
    ref64, cand64 = reference.astype(np.float64), candidate.astype(np.float64)
    diff = cand64 - ref64
    ref_norm = np.linalg.norm(ref64)
    pred_ref, pred_cand = reference.argmax(1), candidate.argmax(1)
    per_pixel_cos = (ref64 * cand64).sum(1) / np.maximum(
        np.linalg.norm(ref64, axis=1) * np.linalg.norm(cand64, axis=1), 1e-30)
    figures: dict[str, Any] = {
        "pixels": int(reference.shape[0]),
        **polygraphy_stats(reference, candidate),
        "rel_l2": float(np.linalg.norm(diff) / ref_norm) if ref_norm else float(np.linalg.norm(diff)),
        "cosine": float((ref64 * cand64).sum() / max(ref_norm * np.linalg.norm(cand64), 1e-30)),
        "min_pixel_cosine": float(per_pixel_cos.min()) if per_pixel_cos.size else 1.0,
        "agreement": float((pred_ref == pred_cand).mean()),
        "labels_differ": int((pred_ref != pred_cand).sum()),
        **flip_figures(ref64, cand64),
    }
    if labels is not None and (labels >= 0).any():
        k = reference.shape[1]
        known = labels >= 0
        a = accuracy_report(labels[known], pred_ref[known], k)
        b = accuracy_report(labels[known], pred_cand[known], k)
        figures.update({"labelled_pixels": int(known.sum()),
                        "oa_original": a["oa"], "oa_artifact": b["oa"], "delta_oa": b["oa"] - a["oa"],
                        "aa_original": a["aa"], "aa_artifact": b["aa"], "delta_aa": b["aa"] - a["aa"],
                        "kappa_original": a["kappa"], "kappa_artifact": b["kappa"],
                        "delta_kappa": b["kappa"] - a["kappa"]})
    checks = []
    for name, limit in thresholds.items():
        if name == "min_agreement":
            checks.append(Check(name, figures["agreement"], limit, figures["agreement"] >= limit))
        elif name == "max_rel_l2":
            checks.append(Check(name, figures["rel_l2"], limit, figures["rel_l2"] <= limit))
        elif name == "max_abs_delta_oa":
            d = figures.get("delta_oa")
            # Without labels the OA cannot be measured: recorded as not measured, not as passed.
            checks.append(Check(name, None if d is None else abs(d), limit, d is None or abs(d) <= limit))
        else:
            raise ValueError(f"unknown parity threshold {name!r}")
    return figures, checks


def save_polygraphy(path: str | Path, data: ParityData, outputs: dict[str, list[np.ndarray]]) -> None:
    """Inputs and every runner's outputs in Polygraphy's formats (`--load-inputs`, `--load-outputs`)."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        save_json([{INPUT_NAME: x} for x in data.batches], str(path / "inputs.json"))
        results = RunResults()
        for name, outs in outputs.items():
            results.append((name, [IterationResult({OUTPUT_NAME: y}, runner_name=name) for y in outs]))
        results.save(str(path / "outputs.json"))


def tiling_effect(runner: Any, data: ParityData, whole: np.ndarray, tiling: Any) -> dict[str, Any]:
    """What running an image model tile by tile (as `hsiedge infer` does, `tiling` being its
    Geometry) changes against the same runner on the whole scene: label agreement and ΔOA.
    Not numeric parity: the model sees different context, so this is reported on its own."""
    from hsiedge.infer import tiled_logits

    h, w = data.shape
    image = np.ascontiguousarray(data.batches[0][0, :, :h, :w])
    tiled = tiled_logits(runner, tiling, image)
    tiled = tiled.reshape(tiled.shape[0], -1).T[data.pixels].argmax(1)
    ref = whole.argmax(1)
    tiles = tiling.tiles(h, w)
    out = {"tile": tiling.core + 2 * tiling.margin, "overlap": 2 * tiling.margin,
           "tiles": len(tiles), "whole_scene": len(tiles) == 1, "pixels": int(ref.size),
           "agreement": float((tiled == ref).mean()), "labels_differ": int((tiled != ref).sum())}
    if data.labels is not None and (data.labels >= 0).any():
        known = data.labels >= 0
        k = whole.shape[1]
        out["oa_whole"] = accuracy_report(data.labels[known], ref[known], k)["oa"]
        out["oa_tiled"] = accuracy_report(data.labels[known], tiled[known], k)["oa"]
        out["delta_oa"] = out["oa_tiled"] - out["oa_whole"]
    return out


def check_bundle(bundle: Bundle, data: ParityData, runtimes: list[str], thresholds: dict[str, float],
                 save_dir: str | Path | None = None,
                 on_batch: Callable[[str, int], None] | None = None,
                 tiling: Callable[[str], Any] | None = None, original: Any = None) -> dict[str, Any]:
    """Compare each runtime on `data` with the original: `original` (an `hsiedge.original.Original`,
    e.g. the logits stored in the bundle), else the torch runtime run now on the checkpoint.

    Returns the report as plain data: per runtime its figures, checks and failures, and
    `passed` over all of them.  `save_dir`: inputs and outputs in Polygraphy's formats (the
    original's only where it ran here).  `tiling` (image models): runtime name -> the
    `hsiedge.infer.Geometry` infer would use with that runtime on this scene; each side's
    tiling effect is then reported for its own tiles.
    """
    import time

    from hsiedge.original import run_original
    from hsiedge.runtimes import open_runner

    def progress(name: str) -> Callable[[int], None] | None:
        return None if on_batch is None else lambda n: on_batch(name, n)

    if original is None:
        original = run_original(bundle, data, progress("torch"), None if tiling is None else tiling("torch"))
    outputs = {} if original.outputs is None else {"original": original.outputs}
    results = []
    for name in runtimes:
        with open_runner(bundle, name) as runner:
            t0 = time.perf_counter()
            outs = run_batches(runner, data, progress(name))
            seconds = time.perf_counter() - t0
            got = pixel_logits(outs, data)
            figures, checks = compare(original.logits, got, data.labels, thresholds)
            figures["seconds"] = round(seconds, 3)
            result = ParityResult(runner.artifact, name, runner.device, runner.precision, figures, checks,
                                  runner.notes)
            entry = {**result.to_dict(), "failures": [c.describe() for c in result.failures()]}
            if tiling is not None and data.kind == "image":
                entry["tiling_effect"] = tiling_effect(runner, data, got, tiling(name))
        results.append(entry)
        outputs[name] = outs
    if save_dir is not None:
        save_polygraphy(save_dir, data, outputs)
    return {"data": data.source, "pixels": int(data.pixels.size), "thresholds": thresholds,
            "original": original.info, "results": results, "passed": all(r["passed"] for r in results)}
