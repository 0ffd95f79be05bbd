"""The portable decomposition of Contract 2's node, run in ONNX Runtime, against the float64
NumPy reference: its straight-line, chunked and generic forms, and the model-local function
that lets plugin-mode graphs run as they are."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import np_selective_scan
from onnx import TensorProto, helper, numpy_helper

from hsiedge.export import portable, scan_functions, scan_node

T = portable.CHUNK


def scan_node_proto(names: list[str], out: str, softplus: bool, name: str) -> onnx.NodeProto:
    return helper.make_node(scan_node.OP_TYPE, names, [out], domain=scan_node.DOMAIN, name=name,
                            delta_softplus=int(softplus), plugin_version="1", plugin_namespace="hsiedge")


def scan_graph(shapes: dict, present: dict, softplus: bool, half: bool,
               static: bool = False) -> onnx.ModelProto:
    """A graph holding one SelectiveScan node; u, delta, B, C, z are inputs (dynamic batch and L
    unless `static`)."""
    scan_node.register_schema()
    t = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    inputs, names = [], []
    for role in scan_node.INPUTS:
        if not present.get(role, True):
            names.append("")
            continue
        names.append(role)
        dims = list(shapes[role])
        elem = TensorProto.FLOAT if role in scan_node.FLOAT32_INPUTS else t
        if role not in scan_node.FLOAT32_INPUTS and not static:
            dims[0], dims[-1] = "batch", "L"
        inputs.append(helper.make_tensor_value_info(role, elem, dims))
    u = shapes["u"]
    y = helper.make_tensor_value_info("y", t, list(u) if static else ["batch", u[1], "L"])
    graph = helper.make_graph([scan_node_proto(names, "y", softplus, "scan0")], "g", inputs, [y])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                                  helper.make_opsetid(scan_node.DOMAIN, 1)])


def random_arrays(rng, batch: int, dim: int, L: int, N: int, groups: int, softplus: bool) -> dict:
    bc = (batch, groups, N, L) if groups else (batch, N, L)
    arrays = {
        "u": rng.standard_normal((batch, dim, L)),
        "delta": rng.standard_normal((batch, dim, L)) * 0.5,
        "A": -np.exp(rng.standard_normal((dim, N)) * 0.5), "B": rng.standard_normal(bc),
        "C": rng.standard_normal(bc), "D": rng.standard_normal(dim),
        "z": rng.standard_normal((batch, dim, L)),
        "delta_bias": rng.standard_normal(dim) * 0.3,
    }
    if not softplus:  # dt >= 0 (a negative dt makes the recurrence itself grow)
        arrays["delta"], arrays["delta_bias"] = np.abs(arrays["delta"]), np.abs(arrays["delta_bias"])
    return arrays


def run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def feeds_of(arrays: dict, present: dict, half: bool = False) -> dict:
    t = np.float16 if half else np.float32
    return {k: v.astype(np.float32 if k in scan_node.FLOAT32_INPUTS else t) for k, v in arrays.items()
            if present.get(k, True)}


def reference(arrays: dict, present: dict, softplus: bool) -> np.ndarray:
    return np_selective_scan(**{k: (v if present.get(k, True) else None) for k, v in arrays.items()},
                             delta_softplus=softplus)


def all_nodes(nodes):
    for n in nodes:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(a.g.node)


def loops(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type in ("Loop", "Scan")]


# (batch, dim, L, N, groups, static L); groups 0: B, C are (batch, N, L).  Long dynamic L: not a
# multiple of T, shorter than T, 1; static L: straight-line (<= T) or chunked (> T, no loop).
CASES = [
    (1, 16, 3001, 8, 0, False), (2, 24, 37, 16, 2, False), (3, 8, 1, 4, 0, False),
    (2, 12, 2 * T, 4, 3, False),
    (5, 24, 4, 16, 0, True), (4, 16, 13, 8, 2, True), (3, 8, 1, 16, 0, True), (2, 16, T, 4, 0, True),
    (2, 16, 169, 8, 4, True), (1, 8, 3 * T + 1, 4, 0, True),
]
# Every combination of z / D / delta_bias / softplus, cycling through the shapes; then every
# shape with all of them.
COMBOS = list(zip(itertools.cycle(CASES), itertools.product([True, False], repeat=4), strict=False))
COMBOS += [(c, (True, True, True, True)) for c in CASES]


@pytest.mark.parametrize("case,opts", COMBOS, ids=lambda v: "-".join(map(str, v)))
def test_decomposition_matches_float64_reference(case, opts):
    batch, dim, L, N, groups, static = case
    use_z, use_D, use_bias, softplus = opts
    rng = np.random.default_rng(abs(hash((case, opts))) % 2**32)
    arrays = random_arrays(rng, batch, dim, L, N, groups, softplus)
    present = {"z": use_z, "D": use_D, "delta_bias": use_bias}
    model = portable.decompose(scan_graph({k: v.shape for k, v in arrays.items()}, present, softplus, False,
                                          static=static))
    assert all(n.domain == "" for n in all_nodes(model.graph.node))
    assert not model.functions and all(o.domain == "" for o in model.opset_import)
    onnx.checker.check_model(model, full_check=True)
    if static:
        assert not loops(model)  # straight-line, or chunks carried by unrolled steps
    else:  # one Scan, over chunks (trip count ceil(L / T)), with a tiny body
        (scan,) = loops(model)
        body = scan.attribute[[a.name for a in scan.attribute].index("body")].g
        assert sorted(n.op_type for n in body.node) == ["Add", "Identity", "Mul"]
    (y,) = run(model, feeds_of(arrays, present))
    ref = reference(arrays, present, softplus)
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert np.abs(y - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("form,chunk", [("chunked", 16), ("chunked", 1), ("per-step", portable.CHUNK)])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5], CASES[8]], ids=str)
def test_other_chunk_sizes_and_the_per_step_form(case, form, chunk):
    # other T, and the earlier per-step Scan that bench/scan_forms.py compares against
    batch, dim, L, N, groups, static = case
    arrays = random_arrays(np.random.default_rng(L), batch, dim, L, N, groups, True)
    plugin = scan_graph({k: v.shape for k, v in arrays.items()}, {}, True, False, static=static)
    model = portable.decompose(plugin, chunk=chunk, form=form)
    if form == "per-step":
        (scan,) = loops(model)
        assert [a.i for a in scan.attribute if a.name == "num_scan_inputs"] == [4]
    (y,) = run(model, feeds_of(arrays, {}))
    ref = reference(arrays, {}, True)
    assert np.abs(y - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_decompose_refuses_unknown_options():
    model = scan_graph({"u": (1, 8, 4), "delta": (1, 8, 4), "A": (8, 4), "B": (1, 4, 4), "C": (1, 4, 4),
                        "D": (8,), "z": (1, 8, 4), "delta_bias": (8,)}, {}, True, False)
    with pytest.raises(ValueError, match="form"):
        portable.decompose(model, form="loop")
    with pytest.raises(ValueError, match="chunk"):
        portable.decompose(model, chunk=0)


@pytest.mark.parametrize("L,static", [(500, False), (7, True), (150, True)])
def test_half_scan_accumulates_in_float32(L, static):
    rng = np.random.default_rng(7)
    arrays = random_arrays(rng, 2, 32, L, 16, 0, True)
    shapes = {k: v.shape for k, v in arrays.items()}
    model = portable.decompose(scan_graph(shapes, {}, True, True, static=static))
    feeds = feeds_of(arrays, {}, half=True)
    (y,) = run(model, feeds)
    assert y.dtype == np.float16
    ref = np_selective_scan(**{k: v.astype(np.float64) for k, v in feeds.items()}, delta_softplus=True)
    assert np.abs(y.astype(np.float64) - ref).max() <= 2e-3 * np.abs(ref).max()


def test_large_decays_neither_overflow_nor_lose_the_state():
    # |A| * dt up to ~1e3 within a chunk: exp(A * sum dt) underflows to 0, nothing is divided.
    rng = np.random.default_rng(11)
    arrays = random_arrays(rng, 1, 8, 700, 4, 0, False)
    arrays["A"] = -np.exp(rng.uniform(-3, 4, (8, 4)))  # -0.05 ... -55
    arrays["delta"] = np.where(rng.random((1, 8, 700)) < 0.2, 20.0, 0.01)
    model = portable.decompose(scan_graph({k: v.shape for k, v in arrays.items()}, {}, False, False))
    (y,) = run(model, feeds_of(arrays, {}))
    ref = reference(arrays, {}, False)
    assert np.isfinite(y).all()
    assert np.abs(y - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


# (batch, dim, L, N, groups, static L, optional inputs given, softplus)
CALLS = [
    (1, 16, 300, 8, 2, False, ("D", "z", "delta_bias"), True),  # long, dynamic, grouped
    (30, 10, 10, 4, 0, True, ("D",), True),  # short static, no z, no delta_bias
    (2, 8, 21, 4, 0, True, ("z", "delta_bias"), False),  # no D, no softplus
    (2, 8, 150, 4, 0, True, ("D", "z", "delta_bias"), False),  # static, chunked
]


def plugin_model(calls, half: bool) -> tuple[onnx.ModelProto, dict, list[np.ndarray]]:
    """A plugin-mode graph with one SelectiveScan node per call (A, D, delta_bias as initializers,
    the rest as inputs), its feeds and the float64 reference of each output."""
    scan_node.register_schema()
    rng = np.random.default_rng(5)
    t = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    vi = helper.make_tensor_value_info
    nodes, inputs, outputs, inits, feeds, refs = [], [], [], [], {}, []
    for i, (batch, dim, L, N, groups, static, given, softplus) in enumerate(calls):
        arrays = random_arrays(rng, batch, dim, L, N, groups, softplus)
        present = {k: k in given for k in scan_node.OPTIONAL_INPUTS}
        names = []
        for role in scan_node.INPUTS:
            if not present.get(role, True):
                names.append("")
                continue
            name = f"s{i}_{role}"
            names.append(name)
            value = feeds_of({role: arrays[role]}, {}, half)[role]
            if role in scan_node.FLOAT32_INPUTS:
                inits.append(numpy_helper.from_array(value, name))
            else:
                dims = list(value.shape) if static else ["batch", *value.shape[1:-1], f"L{i}"]
                inputs.append(vi(name, t, dims))
                feeds[name] = value
        nodes.append(scan_node_proto(names, f"y{i}", softplus, f"scan{i}"))
        outputs.append(vi(f"y{i}", t, [batch, dim, L] if static else ["batch", dim, f"L{i}"]))
        f64 = {k: v.astype(np.float64) for k, v in feeds_of(arrays, present, half).items()}
        refs.append(reference(f64, present, softplus))
    graph = helper.make_graph(nodes, "scans", inputs, outputs, inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                                   helper.make_opsetid(scan_node.DOMAIN, 1)])
    return model, feeds, refs


def assert_close(outs: list[np.ndarray], refs: list[np.ndarray], half: bool) -> None:
    tol = 2e-3 if half else 1e-5
    for y, ref in zip(outs, refs, strict=True):
        assert y.dtype == (np.float16 if half else np.float32) and y.shape == ref.shape
        assert np.abs(y.astype(np.float64) - ref).max() <= tol * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("half", [False, True])
def test_plugin_graph_runs_as_is_through_its_model_local_functions(half):
    plugin, feeds, refs = plugin_model(CALLS, half)
    model = scan_functions.attach_functions(plugin)
    assert scan_functions.runs_as_is(model) and not scan_functions.runs_as_is(plugin)
    # the nodes are still exactly Contract 2's (op_type, domain, inputs, attributes); each names its overload
    for old, node in zip(plugin.graph.node, model.graph.node, strict=True):
        assert (node.op_type, node.domain, list(node.input), list(node.attribute)) == (
            old.op_type, old.domain, list(old.input), list(old.attribute))
        scan_node.check_node(node)
        assert node.overload
    funcs = [(f.domain, f.name, f.overload) for f in model.functions]
    assert funcs[0] == (scan_node.DOMAIN, scan_node.OP_TYPE, "")  # the generic body comes first
    assert len(funcs) == 1 + len(CALLS) == len(set(funcs))
    assert model.ir_version >= 10
    onnx.checker.check_model(model, full_check=True)
    outs = run(model, feeds)  # ONNX Runtime inlines the functions: nothing decomposed by hand
    assert_close(outs, refs, half)
    # each function body is the portable decomposition of its calls
    for a, b in zip(outs, run(portable.decompose(model), feeds), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("half", [False, True])
def test_generic_function_serves_every_call(half):
    # What TensorRT's parser imports when no plugin is registered (it ignores `overload` and takes
    # the first function of the name): one body, sizes read at run time, B/C grouped or not,
    # delta_softplus through an attribute reference, all eight inputs given.
    calls = [(*c[:6], ("D", "z", "delta_bias"), c[7]) for c in CALLS]
    plugin, feeds, refs = plugin_model(calls, half)
    model = scan_functions.attach_functions(plugin)
    for node in model.graph.node:
        node.overload = ""
    generic = [f for f in model.functions if f.overload == ""]
    del model.functions[:]
    model.functions.extend(generic)
    onnx.checker.check_model(model, full_check=True)
    assert_close(run(model, feeds), refs, half)


def test_generic_form_when_sizes_are_unknown():
    # A's and B's sizes unknown to the graph: decompose reads them at run time instead of refusing.
    rng = np.random.default_rng(2)
    arrays = random_arrays(rng, 2, 12, 90, 4, 3, True)
    model = scan_graph({k: v.shape for k, v in arrays.items()}, {}, True, False)
    for vi in model.graph.input:
        if vi.name in ("A", "B", "C"):
            for d in vi.type.tensor_type.shape.dim:
                d.dim_param = "s"
    (y,) = run(portable.decompose(model), feeds_of(arrays, {}))
    ref = reference(arrays, {}, True)
    assert np.abs(y - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_chunking_of_static_lengths():
    assert portable.chunking(None) == (T, None)
    assert portable.chunking(4) == (4, 1) and portable.chunking(T) == (T, 1)
    assert portable.chunking(169) == (57, 3)  # 2 padded steps, not 23
    assert portable.chunking(16384) == (T, 16384 // T)


def test_initializer_inputs_are_used_by_name():
    # A, D and delta_bias as initializers (what the exporter produces) rather than graph inputs.
    rng = np.random.default_rng(3)
    dim, N, L = 16, 8, 11
    A, D, db = -np.exp(rng.standard_normal((dim, N))), rng.standard_normal(dim), rng.standard_normal(dim)
    model = scan_graph({"u": (1, dim, L), "delta": (1, dim, L), "A": (dim, N), "B": (1, N, L), "C": (1, N, L),
                        "D": (dim,), "z": (1, dim, L), "delta_bias": (dim,)}, {}, True, False)
    keep = [i for i in model.graph.input if i.name not in ("A", "D", "delta_bias")]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    model.graph.initializer.extend([numpy_helper.from_array(v.astype(np.float32), k)
                                    for k, v in (("A", A), ("D", D), ("delta_bias", db))])
    feeds = {"u": rng.standard_normal((1, dim, L)), "delta": rng.standard_normal((1, dim, L)),
             "B": rng.standard_normal((1, N, L)), "C": rng.standard_normal((1, N, L)),
             "z": rng.standard_normal((1, dim, L))}
    (y,) = run(portable.decompose(model), {k: v.astype(np.float32) for k, v in feeds.items()})
    ref = np_selective_scan(A=A.astype(np.float32), D=D.astype(np.float32), delta_bias=db.astype(np.float32),
                            delta_softplus=True, **{k: v.astype(np.float32) for k, v in feeds.items()})
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
