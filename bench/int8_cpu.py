"""int8 against fp32 on ONNX Runtime's CPU provider: time per batch and which kernels run.

    python bench/int8_cpu.py MODEL=FP32_BUNDLE,INT8_BUNDLE [...] [--rounds 7] [--batch 128]
                             [--tile 128] [--threads N] [--dump DIR] [--target 1.5]

For each model: one realistic call (patch models: a batch of `--batch` patches of the
manifest's bands and patch size; tile models: one (1, bands, tile, tile) tile), run through the
hsiedge ONNX Runtime runner of each bundle exactly as `hsiedge infer` opens it.  The two runners
are timed in interleaved rounds (fp32, int8, fp32, int8, ...) so that the load of a shared
machine falls on both alike; the table shows medians.  A second pair of sessions, opened the
same way but with ONNX Runtime's profiler on, says which kernels run: the int8 ones
(QLinearConv, QGemm, MatMulInteger, ...), the float compute ones (Conv, MatMul, FusedConv,
...), the Q/DQ conversions, hsiedge's float SelectiveScan kernel, and the rest, with their
share of the profiled time.  The ceiling line is Amdahl's law on the fp32 profile: the
int8 / fp32 ratio that would follow if the layers int8 quantizes (the float Conv, MatMul and
Gemm kernels) cost nothing and nothing else changed; a model whose ceiling is under a target
cannot reach it by int8 kernels, however fast.  The line under it turns the same law around:
how many times faster than in fp32 the quantized layers would have to run for int8 to be
`--target` x fp32 (Q/DQ free, nothing else changed), beside how much faster they ran here (the
Conv/MatMul/Gemm kernels' share of each profile times that bundle's median call) and the time
the Q/DQ conversions added.  `--dump DIR` also writes each session's
optimized graph (ONNX Runtime's `optimized_model_filepath`) and profile there.  Agreement is the export
parity figure from each bundle's manifest (and its threshold), plus the top-1 agreement of the
int8 runner with the fp32 one on the timed input itself.  The process's heap is set as `hsiedge
infer` sets it for each model (hsiedge.memory: MambaHSI keeps blocks over 32 MiB on the heap),
since glibc's own settings page-fault some calls' tensors in afresh.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

INT8_KERNELS = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger",
                "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul",
                "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearAveragePool",
                "QLinearGlobalAveragePool", "QLinearConcat", "QLinearReduceMean", "QAttention",
                "DynamicQuantizeLSTM", "QLinearWhere"}
CONVERSIONS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
FLOAT_COMPUTE = {"Conv", "FusedConv", "NhwcFusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm",
                 "ConvTranspose"}  # Einsum: the runner's rewrite of small transposes, "other"
SCAN = {"SelectiveScan"}


def kind_of(op: str) -> str:
    if op in INT8_KERNELS:
        return "int8"
    if op in CONVERSIONS:
        return "q/dq"
    if op in FLOAT_COMPUTE:
        return "float"
    if op in SCAN:
        return "scan"
    return "other"


@contextlib.contextmanager
def _profiled_sessions(prefix: str, optimized: str | None):
    """While open, every ONNX Runtime session created gets the profiler on (and writes its
    optimized graph to `optimized`); the runner's own session options are otherwise untouched."""
    import onnxruntime as ort

    real = ort.InferenceSession

    def make(model, opts=None, *args, **kwargs):
        opts = opts or ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = prefix
        if optimized:
            opts.optimized_model_filepath = optimized
        return real(model, opts, *args, **kwargs)

    ort.InferenceSession = make
    try:
        yield
    finally:
        ort.InferenceSession = real


def open_runner_for(path: str, threads: int | None):
    from hsiedge.bundle import open_bundle
    from hsiedge.runtimes import open_runner

    return open_runner(open_bundle(path), "onnxruntime", device="cpu", threads=threads)


def profile(path: str, x: np.ndarray, threads: int | None, calls: int, dump: Path | None,
            tag: str) -> dict:
    """Kernel counts and time by kind from ONNX Runtime's profiler over `calls` runs."""
    with tempfile.TemporaryDirectory(prefix="hsiedge-int8-prof-") as tmp:
        where = dump or Path(tmp)
        optimized = str(where / f"{tag}.optimized.onnx") if dump else None
        with _profiled_sessions(str(where / f"{tag}.profile"), optimized):
            runner = open_runner_for(path, threads)
        runner.run(x)  # warm-up
        for _ in range(calls):
            runner.run(x)
        trace = runner.session.end_profiling()
        runner.close()
        events = json.loads(Path(trace).read_text())
    # Per node (first call's node list gives the counts), time over the profiled calls.
    per_op_time: dict[str, float] = defaultdict(float)
    nodes: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e.get("args", {}).get("op_name", "?")
        nodes[e["name"]] = op
        per_op_time[op] += e["dur"]
    counts = Counter(nodes.values())
    by_kind_time: dict[str, float] = defaultdict(float)
    by_kind_count: Counter = Counter()
    for op, n in counts.items():
        by_kind_count[kind_of(op)] += n
        by_kind_time[kind_of(op)] += per_op_time[op]
    total = sum(per_op_time.values()) or 1.0
    return {"counts": dict(counts), "op_share": {op: t / total for op, t in per_op_time.items()},
            "kind_count": dict(by_kind_count), "kind_share": {k: t / total for k, t in by_kind_time.items()}}


def bench_input(path: str, batch: int, tile: int) -> tuple[str, np.ndarray]:
    from hsiedge.bundle import open_bundle

    b = open_bundle(path)
    bands = int(b.manifest["input"]["bands"])
    rng = np.random.default_rng(0)
    if b.input_kind == "patch":
        p = b.patch_size
        shape = (batch, bands, p, p) if p else (batch, bands)
    else:
        shape = (1, bands, tile, tile)
    return b.input_kind, rng.standard_normal(shape, dtype=np.float32)


def parity_of(path: str) -> tuple[float | None, float | None, bool | None]:
    from hsiedge.bundle import open_bundle

    par = open_bundle(path).manifest.get("parity") or {}
    res = (par.get("results") or [{}])[0]
    return (res.get("figures", {}).get("agreement"), par.get("thresholds", {}).get("min_agreement"),
            res.get("passed"))


def bench_model(name: str, fp32: str, int8: str, args) -> dict:
    from hsiedge.memory import bound_heap

    kind, x = bench_input(fp32, args.batch, args.tile)
    bound_heap(large_blocks=kind == "image")  # the heap `hsiedge infer` gives this model
    runners = {"fp32": open_runner_for(fp32, args.threads), "int8": open_runner_for(int8, args.threads)}
    outs = {k: r.run(x) for k, r in runners.items()}  # warm-up, and the outputs compared
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for _ in range(args.rounds):
        for k, r in runners.items():
            t0 = time.perf_counter()
            r.run(x)
            times[k].append(time.perf_counter() - t0)
    for r in runners.values():
        r.close()
    dump = Path(args.dump) if args.dump else None
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
    prof = {k: profile(p, x, args.threads, args.profile_calls, dump, f"{name}.{k}")
            for k, p in (("fp32", fp32), ("int8", int8))}
    pixels = x.shape[0] if kind == "patch" else int(np.prod(x.shape[2:]))
    med = {k: statistics.median(v) for k, v in times.items()}
    ms = {k: v * 1e3 for k, v in med.items()}
    agree_here = float((outs["fp32"].argmax(1) == outs["int8"].argmax(1)).mean())
    agreement, threshold, passed = parity_of(int8)
    return {"model": name, "shape": list(x.shape), "pixels": pixels,
            "ms": ms,
            "spread_ms": {k: [min(v) * 1e3, max(v) * 1e3] for k, v in times.items()},
            "ratio": med["fp32"] / med["int8"], "agreement": agreement, "threshold": threshold,
            "parity_passed": passed, "agreement_here": agree_here, "profile": prof, "target": args.target,
            "needed_speedup": needed_speedup(prof["fp32"]["kind_share"].get("float", 0.0), args.target),
            "layer_ms": layer_times(prof, ms)}


def int8_ceiling(float_share: float) -> float:
    """The most int8 could gain on a graph whose fp32 kernel time is `float_share` float
    Conv/MatMul/Gemm (the layers int8 quantizes): the time left if those cost nothing (Amdahl)."""
    rest = 1.0 - float_share
    return float("inf") if rest <= 0 else 1.0 / rest


def needed_speedup(float_share: float, target: float) -> float:
    """How many times faster than in fp32 the quantized layers (`float_share` of the fp32 kernel
    time) must run for the whole to be `target` times faster, the rest unchanged and Q/DQ free:
    Amdahl's law solved for the layers' speed-up; infinite where even free layers fall short."""
    budget = 1.0 / target - (1.0 - float_share)
    return float("inf") if budget <= 0 else float_share / budget


def layer_times(prof: dict, ms: dict[str, float]) -> dict[str, float]:
    """ms per call of the Conv/MatMul/Gemm layers in fp32, of the same layers in int8 (its int8
    kernels and the layers it kept float) and of int8's Q/DQ conversions: each kind's share of
    its profile times the bundle's unprofiled median call (the profiler slows calls unevenly)."""
    fp32, int8 = prof["fp32"]["kind_share"], prof["int8"]["kind_share"]
    return {"fp32": fp32.get("float", 0.0) * ms["fp32"],
            "int8": (int8.get("int8", 0.0) + int8.get("float", 0.0)) * ms["int8"],
            "qdq": int8.get("q/dq", 0.0) * ms["int8"]}


def _fmt_kinds(p: dict) -> str:
    order = ("int8", "q/dq", "float", "scan", "other")
    return " ".join(f"{k}:{p['kind_count'].get(k, 0)}/{100 * p['kind_share'].get(k, 0):.0f}%"
                    for k in order if p["kind_count"].get(k))


def print_table(rows: list[dict], load: str, threads) -> None:
    print(f"load average before: {load}; after: {_loadavg()}; threads: {threads or 'runtime default'}")
    head = (f"{'model':<14} {'input':<18} {'fp32 ms':>9} {'int8 ms':>9} {'ratio':>6} {'fp32 px/s':>10} "
            f"{'int8 px/s':>10} {'agree (export)':>15} {'need':>6} {'agree (here)':>12}")
    print(head)
    print("-" * len(head))
    for r in rows:
        a = "-" if r["agreement"] is None else f"{100 * r['agreement']:.2f}%"
        a += "" if r["parity_passed"] in (None, True) else " FAIL"
        need = "-" if r["threshold"] is None else f"{100 * r['threshold']:.0f}%"
        shape = "x".join(str(d) for d in r["shape"])
        pxs = {k: r["pixels"] / (v / 1e3) for k, v in r["ms"].items()}
        print(f"{r['model']:<14} {shape:<18} {r['ms']['fp32']:>9.1f} {r['ms']['int8']:>9.1f} "
              f"{r['ratio']:>5.2f}x {pxs['fp32']:>10.0f} {pxs['int8']:>10.0f} {a:>15} {need:>6} "
              f"{100 * r['agreement_here']:>11.2f}%")
    print("\nkernels (count / share of profiled time), by kind: int8 kernels, Q/DQ conversions, float "
          "Conv/MatMul/Gemm, the float SelectiveScan kernel, other")
    for r in rows:
        for k in ("fp32", "int8"):
            p = r["profile"][k]
            print(f"  {r['model']:<14} {k}: {_fmt_kinds(p)}")
        p = r["profile"]["int8"]
        int8_ops = ", ".join(f"{op} x{n}" for op, n in sorted(p["counts"].items()) if kind_of(op) == "int8")
        top = sorted(p["op_share"].items(), key=lambda t: -t[1])[:6]
        print(f"  {'':<14} int8 kernels: {int8_ops or 'none'}")
        print(f"  {'':<14} int8 top ops: {', '.join(f'{op} {100 * s:.0f}%' for op, s in top)}")
        share = r["profile"]["fp32"]["kind_share"].get("float", 0.0)
        top_gain = int8_ceiling(share)
        print(f"  {'':<14} ceiling: int8 at most {top_gain:.2f}x fp32 even with free int8 layers"
              f" (float Conv/MatMul/Gemm {100 * share:.0f}% of fp32 kernel time); measured "
              f"{r['ratio']:.2f}x")
        need, t = r["needed_speedup"], r["layer_ms"]
        if need == float("inf"):
            need_s = "out of reach even at no cost"
        else:
            need_s = f"{'over 100' if need >= 100 else f'{need:.1f}'}x faster than in fp32 (Q/DQ free)"
        ran = t["fp32"] / t["int8"] if t["int8"] else float("inf")
        print(f"  {'':<14} for {r['target']:g}x: the quantized layers {need_s}; here "
              f"{ran:.2f}x ({t['fp32']:.1f} -> {t['int8']:.1f} ms a call), and Q/DQ added {t['qdq']:.1f} ms")


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", nargs="+", metavar="MODEL=FP32,INT8", help="a name and its two bundles")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds (medians shown)")
    ap.add_argument("--batch", type=int, default=128, help="patches per call (patch models)")
    ap.add_argument("--tile", type=int, default=128, help="tile side (tile models: one (1, C, t, t) tile)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: every core)")
    ap.add_argument("--profile-calls", type=int, default=3, help="calls profiled per bundle")
    ap.add_argument("--dump", default=None, help="folder for optimized graphs and profiles")
    ap.add_argument("--target", type=float, default=1.5,
                    help="the int8 / fp32 speed-up the 'for' line solves for")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    load = _loadavg()
    rows = []
    for pair in args.pairs:
        name, _, paths = pair.partition("=")
        fp32, _, int8 = paths.partition(",")
        if not (name and fp32 and int8):
            raise SystemExit(f"{pair!r}: expected MODEL=FP32_BUNDLE,INT8_BUNDLE")
        rows.append(bench_model(name, os.path.expanduser(fp32), os.path.expanduser(int8), args))
    print_table(rows, load, args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
