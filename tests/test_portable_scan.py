"""The portable decomposition of Contract 2's node against the float64 NumPy reference."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import np_selective_scan
from onnx import TensorProto, helper, numpy_helper

from hsiedge.export import portable, scan_node


def scan_graph(shapes: dict, present: dict, softplus: bool, half: bool) -> onnx.ModelProto:
    """A graph holding one SelectiveScan node; u, delta, B, C, z are inputs (dynamic batch and L)."""
    scan_node.register_schema()
    t = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    inputs, names = [], []
    for role in scan_node.INPUTS:
        if not present.get(role, True):
            names.append("")
            continue
        names.append(role)
        dims = shapes[role]
        elem = TensorProto.FLOAT if role in scan_node.FLOAT32_INPUTS else t
        sym = ["batch" if i == 0 and role not in scan_node.FLOAT32_INPUTS else d for i, d in enumerate(dims)]
        if role not in scan_node.FLOAT32_INPUTS:
            sym[-1] = "L"
        inputs.append(helper.make_tensor_value_info(role, elem, sym))
    node = helper.make_node(scan_node.OP_TYPE, names, ["y"], domain=scan_node.DOMAIN, name="scan0",
                            delta_softplus=int(softplus), plugin_version="1", plugin_namespace="hsiedge")
    y = helper.make_tensor_value_info("y", t, ["batch", shapes["u"][1], "L"])
    graph = helper.make_graph([node], "g", inputs, [y])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 18),
                                                                  helper.make_opsetid(scan_node.DOMAIN, 1)])


CASES = [  # (batch, dim, L, N, groups)  groups 0: B, C are (batch, N, L)
    (3, 24, 1, 16, 0), (2, 64, 37, 16, 0), (1, 32, 400, 4, 0), (5, 24, 9, 16, 2), (2, 48, 50, 8, 4),
    (256, 8, 4, 16, 0),
]


# Every combination of z / D / delta_bias / softplus, cycling through the shapes.
COMBOS = [*zip(itertools.cycle(CASES), itertools.product([True, False], repeat=4)),
          ((2, 24, 13, 16, 3), (True, True, True, True))]


@pytest.mark.parametrize("case,opts", COMBOS)
def test_decomposition_matches_float64_reference(case, opts):
    batch, dim, L, N, groups = case
    use_z, use_D, use_bias, softplus = opts
    rng = np.random.default_rng(hash((case, opts)) % 2**32)
    bc = (batch, groups, N, L) if groups else (batch, N, L)
    arrays = {
        "u": rng.standard_normal((batch, dim, L)),
        "delta": rng.standard_normal((batch, dim, L)) * 0.5,
        "A": -np.exp(rng.standard_normal((dim, N)) * 0.5), "B": rng.standard_normal(bc),
        "C": rng.standard_normal(bc), "D": rng.standard_normal(dim),
        "z": rng.standard_normal((batch, dim, L)),
        "delta_bias": rng.standard_normal(dim) * 0.3,
    }
    if not softplus:
        arrays["delta"] = np.abs(arrays["delta"])
    present = {"z": use_z, "D": use_D, "delta_bias": use_bias}
    model = portable.decompose(scan_graph({k: v.shape for k, v in arrays.items()}, present, softplus, False))
    assert all(n.domain == "" for n in model.graph.node)
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {k: v.astype(np.float32) for k, v in arrays.items()
             if present.get(k, True) and k in {i.name for i in sess.get_inputs()}}
    (y,) = sess.run(None, feeds)
    ref = np_selective_scan(**{k: (v if present.get(k, True) else None) for k, v in arrays.items()},
                            delta_softplus=softplus)
    assert np.abs(y - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_half_scan_accumulates_in_float32():
    rng = np.random.default_rng(7)
    batch, dim, L, N = 2, 32, 500, 16
    arrays = {"u": rng.standard_normal((batch, dim, L)), "delta": rng.standard_normal((batch, dim, L)),
              "A": -np.exp(rng.standard_normal((dim, N)) * 0.5), "B": rng.standard_normal((batch, N, L)),
              "C": rng.standard_normal((batch, N, L)), "D": rng.standard_normal(dim),
              "z": rng.standard_normal((batch, dim, L)), "delta_bias": rng.standard_normal(dim)}
    model = portable.decompose(scan_graph({k: v.shape for k, v in arrays.items()}, {}, True, True))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {k: v.astype(np.float32 if k in scan_node.FLOAT32_INPUTS else np.float16)
             for k, v in arrays.items()}
    (y,) = sess.run(None, feeds)
    assert y.dtype == np.float16
    ref = np_selective_scan(**{k: v.astype(np.float64) for k, v in feeds.items()}, delta_softplus=True)
    assert np.abs(y.astype(np.float64) - ref).max() <= 2e-3 * np.abs(ref).max()


def test_recompose_restores_the_plugin_node():
    shapes = {"u": (1, 8, 4), "delta": (1, 8, 4), "A": (8, 4), "B": (1, 4, 4), "C": (1, 4, 4), "D": (8,),
              "z": (1, 8, 4), "delta_bias": (8,)}
    plugin = scan_graph(shapes, {}, True, False)
    back = portable.recompose(portable.decompose(plugin), list(plugin.graph.node))
    assert [(n.op_type, n.domain) for n in back.graph.node] == [(scan_node.OP_TYPE, scan_node.DOMAIN)]
    assert not back.graph.initializer
    scan_node.check_node(back.graph.node[0])


def test_decompose_needs_a_static_state_size():
    # A must be known statically (its N sizes the state); a dynamic A is refused with the reason.
    model = scan_graph({"u": (1, 8, 4), "delta": (1, 8, 4), "A": ("d", "n"), "B": (1, 4, 4), "C": (1, 4, 4),
                        "D": (8,), "z": (1, 8, 4), "delta_bias": (8,)}, {}, False, False)
    with pytest.raises(ValueError, match="must be static"):
        portable.decompose(model)


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
    sess = ort.InferenceSession(portable.decompose(model).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    feeds = {"u": rng.standard_normal((1, dim, L)), "delta": rng.standard_normal((1, dim, L)),
             "B": rng.standard_normal((1, N, L)), "C": rng.standard_normal((1, N, L)),
             "z": rng.standard_normal((1, dim, L))}
    (y,) = sess.run(None, {k: v.astype(np.float32) for k, v in feeds.items()})
    ref = np_selective_scan(A=A.astype(np.float32), D=D.astype(np.float32), delta_bias=db.astype(np.float32),
                            delta_softplus=True, **{k: v.astype(np.float32) for k, v in feeds.items()})
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
