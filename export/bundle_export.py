"""`hsiedge export`: checkpoint -> ONNX (plugin | portable) -> fp16 / int8 -> bundle, then parity.

Steps: load the checkpoint (weights_only), translate the model once with the dynamo
exporter (plugin-mode graph), convert precision, decompose the scan for portable exports,
check the graph, assemble the bundle in a hidden folder, run parity there (the original
checkpoint vs the ONNX graph in ONNX Runtime, on held-out pixels of a real scene), and only
then move the bundle into place.  A bundle failing its thresholds is discarded unless forced.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from hsiedge import __version__
from hsiedge.bundle import (
    INPUT_NAME,
    OUTPUT_NAME,
    BundleWriter,
    class_table,
    default_class_names,
    parse_class_colours,
    sha256_file,
)
from hsiedge.checkpoint import Checkpoint, load_checkpoint
from hsiedge.export import onnx_model, portable, reuse, scan_functions, scan_node
from hsiedge.export.onnx_model import ExportError
from hsiedge.io.scene import Window
from hsiedge.models import count_parameters
from hsiedge.original import REFERENCE, reference_npz, stored_original
from hsiedge.parity import THRESHOLDS, ParityData, check_bundle, parity_data
from hsiedge.preprocess import valid_mask
from hsiedge.tiling import IMAGE_MULTIPLE, PixelInputs, image_batch

SCANS = ("plugin", "portable")
PRECISIONS = ("fp32", "fp16", "int8")
CALIB_PIXELS = 2048  # patch/pixel models: calibration samples drawn from the scene
CALIB_WINDOW, CALIB_WINDOWS = 64, 32  # ... from this many random windows of this side (large scenes)
# Image models: the whole image up to 2 tiles a side, else this many random tiles of this side.
# The calibrator runs the scans as their ONNX function bodies, ~52 kB per tile pixel at
# hidden width 128 (README "Streaming inference"): a 128 x 128 tile costs ~0.8 GiB.
CALIB_TILE, CALIB_TILES = 128, 16
# Held-out data stays bounded whatever the scene: a scene other than the training one is read
# through its central window of at most this side (an image model runs it whole, ~22 kB per
# pixel in torch), and patch / pixel models are checked on at most PARITY_PIXELS of its pixels
# (a seeded sample).
PARITY_WINDOW = {"image": 256, "patch": 512, "pixel": 512}
PARITY_PIXELS = 16_384


class ParityFailedError(ExportError):
    """The new bundle fails its parity thresholds (not written unless forced)."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class HeldOut:
    """The real scene export calibrates and checks parity on."""

    path: Path
    key: str | None
    cube: np.ndarray
    nodata: float | None
    pixels: np.ndarray | None  # flat indices scored (None: every valid pixel)
    labels: np.ndarray | None  # 0-based class ids aligned with `pixels`
    description: str
    window: Window | None = None  # the part of the scene `cube` is (None: all of it)


def _same_file(a: str | Path | None, b: str | Path | None) -> bool:
    try:
        return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def held_out_data(ckpt: Checkpoint, scene: Path | None, key: str | None = None, kind: str = "patch",
                  seed: int = 0) -> HeldOut:
    """The checkpoint's test split of its training scene, or the valid pixels of `scene`, bounded:
    a scene other than the training one is read through its central window (PARITY_WINDOW), and
    patch / pixel models get at most PARITY_PIXELS of the pixels (a seeded sample)."""
    from hsiedge.io import SceneReadError, open_scene

    trained_on = ckpt.train_info.get("scene")
    if scene is None:
        if not trained_on or not Path(trained_on).is_file():
            raise ExportError("export needs held-out data for calibration and parity: pass --calib SCENE "
                              + ("(the checkpoint records no training scene)" if not trained_on
                                 else f"(the training scene {trained_on} is not here)"))
        scene, key = Path(trained_on), ckpt.train_info.get("scene_key")
    split = ckpt.split
    try:
        with open_scene(scene, key=key) as s:
            shape = [s.height, s.width, s.bands]
            if s.bands != ckpt.preprocessing.in_bands:
                raise ExportError(f"{scene}: the model expects {ckpt.preprocessing.in_bands} bands, "
                                  f"the scene has {s.bands}")
            test_split = (_same_file(scene, trained_on) and split is not None and split.test.size > 0
                          and shape == list(ckpt.train_info.get("scene_shape", shape)))
            window, side = None, PARITY_WINDOW[kind]
            if not test_split and (s.height > side or s.width > side):
                h, w = min(s.height, side), min(s.width, side)
                window = Window((s.height - h) // 2, (s.width - w) // 2, h, w)
            cube, nodata = s.read(window), s.nodata
    except SceneReadError as e:
        raise ExportError(str(e)) from None
    where = "" if window is None else f" of its central {window.height} x {window.width} window"
    if test_split:
        pixels, labels = split.test, None if split.test_labels is None else split.test_labels - 1
        what = f"test split ({split.test.size} pixels, {split.protocol}, seed {split.seed})"
    else:
        pixels, labels, what = None, None, f"every valid pixel{where}"
    if kind != "image":
        candidates = pixels if pixels is not None else np.flatnonzero(valid_mask(cube, nodata).reshape(-1))
        if candidates.size > PARITY_PIXELS:
            keep = np.sort(np.random.default_rng(seed).choice(candidates.size, PARITY_PIXELS, replace=False))
            pixels, labels = candidates[keep], None if labels is None else labels[keep]
            what = (f"{PARITY_PIXELS} pixels sampled from the " + (what if test_split else
                                                                   f"valid pixels{where}"))
    return HeldOut(scene, key, cube, nodata, pixels, labels, f"{scene.name}: {what}", window)


def _calibration_regions(data: HeldOut, side: int, count: int, rng: np.random.Generator
                         ) -> list[tuple[np.ndarray, float | None]]:
    """`count` random windows of at most `side` pixels a side, over the WHOLE scene: from the
    cube in memory, or read one by one from the file when only a window of it is held."""
    if data.window is None:
        h, w = data.cube.shape[:2]
        read = lambda win: data.cube[win.row:win.row + win.height, win.col:win.col + win.width]  # noqa: E731
        nodata, scene = data.nodata, None
    else:
        from hsiedge.io import open_scene

        scene = open_scene(data.path, key=data.key)
        h, w, read, nodata = scene.height, scene.width, scene.read, scene.nodata
    try:
        wins = []
        for _ in range(count):
            wh, ww = min(side, h), min(side, w)
            wins.append(Window(int(rng.integers(0, h - wh + 1)), int(rng.integers(0, w - ww + 1)), wh, ww))
        return [(np.asarray(read(win)), nodata) for win in wins]
    finally:
        if scene is not None:
            scene.close()


def calibration_samples(ckpt: Checkpoint, data: HeldOut, kind: str, patch: int, seed: int = 0
                        ) -> tuple[np.ndarray, int]:
    """Real model inputs for int8 calibration, and the batch to feed them in, drawn from the
    whole scene in bounded memory: image models get the image (when small) or CALIB_TILES
    random tiles; patch / pixel models CALIB_PIXELS pixels from CALIB_WINDOWS random windows."""
    chain, rng = ckpt.preprocessing, np.random.default_rng(seed)
    small = data.window is None and max(data.cube.shape[:2]) <= 2 * CALIB_TILE
    if kind == "image":
        regions = ([(data.cube, data.nodata)] if small
                   else _calibration_regions(data, CALIB_TILE, CALIB_TILES, rng))
        tiles = [image_batch(np.ascontiguousarray(chain.apply(cube, nodata)[0].transpose(2, 0, 1)))
                 for cube, nodata in regions]
        return np.concatenate(tiles), 1
    r = patch // 2 if kind == "patch" else 0
    if data.window is None:  # the whole scene is in memory: as many pixels as asked, from anywhere
        regions, per_region = [(data.cube, data.nodata)], CALIB_PIXELS
    else:
        regions, per_region = _calibration_regions(data, CALIB_WINDOW + 2 * r, CALIB_WINDOWS, rng), \
            -(-CALIB_PIXELS // CALIB_WINDOWS)
    samples = []
    for cube, nodata in regions:
        x, valid = chain.apply(cube, nodata)
        if data.window is not None and r:  # only pixels whose whole patch lies inside the window
            inner = np.zeros_like(valid)
            inner[r:valid.shape[0] - r, r:valid.shape[1] - r] = True
            valid &= inner
        candidates = np.flatnonzero(valid.reshape(-1))
        if candidates.size == 0:
            continue
        idx = np.sort(rng.choice(candidates, size=min(per_region, candidates.size), replace=False))
        samples.append(PixelInputs(np.ascontiguousarray(x.transpose(2, 0, 1)), kind, patch)(idx))
    if not samples:
        raise ExportError(f"{data.path}: no valid pixels to calibrate int8 on (all nodata or NaN)")
    return np.concatenate(samples)[:CALIB_PIXELS], 128


def _versions() -> dict[str, str]:
    import onnxruntime
    import onnxscript

    return {"hsiedge": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


def export_bundle(
    checkpoint: str | Path,
    output: str | Path,
    *,
    scan: str = "plugin",
    precision: str = "fp32",
    calib: str | Path | None = None,
    calib_key: str | None = None,
    calib_method: str = "percentile",
    weight_bits: int = 8,
    thresholds: dict[str, float] | None = None,
    force: bool = False,
    engine: bool = False,
    target: str | None = None,
    compute_capabilities: tuple[int, ...] | None = None,
    plugin_library: str | Path | None = None,
    class_colours: str | None = None,
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write a verified bundle at `output`; return its manifest (with the parity results).
    `engine`: then also build a TensorRT engine for `target` into it (`bundle_engine.add_engine`);
    where that engine can run here, its parity is checked and recorded too.  `weight_bits`: int8's
    weights in 8 bits or 7 (fast, unsaturated int8 kernels on x86 CPUs without VNNI; see
    `export/int8.py`).  `class_colours`:
    `NAME=#RRGGBB,...` for the class maps (the rest keep the palette's)."""
    from hsiedge.export.int8 import CALIBRATION_METHODS, WEIGHT_BITS, quantize_int8
    from hsiedge.export.precision import to_fp16

    if scan not in SCANS:
        raise ExportError(f"--scan must be one of {', '.join(SCANS)}, got {scan!r}")
    if precision not in PRECISIONS:
        raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if calib_method not in CALIBRATION_METHODS:
        raise ExportError(f"--calib-method must be one of {', '.join(CALIBRATION_METHODS)}, "
                          f"got {calib_method!r}")
    if weight_bits not in WEIGHT_BITS:
        raise ExportError(f"--weight-bits must be 8 or 7, got {weight_bits!r}")
    if weight_bits != 8 and precision != "int8":
        raise ExportError(f"--weight-bits {weight_bits} applies to --precision int8 only, "
                          f"got --precision {precision}")
    step = on_step or (lambda s: None)
    t0 = time.perf_counter()
    step("loading the checkpoint")
    ckpt = load_checkpoint(checkpoint)
    if ckpt.preprocessing is None or not ckpt.preprocessing.fitted:
        raise ExportError(f"{checkpoint}: the checkpoint has no fitted preprocessing chain; "
                          "export needs one (checkpoints written by `hsiedge train` have it)")
    model = ckpt.build()
    kind, patch = getattr(model, "input_kind", "patch"), int(getattr(model, "patch_size", 0))
    names = ckpt.class_names or default_class_names(model.num_classes)
    try:
        colours = parse_class_colours(class_colours, names) if class_colours else ckpt.class_colours
    except ValueError as e:
        raise ExportError(str(e)) from None
    step("reading the held-out scene")
    data = held_out_data(ckpt, Path(calib) if calib else None, calib_key, kind)

    step("torch -> ONNX (dynamo exporter)")
    graph, kept = reuse.float_graph(sha256_file(checkpoint), model)
    if kept:
        step("torch -> ONNX: the graph of this process's earlier export of the checkpoint")
    scan_calls = sum(1 for _ in scan_node.scan_nodes(graph))
    calibration = None
    if precision == "fp16":
        step("converting to fp16")
        graph = to_fp16(graph)
    elif precision == "int8":
        step(f"calibrating int8 ({calib_method}) and inserting Q/DQ")
        samples, batch = calibration_samples(ckpt, data, kind, patch)
        graph = quantize_int8(graph, samples, batch, calib_method, weight_bits)
        calibration = {"scene": str(data.path), "key": data.key, "method": calib_method,
                       "samples": int(samples.shape[0]), "sample_shape": list(samples.shape[1:]),
                       "symmetric": True, "per_channel_weights": True, "weight_bits": weight_bits,
                       "quantized_ops": ["Conv", "MatMul", "Gemm"], "format": "QDQ int8"}
    # plugin mode: the node stays Contract 2's, its portable body rides along as a model-local
    # function (ONNX Runtime and other ONNX tools run the graph as it is)
    graph = portable.decompose(graph) if scan == "portable" else scan_functions.attach_functions(graph)
    onnx_model.check(graph)

    writer = BundleWriter(output)
    try:
        step("assembling the bundle")
        writer.add("checkpoint", Path(checkpoint))
        writer.add("onnx", graph.SerializeToString())
        held = {"pixels": np.zeros(0, np.int64) if data.pixels is None else data.pixels}
        if data.labels is not None:
            held["labels"] = data.labels
        buf = io.BytesIO()
        np.savez_compressed(buf, **held)
        writer.add("heldout", buf.getvalue())
        limits = dict(THRESHOLDS[precision])
        limits.update(thresholds or {})
        manifest = {
            "hsiedge_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": {"name": ckpt.model_name, "config": ckpt.config, "parameters": count_parameters(model)},
            "input": {"name": INPUT_NAME, "dtype": "float32", "kind": kind,
                      "layout": {"image": "NCHW", "patch": "NCHW", "pixel": "NC"}[kind],
                      "bands": ckpt.preprocessing.out_bands, "scene_bands": ckpt.preprocessing.in_bands,
                      "wavelengths": ckpt.train_info.get("wavelengths"),
                      "patch_size": patch, "padding": "reflect" if kind == "patch" else None,
                      "tile_multiple": IMAGE_MULTIPLE if kind == "image" else None,
                      "batch_dynamic": True},
            "output": {"name": OUTPUT_NAME, "dtype": "float32",
                       "layout": "NKHW" if kind == "image" else "NK"},
            "preprocessing": ckpt.preprocessing.to_dict(),
            "classes": class_table(names, colours),
            "precision": precision, "scan": scan, "scan_calls": scan_calls,
            "opset": {"ai.onnx": onnx_model.OPSET, **({scan_node.DOMAIN: scan_node.OPSET_VERSION}
                                                      if scan == "plugin" else {})},
            "plugin": scan_node.plugin_requirement() if scan == "plugin" else None,
            "calibration": calibration,
            "heldout": {"scene": str(data.path), "sha256": sha256_file(data.path), "key": data.key,
                        "description": data.description,
                        "labelled": data.labels is not None,
                        "window": None if data.window is None else list(data.window)},
            "exporters": _versions(),
            "training": {k: ckpt.train_info.get(k) for k in ("protocol", "seed", "epochs")},
        }
        bundle = writer.write_manifest({**manifest, "parity": None})

        step("parity: original vs ONNX Runtime on the held-out pixels")
        pdata: ParityData = parity_data(bundle.preprocessing, data.cube, kind, patch, nodata=data.nodata,
                                        pixels=data.pixels, labels=data.labels, source=data.description)
        original, kept = reuse.original_logits(bundle, pdata)
        if kept:
            step("parity: the original's logits from this process's earlier export of the checkpoint")
        writer.add(REFERENCE, reference_npz(original, pdata))  # parity on devices without torch
        report = check_bundle(bundle, pdata, ["onnxruntime"], limits, original=original)
        report["forced"] = bool(force and not report["passed"])
        manifest["parity"] = report
        manifest["export_seconds"] = round(time.perf_counter() - t0, 2)
        writer.write_manifest(manifest)
        if not report["passed"] and not force:
            failing = "; ".join(c for r in report["results"] for c in r["failures"])
            raise ParityFailedError(f"the {precision} {scan} export fails parity ({failing}); "
                                    f"no bundle written (--force writes it anyway)", report)
        writer.commit()
    except BaseException:
        writer.discard()
        raise
    if engine:
        manifest = _engine_and_its_parity(Path(output), pdata, limits, target, compute_capabilities,
                                          plugin_library, step)
    return manifest


def _engine_and_its_parity(output: Path, pdata: ParityData, limits: dict[str, float], target: str | None,
                           compute_capabilities: tuple[int, ...] | None, plugin_library: str | Path | None,
                           step: Callable[[str], None]) -> dict[str, Any]:
    """Add the engine to the written bundle; check its parity where a TensorRT runner works here."""
    from hsiedge.bundle import open_bundle, replace_manifest
    from hsiedge.export.bundle_engine import add_engine
    from hsiedge.export.engine import EngineBuildError
    from hsiedge.runtimes import why_unavailable

    step("building the TensorRT engine")
    try:
        entry = add_engine(output, target=target, compute_capabilities=compute_capabilities,
                           plugins=plugin_library,
                           on_phase=lambda p: step(f"building the TensorRT engine: {p}"))
    except EngineBuildError as e:
        raise ExportError(f"{e}; the ONNX bundle was written to {output}") from None
    bundle = open_bundle(output)
    manifest = dict(bundle.manifest)
    why_not = why_unavailable(bundle, "tensorrt")
    if why_not is not None:
        manifest["engines"][entry["target"]]["parity"] = f"not checked at export: {why_not}"
        replace_manifest(output, manifest)
    else:
        step("parity: original vs TensorRT on the held-out pixels")
        trt_report = check_bundle(bundle, pdata, ["tensorrt"], limits,
                                  original=stored_original(bundle, pdata))
        report = dict(manifest["parity"])
        report["results"] = report["results"] + trt_report["results"]
        report["passed"] = report["passed"] and trt_report["passed"]
        manifest["parity"] = report
        replace_manifest(output, manifest)
        if not trt_report["passed"]:
            raise ParityFailedError(f"the TensorRT engine in {output} fails parity ("
                                    + "; ".join(c for r in trt_report["results"] for c in r["failures"])
                                    + "); the bundle keeps it, with the failure recorded", report)
    return manifest
