"""Rewrites of a bundle's ONNX graph that the ONNX Runtime runner makes for the CPU provider.

Each computes what the bundle's graph computes, in a form ONNX Runtime's CPU kernels run
faster; each returns how many places it rewrote (the runner's notes say so).  The bundle's
files are never touched: the runner rewrites its own copy when it opens the session, and the
export's parity check runs through the same runner, so the rewritten graph is the one checked.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from hsiedge.export import portable, scan_node

U8_ZERO = "hsiedge_u8_zero_point"


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Each tensor's reading nodes, in graph order."""
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for n in graph.node:
        for name in n.input:
            readers[name].append(n)
    return readers


def small_transposes_as_einsum(model: onnx.ModelProto) -> int:
    """Rewrite (in place) each Transpose that swaps the last two axes of a stack of small
    matrices, (n, a, b) -> (n, b, a) with a, b <= 256, as the equivalent Einsum; return how many.

    ONNX Runtime's CPU Transpose copies those one element at a time, its Einsum in blocks:
    MambaHSI's spectral tokens (16384, 4, 64) -> (16384, 64, 4) take 16 ms as a Transpose and
    3.6 ms as an Einsum, (16384, 4, 16) 10.4 and 0.6 ms; 2-D and 4-D transposes and single
    large matrices are faster as they are (measured on the 2-core CPU machine, onnxruntime
    1.32).  Transposes that feed a MatMul stay: ONNX Runtime fuses those into the MatMul."""
    shapes = portable.tensor_shapes(model)
    into_matmul = {i for n in model.graph.node if n.op_type in ("MatMul", "Gemm") for i in n.input}
    count = 0
    for node in model.graph.node:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or perm != [0, 2, 1]:
            continue
        dims = shapes.get(node.input[0], (None, []))[1]
        small = len(dims) == 3 and all(isinstance(d, int) and 0 < d <= 256 for d in dims[1:])
        if not small or dims[0] == 1 or node.output[0] in into_matmul:
            continue
        del node.attribute[:]
        node.op_type = "Einsum"
        node.attribute.append(helper.make_attribute("equation", "nab->nba"))
        count += 1
    return count


def half_scans_in_float(model: onnx.ModelProto) -> int:
    """Rewrite (in place) each float16 SelectiveScan node to take float32 inputs and give a
    float32 output, cast from and back to float16 around it; return how many.

    Contract 1 accumulates in float32 whatever the input type, so the float32 kernel computes
    the float16 node's own result (rounded to half on the way out, as the node's output is).
    Without this, a float16 graph's scans run as the portable body in ONNX Runtime."""
    shapes = portable.tensor_shapes(model)
    count = 0
    nodes = list(model.graph.node)
    del model.graph.node[:]
    for node in nodes:
        is_scan = node.op_type == scan_node.OP_TYPE and node.domain == scan_node.DOMAIN
        types = portable.node_spec(node, shapes).types if is_scan else ()
        if onnx.TensorProto.FLOAT16 not in types:
            model.graph.node.append(node)
            continue
        half = {role for role, t in zip(portable.ROLES_TYPED_LIKE_U, types, strict=True)
                if t == onnx.TensorProto.FLOAT16}
        for i, name in enumerate(node.input):
            if name and scan_node.INPUTS[i] in half:
                cast = f"{node.name or 'scan'}_{scan_node.INPUTS[i]}_as_float"
                model.graph.node.append(helper.make_node("Cast", [name], [cast], to=onnx.TensorProto.FLOAT))
                node.input[i] = cast
        y = node.output[0]
        node.output[0] = f"{y}_float"
        model.graph.node.append(node)
        model.graph.node.append(helper.make_node("Cast", [node.output[0]], [y], to=onnx.TensorProto.FLOAT16))
        count += 1
    return count


def relus_as_unsigned(model: onnx.ModelProto) -> int:
    """Rewrite (in place) each ReLU between symmetric int8 Q/DQ pairs as one unsigned pair that
    clips at zero by itself; return how many.

    The export's activations are symmetric int8 (zero point 0, as TensorRT wants), so a
    quantized layer's ReLU stays a float node: Q -> DQ -> Relu -> Q -> DQ, which ONNX Runtime's
    CPU provider runs as two conversions and a float ReLU around every such layer (MD2F-Mamba:
    10 of them, a fifth of its int8 time with the conversions of the rest).  A uint8 pair with
    zero point 0 maps every negative value to 0, which is the ReLU, and ONNX Runtime fuses it
    into the int8 layer that writes it.  The pair takes the scale of the Q that read the ReLU
    (else the first pair's), so one rounding replaces two and the range reaches 255 steps
    instead of 127: the result is at least as close to the float model's as the bundle's graph.
    A ReLU whose readers quantize it at different scales, or whose pair is shared, stays."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}

    def scalar(name: str, dtype: type) -> float | None:
        init = inits.get(name)
        if init is None or init.dims:
            return None
        value = numpy_helper.to_array(init)
        return float(value) if value.dtype == dtype else None

    def symmetric_pair(q: onnx.NodeProto | None, dq: onnx.NodeProto) -> float | None:
        """The scale of a per-tensor int8 Q -> DQ pair with zero point 0, None if it is not one."""
        if q is None or q.op_type != "QuantizeLinear" or dq.op_type != "DequantizeLinear":
            return None
        if len(q.input) < 3 or len(dq.input) < 3 or len(readers[q.output[0]]) != 1:  # dq reads it alone
            return None
        scale, zero = scalar(q.input[1], np.float32), scalar(q.input[2], np.int8)
        same = scalar(dq.input[1], np.float32) == scale and scalar(dq.input[2], np.int8) == zero
        return scale if zero == 0 and same and scale is not None else None

    dropped: set[int] = set()
    renamed: dict[str, str] = {}
    retyped: set[str] = set()
    count = 0
    for relu in graph.node:
        if relu.op_type != "Relu" or relu.domain not in ("", "ai.onnx") or relu.output[0] in outputs:
            continue
        dq = producer.get(relu.input[0])
        if dq is None or id(dq) in dropped or len(readers[dq.output[0]]) != 1 or dq.output[0] in outputs:
            continue  # (dropped: the pair of an earlier ReLU's readers, already its own)
        q = producer.get(dq.input[0])
        if symmetric_pair(q, dq) is None:
            continue
        requantized = [(r, readers[r.output[0]][0]) for r in readers[relu.output[0]]
                       if r.op_type == "QuantizeLinear" and len(readers[r.output[0]]) == 1]
        pairs = [(rq, rdq) for rq, rdq in requantized if symmetric_pair(rq, rdq) is not None]
        if len(pairs) != len(requantized) or len({scalar(rq.input[1], np.float32) for rq, _ in pairs}) > 1:
            continue
        if any(rdq.output[0] in outputs for _, rdq in pairs):
            continue
        scale = pairs[0][0].input[1] if pairs else q.input[1]
        for node in (q, dq):
            node.input[1], node.input[2] = scale, U8_ZERO
        retyped.add(q.output[0])
        renamed[relu.output[0]] = dq.output[0]
        dropped.add(id(relu))
        for rq, rdq in pairs:
            renamed[rdq.output[0]] = dq.output[0]
            dropped.update((id(rq), id(rdq)))
        count += 1
    if not count:
        return 0
    graph.initializer.append(numpy_helper.from_array(np.array(0, dtype=np.uint8), U8_ZERO))
    kept = [n for n in graph.node if id(n) not in dropped]
    for n in kept:
        for i, name in enumerate(n.input):
            n.input[i] = renamed.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)
    gone = retyped | set(renamed)
    info = [vi for vi in graph.value_info if vi.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(info)
    return count


NCHWC_CHANNELS = 16  # ONNX Runtime's NCHWc block: 8 channels with AVX2, 16 with AVX-512


def depthwise_convs_padded(model: onnx.ModelProto) -> int:
    """Rewrite (in place) each float32 2-D depthwise convolution whose channel count is not a
    multiple of 16 to run on zero-padded channels; return how many.

    ONNX Runtime's CPU provider runs a depthwise convolution in its fast blocked (NCHWc)
    layout only when the channels fill whole blocks; otherwise it falls back to one small
    matrix product per image and channel.  SpectralMamba's gate is one over the scene's bands
    (103 for Pavia University): 2.7 ms for 64 patches, 0.34 ms with 104 channels (2-core AVX2
    CPU machine, onnxruntime 1.32).  The input gets zero channels (Pad), the filters and biases
    zeros for them, so the real channels compute what they did.  A single reader that is a
    convolution takes the padded channels through zero weight columns; other readers get the
    real channels back (Slice).  Quantized convolutions (weights through a DequantizeLinear)
    stay as they are: ONNX Runtime runs those in its own int8 kernels."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers = _readers(graph)
    outputs = {o.name for o in graph.output}

    def float_weights(node: onnx.NodeProto, index: int) -> np.ndarray | None:
        init = inits.get(node.input[index]) if len(node.input) > index and node.input[index] else None
        if init is None or init.data_type != onnx.TensorProto.FLOAT:
            return None
        return numpy_helper.to_array(init)

    def group(node: onnx.NodeProto) -> int:
        return next((a.i for a in node.attribute if a.name == "group"), 1)

    def constant(what: str, value: np.ndarray) -> str:
        name = f"hsiedge_padded_{len(graph.initializer)}_{what}"
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    nodes: list[onnx.NodeProto] = []
    gone: set[str] = set()  # tensors that no longer exist (their value_info goes)
    count = 0
    for node in graph.node:
        w = float_weights(node, 1) if node.op_type == "Conv" and node.domain in ("", "ai.onnx") else None
        c = group(node) if w is not None else 0
        if w is None or c < 2 or w.shape[:2] != (c, 1) or w.ndim != 4 or c % NCHWC_CHANNELS == 0:
            nodes.append(node)
            continue
        padded = -(-c // NCHWC_CHANNELS) * NCHWC_CHANNELS
        extra = padded - c
        bias = float_weights(node, 2) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and bias is None:
            nodes.append(node)  # a bias that is not a float32 constant
            continue
        source, result = node.input[0], node.output[0]
        wide_in, wide_out = f"hsiedge_padded_{count}_input", f"hsiedge_padded_{count}_output"
        pads = np.array([0, 0, 0, 0, 0, extra, 0, 0], np.int64)
        nodes.append(helper.make_node("Pad", [source, constant("pads", pads)], [wide_in],
                                      name=f"hsiedge_padded_{count}_pad"))
        node.input[0] = wide_in
        node.input[1] = constant("weight", np.concatenate([w, np.zeros((extra, *w.shape[1:]), w.dtype)]))
        if bias is not None:
            node.input[2] = constant("bias", np.concatenate([bias, np.zeros(extra, bias.dtype)]))
        for a in node.attribute:
            if a.name == "group":
                a.i = padded
        node.output[0] = wide_out
        nodes.append(node)
        only = readers[result][0] if len(readers[result]) == 1 and result not in outputs else None
        rw = float_weights(only, 1) if only is not None and only.op_type == "Conv" else None
        if rw is not None and group(only) == 1 and rw.ndim == 4 and rw.shape[1] == c \
                and only.input[0] == result:
            only.input[1] = constant("columns", np.concatenate(
                [rw, np.zeros((rw.shape[0], extra, *rw.shape[2:]), rw.dtype)], axis=1))
            only.input[0] = wide_out
            gone.add(result)
        else:
            ends = [constant("start", np.array([0], np.int64)), constant("end", np.array([c], np.int64)),
                    constant("axis", np.array([1], np.int64))]
            nodes.append(helper.make_node("Slice", [wide_out, *ends], [result],
                                          name=f"hsiedge_padded_{count}_slice"))
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
        info = [vi for vi in graph.value_info if vi.name not in gone]
        del graph.value_info[:]
        graph.value_info.extend(info)
    return count
