"""`hsiedge export` and `hsiedge parity-check` on Jasper Ridge, with checkpoints trained here.

Every model x {plugin, portable} x {fp32, fp16, int8} is exported and must pass its parity
thresholds against the PyTorch original in ONNX Runtime (CPU).  The graphs are inspected
for Contract 2 (one SelectiveScan node per scan call, its attributes, no other custom op;
no custom domain at all in portable graphs), fp16 and int8 structure; tampered and
failing bundles are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SCAN_CALLS
from onnx import TensorProto, numpy_helper
from typer.testing import CliRunner

from hsiedge.bundle import BundleError, open_bundle
from hsiedge.cli import app
from hsiedge.export import scan_node
from hsiedge.export.bundle_export import ExportError, ParityFailedError, export_bundle
from hsiedge.runtimes import default_runtime

runner = CliRunner()



def export_scene(datasets: Path) -> str:
    """The scene the session's checkpoints are trained (and bundles exported) on."""
    return str(datasets / "jasper_ridge" / "JasperRidge2_R198.mat")

def all_nodes(graph: onnx.GraphProto):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(a.g)


def check_plugin_graph(model: onnx.ModelProto, calls: int) -> None:
    nodes = list(scan_node.scan_nodes(model))
    assert len(nodes) == calls
    for n in nodes:
        scan_node.check_node(n)  # exactly Contract 2's eight inputs, one output, three attributes
    assert {(n.domain, n.op_type) for n in all_nodes(model.graph) if n.domain not in ("", "ai.onnx")} == {
        (scan_node.DOMAIN, scan_node.OP_TYPE)}
    assert {o.domain: o.version for o in model.opset_import}[scan_node.DOMAIN] == 1


def check_fp16(model: onnx.ModelProto) -> None:
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    assert sum(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer) > 0
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # io stays float32
    for n in scan_node.scan_nodes(model):
        io = scan_node.node_inputs(n)
        assert types[io["u"]] == TensorProto.FLOAT16
        for role in scan_node.FLOAT32_INPUTS:
            if io[role]:
                assert types[io[role]] == TensorProto.FLOAT, role
    for n in model.graph.node:  # normalisations stay float32
        if n.op_type in ("LayerNormalization", "InstanceNormalization"):
            assert types.get(n.input[1], TensorProto.FLOAT) == TensorProto.FLOAT
    # precision.fp32_nodes: the first and the last layer compute in float32 (the model input and
    # the logits are never rounded to half), and so does GroupNorm's scale and shift
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    moves = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Pad")
    layers = ("Conv", "MatMul", "Gemm")

    def half(t: str) -> bool:  # float16 by its declared type, or made by a cast to half
        p = producer.get(t)
        return types.get(t) == TensorProto.FLOAT16 or (
            p is not None and p.op_type == "Cast" and p.attribute[0].i == TensorProto.FLOAT16)

    first, todo = [], [model.graph.input[0].name]
    while todo:
        for n in readers.get(todo.pop(), []):
            if n.op_type in layers:
                first.append(n)
            elif n.op_type in moves:
                todo.append(n.output[0])
    last = producer[model.graph.output[0].name]
    while last.op_type in ("Cast", "Resize", *moves):
        last = producer[last.input[0]]
    assert first and last.op_type in layers
    for n in [*first, last]:
        assert not any(half(t) for t in n.input if t), n.name
    outputs = {o.name for o in model.graph.output}

    def for_shape(r: onnx.NodeProto) -> bool:  # a Shape, or a cast only Shapes read
        users = readers.get(r.output[0], [])
        return r.op_type == "Shape" or (r.op_type == "Cast" and bool(users)
                                        and all(u.op_type == "Shape" for u in users))

    out = last.output[0]  # and nothing rounds the logits on their way out
    while out not in outputs:
        (r,) = [r for r in readers[out] if not for_shape(r)]
        assert r.op_type in ("Cast", "Resize", *moves) and not half(r.output[0]), r.name
        out = r.output[0]
    for n in model.graph.node:
        if n.op_type == "InstanceNormalization":
            after = readers[n.output[0]][0]
            after = readers[after.output[0]][0] if after.op_type == "Reshape" else after
            if after.op_type == "Mul":  # GroupNorm's scale
                assert not any(half(t) for t in after.input), after.name


def check_int8(model: onnx.ModelProto) -> None:
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert q and dq
    for n in q + dq:  # symmetric int8: zero point 0
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any()
    assert any(inits[n.input[1]].size > 1 for n in dq if n.input[0] in inits)  # per-channel weights
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in scan_node.scan_nodes(model):  # the scan reads float tensors
        for t in n.input:
            assert not t or producer.get(t) is None or producer[t].op_type != "DequantizeLinear"


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("scan", ["plugin", "portable"])
@pytest.mark.parametrize("model", list(SCAN_CALLS))
def test_export_passes_parity(exported, model, scan, precision):
    path, manifest = exported(model, scan, precision)
    parity = manifest["parity"]
    assert parity["passed"] and not parity["forced"], parity["results"][0]["failures"]
    (result,) = parity["results"]
    assert result["runtime"] == "onnxruntime" and result["device"] == "cpu"
    assert result["figures"]["pixels"] > 9000  # the test split of Jasper Ridge, not a handful
    assert "delta_oa" in result["figures"]  # labels were there, so OA was compared
    bundle = open_bundle(path)
    assert [p.name for p in path.parent.iterdir()] == ["b"]  # nothing half-written beside it
    graph = onnx.load(str(bundle.artifact("onnx")))
    onnx.checker.check_model(graph, full_check=True)
    if scan == "plugin":
        check_plugin_graph(graph, SCAN_CALLS[model])
        assert manifest["plugin"] == {"name": "SelectiveScan", "version": "1", "namespace": "hsiedge"}
    else:
        assert all(n.domain in ("", "ai.onnx") for n in all_nodes(graph.graph))
        assert all(o.domain in ("", "ai.onnx") for o in graph.opset_import)
        assert manifest["plugin"] is None
    if precision == "fp16":
        check_fp16(graph)
    if precision == "int8":
        check_int8(graph)
        assert manifest["calibration"]["method"] == "percentile"
    assert manifest["precision"] == precision and manifest["scan"] == scan
    assert manifest["scan_calls"] == SCAN_CALLS[model]
    thresholds = parity["thresholds"]
    assert thresholds["min_agreement"] == {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99}[precision]
    # no engine here: ONNX Runtime where it runs the scans on hsiedge's kernel (plugin graphs)
    # and for reduced precision, which only the ONNX graph carries; else the PyTorch original,
    # which also goes first for fp32 SpectralMamba (its tile form)
    torch_first = precision == "fp32" and (scan == "portable" or model == "spectralmamba")
    assert default_runtime(bundle) == ("torch" if torch_first else "onnxruntime")
    if precision in ("fp32", "fp16"):  # the standard the FPGA MambaHSI work reports
        assert result["figures"]["flips_confident"] == 0, result["figures"]


@pytest.fixture(scope="module")
def bundle(checkpoints, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bundle") / "sm"
    export_bundle(checkpoints["spectralmamba"], path)
    return path


def test_manifest_states_what_a_runtime_needs(bundle, checkpoints):
    m = open_bundle(bundle).manifest
    assert m["schema"] == "hsiedge-bundle/1" and m["model"]["name"] == "spectralmamba"
    assert m["input"]["bands"] == 198 and m["input"]["patch_size"] == 7 and m["input"]["layout"] == "NCHW"
    assert [c["name"] for c in m["classes"]] == ["Tree", "Water", "Soil", "Road"] or len(m["classes"]) == 4
    assert all(len(c["colour"]) == 3 for c in m["classes"])
    assert m["preprocessing"]["transforms"][0]["kind"] == "standardize"
    assert set(m["artifacts"]) == {"checkpoint", "onnx", "heldout", "reference"}
    assert m["exporters"]["torch"] and m["exporters"]["onnxruntime"]
    assert m["opset"] == {"ai.onnx": 18, "hsiedge": 1}


def test_parity_check_cli_and_polygraphy_files(bundle, datasets, tmp_path):
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    report = tmp_path / "r.json"
    res = runner.invoke(app, ["parity-check", str(bundle), "--scene", export_scene(datasets),
                              "--report", str(report), "--save-polygraphy", str(tmp_path / "pg")])
    assert res.exit_code == 0, res.output
    assert "onnxruntime" in res.output and "pass" in res.output
    r = json.loads(report.read_text())
    assert r["passed"] and r["results"][0]["figures"]["agreement"] >= 0.9999
    outputs = RunResults.load(str(tmp_path / "pg" / "outputs.json"))
    names = [name for name, _ in outputs.items()]
    assert names == ["original", "onnxruntime"]
    inputs = load_json(str(tmp_path / "pg" / "inputs.json"))
    assert len(inputs) == len(outputs["original"]) and inputs[0]["x"].shape[1:] == (198, 7, 7)


def test_parity_check_on_another_scene_with_labels(bundle, datasets, tmp_path):
    jasper = datasets / "jasper_ridge"
    res = runner.invoke(app, ["parity-check", str(bundle), "--scene", str(jasper / "JasperRidge2_R198.mat"),
                              "--labels", str(jasper / "_EndJasperRidge2_R198.mat"), "--every-pixel",
                              "--json"])
    assert res.exit_code == 0, res.output
    figures = json.loads(res.stdout)["results"][0]["figures"]
    assert figures["pixels"] == 10000 and figures["labelled_pixels"] == 10000


def test_failing_parity_exits_non_zero_naming_the_figure(bundle, datasets):
    res = runner.invoke(app, ["parity-check", str(bundle), "--scene", export_scene(datasets),
                              "--max-rel-l2", "1e-12"])
    assert res.exit_code == 1
    assert "parity failed" in res.output and "rel_l2" in res.output


def test_export_refuses_a_failing_bundle_unless_forced(checkpoints, tmp_path):
    with pytest.raises(ParityFailedError, match="rel_l2"):
        export_bundle(checkpoints["spectralmamba"], tmp_path / "b", thresholds={"max_rel_l2": 1e-12})
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary folder
    m = export_bundle(checkpoints["spectralmamba"], tmp_path / "b", thresholds={"max_rel_l2": 1e-12},
                      force=True)
    assert m["parity"]["forced"] and not m["parity"]["passed"]
    assert open_bundle(tmp_path / "b").manifest["parity"]["forced"]


def test_tampered_artifact_is_refused(bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    onnx_file = copy / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        open_bundle(copy)
    res = runner.invoke(app, ["parity-check", str(copy), "--scene", "any.tif"])
    assert res.exit_code == 1 and "sha256" in res.output


def test_wrong_schema_is_refused(bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["schema"] = "hsiedge-bundle/0"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema"):
        open_bundle(copy)


def test_export_without_held_out_data_says_so(checkpoints, tmp_path):
    from hsiedge.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(checkpoints["spectralmamba"])
    ckpt.train_info.pop("scene")
    save_checkpoint(tmp_path / "c.pt", ckpt)
    with pytest.raises(ExportError, match="--calib"):
        export_bundle(tmp_path / "c.pt", tmp_path / "b")
    res = runner.invoke(app, ["export", str(tmp_path / "c.pt"), "-o", str(tmp_path / "b")])
    assert res.exit_code == 1 and "--calib" in res.output


def test_export_bad_options(checkpoints, tmp_path):
    res = runner.invoke(app, ["export", str(checkpoints["spectralmamba"]), "-o", str(tmp_path / "b"),
                              "--precision", "int4"])
    assert res.exit_code == 2 and "--precision" in res.output and "fp32, fp16, int8" in res.output
    res = runner.invoke(app, ["export", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "b")])
    assert res.exit_code == 1 and "not found" in res.output
    res = runner.invoke(app, ["export", str(checkpoints["spectralmamba"]), "-o", str(tmp_path / "b"),
                              "--weight-bits", "7"])
    assert res.exit_code == 1 and "--weight-bits 7 applies to --precision int8 only" in res.output
    assert not (tmp_path / "b").exists()


def test_class_colours_reach_the_manifest_and_the_maps(checkpoints, datasets, tmp_path):
    import rasterio

    from hsiedge.bundle import PALETTE
    from hsiedge.checkpoint import load_checkpoint

    names = load_checkpoint(checkpoints["spectralmamba"]).class_names
    out = tmp_path / "b"
    res = runner.invoke(app, ["export", str(checkpoints["spectralmamba"]), "-o", str(out),
                              "--class-colours", f"1=#1f78b4, {names[2]}=#33A02C"])
    assert res.exit_code == 0, res.output
    colours = [c["colour"] for c in open_bundle(out).manifest["classes"]]
    assert colours[0] == [0x1F, 0x78, 0xB4] and colours[2] == [0x33, 0xA0, 0x2C]
    assert colours[1] == list(PALETTE[1])  # not named: the palette's
    scene = datasets / "jasper_ridge" / "JasperRidge2_R198.mat"
    res = runner.invoke(app, ["infer", str(scene), "--bundle", str(out), "-o", str(tmp_path / "m.tif"),
                              "--quicklook", str(tmp_path / "m.png")])
    assert res.exit_code == 0, res.output
    with rasterio.open(tmp_path / "m.tif") as m:
        assert m.colormap(1)[3][:3] == (0x33, 0xA0, 0x2C)
    from PIL import Image

    drawn = {c for _, c in Image.open(tmp_path / "m.png").convert("RGB").getcolors(1 << 16)}
    assert (0x33, 0xA0, 0x2C) in drawn
    bad_values = [("1=green", "expected CLASS=#RRGGBB"), ("lava=#ff0000", "neither a class name nor an id")]
    for bad, says in bad_values:
        res = runner.invoke(app, ["export", str(checkpoints["spectralmamba"]), "-o", str(tmp_path / "c"),
                                  "--class-colours", bad])
        assert res.exit_code == 1 and says in res.output and not (tmp_path / "c").exists()


def test_dynamic_batch_and_tile_sides(checkpoints):
    """Batch is dynamic for every model; MambaHSI also takes any tile whose sides are multiples of 4."""
    import onnxruntime as ort
    import torch

    from hsiedge.checkpoint import load_checkpoint
    from hsiedge.export.onnx_model import torch_to_onnx
    from hsiedge.export.portable import decompose

    rng = np.random.default_rng(0)
    for name, shape in (("mambahsi", (1, 198, 48, 64)), ("spectralmamba", (5, 198, 7, 7))):
        model = load_checkpoint(checkpoints[name]).build()
        graph = torch_to_onnx(model)
        dims = graph.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param  # batch
        if name == "mambahsi":
            assert dims[2].dim_param and dims[3].dim_param
        sess = ort.InferenceSession(decompose(graph).SerializeToString(), providers=["CPUExecutionProvider"])
        x = rng.standard_normal(shape).astype(np.float32)
        (y,) = sess.run(None, {"x": x})
        with torch.no_grad():
            t = torch.from_numpy(x)
            ref = (model.full_resolution_logits(t) if name == "mambahsi" else model(t)).numpy()
        assert y.shape == ref.shape
        assert np.linalg.norm(y - ref) <= 1e-4 * np.linalg.norm(ref)


@pytest.mark.parametrize("model", ["spectralmamba", "mambahsi"])
def test_polygraphy_runs_a_plugin_bundle_with_onnxruntime(exported, model):
    """Plugin bundles run in any ONNX tool as they are: the SelectiveScan node resolves to its
    model-local function (Polygraphy's own ONNX Runtime runner, no hsiedge code involved)."""
    import subprocess
    import sys

    path, _ = exported(model, "plugin", "fp32")
    shapes = ["--input-shapes", "x:[1,198,32,32]"] if model == "mambahsi" else []
    polygraphy = Path(sys.executable).with_name("polygraphy")
    res = subprocess.run([str(polygraphy), "run", str(path / "model.onnx"), "--onnxrt", *shapes],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "PASSED" in res.stdout + res.stderr


def test_export_on_a_large_calibration_scene_stays_bounded(checkpoints, jasper_cube, tmp_path):
    """A --calib scene larger than the held-out window: parity runs on its central 512 x 512
    window and at most 16,384 sampled pixels, calibration on 2,048 pixels from windows over the
    whole scene; parity-check reads back exactly that window and those pixels."""
    import rasterio
    from rasterio.transform import from_origin

    from hsiedge.export.bundle_export import CALIB_PIXELS, PARITY_PIXELS

    rows, cols = 600, 530
    mosaic = np.tile(jasper_cube, (6, 6, 1))[:rows, :cols]
    scene = tmp_path / "mosaic.tif"
    with rasterio.open(scene, "w", driver="GTiff", height=rows, width=cols, count=mosaic.shape[2],
                       dtype=mosaic.dtype.name, crs="EPSG:32610", transform=from_origin(0, 0, 20, 20),
                       interleave="pixel", tiled=True) as dst:
        dst.write(mosaic.transpose(2, 0, 1))
    manifest = export_bundle(checkpoints["spectralmamba"], tmp_path / "b", precision="int8", calib=scene)
    held = manifest["heldout"]
    assert held["window"] == [44, 9, 512, 512]  # central
    assert f"{PARITY_PIXELS} pixels sampled from the valid pixels of its central 512 x 512" in (
        held["description"])
    assert manifest["calibration"]["samples"] == CALIB_PIXELS and manifest["parity"]["passed"]
    with np.load(tmp_path / "b" / "heldout.npz") as h:
        pixels = h["pixels"]
    assert pixels.size == PARITY_PIXELS and pixels.max() < 512 * 512 and np.all(np.diff(pixels) > 0)
    res = CliRunner().invoke(app, ["parity-check", str(tmp_path / "b"), "--scene", str(scene), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["pixels"] == PARITY_PIXELS
    agreement = manifest["parity"]["results"][0]["figures"]["agreement"]
    assert report["results"][0]["figures"]["agreement"] == agreement


def test_scan_nodes_for_tensorrts_parser_lose_their_trailing_empty_inputs():
    """TensorRT's parser gives the plugin a null tensor for an empty input name: trailing absent
    inputs are dropped (the plugin takes the rest in role order); a hole before a present input
    is refused with one sentence."""
    from onnx import helper

    def graph(inputs: list[str]) -> onnx.ModelProto:
        node = helper.make_node(scan_node.OP_TYPE, inputs, ["y"], name="scan", domain=scan_node.DOMAIN)
        return helper.make_model(helper.make_graph([node], "g", [], []))

    full = graph(["u", "dt", "A", "B", "C", "D", "z", "bias"])
    assert not scan_node.for_tensorrt_parser(full) and len(full.graph.node[0].input) == 8
    trailing = graph(["u", "dt", "A", "B", "C", "D", "", ""])
    assert scan_node.for_tensorrt_parser(trailing)
    assert list(trailing.graph.node[0].input) == ["u", "dt", "A", "B", "C", "D"]
    with pytest.raises(ValueError, match=r"scan: its z input is absent but a later one is present"):
        scan_node.for_tensorrt_parser(graph(["u", "dt", "A", "B", "C", "D", "", "bias"]))


def test_md2f_scan_has_only_trailing_absent_inputs():
    """MD2F-Mamba's scan has no z and folds its step bias into delta, so TensorRT can parse it."""
    from hsiedge.export import onnx_model
    from hsiedge.models import build_model

    graph = onnx_model.torch_to_onnx(build_model("md2f-mamba", in_channels=30, num_classes=4))
    (node,) = scan_node.scan_nodes(graph)
    assert [bool(n) for n in node.input] == [True] * 6 + [False, False]
