"""fp16: float16 weights and activations where that is safe, float32 where half overflows or
where its rounding flips labels.

The conversion is onnxruntime's float16 converter (`onnxruntime.transformers.float16`).
Kept in float32, by op type (FP32_OPS): normalisations and reductions (their sums and
variances overflow or lose all precision in half), exp-like ops, and the scan's A, D and
delta_bias and its accumulation.  The scan node itself takes and returns float16 (u, delta,
B, C, z, y), which is what the TensorRT plugin's half path implements; the portable
decomposition casts to float32 inside.  A scan whose inputs are all computed in float32
stays a float32 node (the plugin's float32 path); no rule here does that to a seed model.

Kept in float32 by position (`fp32_nodes`), because layer-by-layer comparison with the float32
graph (bench/fp16_layers.py) showed that half rounding there, not anywhere in the Mamba
blocks, moves the labels of near-tied pixels (MambaHSI on Jasper Ridge: 10-11 of 9840 labels
changed, the 99.9 % agreement threshold missed, on 2 of 6 checkpoints; a Pavia crop 3 of
2422; all of them near-ties, none confident):

- the first layer, which reads the float32 model input: MambaHSI's bands -> 128 (198 on Jasper)
  convolution sums many correlated bands, and the GroupNorm after it subtracts their large
  common mean, so half rounding of the input and of this layer's output is amplified there;
- the last layer and what follows it (the classifier's final Conv and the bilinear Resize):
  logits rounded to half move every near-tied pixel (that rounding alone flipped 8 labels);
- each exported GroupNorm as a whole (Reshape, InstanceNormalization, Reshape, scale Mul,
  shift Add), not only its InstanceNormalization: the normalised values are no longer
  rounded to half before the affine.

Together they halve the logit error or better (rel. L2 5.2e-4 -> 3.0e-4, Pavia crop 9.6e-4 ->
3.4e-4; at most 4 labels changed on those checkpoints) while about 88 % of MambaHSI's
multiply-adds (every Mamba projection, the scan inputs, the classifier's first Conv) stay in
half; the first layer is the other 12 % (Jasper Ridge's 198 bands).  Casts the converter
puts between two float32 nodes (float32 -> half -> float32) are removed.
"""

from __future__ import annotations

from collections.abc import Sequence

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


# Ops that move or interpolate values without a weighted sum: the first and last layers are
# found through them.
PASS_THROUGH = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice",
                "Pad", "Resize")
LAYERS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def fp32_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes kept float32 besides FP32_OPS: the first layer (from the graph input
    through PASS_THROUGH ops to the first Conv / MatMul / Gemm), the last layer (back from the
    graph output the same way), and the reshapes, scale and shift around InstanceNormalization
    (GroupNorm as exported: Reshape, InstanceNormalization, Reshape, Mul, Add)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    keep: list[onnx.NodeProto] = []

    def forward(tensor: str) -> None:
        for n in consumers.get(tensor, []):
            if n.op_type in LAYERS or (n.op_type in PASS_THROUGH and n.input[0] == tensor):
                keep.append(n)
                if n.op_type not in LAYERS:
                    forward(n.output[0])

    def backward(tensor: str) -> None:
        n = producer.get(tensor)
        if n is not None and n.op_type in (*LAYERS, *PASS_THROUGH):
            keep.append(n)
            if n.op_type not in LAYERS:
                backward(n.input[0])

    for i in model.graph.input:
        if i.type.tensor_type.elem_type == TensorProto.FLOAT:
            forward(i.name)
    for o in model.graph.output:
        backward(o.name)
    for norm in (n for n in model.graph.node if n.op_type == "InstanceNormalization"):
        before = producer.get(norm.input[0])
        if before is not None and before.op_type == "Reshape":
            keep.append(before)
        n, want = norm, ["Reshape", "Mul", "Add"]
        while want and len(users := consumers.get(n.output[0], [])) == 1 and users[0].op_type in want:
            n = users[0]
            want = want[want.index(n.op_type) + 1:]
            keep.append(n)
    return sorted({n.name for n in keep if n.name})


def to_fp16(model: onnx.ModelProto, keep_nodes: Sequence[str] | None = None) -> onnx.ModelProto:
    """A float16 copy of a float32 graph; its input and output stay float32.  `keep_nodes`:
    names of nodes kept float32 besides FP32_OPS (default: `fp32_nodes(model)`)."""
    blocked = sorted({*DEFAULT_OP_BLOCK_LIST, *FP32_OPS, scan_node.OP_TYPE})
    keep_nodes = fp32_nodes(model) if keep_nodes is None else keep_nodes
    half = convert_float_to_float16(model, keep_io_types=True, op_block_list=blocked,
                                    node_block_list=list(keep_nodes) or None)
    _drop_repeated_nodes(half)
    _drop_round_trips(half)
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


def _drop_round_trips(model: onnx.ModelProto) -> None:
    """The converter casts every blocked node's float32 output to half and, for a blocked reader,
    back to float32: between two blocked nodes that is a rounding for nothing.  Readers of
    such a Cast(half) -> Cast(float32) pair read the float32 tensor instead."""
    producer = {o: n for n in model.graph.node for o in n.output}
    outputs = {o.name for o in model.graph.output}
    renamed = {}
    for n in model.graph.node:
        up = producer.get(n.input[0]) if n.op_type == "Cast" and n.input else None
        if (up is not None and up.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT
                and up.attribute[0].i == TensorProto.FLOAT16 and _is_float32(model, up.input[0], producer)):
            if n.output[0] in outputs:  # a graph output keeps its name: cast float32 to float32
                n.input[0] = up.input[0]
            else:
                renamed[n.output[0]] = up.input[0]
    for n in model.graph.node:
        for k, t in enumerate(n.input):
            if t in renamed:
                n.input[k] = renamed[t]
    _drop_dead_nodes(model)


def _is_float32(model: onnx.ModelProto, name: str, producer: dict[str, onnx.NodeProto]) -> bool:
    """Whether `name` is float32 (a blocked node's output, a float32 graph input or initializer)."""
    graph_input = next((i for i in model.graph.input if i.name == name), None)
    if graph_input is not None:
        return graph_input.type.tensor_type.elem_type == TensorProto.FLOAT
    init = next((i for i in model.graph.initializer if i.name == name), None)
    if init is not None:
        return init.data_type == TensorProto.FLOAT
    node = producer.get(name)
    if node is None:
        return False
    if node.op_type == "Cast":
        return node.attribute[0].i == TensorProto.FLOAT
    return name.endswith("_cast_to_fp16")  # the converter's name for a blocked node's float32 output


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
        sources = {}
        for i, role in enumerate(scan_node.INPUTS):
            cast = producer.get(node.input[i]) if i < len(node.input) and node.input[i] else None
            if cast is not None and cast.op_type == "Cast":
                sources[i] = (role, cast.input[0])
        half = [(i, s) for i, (role, s) in sources.items() if role not in scan_node.FLOAT32_INPUTS]
        if len(half) < sum(1 for i, role in enumerate(scan_node.INPUTS)
                           if role not in scan_node.FLOAT32_INPUTS and i < len(node.input) and node.input[i]):
            continue  # some of u, delta, B, C, z are computed in float32: the scan stays float32
        if any(types.get(s) != TensorProto.FLOAT16 for _, s in half):
            continue
        for i, (role, source) in sources.items():
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
