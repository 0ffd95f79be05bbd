"""Streaming inference: hsiedge's pipeline against the straightforward loop, and its memory.

For each model (trained briefly on the real 50 x 50 Pavia University crop and exported to a
bundle, fp32, plugin scan) and each CPU runtime, prints:

- pixels/s of `hsiedge infer` on a Pavia-University-sized scene (610 x 340 x 103, uint16):
  a mosaic of the real crop's 50 x 50 block, each copy flipped / rotated at random, written as
  a georeferenced GeoTIFF.  Wall time of the whole call (open, read, infer, write), median of
  `--runs` runs.
- pixels/s of the loop a user would otherwise write: the whole scene read into memory,
  preprocessed, each pixel's patch cut out with NumPy slicing and run through the PyTorch
  model in eager mode with the sequential Python-loop scan (`reference` backend), one pixel
  per call and, as a stronger baseline, `--naive-batch` pixels per call.  The loop is timed
  on the first pixels of the scene (it is slow) and its rate applied to all of them.
  MambaHSI is an image model: its loop is the whole scene in one eager forward pass.
- the ratio of the two, measured in the same run;
- peak resident memory (VmHWM) of `hsiedge infer` in a subprocess on a scene of at least
  `--big-gb` GB on disk (the same mosaic, larger).  `--big-seconds` stops a run early (for the
  slow models) and reports how many tiles it had finished: memory is bounded by the tile
  size and queue depth, so it is flat after the first tiles.

A benchmark, not a test: it prints tables, it asserts nothing.  The weights are barely
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
RUNTIMES = ("torch", "onnxruntime")
console = Console(width=160)


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


def hsiedge(*args: str) -> None:
    res = subprocess.run([sys.executable, "-m", "hsiedge.cli", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"hsiedge {' '.join(args)} failed:\n{res.stderr}{res.stdout}")


def make_bundles(work: Path, models: list[str], epochs: int) -> dict[str, Path]:
    """Train each model on the crop (labels: k-means clusters of its spectra) and export it."""
    from scipy.cluster.vq import kmeans2

    cube = crop()
    scene = work / "pavia_crop.tif"
    with rasterio.open(scene, "w", driver="GTiff", height=50, width=50, count=103, dtype="uint16", crs=CRS,
                       transform=TRANSFORM, interleave="pixel") as dst:
        dst.write(cube.transpose(2, 0, 1))
    x = cube.reshape(-1, 103).astype(np.float64)
    _, labels = kmeans2((x - x.mean(0)) / x.std(0), 6, seed=0, minit="++")
    np.save(work / "pavia_crop_labels.npy", (labels + 1).reshape(50, 50).astype(np.uint8))
    bundles = {}
    for m in models:
        t0 = time.perf_counter()
        ckpt = work / f"{m}.pt"
        hsiedge("train", m, "--scene", str(scene), "--labels", str(work / "pavia_crop_labels.npy"),
                "--protocol", "per-class:10", "--epochs", str(epochs), "-o", str(ckpt))
        hsiedge("export", str(ckpt), "-o", str(work / f"{m}.bundle"), "--force")
        bundles[m] = work / f"{m}.bundle"
        console.print(f"trained and exported {m} in {time.perf_counter() - t0:.0f} s")
    return bundles


def hsiedge_pixels_per_second(scene: Path, bundle_path: Path, runtime: str, runs: int) -> tuple[float, int]:
    """`hsiedge infer` as a user runs it (its own process, so its heap settings start clean):
    pixels over the seconds its summary reports (reading, inference and writing the map)."""
    rates, pixels = [], 0
    with tempfile.TemporaryDirectory() as out:
        for i in range(runs):
            res = subprocess.run([sys.executable, "-m", "hsiedge.cli", "infer", str(scene), "--bundle",
                                  str(bundle_path), "-o", str(Path(out) / f"map{i}.tif"), "--runtime",
                                  runtime, "--json"], capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"hsiedge infer failed:\n{res.stderr}{res.stdout}")
            s = json.loads(res.stdout)
            rates.append(s["pixels"] / s["seconds"])
            pixels = s["pixels"]
    return statistics.median(rates), pixels


def naive_pixels_per_second(scene: Path, bundle_path: Path, n_pixels: int, batch: int) -> tuple[float, int]:
    """The straightforward loop: eager PyTorch, per-pixel patches, the Python-loop scan.

    Reading and preprocessing the whole scene is timed once; the per-pixel loop is timed on
    the first `n_pixels` pixels and its rate applied to the whole scene (it is slow), so the
    figure is pixels / (read + preprocess + loop time for every pixel).
    """
    from hsiedge.bundle import open_bundle
    from hsiedge.checkpoint import load_checkpoint
    from hsiedge.ops import scan_backend

    bundle = open_bundle(bundle_path)
    model = load_checkpoint(bundle.artifact("checkpoint")).build().eval()
    t0 = time.perf_counter()
    with rasterio.open(scene) as src:
        cube = src.read().transpose(1, 2, 0)
    x, _ = bundle.preprocessing.apply(cube, None)
    h, w, _ = x.shape
    with scan_backend("reference"), torch.inference_mode():
        if bundle.input_kind == "image":  # an image model: the whole scene in one forward pass
            t = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
            t = torch.nn.functional.pad(t[None], (0, -w % 4, 0, -h % 4), mode="reflect")
            model.full_resolution_logits(t).argmax(1)
            return h * w / (time.perf_counter() - t0), h * w
        fixed = time.perf_counter() - t0
        p = bundle.patch_size
        r = p // 2
        padded = np.pad(x, ((r, r), (r, r), (0, 0)), mode="reflect") if p else x
        n = min(n_pixels, h * w)
        t1 = time.perf_counter()
        for i in range(0, n, batch):
            idx = range(i, min(i + batch, n))
            if p:
                xb = np.stack([padded[j // w:j // w + p, j % w:j % w + p].transpose(2, 0, 1) for j in idx])
            else:
                xb = np.stack([x[j // w, j % w] for j in idx])
            model(torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32))).argmax(1)
        per_pixel = (time.perf_counter() - t1) / n
    return h * w / (fixed + per_pixel * h * w), n


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
    ap.add_argument("--runtimes", nargs="*", default=list(RUNTIMES))
    ap.add_argument("--runs", type=int, default=3, help="runs per hsiedge measurement (median)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--naive-pixels", type=int, default=4096)
    ap.add_argument("--naive-batch", type=int, default=256)
    ap.add_argument("--big-gb", type=float, default=4.0, help="size of the memory-test scene (0: skip)")
    ap.add_argument("--big-seconds", type=float, default=0.0,
                    help="stop each memory run after this many seconds (0: run the whole scene)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep scenes and bundles here")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="hsiedge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    console.print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
                  f"{torch.get_num_threads()} threads; work folder {work}")
    bundles = make_bundles(work, args.models, args.epochs)
    scene = write_mosaic(work / "pavia_sized.tif", 610, 340, crop())

    speed = Table(title="hsiedge infer vs the straightforward loop: Pavia-sized scene 610 x 340 x 103 "
                        "uint16, CPU (pixels/s)")
    for col in ("model", "runtime", "hsiedge px/s", "loop, 1 px/call", "ratio",
                f"loop, {args.naive_batch} px/call", "ratio"):
        speed.add_column(col, justify="left" if col in ("model", "runtime") else "right")
    loops = {}
    for m in args.models:
        one, _ = naive_pixels_per_second(scene, bundles[m], args.naive_pixels // 8, 1)
        many = one if m == "mambahsi" else naive_pixels_per_second(scene, bundles[m], args.naive_pixels,
                                                                    args.naive_batch)[0]
        loops[m] = one, many
    for m in args.models:
        one, many = loops[m]
        for rt in args.runtimes:
            ours, _ = hsiedge_pixels_per_second(scene, bundles[m], rt, args.runs)
            speed.add_row(m, rt, f"{ours:,.0f}", f"{one:,.0f}", f"{ours / one:.1f}x", f"{many:,.0f}",
                          f"{ours / many:.1f}x")
            console.print(f"{m} {rt}: {ours:,.0f} px/s; loop {one:,.0f} px/s (1 px/call), "
                          f"{many:,.0f} px/s ({args.naive_batch} px/call)")
    console.print(speed)

    if args.big_gb > 0:
        side = int(np.ceil(np.sqrt(args.big_gb * 1e9 / (103 * 2))))
        big = work / "big.tif"
        t0 = time.perf_counter()
        if not big.exists():
            write_mosaic(big, side, side, crop(), seed=1)
        gb = big.stat().st_size / 1e9
        console.print(f"memory-test scene {side} x {side} x 103 uint16, {gb:.2f} GB on disk "
                      f"(written in {time.perf_counter() - t0:.0f} s)")
        mem = Table(title=f"peak resident memory of `hsiedge infer` on a {gb:.2f} GB scene "
                          f"({side} x {side} x 103)")
        for col in ("model", "runtime", "peak RSS MiB", "tiles done", "seconds"):
            mem.add_column(col, justify="left" if col in ("model", "runtime") else "right")
        for m in args.models:
            for rt in args.runtimes:
                rss, done, secs = peak_rss(big, bundles[m], rt, args.big_seconds, work)
                mem.add_row(m, rt, f"{rss:,.0f}", done, f"{secs:.0f}")
                console.print(f"{m} {rt}: peak {rss:,.0f} MiB, tiles {done}, {secs:.0f} s")
        console.print(mem)


if __name__ == "__main__":
    main()
