"""The portable form of Contract 2's node: the same math in standard ONNX ops only.

`decompose` replaces each `SelectiveScan` node with plain opset-18 ops around one ONNX
`Scan` over the time axis.  The state h (batch, dim, N) is the Scan's carried value, so no
(batch, dim, L, N) tensor ever exists; everything is computed in float32 and the output is
cast back to u's type, as Contract 1 asks.  This one implementation serves three uses:
`--scan portable` exports, running plugin-mode graphs in ONNX Runtime (which has no
SelectiveScan kernel), and calibrating int8 graphs (`recompose` restores the plugin node).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper, numpy_helper

from hsiedge.export import scan_node
from hsiedge.export.onnx_model import topological

_SOFTPLUS_THRESHOLD = 20.0  # mamba-ssm / torch: softplus(x) = x above 20
_TAG = "/portable/"


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, list]]:
    """Tensor name -> (element type, dims as int or str) from inputs, value_info and initializers."""
    out: dict[str, tuple[int, list]] = {}
    for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        out[vi.name] = (t.elem_type, dims)
    for init in model.graph.initializer:
        out[init.name] = (init.data_type, list(init.dims))
    return out


def _static(dims: list, i: int, what: str, node: str) -> int:
    if not isinstance(dims[i], int) or dims[i] <= 0:
        raise ValueError(f"{node}: {what} must be static to decompose the scan, got {dims}")
    return int(dims[i])


class _Builder:
    """Nodes and initializers of one decomposition, all named under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.nodes, self.inits, self._n = prefix, [], [], 0

    def name(self, what: str) -> str:
        self._n += 1
        return f"{self.prefix}{_TAG}{what}_{self._n}"

    def const(self, what: str, value, dtype=None) -> str:
        import numpy as np

        name = self.name(what)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type), **attrs))
        return out


def _body(b: _Builder, A: str, dim: int, N: int, groups: int) -> onnx.GraphProto:
    """One time step: h <- exp(dt*A) * h + (dt*u) * B_t ; y_t = <h, C_t>."""
    body = _Builder(b.prefix + "/step")
    f = TensorProto.FLOAT
    minus1 = b.const("axes_last", [-1], "int64")  # outer-scope constants, visible in the body
    if groups:
        ax = b.const("axes_2", [2], "int64")
        rep = b.const("repeat", [1, 1, dim // groups, 1], "int64")
        flat = b.const("shape_bdn", [0, dim, N], "int64")

        def per_channel(t: str) -> str:  # (b, G, N) -> (b, dim, N)
            return body.op("Reshape", [body.op("Expand", [body.op("Unsqueeze", [t, ax]), rep]), flat])
    else:
        ax1 = b.const("axes_1", [1], "int64")

        def per_channel(t: str) -> str:  # (b, N) -> (b, 1, N), broadcast over channels
            return body.op("Unsqueeze", [t, ax1])

    h, dt, du, Bt, Ct = "h", "dt_t", "du_t", "B_t", "C_t"
    dA = body.op("Exp", [body.op("Mul", [body.op("Unsqueeze", [dt, minus1]), A])])
    dBu = body.op("Mul", [body.op("Unsqueeze", [du, minus1]), per_channel(Bt)])
    h_new = body.op("Add", [body.op("Mul", [dA, h]), dBu], out="h_next")
    body.op("ReduceSum", [body.op("Mul", [h_new, per_channel(Ct)]), minus1], out="y_t", keepdims=0)
    vi = helper.make_tensor_value_info
    return helper.make_graph(
        body.nodes, f"{b.prefix}_step",
        [vi(n, f, None) for n in (h, dt, du, Bt, Ct)], [vi("h_next", f, None), vi("y_t", f, None)])


def _decompose_node(node: onnx.NodeProto, shapes: dict[str, tuple[int, list]], b: _Builder) -> None:
    io = scan_node.node_inputs(node)
    for role in ("u", "A", "B"):
        if io[role] not in shapes:
            raise ValueError(f"{node.name}: no shape known for input {role} ({io[role]!r})")
    u_type, _ = shapes[io["u"]]
    _, a_dims = shapes[io["A"]]
    _, b_dims = shapes[io["B"]]
    dim, N = _static(a_dims, 0, "A's dim", node.name), _static(a_dims, 1, "A's N", node.name)
    groups = _static(b_dims, 1, "B's groups", node.name) if len(b_dims) == 4 else 0
    f = TensorProto.FLOAT

    def f32(t: str) -> str:
        return t if shapes.get(t, (f,))[0] == f else b.op("Cast", [t], to=f)

    u, dt = f32(io["u"]), f32(io["delta"])
    ax1 = b.const("axes_1", [1], "int64")
    if io["delta_bias"]:
        dt = b.op("Add", [dt, b.op("Unsqueeze", [f32(io["delta_bias"]), ax1])])
    if scan_node.delta_softplus(node):
        big = b.op("Greater", [dt, b.const("threshold", _SOFTPLUS_THRESHOLD, "float32")])
        dt = b.op("Where", [big, dt, b.op("Softplus", [dt])])
    du = b.op("Mul", [dt, u])
    Bf, Cf = f32(io["B"]), f32(io["C"])
    state_shape = b.op("Concat", [b.op("Shape", [u], start=0, end=2), b.const("n", [N], "int64")], axis=0)
    h0 = b.op("ConstantOfShape", [state_shape], value=helper.make_tensor("zero", f, [1], [0.0]))
    time_axis = 3 if groups else 2
    _, y = b.name("h_last"), b.name("y")
    b.nodes.append(helper.make_node(
        "Scan", [h0, dt, du, Bf, Cf], [_, y], name=b.name("Scan"), num_scan_inputs=4,
        scan_input_axes=[2, 2, time_axis, time_axis], scan_output_axes=[2],
        body=_body(b, f32(io["A"]), dim, N, groups)))
    if io["D"]:
        y = b.op("Add", [y, b.op("Mul", [u, b.op("Unsqueeze", [f32(io["D"]), ax1])])])
    if io["z"]:
        z = f32(io["z"])
        y = b.op("Mul", [y, b.op("Mul", [z, b.op("Sigmoid", [z])])])
    if u_type == f:
        b.op("Identity", [y], out=node.output[0])
    else:
        b.op("Cast", [y], out=node.output[0], to=u_type)


def decompose(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every SelectiveScan node replaced by standard ONNX ops."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    shapes = _shapes(out)
    nodes, inits = [], []
    for i, node in enumerate(out.graph.node):
        if node.domain == scan_node.DOMAIN and node.op_type == scan_node.OP_TYPE:
            b = _Builder(node.name or f"SelectiveScan_{i}")
            _decompose_node(node, shapes, b)
            nodes.extend(b.nodes)
            inits.extend(b.inits)
        else:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(inits)
    kept = [o for o in out.opset_import if o.domain != scan_node.DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(kept)
    return out


def recompose(model: onnx.ModelProto, plugin_nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    """Undo `decompose` on a graph derived from its output (e.g. quantized): the plugin nodes return.

    Every tensor the plugin nodes read must still exist under its name; the graph is then
    sorted topologically again.
    """
    prefixes = tuple(n.name + _TAG for n in plugin_nodes)
    keep = [n for n in model.graph.node if not n.name.startswith(prefixes)]
    produced = {o for n in keep for o in n.output} | {i.name for i in model.graph.input} | {
        i.name for i in model.graph.initializer}
    for node in plugin_nodes:
        lost = [t for t in node.input if t and t not in produced]
        if lost:
            raise ValueError(f"{node.name}: inputs {lost} no longer exist in the transformed graph")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend([*keep, *plugin_nodes])
    used = {t for n in out.graph.node for t in n.input}
    inits = [i for i in out.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(inits)
    if not any(o.domain == scan_node.DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(scan_node.DOMAIN, scan_node.OPSET_VERSION))
    return topological(out)
