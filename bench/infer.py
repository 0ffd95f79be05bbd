"""Streaming inference: `hsiedge infer` against the best loop a user would write, per model,
runtime and precision; and its peak memory.

    python bench/infer.py [--rounds 3] [--workdir DIR] [--models ...] [--big-gb 0]

Each model (trained briefly on the real 50 x 50 Pavia University crop, then exported fp32, fp16
and int8 with 8-bit and with 7-bit weights (`--weight-bits 7`), plugin scan, the crop as int8
calibration) classifies a mosaic of the crop's
randomly flipped / rotated copies, written as a georeferenced uint16 GeoTIFF: 610 x 340 x 103
(Pavia University's size) for MambaHSI and SpectralMamba, 160 x 160 for the slower MD2F-Mamba.

- **hsiedge**: `hsiedge infer --json` in its own process, pixels over the compute seconds
  its summary reports, for torch fp32 and ONNX Runtime fp32 / fp16 / int8 / int8 with 7-bit
  weights, and for the fp32
  bundle's default runtime (no --runtime), which is the ratio's numerator.
- **the best hand loop**: in its own process, the scene read whole with rasterio and
  preprocessed by the bundle's chain, patches cut with NumPy's sliding-window view, hsiedge's
  own model run eagerly under `torch.inference_mode` with the fast CPU scan, at batch 256 and
  1024 (the better one counts).  Its time covers reading, preprocessing and the loop.
  MambaHSI is an image model: its loop is the whole scene in one forward pass.
- The labels of both are compared: patch models must give identical labels; MambaHSI's tiles
  are compared with the whole-scene loop, and the agreement printed beside the ratio.
- Rounds are interleaved (every configuration once per round, each model's `hsiedge infer`
  runs before its loops) and medians reported, with the load average at the start and end of
  each round.
- `hsiedge bench --json` (runners only, no reading or writing) for each bundle, same batch.
- With `--big-gb`, the peak resident memory (VmHWM) of `hsiedge infer` on a scene of that
  size (the same mosaic, larger); `--big-seconds` stops each run early.

A benchmark, not a test: it prints tables and asserts nothing.  The weights are barely
trained (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import scipy.io as sio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
PAVIA = REPO.parent / "shared" / "datasets" / "pavia_university" / "paviaU_subimg.mat"
CRS = "EPSG:32632"  # UTM 32N, where Pavia is
TRANSFORM = from_origin(510000.0, 5010000.0, 1.3, 1.3)  # ROSIS: 1.3 m pixels
MODELS = ("mambahsi", "spectralmamba", "md2f-mamba")
SCENES = {"mambahsi": (610, 340), "spectralmamba": (610, 340), "md2f-mamba": (160, 160)}
PRECISIONS = ("fp32", "fp16", "int8", "int8-w7")
EXPORT_ARGS = {"int8-w7": ("--precision", "int8", "--weight-bits", "7")}  # the rest: --precision NAME
# (runtime, precision) configurations of `hsiedge infer`; None: the bundle's default runtime
CONFIGS = ((None, "fp32"), ("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16"),
           ("onnxruntime", "int8"), ("onnxruntime", "int8-w7"))
LOOP_BATCHES = (256, 1024)
console = Console(width=170)


def crop() -> np.ndarray:
    """The real Pavia University crop, (50, 50, 103) uint16."""
    return sio.loadmat(PAVIA)["paviaU_subimg"]


def write_mosaic(path: Path, rows: int, cols: int, block: np.ndarray, seed: int = 0) -> Path:
    """A (rows, cols) GeoTIFF tiled with randomly flipped / rotated copies of `block`."""
    rng = np.random.default_rng(seed)
    b = block.shape[0]
    profile = dict(driver="GTiff", height=rows, width=cols, count=block.shape[2], dtype=block.dtype.name,
                   crs=CRS, transform=TRANSFORM, interleave="pixel", tiled=True, blockxsize=256,
                   blockysize=256, BIGTIFF="IF_SAFER")
    tmp = path.with_name(f".{path.name}.part")
    with rasterio.open(tmp, "w", **profile) as dst:
        for r0 in range(0, rows, 256):
            h = min(256, rows - r0)
            strip = np.empty((h, cols, block.shape[2]), dtype=block.dtype)
            for br in range(r0 - r0 % b, r0 + h, b):
                for bc in range(0, cols, b):
                    piece = np.rot90(block, k=int(rng.integers(4)))
                    piece = piece[::-1] if rng.integers(2) else piece
                    top, bottom = max(br, r0), min(br + b, r0 + h, rows)
                    right = min(bc + b, cols)
                    strip[top - r0:bottom - r0, bc:right] = piece[top - br:bottom - br, :right - bc]
            dst.write(strip.transpose(2, 0, 1), window=Window(0, r0, cols, h))
    os.replace(tmp, path)
    return path


def hsiedge(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "hsiedge.cli", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"hsiedge {' '.join(args)} failed:\n{res.stderr}{res.stdout}")
    return res.stdout


def make_bundles(work: Path, models: list[str], epochs: int,
                 precisions: tuple[str, ...] = PRECISIONS) -> dict[tuple[str, str], Path]:
    """Train each model on the crop (labels: k-means clusters of its spectra) and export it at
    each precision (int8 calibrated on the crop); what the work folder already has is kept."""
    from scipy.cluster.vq import kmeans2

    cube = crop()
    scene = work / "pavia_crop.tif"
    if not scene.exists():
        with rasterio.open(scene, "w", driver="GTiff", height=50, width=50, count=103, dtype="uint16",
                           crs=CRS, transform=TRANSFORM, interleave="pixel") as dst:
            dst.write(cube.transpose(2, 0, 1))
    labels = work / "pavia_crop_labels.npy"
    if not labels.exists():
        x = cube.reshape(-1, 103).astype(np.float64)
        _, ids = kmeans2((x - x.mean(0)) / x.std(0), 6, seed=0, minit="++")
        np.save(labels, (ids + 1).reshape(50, 50).astype(np.uint8))
    bundles = {}
    for m in models:
        ckpt = work / f"{m}.pt"
        if not ckpt.exists():
            hsiedge("train", m, "--scene", str(scene), "--labels", str(labels), "--protocol", "per-class:10",
                    "--epochs", str(epochs), "-o", str(ckpt))
        for prec in precisions:
            out = work / f"{m}-{prec}.bundle"
            if not (out / "manifest.json").exists():
                t0 = time.perf_counter()
                hsiedge("export", str(ckpt), "-o", str(out), *EXPORT_ARGS.get(prec, ("--precision", prec)),
                        "--calib", str(scene), "--force")
                console.print(f"exported {m} {prec} in {time.perf_counter() - t0:.0f} s")
            bundles[m, prec] = out
    return bundles


def infer_run(scene: Path, bundle: Path, runtime: str | None, out: Path) -> dict:
    """`hsiedge infer --json` in its own process (its heap settings start clean): its summary."""
    args = ["infer", str(scene), "--bundle", str(bundle), "-o", str(out), "--json"]
    summary = json.loads(hsiedge(*args, *(["--runtime", runtime] if runtime else [])))
    with rasterio.open(out) as src:
        classes = src.read(1)
    for f in out.parent.glob(f"{out.name}*"):
        f.unlink()
    return {"px_s": summary["pixels"] / summary["seconds"], "runtime": summary["runtime"],
            "peak_mib": summary["peak_memory_mib"], "classes": classes}


def loop_child(scene: str, bundle_path: str, batch: int, labels_out: str) -> None:
    """The best hand loop (run in its own process by `loop_run`): prints its pixels/s."""
    from hsiedge.bundle import open_bundle
    from hsiedge.checkpoint import load_checkpoint
    from hsiedge.ops import scan_backend

    bundle = open_bundle(bundle_path)
    model = load_checkpoint(bundle.artifact("checkpoint")).build().eval()
    with scan_backend("cpu"), torch.inference_mode():
        t0 = time.perf_counter()
        with rasterio.open(scene) as src:
            cube = src.read().transpose(1, 2, 0)
        x, _ = bundle.preprocessing.apply(cube, None)
        h, w, _ = x.shape
        if bundle.input_kind == "image":  # the whole scene in one forward pass
            t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
            t = torch.nn.functional.pad(t[None], (0, -w % 4, 0, -h % 4), mode="reflect")
            labels = model.full_resolution_logits(t)[0, :, :h, :w].argmax(0).numpy()
        else:
            p = bundle.patch_size
            r = p // 2
            chw = np.ascontiguousarray(x.transpose(2, 0, 1))
            if p:
                padded = np.pad(chw, ((0, 0), (r, r), (r, r)), mode="reflect")
                view = np.lib.stride_tricks.sliding_window_view(padded, (p, p), axis=(1, 2))
                view = view.transpose(1, 2, 0, 3, 4)  # (h, w, bands, p, p)
            else:
                view = chw.transpose(1, 2, 0)
            rows, cols = np.divmod(np.arange(h * w), w)
            labels = np.empty(h * w, dtype=np.int64)
            for i in range(0, h * w, batch):
                xb = np.ascontiguousarray(view[rows[i:i + batch], cols[i:i + batch]])
                labels[i:i + batch] = model(torch.from_numpy(xb)).argmax(1).numpy()
            labels = labels.reshape(h, w)
        seconds = time.perf_counter() - t0
    np.save(labels_out, (labels + 1).astype(np.uint8))
    print(json.dumps({"px_s": h * w / seconds, "threads": torch.get_num_threads()}))


def loop_run(scene: Path, bundle: Path, batch: int, work: Path) -> dict:
    out = work / f"loop-{bundle.name}-{batch}.npy"
    cmd = [sys.executable, __file__, "--loop-child", str(scene), str(bundle), str(batch), str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"the loop on {bundle.name} failed:\n{res.stderr}")
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "classes": np.load(out)}


def bench_runners(bundle: Path, scene: Path, seconds: float) -> list[dict]:
    """`hsiedge bench --json` on the bundle, input cut from the scene."""
    return json.loads(hsiedge("bench", str(bundle), "--scene", str(scene), "--seconds", str(seconds),
                              "--json"))["results"]


def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def peak_rss(scene: Path, bundle: Path, runtime: str, limit_s: float, work: Path) -> tuple[float, str, float]:
    """Peak resident memory (MiB) of `hsiedge infer` in a subprocess, tiles done, seconds."""
    out = work / f"big-{bundle.stem}-{runtime}.tif"
    cmd = [sys.executable, "-m", "hsiedge.cli", "infer", str(scene), "--bundle", str(bundle), "-o", str(out),
           "--runtime", runtime, "--json"]
    proc = subprocess.Popen(cmd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0, hwm = time.perf_counter(), 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm = max(hwm, int(line.split()[1]))
        except OSError:
            pass
        if limit_s and time.perf_counter() - t0 > limit_s:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.2)
    seconds = time.perf_counter() - t0
    journal = out.with_name(f".{out.name}.journal")
    if proc.returncode == 0:
        done = "all"
    elif journal.exists():
        done = f"{len(journal.read_text().splitlines()) - 1} (stopped)"
    else:
        done = f"failed: {proc.stderr.read().strip()[-200:]}"
    for f in work.glob(f"*big-{bundle.stem}-{runtime}*"):
        f.unlink()
    return hwm / 1024, done, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--bench-seconds", type=float, default=5.0,
                    help="timed seconds per `hsiedge bench` runtime")
    ap.add_argument("--big-gb", type=float, default=0.0, help="size of the memory-test scene (0: skip)")
    ap.add_argument("--big-seconds", type=float, default=0.0,
                    help="stop each memory run after this many seconds (0: run the whole scene)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep scenes and bundles here (reused)")
    ap.add_argument("--loop-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.loop_child:
        scene, bundle, batch, out = args.loop_child
        loop_child(scene, bundle, int(batch), out)
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="hsiedge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    console.print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} "
                  f"threads); work folder {work}; load average {load()}")
    bundles = make_bundles(work, args.models, args.epochs)
    scenes = {}
    for m in args.models:
        rows, cols = SCENES[m]
        path = work / f"pavia_mosaic_{rows}x{cols}.tif"
        scenes[m] = path if path.exists() else write_mosaic(path, rows, cols, crop())

    ours: dict[tuple, list[dict]] = {}
    loops: dict[tuple, list[dict]] = {}
    loads = []
    for rnd in range(args.rounds):
        before = load()
        for m in args.models:
            # hsiedge first, the loops after: the process right after MambaHSI's whole-scene loop
            # (4.2 GB) ran about 10 % slower, while the machine took that memory back
            for runtime, prec in CONFIGS:
                r = infer_run(scenes[m], bundles[m, prec], runtime, work / f"map-{m}.tif")
                ours.setdefault((m, runtime, prec), []).append(r)
            for batch in (0,) if m == "mambahsi" else LOOP_BATCHES:
                loops.setdefault((m, batch), []).append(loop_run(scenes[m], bundles[m, "fp32"], batch, work))
            said = [f"{b or 'whole'}: {loops[m, b][-1]['px_s']:,.0f}"
                    for b in ((0,) if m == "mambahsi" else LOOP_BATCHES)]
            said_ours = [f"{rt or 'default'} {p}: {ours[m, rt, p][-1]['px_s']:,.0f}" for rt, p in CONFIGS]
            console.print(f"round {rnd + 1}, {m}: loop {', '.join(said)}; "
                          f"hsiedge {', '.join(said_ours)} px/s")
        loads.append(f"{before} -> {load()}")
        console.print(f"round {rnd + 1}: load average {loads[-1]}")

    def med(runs: list[dict]) -> float:
        return statistics.median(r["px_s"] for r in runs)

    speed = Table(title=f"`hsiedge infer` px/s per model, runtime and precision (medians of {args.rounds} "
                        f"interleaved rounds); {os.cpu_count()} CPUs")
    for col in ("model (scene)", "torch fp32", "ORT fp32", "ORT fp16", "ORT int8", "ORT int8 7-bit w",
                "int8 / fp32 (ORT)", "int8 7-bit w / fp32", "fp16 / fp32 (ORT)", "default runtime (fp32)"):
        speed.add_column(col, justify="left" if col.startswith("model") else "right")
    for m in args.models:
        v = {(rt, p): med(ours[m, rt, p]) for rt, p in CONFIGS}
        default = ours[m, None, "fp32"][0]["runtime"]
        speed.add_row(f"{m} ({SCENES[m][0]} x {SCENES[m][1]})", f"{v['torch', 'fp32']:,.0f}",
                      f"{v['onnxruntime', 'fp32']:,.0f}", f"{v['onnxruntime', 'fp16']:,.0f}",
                      f"{v['onnxruntime', 'int8']:,.0f}", f"{v['onnxruntime', 'int8-w7']:,.0f}",
                      f"{v['onnxruntime', 'int8'] / v['onnxruntime', 'fp32']:.2f}x",
                      f"{v['onnxruntime', 'int8-w7'] / v['onnxruntime', 'fp32']:.2f}x",
                      f"{v['onnxruntime', 'fp16'] / v['onnxruntime', 'fp32']:.2f}x", default)

    ratio = Table(title="`hsiedge infer` (fp32 bundle, default runtime) against the best hand loop, "
                        "same scene")
    for col in ("model", "default runtime", "hsiedge px/s", "loop px/s (batch)", "ratio",
                "same labels as loop", "other batch's loop px/s"):
        ratio.add_column(col, justify="left" if col in ("model", "default runtime") else "right")
    for m in args.models:
        batches = (0,) if m == "mambahsi" else LOOP_BATCHES
        best = max(batches, key=lambda b: med(loops[m, b]))
        default_runs = ours[m, None, "fp32"]
        same = float(np.mean(default_runs[-1]["classes"] == loops[m, best][-1]["classes"]))
        what = "whole scene" if best == 0 else str(best)
        note = "(tiling agreement)" if m == "mambahsi" else ""
        others = [f"{med(loops[m, b]):,.0f} ({b})" for b in batches if b != best]
        ratio.add_row(m, default_runs[0]["runtime"], f"{med(default_runs):,.0f}",
                      f"{med(loops[m, best]):,.0f} ({what})",
                      f"{med(default_runs) / med(loops[m, best]):.2f}x",
                      f"{100 * same:.3f} % {note}", ", ".join(others) or "-")

    runners = Table(title=f"`hsiedge bench` (runners only, input from the scene's middle, "
                          f"{args.bench_seconds:g} s each): px/s")
    for col in ("model", "precision", "input", "torch", "onnxruntime", "ORT latency ms median / p99"):
        runners.add_column(col, justify="left" if col in ("model", "precision", "input") else "right")
    bench_load = load()
    from hsiedge.infer import DEFAULT_BATCH

    for m in args.models:
        for prec in PRECISIONS:
            res = {r["runtime"]: r for r in bench_runners(bundles[m, prec], scenes[m], args.bench_seconds)}
            ort = res.get("onnxruntime")
            runners.add_row(m, prec, "tile 128" if m == "mambahsi" else f"batch {DEFAULT_BATCH}",
                            f"{res['torch']['pixels_per_second']:,.0f}" if "torch" in res else "-",
                            f"{ort['pixels_per_second']:,.0f}" if ort else "-",
                            f"{ort['latency_ms']['median']:.1f} / {ort['latency_ms']['p99']:.1f}"
                            if ort else "-")
    console.print(speed)
    console.print(ratio)
    console.print(runners)
    console.print("load average (1/5/15 min) per round: " + "; ".join(loads) + f"; before the runner table: "
                  f"{bench_load}, after: {load()}")

    if args.big_gb > 0:
        side = int(np.ceil(np.sqrt(args.big_gb * 1e9 / (103 * 2))))
        big = work / "big.tif"
        if not big.exists():
            write_mosaic(big, side, side, crop(), seed=1)
        gb = big.stat().st_size / 1e9
        mem = Table(title=f"peak resident memory of `hsiedge infer` on a {gb:.2f} GB scene "
                          f"({side} x {side} x 103)")
        for col in ("model", "runtime", "peak RSS MiB", "tiles done", "seconds"):
            mem.add_column(col, justify="left" if col in ("model", "runtime") else "right")
        for m in args.models:
            for rt in ("torch", "onnxruntime"):
                rss, done, secs = peak_rss(big, bundles[m, "fp32"], rt, args.big_seconds, work)
                mem.add_row(m, rt, f"{rss:,.0f}", done, f"{secs:.0f}")
        console.print(mem)


if __name__ == "__main__":
    main()
