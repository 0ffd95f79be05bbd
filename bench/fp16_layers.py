"""Where does an fp16 export lose precision?  fp16 vs fp32, tensor by tensor, in ONNX Runtime.

Exports a checkpoint to ONNX (fp32) and converts it with `hsiedge.export.precision.to_fp16`
exactly as `hsiedge export --precision fp16` does; both graphs get their SelectiveScan nodes
replaced by the portable decomposition (float32 inside, as the C kernel that ONNX Runtime's
CPU runner casts float16 scans to; its inner tensors can then be exposed) and run on the
checkpoint's held-out scene, with the
outputs of the nodes of the un-decomposed graph exposed as graph outputs.  A float16 tensor is
compared with the float32 tensor of the same name (a cast the converter inserted is compared
with the tensor it casts), both in float64.

Per node: its output's relative L2 error ||fp16 - fp32|| / ||fp32||, and its growth: that error
over the largest relative error among its inputs (weights included, as rounded to half).  A
growth near 1 passes the error on; well above 1, the node itself adds error (a rounding of a
tensor that was exact, a cancellation, an amplification).  The module table shows each module's
last output (the error after that layer) and its growth over the previous module's.  Finally
the logits at the held-out pixels against the PyTorch original: label agreement and the
confident flips of `hsiedge.parity.flip_figures`.

A benchmark, not a test: it prints, it asserts nothing.

    python bench/fp16_layers.py CKPT [--nodes 40] [--calib SCENE]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, numpy_helper
from rich.console import Console
from rich.table import Table

from hsiedge.checkpoint import load_checkpoint
from hsiedge.export import onnx_model, portable
from hsiedge.export.bundle_export import held_out_data
from hsiedge.export.precision import to_fp16
from hsiedge.parity import flip_figures, parity_data, pixel_logits
from hsiedge.tensor_inputs import image_logits

FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16)
MOVES = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split", "Concat", "Identity",
         "Pad", "Shape", "Cast"}  # value-preserving (Cast between float types: rounding only)
GROUP = 24  # exposed outputs per run: bounds the memory a run holds


def session(model: onnx.ModelProto, outputs: list[str]) -> ort.InferenceSession:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = False
    # no fusions: every exposed tensor is computed as the graph says
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def strict_half(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 graph computing what `model` (float16, scan decomposed) computes when every half
    tensor is stored as half, as on a GPU: each node runs in float32 on the half-rounded values
    and its half outputs are rounded (Cast to float16 and back).  ONNX Runtime's CPU has no
    float16 kernels for most ops: it runs chains of them in float32 and rounds only where the
    graph casts explicitly or a shape op reads the tensor, so it alone under-states the error."""
    halves = {k for k, v in float_tensors(model).items() if v == TensorProto.FLOAT16}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for init in m.graph.initializer:
        if init.data_type == TensorProto.FLOAT16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    nodes = []
    for node in m.graph.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT16:
                a.i = TensorProto.FLOAT
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
        nodes.append(node)
        for k, out in enumerate(node.output):
            if out in halves:
                node.output[k] = out + "/f32"
                half = onnx.helper.make_node("Cast", [out + "/f32"], [out + "/f16"], to=TensorProto.FLOAT16)
                nodes += [half, onnx.helper.make_node("Cast", [out + "/f16"], [out], to=TensorProto.FLOAT)]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


def float_tensors(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    return {k: v for k, v in types.items() if v in FLOATS}


def scope(node: onnx.NodeProto) -> str:
    props = {p.key: p.value for p in node.metadata_props}
    scopes = props.get("pkg.torch.onnx.name_scopes", "")
    parts = re.findall(r"'([^']*)'", scopes)
    parts = [p for p in parts[:-1] if p]  # the last part is the aten op
    return (parts[-1] if parts else "").removeprefix("model.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--calib", type=Path, help="scene to run on (default: the training scene's test split)")
    ap.add_argument("--nodes", type=int, default=40, help="node rows to print, largest growth first")
    ap.add_argument("--strict", action="store_true",
                    help="round every half tensor, as a GPU stores it (see strict_half), not as ONNX "
                         "Runtime's CPU runs the graph (the parity check's view)")
    ap.add_argument("--no-targeted", action="store_true",
                    help="convert without precision.fp32_nodes (only the op types stay float32)")
    args = ap.parse_args()
    console = Console(width=160)

    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.build().eval()
    kind, patch = getattr(model, "input_kind", "patch"), int(getattr(model, "patch_size", 0))
    held = held_out_data(ckpt, args.calib, None, kind)
    data = parity_data(ckpt.preprocessing, held.cube, kind, patch, nodata=held.nodata, pixels=held.pixels)
    x = np.asarray(data.batches[0], dtype=np.float32)

    plugin32 = onnx_model.torch_to_onnx(model)
    plugin16 = to_fp16(plugin32, keep_nodes=[] if args.no_targeted else None)
    g32, g16 = portable.decompose(plugin32), portable.decompose(plugin16)
    if args.strict:
        g16 = strict_half(g16)
    t32, t16 = float_tensors(g32), float_tensors(g16)

    # fp16 name -> the fp32 tensor it stands for (converter casts stand for their source)
    producer16 = {o: n for n in plugin16.graph.node for o in n.output}
    def source(name: str) -> str:
        while name not in t32:
            if name in producer16 and producer16[name].op_type == "Cast":
                name = producer16[name].input[0]
            elif name.endswith("_cast_to_fp16"):  # a blocked node's float32 output, renamed
                name = name.removesuffix("_cast_to_fp16")
            else:
                break
        return name

    inits32 = {i.name: numpy_helper.to_array(i) for i in g32.graph.initializer}
    inits16 = {i.name: numpy_helper.to_array(i) for i in g16.graph.initializer}
    compared = [o for n in plugin16.graph.node for o in n.output
                if o in t16 and source(o) in t32 and o not in inits16]
    rel: dict[str, float] = {}
    for name, a in inits16.items():  # weights as rounded (or not) to half
        if name in inits32 and a.dtype.kind == "f" and inits32[name].size > 1:
            ref = inits32[name].astype(np.float64)
            rel[name] = float(np.linalg.norm(a.astype(np.float64) - ref) / max(np.linalg.norm(ref), 1e-30))
    rel["x"] = 0.0
    stats: dict[str, tuple[float, float, str]] = {}
    s32_all = {}
    for k in range(0, len(compared), GROUP):
        part = compared[k:k + GROUP]
        refs = sorted({source(o) for o in part})
        s32_all = dict(zip(refs, session(g32, refs).run(refs, {"x": x}), strict=True))
        outs16 = session(g16, part).run(part, {"x": x})
        for name, a in zip(part, outs16, strict=True):
            ref = s32_all[source(name)].astype(np.float64)
            d = a.astype(np.float64) - ref
            r = float(np.linalg.norm(d) / max(np.linalg.norm(ref), 1e-30))
            rel[name] = r
            stats[name] = (r, float(np.abs(d).max() / max(np.abs(ref).max(), 1e-30)),
                           np.dtype(a.dtype).name)
        del s32_all, outs16

    rows = []
    for node in plugin16.graph.node:
        outs = [o for o in node.output if o in stats]
        if not outs:
            continue
        o = outs[0]
        ins = [rel[i] for i in node.input if i in rel]
        inherited = max(ins) if ins else 0.0
        growth = stats[o][0] / inherited if inherited > 0 else float("nan")
        rows.append((node, o, stats[o], inherited, growth))

    table = Table(title=f"fp16 vs fp32 per node, {len(rows)} nodes: the {args.nodes} adding the most error "
                        "(growth = out rel / max in rel)")
    for c in ("#", "node", "op", "module", "dtype", "rel L2 out", "max in", "growth", "max|Δ|/max|ref|"):
        table.add_column(c, justify="left" if c in ("node", "op", "module") else "right")
    order = {id(r[0]): i for i, r in enumerate(rows)}
    adding = [r for r in rows if r[0].op_type not in MOVES or r[0].op_type == "Cast"]
    for node, _, (r, m, dt), inherited, growth in sorted(adding, key=lambda r: -r[4])[:args.nodes]:
        table.add_row(str(order[id(node)]), node.name[:40], node.op_type, scope(node)[:34], dt,
                      f"{r:.2e}", f"{inherited:.2e}", f"{growth:.2f}", f"{m:.2e}")
    console.print(table)

    mods = Table(title="per module (its last output in graph order; growth over the previous module's)")
    for c in ("module", "last node", "op", "dtype", "rel L2", "growth"):
        mods.add_column(c, justify="left" if c in ("module", "last node", "op") else "right")
    last: dict[str, tuple] = {}
    for row in rows:
        last[scope(row[0])] = row  # insertion order is first appearance; value the last node
    prev = None
    for name, (node, _, (r, _, dt), _, _) in last.items():
        mods.add_row(name or "(no module: io casts, Resize)", node.name[:40], node.op_type, dt, f"{r:.2e}",
                     "" if not prev else f"{r / prev:.2f}")
        prev = r
    console.print(mods)

    with torch.no_grad():
        orig = image_logits(model, torch.from_numpy(ckpt.preprocessing.apply(held.cube, held.nodata)[0])
                            .permute(2, 0, 1).contiguous()).numpy()[None] if kind == "image" else None
    graphs = {"fp32": g32, "fp16 (as compared above)": g16}
    for tag, keep in (("fp16, op types only", []), ("fp16, + fp32_nodes", None)):
        g = portable.decompose(to_fp16(plugin32, keep_nodes=keep))
        graphs[tag + ", ORT CPU"], graphs[tag + ", strict"] = g, strict_half(g)
    outs = {tag: session(g, ["logits"]).run(["logits"], {"x": x})[0].astype(np.float32)
            for tag, g in graphs.items()}
    if orig is None:
        raise SystemExit("the logits summary is written for image models")
    ref = pixel_logits([orig], data).astype(np.float64)
    summary = Table(title=f"logits at {data.pixels.size} held-out pixels vs the PyTorch original")
    for c in ("graph", "rel L2", "agreement", "differ", "confident flips", "error bound"):
        summary.add_column(c, justify="right")
    for tag, y in outs.items():
        cand = pixel_logits([y], data).astype(np.float64)
        f = flip_figures(ref, cand)
        differ = int((ref.argmax(1) != cand.argmax(1)).sum())
        summary.add_row(tag, f"{np.linalg.norm(cand - ref) / np.linalg.norm(ref):.2e}",
                        f"{1 - differ / ref.shape[0]:.4%}", str(differ),
                        f"{f['flips_confident']}/{f['confident_pixels']}", f"{f['error_bound']:.2e}")
    console.print(summary)


if __name__ == "__main__":
    main()
