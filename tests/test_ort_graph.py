"""The ONNX Runtime runner's graph rewrites (`runtimes/ort_graph.py`), on hand-built graphs
against float64 NumPy references, on what ONNX Runtime then runs, and on the cases each must
leave alone:

- ReLUs between symmetric int8 Q/DQ pairs as unsigned pairs (the runner on a real int8
  bundle: `test_ort_int8.py`);
- depthwise convolutions on channels padded to whole blocks (and the runner on a real
  SpectralMamba bundle against the PyTorch original)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

from hsiedge.runtimes.onnxruntime import X64_QUANT_PRECISION
from hsiedge.runtimes.ort_graph import depthwise_convs_padded, relus_as_unsigned

K, M, SIDE = 8, 16, 6
X_SCALE, S1, S2, ADD = 0.05, 0.04, 0.025, 0.5  # S2 < S1: the ReLU's range is the upper half


def _graph(rng: np.random.Generator, second_scale: float = S2,
           relu_out: bool = False) -> tuple[onnx.ModelProto, dict]:
    """x -> Q/DQ -> Conv 3x3 -> Q/DQ (S1) -> Relu -> {Q/DQ (second_scale) -> Conv 1x1 -> z, Add -> a},
    as the export quantizes a Conv-ReLU: symmetric int8, per-channel 7-bit weights."""
    w1 = rng.integers(-64, 65, size=(M, K, 3, 3)).astype(np.int8)
    w2 = rng.integers(-64, 65, size=(M, M, 1, 1)).astype(np.int8)
    s_w1, s_w2 = (rng.uniform(0.002, 0.01, M).astype(np.float32) for _ in range(2))
    zero = numpy_helper.from_array(np.array(0, np.int8), "zero")
    inits = [zero, numpy_helper.from_array(np.zeros(M, np.int8), "w_zero"),
             numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(s_w1, "s_w1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(s_w2, "s_w2"),
             *(numpy_helper.from_array(np.array(v, np.float32), n)
               for n, v in (("sx", X_SCALE), ("s1", S1), ("s2", S2), ("s3", second_scale), ("c", ADD)))]
    q = helper.make_node
    nodes = [q("QuantizeLinear", ["x", "sx", "zero"], ["xq"]),
             q("DequantizeLinear", ["xq", "sx", "zero"], ["xd"]),
             q("DequantizeLinear", ["w1", "s_w1", "w_zero"], ["w1d"], axis=0),
             q("DequantizeLinear", ["w2", "s_w2", "w_zero"], ["w2d"], axis=0),
             q("Conv", ["xd", "w1d"], ["y"], pads=[1, 1, 1, 1]),
             q("QuantizeLinear", ["y", "s1", "zero"], ["yq"]),
             q("DequantizeLinear", ["yq", "s1", "zero"], ["yd"]),
             q("Relu", ["yd"], ["r"]),
             q("QuantizeLinear", ["r", "s2", "zero"], ["rq"]),
             q("DequantizeLinear", ["rq", "s2", "zero"], ["rd"]),
             q("Conv", ["rd", "w2d"], ["z"]), q("Add", ["r", "c"], ["a"])]
    outputs = ["z", "a"]
    if second_scale != S2:  # a second quantized reader of the ReLU, at another scale
        nodes += [q("QuantizeLinear", ["r", "s3", "zero"], ["rq3"]),
                  q("DequantizeLinear", ["rq3", "s3", "zero"], ["rd3"]), q("Conv", ["rd3", "w2d"], ["z3"])]
        outputs.append("z3")
    if relu_out:
        outputs.append("r")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K, SIDE, SIDE])
    ys = [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None, M, SIDE, SIDE]) for o in outputs]
    graph = helper.make_graph(nodes, "g", [x], ys, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return model, {"w1": w1.astype(np.float64) * s_w1[:, None, None, None],
                   "w2": w2.astype(np.float64) * s_w2[:, None, None, None]}


def _conv(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float64 convolution, stride 1, 'same' padding."""
    p = w.shape[-1] // 2
    windows = sliding_window_view(np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))), w.shape[2:], axis=(2, 3))
    return np.einsum("nkhwij,mkij->nmhw", windows, w)


def _q(v: np.ndarray, scale: float, low: int, high: int) -> np.ndarray:
    return np.clip(np.rint(v / scale), low, high) * scale


def _references(x: np.ndarray, w: dict) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """float64 (z, a) of the bundle's graph ("int8"), of the rewritten one ("unsigned") and of
    the float model the quantization stands for ("float")."""
    y = _conv(_q(x.astype(np.float64), X_SCALE, -128, 127), w["w1"])
    signed = np.maximum(_q(y, S1, -128, 127), 0.0)
    unsigned = _q(y, S2, 0, 255)
    return {"int8": (_conv(_q(signed, S2, -128, 127), w["w2"]), signed + ADD),
            "unsigned": (_conv(unsigned, w["w2"]), unsigned + ADD),
            "float": (_conv(np.maximum(y, 0.0), w["w2"]), np.maximum(y, 0.0) + ADD)}


def _session(model: onnx.ModelProto, tmp_path, tag: str) -> tuple[ort.InferenceSession, list[str]]:
    """A CPU session with the runner's int8 options, and the op types of the graph it runs."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / f"{tag}.onnx")
    opts.log_severity_level = 3
    opts.add_session_config_entry(X64_QUANT_PRECISION, "1")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=["CommonSubexpressionElimination"])
    return sess, [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


@pytest.mark.parametrize("seed", [0, 1])
def test_relu_pairs_become_unsigned_and_match_the_reference(seed, tmp_path):
    rng = np.random.default_rng(seed)
    model, w = _graph(rng)
    original = onnx.ModelProto()
    original.CopyFrom(model)
    assert relus_as_unsigned(model) == 1
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert "Relu" not in ops and ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 4

    x = rng.normal(0.0, 1.5, size=(3, K, SIDE, SIDE)).astype(np.float32)
    refs = _references(x, w)
    sess, fused = _session(model, tmp_path, "unsigned")
    z, a = sess.run(None, {"x": x})
    ref_z, ref_a = refs["unsigned"]
    # ONNX Runtime requantizes in float32: a value on a rounding tie may land one step away
    assert np.abs(a - ref_a).max() <= S2 * 1.001 and np.mean(np.abs(a - ref_a) > 1e-5) < 0.01
    np.testing.assert_allclose(z, ref_z, atol=S2 * np.abs(w["w2"]).sum(axis=(1, 2, 3)).max() * 1.001)
    assert np.mean(np.abs(z - ref_z) > 1e-4) < 0.05
    # the ReLU is gone from what ONNX Runtime runs, the Conv is an int8 kernel writing u8
    assert "Relu" not in fused and "QLinearConv" in fused, fused
    _, fused_before = _session(original, tmp_path, "int8")
    assert "Relu" in fused_before
    # and the rewritten form is closer to the float model than the bundle's graph
    float_z, float_a = refs["float"]
    int8_z, int8_a = refs["int8"]
    assert np.abs(a - float_a).mean() < np.abs(int8_a - float_a).mean()
    assert np.abs(z - float_z).mean() < np.abs(int8_z - float_z).mean()


def test_relus_it_must_leave_alone():
    """Readers that quantize the ReLU at two scales, and a ReLU that is a graph output."""
    for kwargs in ({"second_scale": 0.03}, {"relu_out": True}):
        model, _ = _graph(np.random.default_rng(0), **kwargs)
        before = model.SerializeToString()
        assert relus_as_unsigned(model) == 0
        assert model.SerializeToString() == before


BANDS, CLASSES, PATCH = 19, 5, 7  # 19 channels: not whole blocks of 16 (nor of 8)


def _depthwise_graph(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """x -> depthwise 3x3 (bias) -> 1x1 conv -> Sigmoid -> s   (padded, the 1x1 takes zero columns)
       x -> depthwise 3x3 (no bias) -> Relu -> r                (padded, sliced back)
       w (32 channels) -> depthwise 3x3 -> v                    (whole blocks: left alone)
       x -> depthwise 3x3 with int8 weights through a DequantizeLinear -> d   (left alone)"""
    arrays = {"dw1": rng.standard_normal((BANDS, 1, 3, 3)), "b1": rng.standard_normal(BANDS),
              "pw": rng.standard_normal((CLASSES, BANDS, 1, 1)), "pb": rng.standard_normal(CLASSES),
              "dw2": rng.standard_normal((BANDS, 1, 3, 3)), "dw3": rng.standard_normal((32, 1, 3, 3))}
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    q8 = rng.integers(-127, 128, size=(BANDS, 1, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(v, k) for k, v in arrays.items()]
    inits += [numpy_helper.from_array(q8, "q8"), numpy_helper.from_array(np.zeros(BANDS, np.int8), "qz"),
              numpy_helper.from_array(np.full(BANDS, 0.01, np.float32), "qs")]
    n = helper.make_node
    nodes = [n("Conv", ["x", "dw1", "b1"], ["t"], group=BANDS, pads=[1, 1, 1, 1]),
             n("Conv", ["t", "pw", "pb"], ["u"]), n("Sigmoid", ["u"], ["s"]),
             n("Conv", ["x", "dw2"], ["t2"], group=BANDS, pads=[1, 1, 1, 1]), n("Relu", ["t2"], ["r"]),
             n("Conv", ["w", "dw3"], ["v"], group=32, pads=[1, 1, 1, 1]),
             n("DequantizeLinear", ["q8", "qs", "qz"], ["q8d"], axis=0),
             n("Conv", ["x", "q8d"], ["d"], group=BANDS, pads=[1, 1, 1, 1])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, BANDS, PATCH, PATCH]),
              helper.make_tensor_value_info("w", TensorProto.FLOAT, [None, 32, PATCH, PATCH])]
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * 4) for o in ("s", "r", "v", "d")]
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    arrays["q8d"] = q8.astype(np.float32) * np.float32(0.01)
    return model, {k: v.astype(np.float64) for k, v in arrays.items()}


def _depthwise(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float64 depthwise convolution, stride 1, 'same' padding: w is (channels, 1, k, k)."""
    p = w.shape[-1] // 2
    windows = sliding_window_view(np.pad(x, ((0, 0), (0, 0), (p, p), (p, p))), w.shape[2:], axis=(2, 3))
    return np.einsum("nchwij,cij->nchw", windows, w[:, 0])


def _optimized(model: onnx.ModelProto, tmp_path, tag: str) -> tuple[ort.InferenceSession, list[str]]:
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / f"{tag}.onnx")
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess, [f"{n.domain}:{n.op_type}" for n in onnx.load(opts.optimized_model_filepath).graph.node]


@pytest.mark.parametrize("seed", [0, 1])
def test_depthwise_convs_on_padded_channels_match_the_reference(seed, tmp_path):
    rng = np.random.default_rng(seed)
    model, a = _depthwise_graph(rng)
    before = model.SerializeToString()
    assert depthwise_convs_padded(model) == 2
    assert model.SerializeToString() != before
    onnx.checker.check_model(model, full_check=True)
    x = rng.standard_normal((3, BANDS, PATCH, PATCH)).astype(np.float32)
    w = rng.standard_normal((3, 32, PATCH, PATCH)).astype(np.float32)
    sess, ops = _optimized(model, tmp_path, "padded")
    s, r, v, d = sess.run(None, {"x": x, "w": w})
    x64 = x.astype(np.float64)
    t = _depthwise(x64, a["dw1"]) + a["b1"][None, :, None, None]
    u = np.einsum("nchw,kc->nkhw", t, a["pw"][:, :, 0, 0]) + a["pb"][None, :, None, None]
    want = {"s": 1.0 / (1.0 + np.exp(-u)), "r": np.maximum(_depthwise(x64, a["dw2"]), 0.0),
            "v": _depthwise(w.astype(np.float64), a["dw3"]), "d": _depthwise(x64, a["q8d"])}
    for name, got in zip("srvd", (s, r, v, d), strict=True):
        assert got.shape == want[name].shape, name
        np.testing.assert_allclose(got, want[name], rtol=1e-5, atol=1e-5, err_msg=name)
    # where ONNX Runtime's blocked (NCHWc) layout is on (x86 with AVX2), the padded ones now use it
    _, plain = _optimized(onnx.load_from_string(before), tmp_path, "plain")
    blocked = "com.microsoft.nchwc:Conv"
    if blocked in plain:  # the 32-channel one
        assert ops.count(blocked) == plain.count(blocked) + 3  # both padded and the 1x1 after one


def test_runner_pads_a_spectralmamba_gate_and_gives_the_same_logits(exported):
    from hsiedge.bundle import open_bundle
    from hsiedge.runtimes import open_runner

    bundle = open_bundle(exported("spectralmamba", "plugin", "fp32")[0])
    bands, side = bundle.manifest["input"]["bands"], bundle.patch_size
    assert bands % 16 != 0
    x = np.random.default_rng(3).standard_normal((8, bands, side, side)).astype(np.float32)
    with open_runner(bundle, "onnxruntime") as runner:
        assert runner.padded_depthwise == 1
        assert "depthwise convolutions run on channels padded to whole blocks of 16: 1" in runner.notes
        got = runner.run(x)
    with open_runner(bundle, "torch") as original:
        want = original.run(x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
