"""int8: explicit quantization (QuantizeLinear/DequantizeLinear pairs), as TensorRT 10 wants.

onnxruntime's static quantization tool does the work: symmetric int8 (zero point 0),
per-channel weights, activation ranges calibrated by its entropy or percentile calibrator
on real inputs.  Only convolutions and matrix products are quantized; the selective scan,
every tensor it reads and the normalisations stay in float (TensorRT fuses Q/DQ into the
int8 convolutions and GEMMs and runs the rest at the precision it is given).

Calibration runs the graph, and ONNX Runtime has no SelectiveScan kernel, so the graph is
calibrated and quantized with its model-local SelectiveScan functions attached (ONNX Runtime
runs the node through them; the calibrator and quantizer see only the model's own nodes, not
the scan's internals), and returned without them, a plain plugin-mode graph again.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from hsiedge.bundle import INPUT_NAME
from hsiedge.export import scan_functions, scan_node

CALIBRATION_METHODS = {"entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
PERCENTILE = 99.999


class _Batches(CalibrationDataReader):
    """Equal-sized batches of the samples, handed to the calibrator one at a time.

    onnxruntime's calibrators keep every intermediate tensor of every batch they are given
    before reducing them to ranges or histograms (MD2F-Mamba: 5.8 GiB for 2,048 patches).  With
    its `CalibStridedMinMax` option it asks for `len()` batches in strides, setting the range of
    each stride with `set_range` and folding it into the running histograms before the next one,
    so a stride of one batch bounds calibration memory by one batch's activations."""

    def __init__(self, samples: np.ndarray, batch: int) -> None:
        self._samples, self._batch = samples, batch
        self._count = max(1, samples.shape[0] // batch)
        self.set_range(0, self._count)

    def __len__(self) -> int:
        return self._count

    def set_range(self, start_index: int, end_index: int) -> None:
        self._at, self._end = start_index, min(end_index, self._count)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._at >= self._end:
            return None
        x = self._samples[self._at * self._batch:(self._at + 1) * self._batch]
        self._at += 1
        return {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)}


def boundary_layers(model: onnx.ModelProto) -> list[str]:
    """Names of the first and last quantizable layers: every one reading the graph input with no
    other quantizable layer in between, and the last one in topological order (the classifier).

    They stay in float (the usual first/last-layer rule): the first sees raw standardised
    spectra whose outliers set its range, and the last sets the logits directly.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    found, seen, todo = set(), set(), [i.name for i in model.graph.input]
    while todo:
        for n in consumers.get(todo.pop(), []):
            if n.name in seen or n.op_type in ("Shape", "Size"):  # shape arithmetic carries no data
                continue
            seen.add(n.name)
            if n.op_type in QUANTIZED_OPS:
                found.add(n.name)
            else:
                todo.extend(n.output)
    layers = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS]
    return sorted(found | set(layers[-1:]))


def _scan_tensors(model: onnx.ModelProto) -> set[str]:
    return {t for n in scan_node.scan_nodes(model) for t in (*n.input, *n.output) if t}


def quantize_int8(model: onnx.ModelProto, samples: np.ndarray, batch: int = 256,
                  method: str = "percentile") -> onnx.ModelProto:
    """A QDQ int8 copy of a float32 plugin-mode graph, calibrated on `samples` of model input
    (patches, spectra or image tiles, stacked on axis 0), fed `batch` at a time."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {sorted(CALIBRATION_METHODS)}, got {method!r}")
    keep_float = _scan_tensors(model)
    extra = {
        "ActivationSymmetric": True, "WeightSymmetric": True,
        # The scan's inputs must reach it unquantized, even where a quantized MatMul also reads them.
        "DedicatedQDQPair": True,
        "CalibTensorRangeSymmetric": True,
        # Biases stay float: TensorRT folds them into its int8 kernels and takes no int32 bias Q/DQ.
        "QuantizeBias": False,
        # One batch per collection pass: memory bounded by one batch, whatever the sample count.
        "CalibStridedMinMax": 1,
    }
    if method == "percentile":
        extra["CalibPercentile"] = PERCENTILE
    with tempfile.TemporaryDirectory(prefix="hsiedge-int8-") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        onnx.save(scan_functions.attach_functions(model), src)
        cwd = os.getcwd()
        os.chdir(tmp)  # the calibrator writes its augmented model into the working directory
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # its advice to pre-process (shape inference) does not apply here
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints its calibration progress
                quantize_static(
                    str(src), str(dst), _Batches(samples, batch), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=list(QUANTIZED_OPS), calibrate_method=CALIBRATION_METHODS[method],
                    nodes_to_exclude=boundary_layers(model), extra_options=extra)
        finally:
            os.chdir(cwd)
            root.setLevel(level)
        quantized = onnx.load(str(dst))
    _unquantize(quantized, keep_float)
    return scan_functions.detach_functions(quantized)


def _unquantize(model: onnx.ModelProto, names: set[str]) -> None:
    """Make every reader of `names` read the float tensor, not a Q/DQ copy of it."""
    producer = {o: n for n in model.graph.node for o in n.output}
    dq_of: dict[str, str] = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear":
            q = producer.get(n.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in names:
                dq_of[n.output[0]] = q.input[0]
    for n in model.graph.node:
        if n.op_type in QUANTIZED_OPS or n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, t in enumerate(n.input):
            if t in dq_of:
                n.input[i] = dq_of[t]
