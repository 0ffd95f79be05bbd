"""`hsiedge infer-many`: scaling from 1 to 2 Dask workers on this machine, against one process.

A SpectralMamba bundle (trained briefly on Jasper Ridge, exported fp32, plugin scan) classifies
a catalogue of real AVIRIS scenes: Jasper Ridge, the Santa Barbara crop and four ABU scenes
cropped to mixed sizes (first 198 bands each), every one written `--copies` times as a
GeoTIFF.  Each configuration runs in a fresh process (so peak memory is its own), in
`--rounds` interleaved rounds; the table shows medians:

- `one process`: `infer_scene` on every scene in turn, one runner kept open, every core
  (the best a shell loop of `hsiedge infer` could do, without its per-scene start-up);
- `infer-many, N workers`: `hsiedge infer-many --workers N` (a LocalCluster of N worker
  processes, cores shared out among them), wall time including the command's start-up (Python
  imports, the cluster, each worker verifying the bundle and opening its runner), which the
  columns "after start-up" leave out: they are what a long catalogue tends to.

Columns: wall seconds, scenes/s and pixels/s over the wall time, the speed-up over
`one process`, and the peak resident memory of the process that classified (the largest
worker's for infer-many).  A benchmark, not a test: it prints a table, it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.io as sio
from rasterio.transform import from_origin
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets"
JASPER = DATA / "jasper_ridge"
# (file, key, rows, cols): real AVIRIS scenes at mixed sizes
CROPS = {"santa-barbara": ("aviris_santa_barbara/a_hsi_img_for_VI_demo.mat", "hsi_img", 90, 90),
         "airport-2": ("abu/abu-airport-2.mat", "data", 100, 64),
         "urban-1": ("abu/abu-urban-1.mat", "data", 72, 100),
         "urban-2": ("abu/abu-urban-2.mat", "data", 50, 50),
         "urban-4": ("abu/abu-urban-4.mat", "data", 37, 81)}
TRANSFORM = from_origin(560000.0, 4140000.0, 20.0, 20.0)
console = Console(width=160)


def hsiedge(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "hsiedge.cli", *args], check=True, capture_output=True)


def write_scenes(folder: Path, copies: int) -> list[Path]:
    import rasterio

    d = sio.loadmat(JASPER / "JasperRidge2_R198.mat")
    rows, cols = int(d["nRow"][0, 0]), int(d["nCol"][0, 0])
    cubes = {"jasper": d["Y"].reshape(-1, rows, cols, order="F").transpose(1, 2, 0)}
    for name, (f, key, h, w) in CROPS.items():
        cubes[name] = sio.loadmat(DATA / f)[key][:h, :w, :198]
    paths = []
    for i in range(copies):
        for name, cube in cubes.items():
            h, w, b = cube.shape
            path = folder / f"{name}-{i}.tif"
            with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=b, dtype=cube.dtype.name,
                               crs="EPSG:32610", transform=TRANSFORM) as dst:
                dst.write(np.ascontiguousarray(cube.transpose(2, 0, 1)))
            paths.append(path)
    return paths


def one_process(bundle_path: str, scenes: list[str], out_dir: str) -> dict:
    """Every scene in turn in this process, one runner: the single-process baseline."""
    from hsiedge.bundle import open_bundle
    from hsiedge.infer import infer_scene
    from hsiedge.runtimes import open_runner

    t0 = time.perf_counter()
    bundle = open_bundle(bundle_path)
    pixels = 0
    with open_runner(bundle) as runner:
        for s in scenes:
            out = Path(out_dir) / f"{Path(s).stem}.classes.tif"
            pixels += infer_scene(s, bundle, out, runner=runner)["pixels"]
    return {"wall": time.perf_counter() - t0, "pixels": pixels, "startup": 0.0,
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run(config: str, bundle: Path, scenes: list[Path], work: Path) -> dict:
    out = Path(tempfile.mkdtemp(dir=work))
    if config == "one":
        res = subprocess.run([sys.executable, __file__, "--one", str(bundle), str(out), *map(str, scenes)],
                             check=True, capture_output=True, text=True)
        return json.loads(res.stdout.splitlines()[-1])
    workers = config.split("-")[1]
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "hsiedge.cli", "infer-many", *map(str, scenes), "--bundle",
                          str(bundle), "--out-dir", str(out), "--workers", workers, "--json"],
                         check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    report = json.loads(res.stdout)
    return {"wall": wall, "pixels": report["totals"]["pixels_classified"],
            "startup": wall - report["totals"]["wall_seconds"] + report["startup_seconds"],
            "peak_mib": max(e["peak_memory_mib"] for e in report["scenes"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", type=int, default=3, help="copies of the six scenes in the catalogue")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--one", nargs="+", help=argparse.SUPPRESS)  # internal: the one-process baseline
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_process(args.one[0], args.one[2:], args.one[1])))
        return
    configs = ["one", "many-1", "many-2"]
    names = {"one": "one process (every core)", "many-1": "infer-many, 1 worker",
             "many-2": "infer-many, 2 workers"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with console.status("training and exporting a SpectralMamba bundle"):
            hsiedge("train", "spectralmamba", "--scene", str(JASPER / "JasperRidge2_R198.mat"), "--labels",
                    str(JASPER / "_EndJasperRidge2_R198.mat"), "--epochs", str(args.epochs), "-o",
                    str(work / "sm.pt"))
            hsiedge("export", str(work / "sm.pt"), "-o", str(work / "bundle"))
        (work / "scenes").mkdir()
        scenes = write_scenes(work / "scenes", args.copies)
        results: dict[str, list[dict]] = {c: [] for c in configs}
        loads = []
        for r in range(args.rounds):
            for c in configs:
                with console.status(f"round {r + 1}/{args.rounds}: {names[c]}"):
                    results[c].append(run(c, work / "bundle", scenes, work))
                loads.append(os.getloadavg()[0])
    pixels = results["one"][0]["pixels"]
    base = statistics.median(x["wall"] for x in results["one"])
    table = Table(title=f"infer-many scaling: {len(scenes)} real AVIRIS scenes, {pixels:,} pixels, "
                  f"SpectralMamba fp32 (default runtime); {os.cpu_count()} cores; medians of {args.rounds} "
                  "interleaved rounds; "
                  f"load average during the runs {min(loads):.1f}-{max(loads):.1f}")
    for col in ("configuration", "wall s", "start-up s", "scenes/s", "px/s", "speed-up",
                "px/s after start-up", "speed-up after start-up", "peak memory MiB"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    for c in configs:
        wall = statistics.median(x["wall"] for x in results[c])
        peak = statistics.median(x["peak_mib"] for x in results[c])
        start = statistics.median(x["startup"] for x in results[c])
        steady = statistics.median(x["wall"] - x["startup"] for x in results[c])
        table.add_row(names[c], f"{wall:.1f}", f"{start:.1f}", f"{len(scenes) / wall:.2f}",
                      f"{pixels / wall:,.0f}", f"{base / wall:.2f}x", f"{pixels / steady:,.0f}",
                      f"{base / steady:.2f}x", f"{peak:,.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
