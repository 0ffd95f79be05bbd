"""Forms of the portable selective scan, side by side, in ONNX Runtime on CPU and against torch.

For each seed model in its default config (MambaHSI on one --tile x --tile tile, batch 1;
SpectralMamba and MD2F-Mamba on a batch of --batch patches, `hsiedge infer`'s default) and
each form of `hsiedge.export.portable.decompose`:

- per-step: one ONNX Scan over all L time steps (the earlier form);
- chunked (T): chunks of T steps, unrolled inside, carried across chunks by a Scan over the
  chunks (dynamic L) or by unrolled steps (static L); short static L is straight-line code;
- function: the plugin-mode graph as bundles carry it, SelectiveScan run through its
  model-local function (ONNX Runtime inlines it: it should equal chunked at the default T),

it prints the scan calls' lengths, the loop trip counts (one per Scan op executed, "-" where a
scan has no loop), the bytes the scans move, the largest tensor a scan makes, the share of ONNX
Runtime's time spent in the scans, and ONNX Runtime's time per forward next to the PyTorch
original's (its forward with the default CPU scan backend), medians of --runs runs on the
same input, interleaved in one process.

Bytes moved, a simple model: the sum, over every execution of every node of the scan's
decomposition (a Scan body once per iteration, the Scan op itself for its slicing and
stacking), of the sizes of the tensors it reads and writes, taken from the shapes ONNX
Runtime's profiler records (`SessionOptions.enable_profiling`).  It is graph-level traffic,
what an executor that fuses nothing moves; caches, in-place reuse and fusion (TensorRT's)
change what really reaches memory.  Profiled runs are not timed.

A benchmark, not a test: it prints tables and asserts nothing.  The machine is shared: the
load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table

from hsiedge.export import onnx_model, portable, scan_functions
from hsiedge.models.registry import build_model

TAG = "/portable/"  # every node of a decomposition is named <scan node>/portable/... (export/portable.py)

MODELS = ("mambahsi", "spectralmamba", "md2f-mamba")
ITEM_BYTES = {"float": 4, "float16": 2, "double": 8, "int64": 8, "int32": 4, "int8": 1, "uint8": 1, "bool": 1}
console = Console(width=170)


@dataclass
class Form:
    """One ONNX graph of the model and what running it showed."""

    name: str
    graph: onnx.ModelProto
    session: ort.InferenceSession | None = None
    times: list[float] = field(default_factory=list)
    trips: list[int] = field(default_factory=list)
    scan_bytes: int = 0
    largest: int = 0
    scan_share: float = 0.0
    top_ops: list[tuple[str, float]] = field(default_factory=list)


def model_input(model: torch.nn.Module, tile: int, batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    kind = getattr(model, "input_kind", "patch")
    if kind == "image":
        shape = (1, model.in_channels, tile, tile)
    elif kind == "pixel":
        shape = (batch, model.in_channels)
    else:
        shape = (batch, model.in_channels, model.patch_size, model.patch_size)
    return rng.standard_normal(shape).astype(np.float32)


def session(graph: onnx.ModelProto, threads: int, profile_dir: str | None = None) -> ort.InferenceSession:
    """A CPU session configured as `hsiedge.runtimes.onnxruntime` configures its own."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = False
    if threads:
        opts.intra_op_num_threads = threads
    if profile_dir:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(profile_dir) / "scan_forms")
    return ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def tensor_bytes(typed_shapes: list[dict]) -> list[int]:
    out = []
    for entry in typed_shapes:
        for dtype, shape in entry.items():
            out.append(int(np.prod(shape, dtype=np.int64)) * ITEM_BYTES.get(dtype, 4))
    return out


def scan_axes(graph: onnx.ModelProto) -> dict[str, int]:
    """Scan node name -> the axis its first scanned input is cut along."""
    axes = {}
    for n in graph.graph.node:
        if n.op_type == "Scan":
            attrs = {a.name: a for a in n.attribute}
            axes[n.name] = attrs["scan_input_axes"].ints[0] if "scan_input_axes" in attrs else 0
    return axes


def profile(form: Form, x: np.ndarray, threads: int) -> None:
    """One profiled run: trip counts, bytes moved and time share of the scans' nodes."""
    axes = scan_axes(form.graph)
    with tempfile.TemporaryDirectory(prefix="hsiedge-scan-forms-") as tmp:
        sess = session(form.graph, threads, tmp)
        sess.run(None, {sess.get_inputs()[0].name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    total = scan_time = 0.0
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        name, args = e["name"][: -len("_kernel_time")], e.get("args", {})
        ins = tensor_bytes(args.get("input_type_shape", []))
        outs = tensor_bytes(args.get("output_type_shape", []))
        inner = "/step/" in name or "carry_" in name  # Scan body nodes: their time is inside the Scan's
        if not inner:
            total += e["dur"]
        if TAG not in name:
            continue
        form.scan_bytes += sum(ins) + sum(outs)
        form.largest = max([form.largest, *ins, *outs])
        if not inner:
            scan_time += e["dur"]
            op = args.get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"]
        if name in axes:
            shape = next(iter(args["input_type_shape"][1].values()))
            form.trips.append(int(shape[axes[name]]))
    form.scan_share = scan_time / total if total else 0.0
    form.top_ops = sorted(((op, t / 1e3) for op, t in by_op.items()), key=lambda p: -p[1])[:5]


def torch_forward(model: torch.nn.Module):
    image = getattr(model, "input_kind", "patch") == "image"
    return model.full_resolution_logits if image else model


def bench_model(name: str, args: argparse.Namespace) -> tuple[list[Form], list[float], dict]:
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = model_input(model, args.tile, args.batch)
    plugin = onnx_model.torch_to_onnx(model)
    forms = [Form("per-step", portable.decompose(plugin, form="per-step"))]
    forms += [Form(f"chunked T={t}", portable.decompose(plugin, chunk=t)) for t in args.chunks]
    forms.append(Form(f"function T={portable.CHUNK}", scan_functions.attach_functions(plugin)))
    forward = torch_forward(model)
    xt = torch.from_numpy(x)
    with torch.inference_mode():
        ref = forward(xt).numpy()
        for f in forms:
            f.session = session(f.graph, args.threads)
            y = f.session.run(None, {f.session.get_inputs()[0].name: x})[0]  # warm-up and check
            err = float(np.abs(y - ref).max() / max(1e-12, np.abs(ref).max()))
            if err > 1e-4:
                console.print(f"[red]{name} {f.name}: differs from torch by {err:.1e} (relative)[/red]")
        torch_times = []
        for _ in range(args.runs):
            for f in forms:
                t0 = time.perf_counter()
                f.session.run(None, {f.session.get_inputs()[0].name: x})
                f.times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            forward(xt)
            torch_times.append(time.perf_counter() - t0)
    for f in forms:
        f.session = None
        if not f.name.startswith("function"):
            profile(f, x, args.threads)
    # the per-step form has one Scan over L per scan call: its trip counts are the calls' lengths
    info = {"input": "x".join(map(str, x.shape)), "lengths": [str(t) for t in forms[0].trips],
            "nodes": {f.name: len(f.graph.graph.node) for f in forms}}
    return forms, torch_times, info


def trips_text(trips: list[int]) -> str:
    if not trips:
        return "- (no loop)"
    return ", ".join(map(str, trips)) + f"  (total {sum(trips):,})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--runs", type=int, default=5, help="timed runs per form (median)")
    ap.add_argument("--tile", type=int, default=128, help="MambaHSI tile side")
    ap.add_argument("--batch", type=int, default=128, help="patches per forward for the patch models")
    ap.add_argument("--chunks", type=int, nargs="*", default=[portable.CHUNK],
                    help="chunk sizes T to compare")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    ap.add_argument("--top-ops", action="store_true",
                    help="also print where ONNX Runtime spends the scans' time")
    args = ap.parse_args()

    console.print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; torch "
                  f"{torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__} "
                  f"({args.threads or 'default'} threads)")
    table = Table(title="selective-scan forms: ONNX Runtime (CPU) vs the PyTorch original, "
                        "ms per forward (median)")
    left = ("model / input", "form", "loop trip counts")
    for col in (*left[:2], "scan L", left[2], "scan bytes moved", "largest scan tensor", "nodes",
                "ORT time in scans", "ORT ms", "torch ms", "ORT / torch"):
        table.add_column(col, justify="left" if col in left else "right")
    for name in args.models:
        forms, torch_times, info = bench_model(name, args)
        torch_ms = 1e3 * statistics.median(torch_times)
        for i, f in enumerate(forms):
            ort_ms = 1e3 * statistics.median(f.times)
            profiled = not f.name.startswith("function")
            table.add_row(f"{name} {info['input']}" if i == 0 else "", f.name,
                          ", ".join(info["lengths"]) if i == 0 else "",
                          trips_text(f.trips) if profiled else "as chunked",
                          f"{f.scan_bytes / 2**30:.2f} GiB" if profiled else "",
                          f"{f.largest / 2**20:.1f} MiB" if profiled else "", f"{info['nodes'][f.name]:,}",
                          f"{100 * f.scan_share:.0f} %" if profiled else "", f"{ort_ms:,.1f}",
                          f"{torch_ms:,.1f}" if i == 0 else "", f"{ort_ms / torch_ms:.2f}")
            if args.top_ops and f.top_ops:
                console.print(f"{name} {f.name}: scans' ORT time by op (ms, profiled run): "
                              + ", ".join(f"{op} {ms:.1f}" for op, ms in f.top_ops))
        table.add_section()
        console.print(f"{name}: done (load average {os.getloadavg()[0]:.2f})")
    console.print(table)
    console.print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
