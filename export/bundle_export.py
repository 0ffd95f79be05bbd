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
from hsiedge.bundle import INPUT_NAME, OUTPUT_NAME, BundleWriter, class_table, parse_class_colours
from hsiedge.checkpoint import Checkpoint, load_checkpoint
from hsiedge.export import onnx_model, portable, scan_functions, scan_node
from hsiedge.export.onnx_model import ExportError
from hsiedge.models import count_parameters
from hsiedge.parity import THRESHOLDS, ParityData, check_bundle, parity_data
from hsiedge.tiling import IMAGE_MULTIPLE, PixelInputs, image_batch

SCANS = ("plugin", "portable")
PRECISIONS = ("fp32", "fp16", "int8")
CALIB_PIXELS = 2048  # patch/pixel models: calibration samples drawn from the scene
CALIB_TILE = 256  # image models: tiles of this side when the scene is larger than 2 tiles


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


def _same_file(a: str | Path | None, b: str | Path | None) -> bool:
    try:
        return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def held_out_data(ckpt: Checkpoint, scene: Path | None, key: str | None = None) -> HeldOut:
    """The checkpoint's test split of its training scene, or every pixel of `scene`."""
    from hsiedge.io import SceneReadError, open_scene

    trained_on = ckpt.train_info.get("scene")
    if scene is None:
        if not trained_on or not Path(trained_on).is_file():
            raise ExportError("export needs held-out data for calibration and parity: pass --calib SCENE "
                              + ("(the checkpoint records no training scene)" if not trained_on
                                 else f"(the training scene {trained_on} is not here)"))
        scene, key = Path(trained_on), ckpt.train_info.get("scene_key")
    try:
        with open_scene(scene, key=key) as s:
            cube, nodata = s.read(), s.nodata
    except SceneReadError as e:
        raise ExportError(str(e)) from None
    bands = ckpt.preprocessing.in_bands
    if cube.shape[2] != bands:
        raise ExportError(f"{scene}: the model expects {bands} bands, the scene has {cube.shape[2]}")
    split = ckpt.split
    if _same_file(scene, trained_on) and split is not None and split.test.size \
            and list(cube.shape) == list(ckpt.train_info.get("scene_shape", cube.shape)):
        labels = None if split.test_labels is None else split.test_labels - 1
        what = f"test split ({split.test.size} pixels, {split.protocol}, seed {split.seed})"
        return HeldOut(scene, key, cube, nodata, split.test, labels, f"{scene.name}: {what}")
    return HeldOut(scene, key, cube, nodata, None, None, f"{scene.name}: every valid pixel")


def calibration_samples(ckpt: Checkpoint, data: HeldOut, kind: str, patch: int, seed: int = 0
                        ) -> tuple[np.ndarray, int]:
    """Real model inputs for int8 calibration, and the batch to feed them in."""
    x, valid = ckpt.preprocessing.apply(data.cube, data.nodata)
    image = torch.from_numpy(x).permute(2, 0, 1).contiguous()
    rng = np.random.default_rng(seed)
    if kind == "image":
        _, h, w = image.shape
        if h <= 2 * CALIB_TILE and w <= 2 * CALIB_TILE:
            return image_batch(image), 1
        tiles = []
        for _ in range(8):
            r, c = rng.integers(0, max(1, h - CALIB_TILE)), rng.integers(0, max(1, w - CALIB_TILE))
            tiles.append(image_batch(image[:, r:r + CALIB_TILE, c:c + CALIB_TILE]))
        return np.concatenate(tiles), 1
    candidates = np.flatnonzero(valid.reshape(-1))
    idx = np.sort(rng.choice(candidates, size=min(CALIB_PIXELS, candidates.size), replace=False))
    return PixelInputs(image, kind, patch)(idx).numpy(), 128


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
    where that engine can run here, its parity is checked and recorded too.  `class_colours`:
    `NAME=#RRGGBB,...` for the class maps (the rest keep the palette's)."""
    from hsiedge.export.int8 import CALIBRATION_METHODS, quantize_int8
    from hsiedge.export.precision import to_fp16

    if scan not in SCANS:
        raise ExportError(f"--scan must be one of {', '.join(SCANS)}, got {scan!r}")
    if precision not in PRECISIONS:
        raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if calib_method not in CALIBRATION_METHODS:
        raise ExportError(f"--calib-method must be one of {', '.join(CALIBRATION_METHODS)}, "
                          f"got {calib_method!r}")
    step = on_step or (lambda s: None)
    t0 = time.perf_counter()
    step("loading the checkpoint")
    ckpt = load_checkpoint(checkpoint)
    if ckpt.preprocessing is None or not ckpt.preprocessing.fitted:
        raise ExportError(f"{checkpoint}: the checkpoint has no fitted preprocessing chain; "
                          "export needs one (checkpoints written by `hsiedge train` have it)")
    model = ckpt.build()
    kind, patch = getattr(model, "input_kind", "patch"), int(getattr(model, "patch_size", 0))
    names = ckpt.class_names or [f"class {i + 1}" for i in range(model.num_classes)]
    try:
        colours = parse_class_colours(class_colours, names) if class_colours else None
    except ValueError as e:
        raise ExportError(str(e)) from None
    step("reading the held-out scene")
    data = held_out_data(ckpt, Path(calib) if calib else None, calib_key)

    step("torch -> ONNX (dynamo exporter)")
    graph = onnx_model.torch_to_onnx(model)
    scan_calls = sum(1 for _ in scan_node.scan_nodes(graph))
    calibration = None
    if precision == "fp16":
        step("converting to fp16")
        graph = to_fp16(graph)
    elif precision == "int8":
        step(f"calibrating int8 ({calib_method}) and inserting Q/DQ")
        samples, batch = calibration_samples(ckpt, data, kind, patch)
        graph = quantize_int8(graph, samples, batch, calib_method)
        calibration = {"scene": str(data.path), "key": data.key, "method": calib_method,
                       "samples": int(samples.shape[0]), "sample_shape": list(samples.shape[1:]),
                       "symmetric": True, "per_channel_weights": True,
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
            "heldout": {"scene": str(data.path), "key": data.key, "description": data.description,
                        "labelled": data.labels is not None},
            "exporters": _versions(),
            "training": {k: ckpt.train_info.get(k) for k in ("protocol", "seed", "epochs")},
        }
        bundle = writer.write_manifest({**manifest, "parity": None})

        step("parity: original vs ONNX Runtime on the held-out pixels")
        pdata: ParityData = parity_data(bundle.preprocessing, data.cube, kind, patch, nodata=data.nodata,
                                        pixels=data.pixels, labels=data.labels, source=data.description)
        report = check_bundle(bundle, pdata, ["onnxruntime"], limits)
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
        trt_report = check_bundle(bundle, pdata, ["tensorrt"], limits)
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
