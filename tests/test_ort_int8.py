"""int8 graphs on x86 CPUs without VNNI: the runner has ONNX Runtime run their layers as u8 x u8
kernels (`session.x64quantprecision`), which cannot saturate, instead of u8 x s8 ones, which do
with full-range weights; 7-bit weights (`--weight-bits 7`) cannot saturate them, and keep the
u8 x s8 kernels.  Checked on hand-built QDQ layers against float64 NumPy references, and through
the runner on the suite's int8 bundles."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

from hsiedge.bundle import open_bundle
from hsiedge.runtimes.onnxruntime import X64_QUANT_PRECISION, OnnxRuntimeRunner, int8_kernels_saturate

K, M, SIDE = 64, 24, 6  # input channels, output channels, image side (Conv)
X_SCALE = 0.02
INT8_KERNELS = {"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QLinearConv", "ConvInteger"}
WEIGHT_INPUT = {"MatMulIntegerToFloat": 1, "QLinearMatMul": 3, "MatMulInteger": 1, "QLinearConv": 3,
                "ConvInteger": 1}


def _quantized_layer(kind: str, w: np.ndarray, scale: np.ndarray) -> onnx.ModelProto:
    """y = layer(DQ(Q(x)), DQ(w)), symmetric int8, per-output-channel weight scales: the export's
    QDQ form of a linear layer (`MatMul`, w (K, M)) or a 3 x 3 convolution (`Conv`, w (M, K, 3, 3),
    padding 1).  A Q after the Conv, as the export puts before the next layer, lets ONNX Runtime
    fuse it (its scale 1 keeps every value: the outputs are whole numbers within int8)."""
    axis = 1 if kind == "MatMul" else 0
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale, "w_scale"),
             numpy_helper.from_array(np.zeros(M, np.int8), "w_zero"),
             numpy_helper.from_array(np.array(X_SCALE, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "x_zero"),
             numpy_helper.from_array(np.array(1.0, np.float32), "y_scale")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=axis)]
    if kind == "MatMul":
        nodes.append(helper.make_node("MatMul", ["xd", "wd"], ["y"]))
        dims_in, dims_out = [None, K], [None, M]
    else:
        nodes += [helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1]),
                  helper.make_node("QuantizeLinear", ["c", "y_scale", "x_zero"], ["cq"]),
                  helper.make_node("DequantizeLinear", ["cq", "y_scale", "x_zero"], ["y"])]
        dims_in, dims_out = [None, K, SIDE, SIDE], [None, M, SIDE, SIDE]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims_in)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims_out)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _weights(rng: np.random.Generator, kind: str, top: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weights in [-top, top], every output channel reaching both ends (127: full
    range; 64: 7 bits), and their scales."""
    shape = (K, M) if kind == "MatMul" else (M, K, 3, 3)
    w = rng.integers(-top, top + 1, size=shape).astype(np.int8)
    if kind == "MatMul":
        w[0], w[1] = top, -top
    else:
        w[:, 0, 0, 0], w[:, 0, 0, 1] = top, -top
    return w, rng.uniform(0.001, 0.01, M).astype(np.float32)


def _saturating_input(rng: np.random.Generator, kind: str, n: int = 32) -> np.ndarray:
    """Activations at the ends of their int8 range, so that pair sums of full-range s8 weights
    leave 16 bits: u8 255 (s8 127 shifted) x 127, twice, is 64770."""
    shape = (n, K) if kind == "MatMul" else (2, K, SIDE, SIDE)
    return (rng.choice([-1.0, 1.0], size=shape) * 127 * X_SCALE).astype(np.float32)


def _run(model: onnx.ModelProto, x: np.ndarray, tmp_path, u8u8: bool) -> tuple[np.ndarray, onnx.GraphProto]:
    """The first output of ONNX Runtime's CPU provider at full optimisation, with or without the
    runner's int8 session option, and the graph it ran."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / f"{u8u8}.onnx")
    opts.log_severity_level = 3
    if u8u8:
        opts.add_session_config_entry(X64_QUANT_PRECISION, "1")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    (y, *_) = sess.run(None, {"x": x})
    return y, onnx.load(opts.optimized_model_filepath).graph


def _reference(kind: str, x: np.ndarray, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float64: the quantized activations through the dequantized layer (Conv: its output
    rounded to the whole numbers of its requantization, scale 1)."""
    xq = np.clip(np.rint(x.astype(np.float64) / X_SCALE), -128, 127) * X_SCALE
    if kind == "MatMul":
        return xq @ (w.astype(np.float64) * scale.astype(np.float64))
    wd = w.astype(np.float64) * scale.astype(np.float64)[:, None, None, None]
    windows = sliding_window_view(np.pad(xq, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), axis=(2, 3))
    y = np.einsum("nkhwij,mkij->nmhw", windows, wd)
    return np.clip(np.rint(y), -128, 127)


def _kernel_weight_types(graph: onnx.GraphProto) -> set[int]:
    """The element types of the weights the graph's int8 kernels read (INT8: u8 x s8 kernels;
    UINT8: ONNX Runtime widened them to u8 x u8)."""
    inits = {i.name: i.data_type for i in graph.initializer}
    return {inits[n.input[WEIGHT_INPUT[n.op_type]]] for n in graph.node if n.op_type in WEIGHT_INPUT}


def _layer_run(kind: str, tmp_path, u8u8: bool, top: int = 127) -> tuple[np.ndarray, np.ndarray, set[int]]:
    """A layer with weights reaching +-top on activations at their ends: ONNX Runtime's output
    (after checking that it ran as an int8 kernel, not in float), the float64 reference, and
    the element types of the weights its int8 kernels read."""
    rng = np.random.default_rng(2)
    w, scale = _weights(rng, kind, top)
    x = _saturating_input(rng, kind)
    y, graph = _run(_quantized_layer(kind, w, scale), x, tmp_path, u8u8)
    ops = {n.op_type for n in graph.node}
    assert ops & INT8_KERNELS, ops
    return y, _reference(kind, x, w, scale), _kernel_weight_types(graph)


def _assert_matches(kind: str, y: np.ndarray, ref: np.ndarray) -> None:
    if kind == "MatMul":
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    else:  # integer outputs: at most a rounding tie away
        assert np.abs(y - ref).max() <= 1 and np.mean(y != ref) < 0.01


@pytest.mark.parametrize("kind", ["MatMul", "Conv"])
def test_int8_layers_run_as_int8_kernels_and_match_the_reference(kind, tmp_path):
    """With the runner's option, on any CPU."""
    y, ref, _ = _layer_run(kind, tmp_path, u8u8=True)
    _assert_matches(kind, y, ref)


@pytest.mark.parametrize("kind", ["MatMul", "Conv"])
def test_seven_bit_weights_keep_u8_s8_kernels_and_match_the_reference(kind, tmp_path):
    """Weights at +-64 (the 7 bits of `--weight-bits 7`) on activations at their ends: with the
    runner's option ONNX Runtime keeps them s8 (its fast u8 x s8 kernels, where this CPU has
    no VNNI), and the sums do not saturate: 2 x 255 x 64 fits 16 bits."""
    y, ref, types = _layer_run(kind, tmp_path, u8u8=True, top=64)
    assert types == {TensorProto.INT8}, types
    _assert_matches(kind, y, ref)


@pytest.mark.skipif(not int8_kernels_saturate(), reason="this CPU's u8 x s8 kernels do not saturate")
@pytest.mark.parametrize("kind", ["MatMul", "Conv"])
def test_without_it_int8_layers_saturate_on_this_cpu(kind, tmp_path):
    """Why the runner sets it: the same layer, fused as u8 x s8, is wrong here."""
    y, ref, _ = _layer_run(kind, tmp_path, u8u8=False)
    assert np.abs(y - ref).max() > 0.01 * np.abs(ref).max()


def _runner_graph(path, tmp_path, monkeypatch) -> tuple[OnnxRuntimeRunner, onnx.GraphProto]:
    """The runner of the bundle at `path` on CPU, and the graph ONNX Runtime optimized for it."""
    optimized = tmp_path / "optimized.onnx"
    real = ort.SessionOptions

    def options() -> ort.SessionOptions:
        opts = real()
        opts.optimized_model_filepath = str(optimized)
        return opts

    monkeypatch.setattr(ort, "SessionOptions", options)
    runner = OnnxRuntimeRunner(open_bundle(path), device="cpu")
    return runner, onnx.load(str(optimized)).graph


@pytest.mark.parametrize("model", ["mambahsi", "spectralmamba", "md2f-mamba"])
def test_int8_bundles_run_their_layers_as_int8_kernels(exported, model, tmp_path, monkeypatch):
    """The runner's session of an int8 bundle fuses its quantized layers into int8 kernels
    (their parity is `test_export`'s), and says how where this CPU lacks VNNI."""
    path, _ = exported(model, "plugin", "int8")
    runner, graph = _runner_graph(path, tmp_path, monkeypatch)
    ops = [n.op_type for n in graph.node]
    assert sum(op in INT8_KERNELS for op in ops) >= 5, sorted(set(ops))
    assert ("u8 x u8" in runner.notes) == int8_kernels_saturate()
    runner.close()


def test_seven_bit_int8_bundle(checkpoints, tmp_path, monkeypatch):
    """`--weight-bits 7`: every weight within [-64, 64], every output channel reaching an end of
    it; parity at export passes; the runner's int8 kernels read them as s8 (u8 x s8 kernels,
    VNNI or not) and say so where this CPU lacks VNNI.  SpectralMamba: its int8 export takes a
    quarter of MD2F-Mamba's (whose 7-bit bundles `bench/int8_cpu.py` measures)."""
    from hsiedge.export.bundle_export import export_bundle

    out = tmp_path / "b"
    manifest = export_bundle(checkpoints["spectralmamba"], out, precision="int8", weight_bits=7)
    assert manifest["calibration"]["weight_bits"] == 7 and manifest["parity"]["passed"]
    int8_weights = [numpy_helper.to_array(i) for i in onnx.load(str(out / "model.onnx")).graph.initializer
                    if i.data_type == TensorProto.INT8 and len(i.dims) > 1]
    assert len(int8_weights) >= 5
    for w in int8_weights:
        top = np.abs(w.astype(np.int16)).reshape(w.shape[0], -1).max(axis=1)  # per output channel (Conv)
        assert top.max() == 64 and (top.min() == 64 or w.ndim == 2), top
    runner, graph = _runner_graph(out, tmp_path, monkeypatch)
    assert sum(n.op_type in INT8_KERNELS for n in graph.node) >= 5
    assert _kernel_weight_types(graph) == {TensorProto.INT8}
    assert "u8 x u8" not in runner.notes and ("u8 x s8" in runner.notes) == int8_kernels_saturate()
    runner.close()


def test_int8_bundle_runs_its_relus_unsigned(exported, tmp_path, monkeypatch):
    """The runner of the suite's int8 MD2F-Mamba bundle rewrites every ReLU that sits between Q/DQ
    pairs (`ort_graph.relus_as_unsigned`), ONNX Runtime runs none of them, and the runner says
    how many (the bundle's parity, through the same runner, is `test_export`'s)."""
    path, _ = exported("md2f-mamba", "plugin", "int8")
    graph = onnx.load(str(path / "model.onnx")).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    relus = [n for n in graph.node if n.op_type == "Relu"]
    between = sum(producer.get(n.input[0]) == "DequantizeLinear" for n in relus)
    assert between >= 5
    runner, ran = _runner_graph(path, tmp_path, monkeypatch)
    assert runner.unsigned_relus == between and f"{between} ReLUs run as unsigned" in runner.notes
    assert sum(n.op_type == "Relu" for n in ran.node) <= len(relus) - between
    runner.close()
