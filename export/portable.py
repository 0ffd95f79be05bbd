"""The portable form of Contract 2's node: the same math in standard ONNX ops only.

One decomposition serves three uses: `--scan portable` exports (`decompose`); the body of the
model-local function `hsiedge:SelectiveScan` that plugin-mode graphs carry, so that ONNX
Runtime (the parity check and the onnxruntime runner, int8 calibration) and any ONNX tool run
them as they are (`scan_functions.attach_functions`); and running older plugin-mode graphs without those
functions in ONNX Runtime.  Everything is computed in float32 and the output is cast to u's
type (Contract 1).

Forms.  No loop over time steps:

- **straight-line** (L static and L <= T): the recurrence h_t = exp(dt_t A) h_{t-1} +
  dt_t u_t B_t unrolled step by step on (batch, dim, N) slices, y_t = C_t . h_t by MatMul.
  No Loop or Scan op at all.
- **chunked** (L longer, or dynamic): time is cut into chunks of T steps (T = `CHUNK` = 64,
  chosen with `bench/scan_forms.py`), L padded up to a multiple of T with dt = 0 steps (decay
  exactly 1, input 0: the state passes through unchanged; their outputs are dropped).  The
  same unrolled recurrence runs in every chunk at once from a zero state.  The state entering
  each chunk is carried across chunks from each chunk's final state and total decay
  exp(A * sum of its dt) by an ONNX `Scan` over the chunks (trip count L/T, a Mul and an Add on
  (batch, dim, N) per chunk), or by the same steps unrolled when L, hence the number of
  chunks, is static (no loop at all).  Each step t then gets C_t . (exp(A * S_t) * entering
  state), S_t the sum of the chunk's dt up to t: a cumulative decay with exponent <= 0 for
  the models' A < 0, so nothing overflows and nothing is divided.

Layout: time-major (chunks, T, batch, groups, ., dim/groups), so that one step of every
chunk is a Split along axis 1 and the chunks are the carry Scan's natural axis 0; the only
transposes are 2-D ones.  The largest temporaries hold one step of every chunk,
(L/T) x batch x dim x N values, never (batch, dim, L, N); node order keeps only a few of
them alive in ONNX Runtime (see `_recurrence`).  Cost per state element: 2 exps and about
ten elementwise ops, against 1 exp for the sequential scan.

Functions.  `scan_functions.py` wraps the same decomposition as the model-local functions
that plugin-mode graphs carry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hsiedge.export import scan_node

CHUNK = 64  # T: time steps per chunk (bench/scan_forms.py)
FORMS = ("chunked", "per-step")  # per-step: one ONNX Scan over all L steps (earlier versions; for comparison)
_TAG = "/portable/"
_F = TensorProto.FLOAT
ROLES_TYPED_LIKE_U = ("u", "delta", "B", "C", "z")  # the inputs typed like u
_ZERO = helper.make_tensor("zero", _F, [1], [0.0])


@dataclass(frozen=True)
class ScanSpec:
    """What one decomposition is specialised on; None means "read from the tensors at run time".

    `groups`: 0 for B, C of shape (batch, N, L), G for (batch, G, N, L).  `types`: element type
    of u, delta, B, C, z in that order.  `softplus` None reads the node's attribute (function
    bodies only).  `present`: the optional inputs given.
    """

    dim: int | None
    N: int | None
    groups: int | None
    length: int | None
    types: tuple[int | None, ...]
    present: frozenset[str]
    softplus: bool | None

    @property
    def generic(self) -> bool:
        return self.dim is None and self.length is None and self.softplus is None

    def overload(self) -> str:
        """A readable, unique name of this signature (the FunctionProto.overload string)."""
        def v(x) -> str:
            return "x" if x is None else str(x)
        opts = "".join(k for k in ("D", "z", "delta_bias") if k in self.present).replace("delta_bias", "b")
        types = "".join(v(t) for t in self.types)
        return (f"dim{v(self.dim)}_N{v(self.N)}_G{v(self.groups)}_L{v(self.length)}_t{types}"
                f"_{opts or 'none'}_sp{v(None if self.softplus is None else int(self.softplus))}")


GENERIC = ScanSpec(None, None, None, None, (None,) * len(ROLES_TYPED_LIKE_U),
                   frozenset(scan_node.OPTIONAL_INPUTS), None)


def tensor_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, list]]:
    """Tensor name -> (element type, dims as int or str) from inputs, value_info and initializers."""
    out: dict[str, tuple[int, list]] = {}
    for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        out[vi.name] = (t.elem_type, dims)
    for init in model.graph.initializer:
        out[init.name] = (init.data_type, list(init.dims))
    return out


def _static(dims: list | None, i: int) -> int | None:
    if dims is None or len(dims) <= i or not isinstance(dims[i], int) or dims[i] <= 0:
        return None
    return int(dims[i])


def node_spec(node: onnx.NodeProto, shapes: dict[str, tuple[int, list]]) -> ScanSpec:
    """The signature of one SelectiveScan call, from what the graph states about its inputs."""
    io = scan_node.node_inputs(node)
    a_dims = shapes.get(io["A"], (None, None))[1]
    b_dims = shapes.get(io["B"], (None, None))[1]
    u_dims = shapes.get(io["u"], (None, None))[1]
    ranks = {3: 0, 4: _static(b_dims, 1)}
    groups = ranks.get(len(b_dims)) if b_dims is not None else None  # None: unknown
    types = tuple((shapes.get(io[r], (None,))[0] or None) if io[r] else None for r in ROLES_TYPED_LIKE_U)
    return ScanSpec(dim=_static(a_dims, 0), N=_static(a_dims, 1), groups=groups, length=_static(u_dims, 2),
                    types=types, present=frozenset(r for r in scan_node.OPTIONAL_INPUTS if io[r]),
                    softplus=scan_node.delta_softplus(node))


class Builder:
    """Nodes (and, in a graph, initializers) of one decomposition, all named under one prefix.

    In a function body there are no initializers: constants become Constant nodes.
    """

    def __init__(self, prefix: str, inline_constants: bool = False) -> None:
        self.prefix, self.inline = prefix, inline_constants
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, what: str) -> str:
        self._n += 1
        return f"{self.prefix}{_TAG}{what}_{self._n}"

    def const(self, what: str, value, dtype=None) -> str:
        name = self.name(what)
        tensor = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        if self.inline:
            node = helper.make_node("Constant", [], [name], name=self.name("Constant"), value=tensor)
            self.nodes.append(node)
        else:
            self.inits.append(tensor)
        return name

    def ints(self, values: list[int]) -> str:
        return self.const("ints", list(values), "int64")

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs) -> str:
        out = out or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type), **attrs))
        return out

    def ops(self, op_type: str, inputs: list[str], n: int, **attrs) -> list[str]:
        outs = [self.name(op_type.lower()) for _ in range(n)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), **attrs))
        return outs

    def shape(self, parts: list[int | str]) -> str:
        """A 1-D int64 shape from static ints and 1-element runtime tensors."""
        if all(isinstance(p, int) for p in parts):
            return self.ints(parts)
        groups: list[str] = []
        run: list[int] = []
        for p in parts:
            if isinstance(p, int):
                run.append(p)
                continue
            if run:
                groups.append(self.ints(run))
                run = []
            groups.append(p)
        if run:
            groups.append(self.ints(run))
        return self.op("Concat", groups, axis=0)

    def dim_of(self, tensor: str, axis: int) -> str:
        """Size of `axis` (>= 0) of `tensor` at run time, as a 1-element int64 tensor."""
        return self.op("Shape", [tensor], start=axis, end=axis + 1)


def _softplus(b: Builder, x: str) -> str:
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), log1p(e) = log(u) - ((u - 1) - e) / u with
    u = 1 + e: within 4 ulp of the exact value for every float32 x, no overflow, and in ONNX
    Runtime 2.5x faster than its Softplus op (whose x > 20 cut-off torch shares: there both
    give x)."""
    one = b.const("one", 1.0, "float32")
    e = b.op("Exp", [b.op("Neg", [b.op("Abs", [x])])])
    u = b.op("Add", [e, one])
    log1p = b.op("Sub", [b.op("Log", [u]), b.op("Div", [b.op("Sub", [b.op("Sub", [u, one]), e]), u])])
    return b.op("Add", [b.op("Relu", [x]), log1p])


def _f32(b: Builder, name: str, elem: int | None) -> str:
    return name if elem == _F else b.op("Cast", [name], to=_F)


def emit(b: Builder, io: dict[str, str], spec: ScanSpec, out: str, chunk: int = CHUNK,
          form: str = "chunked") -> None:
    """Nodes computing Contract 1 from the tensors named in `io` into `out`."""
    t = dict(zip(ROLES_TYPED_LIKE_U, spec.types, strict=True))
    u, dt = _f32(b, io["u"], t["u"]), _f32(b, io["delta"], t["delta"])
    last = b.ints([-1])
    if "delta_bias" in spec.present:
        dt = b.op("Add", [dt, b.op("Unsqueeze", [_f32(b, io["delta_bias"], _F), last])])
    if spec.softplus is not False:
        soft = _softplus(b, dt)
        if spec.softplus is None:  # the calling node's attribute, through an attribute reference
            flag = onnx.AttributeProto(name="value_int", type=onnx.AttributeProto.INT,
                                       ref_attr_name="delta_softplus")
            on = b.name("delta_softplus")
            b.nodes.append(helper.make_node("Constant", [], [on], name=b.name("Constant")))
            b.nodes[-1].attribute.append(flag)
            soft = b.op("Where", [b.op("Cast", [on], to=TensorProto.BOOL), soft, dt])
        dt = soft
    if spec.groups == 0:
        Bg, Cg = (b.op("Unsqueeze", [io[r], b.ints([1])]) for r in ("B", "C"))
    elif spec.groups is None:  # (b, N, L) or (b, G, N, L) -> (b, G, N, L)
        def grouped(x: str) -> str:
            return b.op("Reshape", [x, b.shape([b.dim_of(x, 0), -1, b.op("Shape", [x], start=-2)])])
        Bg, Cg = grouped(io["B"]), grouped(io["C"])
    else:
        Bg, Cg = io["B"], io["C"]
    recurrence = _per_step if form == "per-step" else _recurrence
    y = recurrence(b, u, dt, _f32(b, io["A"], _F), _f32(b, Bg, t["B"]), _f32(b, Cg, t["C"]), spec, chunk)
    if "D" in spec.present:
        y = b.op("Add", [y, b.op("Mul", [u, b.op("Unsqueeze", [_f32(b, io["D"], _F), last])])])
    if "z" in spec.present:
        z = _f32(b, io["z"], t["z"])
        y = b.op("Mul", [y, b.op("Mul", [z, b.op("Sigmoid", [z])])])
    if t["u"] is None:
        b.op("CastLike", [y, io["u"]], out=out)
    elif t["u"] == _F:
        b.op("Identity", [y], out=out)
    else:
        b.op("Cast", [y], out=out, to=t["u"])


def chunking(length: int | None, chunk: int = CHUNK) -> tuple[int, int | None]:
    """(T, number of chunks) for a static length, (`chunk`, None) for a dynamic one.

    A static length is cut into the fewest chunks of at most `chunk` steps, all of one size, so
    that it needs the least padding (169 -> 3 chunks of 57: 2 padded steps, not 23).
    """
    if length is None:
        return chunk, None
    chunks = math.ceil(length / chunk)
    return math.ceil(length / chunks), chunks


def _sizes(b: Builder, u: str, A: str, Bg: str, spec: ScanSpec) -> tuple:
    """(groups, channels per group, dim, N): static ints where the spec knows them, else
    1-element tensors read at run time."""
    if spec.dim is not None and spec.groups is not None:
        G = max(spec.groups, 1)
        return G, spec.dim // G, spec.dim, (spec.N if spec.N is not None else b.dim_of(A, 1))
    groups, dim = b.dim_of(Bg, 1), b.dim_of(u, 1)
    return groups, b.op("Div", [dim, groups]), dim, (spec.N if spec.N is not None else b.dim_of(A, 1))


def _recurrence(b: Builder, u: str, dt: str, A: str, Bg: str, Cg: str, spec: ScanSpec,
                chunk: int = CHUNK) -> str:
    """h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t ; y_t = <h_t, C_t>, float32 (b, dim, L) out.

    u, dt: (b, dim, L); A: (dim, N); Bg, Cg: (b, G, N, L).
    """
    groups, dpg, dim, N = _sizes(b, u, A, Bg, spec)
    T, chunks = chunking(spec.length, chunk)
    du = b.op("Mul", [dt, u])
    length = None
    if chunks is None:  # pad at run time to a multiple of T with dt = 0 steps
        length = b.dim_of(u, 2)
        Tc = b.ints([T])
        pad = b.op("Mod", [b.op("Sub", [Tc, b.op("Mod", [length, Tc])]), Tc])
        pads3 = b.op("Concat", [b.ints([0] * 5), pad], axis=0)
        pads4 = b.op("Concat", [b.ints([0] * 7), pad], axis=0)
        dt, du = b.op("Pad", [dt, pads3]), b.op("Pad", [du, pads3])
        Bg, Cg = b.op("Pad", [Bg, pads4]), b.op("Pad", [Cg, pads4])
    elif chunks * T != spec.length:
        extra = chunks * T - spec.length
        pads3, pads4 = b.ints([0] * 5 + [extra]), b.ints([0] * 7 + [extra])
        dt, du = b.op("Pad", [dt, pads3]), b.op("Pad", [du, pads3])
        Bg, Cg = b.op("Pad", [Bg, pads4]), b.op("Pad", [Cg, pads4])

    # Time-major: (nc, T, b, G, ., .), so that one step of every chunk is a Split along axis 1
    # (blocks of b*dim contiguous values), and the chunks are the Scan's natural axis 0.  The
    # only transposes are 2-D ones of (rows, Lp), which ONNX Runtime does fast (its N-d
    # transposes that move two axes were 20x slower for the same bytes).
    batch = b.dim_of(u, 0)

    def time_major(x: str, rows: int, inner: list) -> str:  # (..., Lp) -> (nc, T, b, G, *inner)
        x = b.op("Transpose", [b.op("Flatten", [x], axis=rows)], perm=[1, 0])  # (Lp, b*G*...)
        return b.op("Reshape", [x, b.shape([-1, T, batch, groups, *inner])])

    dtc, duc = time_major(dt, 2, [1, dpg]), time_major(du, 2, [1, dpg])
    Bc, Cc = time_major(Bg, 3, [N, 1]), time_major(Cg, 3, [1, N])  # B_t (.., N, 1), C_t (.., 1, N)
    At = b.op("Transpose", [b.op("Reshape", [A, b.shape([groups, dpg, N])])], perm=[0, 2, 1])  # (G, N, dpg)

    def split(x: str) -> list[str]:
        return b.ops("Split", [x], T, axis=1, num_outputs=T) if T > 1 else [x]

    dts, dus, Bs, Cs = split(dtc), split(duc), split(Bc), split(Cc)

    states: list[str] = []  # every chunk from a zero state
    for k in range(T):
        dBu = b.op("Mul", [dus[k], Bs[k]])  # (nc, 1, b, G, N, dpg)
        if not states:
            states.append(dBu)
        else:
            decay_k = b.op("Exp", [b.op("Mul", [dts[k], At])])
            states.append(b.op("Add", [b.op("Mul", [decay_k, states[-1]]), dBu]))
    corrections: list[str] = []
    if chunks != 1:
        # S_t: dt summed over the chunk up to t; the state entering a chunk reaches its step t
        # decayed by exp(A * S_t) (exponent <= 0 for A < 0: no overflow, nothing divided)
        sums = [dts[0]]
        for k in range(1, T):
            sums.append(b.op("Add", [sums[-1], dts[k]]))
        decay = b.op("Exp", [b.op("Mul", [sums[-1], At])])  # the whole chunk's
        entering = _carry(b, decay, states[-1], chunks)
        for k in range(T):
            reach = decay if k == T - 1 else b.op("Exp", [b.op("Mul", [sums[k], At])])
            corrections.append(b.op("MatMul", [Cs[k], b.op("Mul", [reach, entering])]))
        corrections = [b.op("Concat", corrections, axis=1) if T > 1 else corrections[0]]
    # Emission order is peak memory for ONNX Runtime, which orders nodes by a depth-first search
    # from the outputs that takes a node's highest-numbered input first: the outputs C_t . h_t
    # come last and in reverse, so that each is taken right after its state and the states are
    # freed one by one (otherwise all T states of every chunk live at once), and the corrections
    # are concatenated before the outputs so that they are taken after them.
    ys = [b.op("MatMul", [Cs[k], states[k]]) for k in reversed(range(T))][::-1]  # (nc, 1, b, G, 1, dpg)
    y = b.op("Concat", ys, axis=1) if T > 1 else ys[0]  # (nc, T, b, G, 1, dpg)
    if corrections:
        y = b.op("Add", [y, corrections[0]])
    y = b.op("Transpose", [b.op("Flatten", [y], axis=2)], perm=[1, 0])  # (b*dim, Lp)
    y = b.op("Reshape", [y, b.shape([batch, dim, -1])])
    if length is not None:
        y = b.op("Slice", [y, b.ints([0]), length, b.ints([2])])
    elif chunks * T != spec.length:
        y = b.op("Slice", [y, b.ints([0]), b.ints([spec.length]), b.ints([2])])
    return y


def _carry(b: Builder, decay: str, last: str, chunks: int | None) -> str:
    """The state entering each chunk, (nc, 1, b, G, N, dpg), from each chunk's total decay and
    final state from zero: s_0 = 0, s_{c+1} = decay_c * s_c + last_c."""
    if chunks is not None:  # static: unrolled
        ds = b.ops("Split", [decay], chunks, axis=0, num_outputs=chunks)
        ls = b.ops("Split", [last], chunks, axis=0, num_outputs=chunks)
        states = [b.op("ConstantOfShape", [b.op("Shape", [ls[0]])], value=_ZERO), ls[0]]
        for c in range(1, chunks - 1):
            states.append(b.op("Add", [b.op("Mul", [ds[c], states[-1]]), ls[c]]))
        return b.op("Concat", states, axis=0)
    # dynamic: a Scan over the chunks (axis 0), state (1, b, G, N, dpg)
    s0 = b.op("ConstantOfShape", [b.op("Shape", [decay], start=1)], value=_ZERO)
    body = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["s_in"], name=b.name("carry_Identity")),
         helper.make_node("Mul", ["d", "s"], ["ds"], name=b.name("carry_Mul")),
         helper.make_node("Add", ["ds", "e"], ["s_next"], name=b.name("carry_Add"))],
        b.name("carry").replace("/", "_"),
        [helper.make_tensor_value_info(n, _F, None) for n in ("s", "d", "e")],
        [helper.make_tensor_value_info(n, _F, None) for n in ("s_next", "s_in")])
    _, entering = b.ops("Scan", [s0, decay, last], 2, num_scan_inputs=2, body=body)
    return entering


def _per_step(b: Builder, u: str, dt: str, A: str, Bg: str, Cg: str, spec: ScanSpec,
              chunk: int = CHUNK) -> str:
    """The form of earlier versions, kept for comparison (bench/scan_forms.py): one ONNX Scan
    over all L time steps carrying the (b, G, dim/G, N) state, B_t and C_t unsqueezed in its body."""
    groups, dpg, dim, N = _sizes(b, u, A, Bg, spec)
    per_group = b.shape([0, groups, dpg, -1])
    dt4, du4 = b.op("Reshape", [dt, per_group]), b.op("Reshape", [b.op("Mul", [dt, u]), per_group])
    At = b.op("Reshape", [A, b.shape([groups, dpg, N])])  # (G, dpg, N)
    state = b.op("Concat", [b.op("Shape", [dt4], start=0, end=3), b.shape([N])], axis=0)
    h0 = b.op("ConstantOfShape", [state], value=_ZERO)
    body = Builder(b.prefix + "/step")
    last, ax2 = b.ints([-1]), b.ints([2])  # outer-scope constants, visible in the body
    dA = body.op("Exp", [body.op("Mul", [body.op("Unsqueeze", ["dt_t", last]), At])])
    dBu = body.op("Mul", [body.op("Unsqueeze", ["du_t", last]), body.op("Unsqueeze", ["B_t", ax2])])
    body.op("Add", [body.op("Mul", [dA, "h"]), dBu], out="h_next")
    body.op("ReduceSum", [body.op("Mul", ["h_next", body.op("Unsqueeze", ["C_t", ax2])]), last], out="y_t",
            keepdims=0)
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(body.nodes, b.name("step").replace("/", "_"),
                              [vi(n, _F, None) for n in ("h", "dt_t", "du_t", "B_t", "C_t")],
                              [vi("h_next", _F, None), vi("y_t", _F, None)])
    _, y = b.ops("Scan", [h0, dt4, du4, Bg, Cg], 2, num_scan_inputs=4, scan_input_axes=[3, 3, 3, 3],
                 scan_output_axes=[3], body=graph)
    return b.op("Reshape", [y, b.shape([0, dim, -1])])


def _is_scan(node: onnx.NodeProto) -> bool:
    return node.domain == scan_node.DOMAIN and node.op_type == scan_node.OP_TYPE


def decompose(model: onnx.ModelProto, *, chunk: int = CHUNK, form: str = "chunked") -> onnx.ModelProto:
    """A copy of `model` with every SelectiveScan node replaced by standard ONNX ops (and its
    SelectiveScan functions and the hsiedge opset import dropped).

    `chunk`: time steps per chunk (T); `form`: "chunked" (straight-line for short static L), or
    "per-step" (one Scan over all L steps, the earlier form, for comparison)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    shapes = tensor_shapes(out)
    nodes, inits = [], []
    for i, node in enumerate(out.graph.node):
        if _is_scan(node):
            b = Builder(node.name or f"SelectiveScan_{i}")
            emit(b, scan_node.node_inputs(node), node_spec(node, shapes), node.output[0], chunk, form)
            nodes.extend(b.nodes)
            inits.extend(b.inits)
        else:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(inits)
    drop_functions(out)
    kept = [o for o in out.opset_import if o.domain != scan_node.DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(kept)
    return out


def drop_functions(model: onnx.ModelProto) -> None:
    """Remove the model's `hsiedge:SelectiveScan` functions (in place)."""
    keep = [f for f in model.functions if (f.domain, f.name) != (scan_node.DOMAIN, scan_node.OP_TYPE)]
    del model.functions[:]
    model.functions.extend(keep)
