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

The same QDQ graph is what ONNX Runtime's CPU provider fuses into int8 kernels (QLinearConv,
QLinearMatMul, QGemm: u8 activations x s8 weights, VNNI), and two things decide whether it can:

- weights must be initializers.  The exporter computes some (a linear layer's weight split in
  two and transposed); those chains are folded into initializers first, so that they quantize
  per channel once, at export, rather than per tensor on every call;
- a Q/DQ pair must feed only the quantized layers it was made for.  The quantizer hands the
  DQ output of a shared tensor to its float readers too, and ONNX Runtime can fuse a layer only
  when its int8 input comes from a Q that feeds nothing else (it converts s8 pairs to u8 one
  pair at a time).  Float readers (and every reader of a scan tensor) get the float tensor back,
  which is also more exact.  (The runner also keeps ONNX Runtime from merging the dedicated pairs
  back into one: see `runtimes/onnxruntime.py`, common subexpression elimination.)

On x86 CPUs without VNNI those u8 x s8 kernels sum pairs of products into 16 bits, which
saturates with 8-bit weights; the runner then has ONNX Runtime widen them to u8 x u8 kernels,
which are slower.  `weight_bits=7` quantizes weights to [-64, 64] (onnxruntime's `reduce_range`)
instead: pairs of them cannot saturate, so ONNX Runtime keeps the fast u8 x s8 kernels there, at
the cost of one bit of weight precision everywhere else.
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
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
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
WEIGHT_BITS = (8, 7)


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
    spectra whose outliers set its range, and the last sets the logits directly.  Except a
    first layer that is a 2-D convolution: per-channel weights keep it within the int8 parity
    thresholds, and it can be most of the time (SpectralMamba's depthwise 3 x 3 over 103 bands:
    45-60 % of an fp32 batch on the 2-core CPU machine); ONNX Runtime runs it as QLinearConv.
    A 3-D one (MD2F-Mamba's) stays float: ONNX Runtime's int8 3-D convolution was slower than
    its float one (66 % of the int8 batch's time).
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
                if not _conv2d(model, n):
                    found.add(n.name)
            else:
                todo.extend(n.output)
    layers = [n.name for n in model.graph.node if n.op_type in QUANTIZED_OPS]
    return sorted(found | set(layers[-1:]))


def _conv2d(model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    if node.op_type != "Conv":
        return False
    weight = next((i for i in model.graph.initializer if i.name == node.input[1]), None)
    return weight is not None and len(weight.dims) == 4


def _scan_tensors(model: onnx.ModelProto) -> set[str]:
    return {t for n in scan_node.scan_nodes(model) for t in (*n.input, *n.output) if t}


def quantize_int8(model: onnx.ModelProto, samples: np.ndarray, batch: int = 256,
                  method: str = "percentile", weight_bits: int = 8) -> onnx.ModelProto:
    """A QDQ int8 copy of a float32 plugin-mode graph, calibrated on `samples` of model input
    (patches, spectra or image tiles, stacked on axis 0), fed `batch` at a time; its weights
    quantized to `weight_bits` (8: [-127, 127]; 7: [-64, 64], see the module's docstring)."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {sorted(CALIBRATION_METHODS)}, got {method!r}")
    if weight_bits not in WEIGHT_BITS:
        raise ValueError(f"weight bits must be one of {WEIGHT_BITS}, got {weight_bits!r}")
    model = fold_weights(model)
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
                    op_types_to_quantize=list(QUANTIZED_OPS),
                    calibrate_method=CALIBRATION_METHODS[method],
                    nodes_to_exclude=boundary_layers(model), extra_options=extra,
                    reduce_range=weight_bits == 7)
        finally:
            os.chdir(cwd)
            root.setLevel(level)
        quantized = onnx.load(str(dst))
    _unquantize(quantized, keep_float)
    return scan_functions.detach_functions(quantized)


def fold_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose quantized layers read every weight computed from initializers
    alone (Split, Transpose, Reshape ... of a parameter) as an initializer, evaluated here."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    const = {i.name for i in graph.initializer}
    chain: list[onnx.NodeProto] = []
    for n in graph.node:  # topological order: a node of constant inputs is constant
        if n.domain in ("", "ai.onnx") and all(not t or t in const for t in n.input):
            const.update(n.output)
            chain.append(n)
    produced = {o for n in chain for o in n.output}
    wanted = sorted({t for n in graph.node if n.op_type in QUANTIZED_OPS
                     for t in n.input[1:2] if t in produced})
    if not wanted:
        return out
    needed, todo = set(), list(wanted)
    by_output = {o: n for n in chain for o in n.output}
    while todo:
        n = by_output.get(todo.pop())
        if n is not None and id(n) not in needed:
            needed.add(id(n))
            todo.extend(n.input)
    nodes = [n for n in chain if id(n) in needed]
    sub = onnx.helper.make_model(
        onnx.helper.make_graph(nodes, "weights", [], [onnx.helper.make_tensor_value_info(t, 0, None)
                                                     for t in wanted],
                               [i for i in graph.initializer]),
        opset_imports=[o for o in out.opset_import if o.domain in ("", "ai.onnx")], ir_version=out.ir_version)
    values = ReferenceEvaluator(sub).run(None, {})
    folded = {t: f"{t}_folded" for t in wanted}
    graph.initializer.extend(numpy_helper.from_array(np.asarray(v), folded[t])
                             for t, v in zip(wanted, values, strict=True))
    for n in graph.node:
        if n.op_type in QUANTIZED_OPS and len(n.input) > 1 and n.input[1] in folded:
            n.input[1] = folded[n.input[1]]
    _drop_dead(graph, {id(n) for n in nodes})
    return out


def _drop_dead(graph: onnx.GraphProto, candidates: set[int]) -> None:
    """Remove, among `candidates` (node ids), the nodes whose outputs nothing reads any more."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {t for n in graph.node for t in n.input} | outputs
        dead = [n for n in graph.node if id(n) in candidates and not any(o in read for o in n.output)]
        if not dead:
            return
        for n in dead:
            graph.node.remove(n)


def _unquantize(model: onnx.ModelProto, scan_tensors: set[str]) -> None:
    """Give each quantized layer Q/DQ pairs of its own, and float readers the float tensor.

    - every reader of `scan_tensors` (which the scan reads in float) that is not a quantized
      layer reads the float tensor;
    - a float reader of a Q/DQ copy reads the float tensor too, unless that copy is the only
      reader of a convolution's output (ONNX Runtime fuses DQ -> Conv -> Q into one int8
      kernel only when the Conv's output goes to nothing but that Q, and the Q to one DQ, and
      that DQ to one node);
    - a Q/DQ pair read by several nodes is split into one pair per reader (ONNX Runtime on x86
      runs int8 activations as uint8, converting Q -> DQ pairs one at a time: a Q feeding two
      DQs stays int8 and its layers stay float);
    then the pairs nothing reads any more are dropped."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    source: dict[str, str] = {}  # DQ output -> the float tensor its Q quantizes
    for n in graph.node:
        if n.op_type == "DequantizeLinear":
            q = producer.get(n.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                source[n.output[0]] = q.input[0]

    def conv_output_chain(t: str, dq_out: str) -> bool:
        made_by = producer.get(t)
        q = producer[producer[dq_out].input[0]]
        return (made_by is not None and made_by.op_type == "Conv" and len(readers.get(t, [])) == 1
                and len(readers.get(q.output[0], [])) == 1 and len(readers.get(dq_out, [])) == 1)

    for n in graph.node:
        if n.op_type in QUANTIZED_OPS or n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, t in enumerate(n.input):
            if t not in source:
                continue
            floats = not conv_output_chain(source[t], t)
            if source[t] in scan_tensors or floats:
                n.input[i] = source[t]
    _drop_dead(graph, {id(n) for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")})
    _one_pair_per_reader(graph)


def _one_pair_per_reader(graph: onnx.GraphProto) -> None:
    """Split every Q -> DQ(s) -> readers fan-out into one Q -> DQ pair per reading input."""
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in graph.node:
        for k, t in enumerate(n.input):
            readers.setdefault(t, []).append((n, k))
    graph_outputs = {o.name for o in graph.output}
    inserts: list[tuple[onnx.NodeProto, list[onnx.NodeProto]]] = []
    for q in [n for n in graph.node if n.op_type == "QuantizeLinear"]:
        dqs = [r for r, _ in readers.get(q.output[0], []) if r.op_type == "DequantizeLinear"]
        edges = [(dq, r, k) for dq in dqs for r, k in readers.get(dq.output[0], [])]
        if len(edges) < 2 or any(dq.output[0] in graph_outputs for dq in dqs):
            continue
        copies = []
        for j, (dq, reader, k) in enumerate(edges[1:], start=1):
            q2, dq2 = onnx.NodeProto(), onnx.NodeProto()
            q2.CopyFrom(q)
            dq2.CopyFrom(dq)
            q2.name, dq2.name = f"{q.name}/reader{j}", f"{dq.name}/reader{j}"
            q2.output[0], dq2.output[0] = f"{q.output[0]}/reader{j}", f"{dq.output[0]}/reader{j}"
            dq2.input[0] = q2.output[0]
            reader.input[k] = dq2.output[0]
            copies += [q2, dq2]
        inserts.append((dqs[0], copies))
    for dq, copies in inserts:  # right after the first DQ: the Q's input exists there
        at = list(graph.node).index(dq) + 1
        for c in reversed(copies):
            graph.node.insert(at, c)
    _drop_dead(graph, {id(n) for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")})
