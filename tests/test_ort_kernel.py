"""hsiedge's CPU kernel as an ONNX Runtime custom operator (`hsiedge.ops.ort_kernel`): the
SelectiveScan node run by it against the float64 NumPy reference, its errors, and the
onnxruntime runner's choice between it and the portable function body."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_portable_scan import COMBOS, feeds_of, random_arrays, reference, scan_graph

from hsiedge.bundle import open_bundle
from hsiedge.export import scan_node
from hsiedge.ops import cpu, ort_kernel

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C compiler for hsiedge's CPU kernel")


def kernel_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A CPU session with the kernel registered.  The graphs here carry no function for the
    node, so ONNX Runtime can only run it through the kernel."""
    assert not model.functions
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(ort_kernel.library()))
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run_kernel(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    sess = kernel_session(model)
    names = {i.name for i in sess.get_inputs()}
    (y,) = sess.run(None, {k: v for k, v in feeds.items() if k in names})
    return y


def test_without_the_kernel_the_bare_node_does_not_run():
    """The control for the tests below: no kernel, no function, no session."""
    model = scan_graph({"u": (2, 8, 5), "delta": (2, 8, 5), "A": (8, 4), "B": (2, 4, 5), "C": (2, 4, 5),
                        "D": (8,), "z": (2, 8, 5), "delta_bias": (8,)}, {}, True, False)
    with pytest.raises(Exception, match="SelectiveScan"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("case,opts", COMBOS[::2], ids=lambda v: "-".join(map(str, v)))
def test_kernel_matches_float64_reference(case, opts):
    batch, dim, L, N, groups, static = case
    z, D, bias, softplus = opts
    present = {"z": z, "D": D, "delta_bias": bias}
    rng = np.random.default_rng(abs(hash((case, opts))) % 2**32)
    arrays = random_arrays(rng, batch, dim, L, N, groups, softplus)
    shapes = {k: v.shape for k, v in arrays.items()}
    model = scan_graph(shapes, present, softplus, half=False, static=static)
    y = run_kernel(model, feeds_of(arrays, present))
    ref = reference(arrays, present, softplus)
    assert y.dtype == np.float32 and y.shape == ref.shape
    assert np.abs(y.astype(np.float64) - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_kernel_output_is_written_whole_on_long_sequences():
    """batch 1, L of 20000: the kernel's threads split channels, time is walked in tiles."""
    rng = np.random.default_rng(7)
    arrays = random_arrays(rng, 1, 64, 20_000, 16, 0, True)
    model = scan_graph({k: v.shape for k, v in arrays.items()}, {}, True, half=False)
    y = run_kernel(model, feeds_of(arrays, {}))
    ref = reference(arrays, {}, True)
    assert np.isfinite(y).all()
    assert np.abs(y.astype(np.float64) - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())


def test_kernel_refuses_inconsistent_shapes_with_one_sentence():
    rng = np.random.default_rng(3)
    arrays = random_arrays(rng, 2, 8, 6, 4, 0, True)
    shapes = {k: v.shape for k, v in arrays.items()}
    model = scan_graph({**shapes, "A": (5, 4)}, {}, True, half=False)  # the graph states it too
    feeds = feeds_of(arrays, {})
    feeds["A"] = feeds["A"][:5]  # (5, N) for dim 8
    with pytest.raises(Exception, match=r"SelectiveScan: A must be \(dim, N\)"):
        run_kernel(model, feeds)
    model = scan_graph(shapes, {}, True, half=False)
    feeds = feeds_of(arrays, {})
    feeds["C"] = feeds["C"][:, :, :5]
    with pytest.raises(Exception, match="SelectiveScan: B and C must be"):
        run_kernel(model, feeds)


def test_runner_uses_the_kernel_for_plugin_bundles_and_agrees_with_the_function_body(exported):
    from hsiedge.runtimes.onnxruntime import OnnxRuntimeRunner, runs_scan_kernel

    path, _ = exported("mambahsi", "plugin", "fp32")
    bundle = open_bundle(path)
    assert runs_scan_kernel(bundle)
    with_kernel = OnnxRuntimeRunner(bundle, "cpu")
    body = OnnxRuntimeRunner(bundle, "cpu", scan_kernel=False)
    assert "CPU kernel" in with_kernel.notes and "function" in body.notes
    x = np.random.default_rng(0).random((1, bundle.preprocessing.out_bands, 32, 32), dtype=np.float32)
    a, b = with_kernel.run(x), body.run(x)
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(b).max())


@pytest.mark.parametrize("groups", [0, 2])
def test_half_scans_run_on_the_kernel_through_casts(groups):
    """A float16 node, rewritten to cast its inputs to float32 and its output back, against
    the float64 reference on the same half-rounded inputs."""
    from hsiedge.runtimes.onnxruntime import kernel_unusable
    from hsiedge.runtimes.ort_graph import half_scans_in_float

    arrays = random_arrays(np.random.default_rng(11 + groups), 3, 16, 9, 8, groups, True)
    model = scan_graph({k: v.shape for k, v in arrays.items()}, {}, True, half=True)
    assert "not float32" in kernel_unusable(model)
    assert half_scans_in_float(model) == 1 and kernel_unusable(model) is None
    feeds = feeds_of(arrays, {}, half=True)
    y = run_kernel(model, feeds)
    ref = reference({k: v.astype(np.float64) for k, v in feeds.items()}, {}, True)
    assert y.dtype == np.float16 and y.shape == ref.shape
    # float32 accumulation, then one rounding to half
    assert np.abs(y.astype(np.float64) - ref).max() <= 2e-3 * max(1.0, np.abs(ref).max())


def test_runner_runs_half_bundles_on_the_kernel_and_agrees_with_the_body(exported):
    from hsiedge.runtimes.onnxruntime import OnnxRuntimeRunner, kernel_unusable, runs_scan_kernel

    half, _ = exported("spectralmamba", "plugin", "fp16")
    bundle = open_bundle(half)
    model = onnx.load(str(bundle.artifact("onnx")))
    assert any(True for _ in scan_node.scan_nodes(model))
    assert "not float32" in kernel_unusable(model)
    assert runs_scan_kernel(bundle)
    runner = OnnxRuntimeRunner(bundle, "cpu")
    body = OnnxRuntimeRunner(bundle, "cpu", scan_kernel=False)
    assert "cast to float32" in runner.notes and runner.half_scans == 1
    assert "function" in body.notes
    x = np.random.default_rng(2).standard_normal((64, bundle.preprocessing.out_bands, 7, 7), dtype=np.float32)
    a, b = runner.run(x), body.run(x)
    assert np.abs(a - b).max() <= 1e-2 * max(1.0, np.abs(b).max())
    portable_bundle, _ = exported("spectralmamba", "portable", "fp32")
    assert not runs_scan_kernel(open_bundle(portable_bundle))


def test_memory_estimate_follows_how_the_scans_run(exported):
    from hsiedge.infer.policy import IMAGE_MEMORY, _memory_profile

    plugin, _ = exported("mambahsi", "plugin", "fp32")
    portable_bundle, _ = exported("mambahsi", "portable", "fp32")
    assert _memory_profile(open_bundle(plugin), "onnxruntime") == "onnxruntime"
    assert _memory_profile(open_bundle(portable_bundle), "onnxruntime") == "onnxruntime-portable"
    assert IMAGE_MEMORY["onnxruntime-portable"][1] > IMAGE_MEMORY["onnxruntime"][1]


@pytest.mark.parametrize("batch,L", [(0, 5), (2, 0)])
def test_kernel_gives_empty_outputs_for_empty_inputs(batch, L):
    arrays = random_arrays(np.random.default_rng(5), batch, 8, L, 4, 0, True)
    model = scan_graph({k: v.shape for k, v in arrays.items()}, {}, True, half=False)
    y = run_kernel(model, feeds_of(arrays, {}))
    assert y.shape == (batch, 8, L)


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_count_applies_to_open_sessions_and_keeps_the_results(threads):
    """`set_threads` (what a runner given `threads` calls) changes who computes, not what: an
    open session run at each thread count agrees with the float64 reference and, bit for bit,
    with the default count, on work big enough to be split among threads."""
    rng = np.random.default_rng(threads)
    arrays = random_arrays(rng, 4, 96, 300, 16, 1, True)
    present = {"z": True, "D": True, "delta_bias": True}
    model = scan_graph({k: v.shape for k, v in arrays.items()}, present, True, half=False, static=True)
    sess = kernel_session(model)
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds_of(arrays, present).items() if k in names}
    try:
        ort_kernel.set_threads(threads)
        (y,) = sess.run(None, feeds)
    finally:
        ort_kernel.set_threads(None)
    (y_all,) = sess.run(None, feeds)
    ref = reference(arrays, present, True)
    for out in (y, y_all):
        assert np.abs(out.astype(np.float64) - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    assert np.array_equal(y, y_all)  # every (batch, channel) sequence is computed alone, whoever runs it
