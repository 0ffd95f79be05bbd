"""A bundle's manifest against the ONNX graph it describes: `check_against_graph`.

The graph is loaded without its external data (a bundle's graph must have none); its input,
output, precision, scan nodes and opsets must be what the manifest says, so a manifest edited
to fit other weights, bands or classes is refused before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hsiedge.manifest import ManifestError, expect


def _subgraphs(graph: Any) -> Any:
    """`graph` and every graph nested in its nodes' attributes (Loop / Scan / If bodies)."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _subgraphs(g)


def _tensors(model: Any) -> Any:
    """Every TensorProto the model stores: initializers and attribute tensors, functions included."""
    nodes = [n for f in model.functions for n in f.node]
    for g in _subgraphs(model.graph):
        yield from g.initializer
        for s in g.sparse_initializer:
            yield from (s.values, s.indices)
        nodes += g.node
    for n in nodes:
        for a in n.attribute:
            yield from ([a.t] if a.HasField("t") else []) + list(a.tensors)
            for s in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
                yield from (s.values, s.indices)


def check_against_graph(manifest: dict[str, Any], onnx_path: Path) -> None:
    """Cross-check a parsed manifest against its ONNX graph (never reading external data): input name,
    dtype and shape, class count, precision, scan mode and opsets."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except (OSError, DecodeError, ValueError):
        raise ManifestError("artifacts.onnx: expected an ONNX model, found a file ONNX cannot read") from None
    external = any(t.data_location == onnx.TensorProto.EXTERNAL or t.external_data for t in _tensors(model))
    expect(not external, "artifacts.onnx", "a self-contained model (bundles allow no external data files)",
           "a model that refers to external data files")

    def same(field: str, graph: Any, ours: Any, what: str) -> None:
        expect(graph == ours, field, f"{graph!r} as in the ONNX graph ({what})", ours)

    g, inp, out = model.graph, manifest["input"], manifest["output"]
    inputs = [v for v in g.input if v.name not in {i.name for i in g.initializer}]
    same("input", 1, len(inputs), "its number of inputs")
    same("output", 1, len(g.output), "its number of outputs")
    same("input.name", inputs[0].name, inp["name"], "its input")
    same("output.name", g.output[0].name, out["name"], "its output")
    names = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}
    for field, v in (("input.dtype", inputs[0]), ("output.dtype", g.output[0])):
        dtype = v.type.tensor_type.elem_type
        same(field, names.get(dtype, f"ONNX type {dtype}"), "float32", f"{v.name}'s element type")
    dims = [[d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in (inputs[0], g.output[0])]
    shape, kind = dims[0], inp["kind"]
    same("input.layout", {2: "NC", 4: "NCHW"}.get(len(shape), f"rank {len(shape)}"), inp["layout"],
         "input rank")
    same("input.bands", shape[1], inp["bands"], "input dimension 1")
    if len(shape) == 4:
        same("input.kind", "image" if shape[2:] == [None, None] else "patch", kind, "input height and width")
        if kind == "patch":
            same("input.patch_size", shape[2] if shape[2] == shape[3] else shape[2:], inp["patch_size"],
                 "input dimensions 2 and 3")
    else:
        same("input.kind", "pixel", kind, "a rank-2 input")
    if inp.get("batch_dynamic", True):
        same("input.batch_dynamic", shape[0] is None, True, "whether input dimension 0 is dynamic")
    same("output.layout", {2: "NK", 4: "NKHW"}.get(len(dims[1]), f"rank {len(dims[1])}"), out["layout"],
         "output rank")
    same("classes", dims[1][1], len(manifest["classes"]), "number of classes: output dimension 1")
    graphs = list(_subgraphs(g))
    ops = [(n.domain or "ai.onnx", n.op_type) for sub in graphs for n in sub.node]
    half = onnx.TensorProto.FLOAT16
    has_half = any(t.data_type == half for sub in graphs for t in sub.initializer) or any(
        n.op_type == "Cast" and any(a.name == "to" and a.i == half for a in n.attribute)
        for sub in graphs for n in sub.node)
    has_qdq = any(op in (("ai.onnx", "QuantizeLinear"), ("ai.onnx", "DequantizeLinear")) for op in ops)
    same("precision", "int8" if has_qdq else "fp16" if has_half else "fp32", manifest["precision"],
         "Q/DQ nodes for int8, float16 tensors for fp16, neither for fp32")
    scans = ops.count(("hsiedge", "SelectiveScan"))
    same("scan", "plugin" if scans else "portable", manifest["scan"], f"{scans} hsiedge SelectiveScan nodes")
    if manifest["scan"] == "plugin" and manifest.get("scan_calls") is not None:
        same("scan_calls", scans, manifest["scan_calls"], "hsiedge SelectiveScan nodes")
    imports = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    for domain in sorted({"ai.onnx", "hsiedge", *manifest["opset"]}):
        same(f"opset.{domain}", imports.get(domain), manifest["opset"].get(domain), "its opset imports")
