"""fp16: float16 weights and activations where that is safe, float32 where half overflows.

The conversion is onnxruntime's float16 converter (`onnxruntime.transformers.float16`).
Kept in float32: normalisations and reductions (their sums and variances overflow or lose
all precision in half), and the scan's A, D and delta_bias and its accumulation.  The
scan node itself takes and returns float16 (u, delta, B, C, z, y), which is what the
TensorRT plugin's half path implements; the portable decomposition casts to float32 inside.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from hsiedge.export import scan_node
from hsiedge.export.onnx_model import topological

# Ops left in float32: normalisations (mean/variance of up to thousands of values), the
# reductions and powers they decompose into, and exp-like ops whose range half cannot hold.
FP32_OPS = (
    "LayerNormalization", "InstanceNormalization", "GroupNormalization", "BatchNormalization",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Pow", "Sqrt", "Reciprocal",
    "Softplus", "Softmax", "Exp",
)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of a float32 graph; its input and output stay float32."""
    blocked = sorted({*DEFAULT_OP_BLOCK_LIST, *FP32_OPS, scan_node.OP_TYPE})
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked)
    _drop_repeated_nodes(half)
    _half_scan(half)
    return topological(half)


def _drop_repeated_nodes(model: onnx.ModelProto) -> None:
    """The converter casts an initializer shared by two blocked nodes twice, under one output
    name, and declares float32 initializers as float16 in value_info: keep the first of such
    identical nodes and only correct value_info entries."""
    seen: dict[str, bytes] = {}
    keep = []
    for n in model.graph.node:
        key = n.SerializeToString()
        if n.output and n.output[0] in seen:
            if seen[n.output[0]] != key:
                raise ValueError(f"two different nodes write {n.output[0]!r}")
            continue
        seen.update({o: key for o in n.output})
        keep.append(n)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    infos, names = [], {i.name for i in model.graph.initializer}  # it also mistypes initializers
    for vi in model.graph.value_info:
        if vi.name not in names:
            names.add(vi.name)
            infos.append(vi)
    del model.graph.value_info[:]
    model.graph.value_info.extend(infos)


def _half_scan(model: onnx.ModelProto) -> None:
    """The converter wraps blocked nodes in casts to float32 and back.  The scan node takes
    float16 u, delta, B, C, z and returns float16 (Contract 1: y has u's dtype, accumulation
    is float32 inside), while A, D and delta_bias stay float32: rewire the node past those
    casts and drop the casts nobody reads any more."""
    producer = {o: n for n in model.graph.node for o in n.output}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    for node in scan_node.scan_nodes(model):
        for i, role in enumerate(scan_node.INPUTS):
            cast = producer.get(node.input[i]) if i < len(node.input) and node.input[i] else None
            if cast is None or cast.op_type != "Cast":
                continue
            source = cast.input[0]
            want = TensorProto.FLOAT if role in scan_node.FLOAT32_INPUTS else TensorProto.FLOAT16
            if types.get(source) == want:
                node.input[i] = source
        y = node.output[0]
        users = consumers.get(y, [])
        if not users or any(n.op_type != "Cast" or n.attribute[0].i != TensorProto.FLOAT16 for n in users):
            raise ValueError(f"{node.name}: expected the float16 converter to cast its output to half")
        node.output[0] = users[0].output[0]
        for extra in users[1:]:
            for n in model.graph.node:
                for k, t in enumerate(n.input):
                    if t == extra.output[0]:
                        n.input[k] = node.output[0]
        for cast in users:
            model.graph.node.remove(cast)
    _drop_dead_nodes(model)


def _drop_dead_nodes(model: onnx.ModelProto) -> None:
    while True:
        read = {t for n in model.graph.node for t in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if not any(o in read for o in n.output)]
        if not dead:
            return
        for n in dead:
            model.graph.node.remove(n)
