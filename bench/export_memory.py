"""Peak memory and time of `hsiedge export --precision int8`, per model, on a small and a large scene.

    python bench/export_memory.py [--models ...] [--side 1024] [--workdir DIR]

Each model is trained briefly on Jasper Ridge with `hsiedge train` (speed and memory do not
depend on the weights), then exported to an int8 plugin bundle twice, each in its own
subprocess: calibrated and checked on Jasper Ridge's test split (100 x 100 x 198), and with
`--calib` on a `--side` x `--side` GeoTIFF mosaic of flipped / rotated Jasper Ridge copies.
Peak resident memory is the subprocess's own maximum RSS (`os.wait4`).  A benchmark, not a
test: it prints a table, it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import scipy.io as sio
from infer import write_mosaic  # bench/infer.py: the same mosaic writer
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
JASPER = REPO.parent / "shared" / "datasets" / "jasper_ridge"
EPOCHS = {"mambahsi": 5, "spectralmamba": 3, "md2f-mamba": 2}


def run_measured(args: list[str], log: Path) -> tuple[int, float, float]:
    """(exit code, peak RSS MiB, seconds) of `hsiedge ARGS` in a subprocess."""
    t0 = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "hsiedge.cli", *args], stdout=err, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(EPOCHS))
    ap.add_argument("--side", type=int, default=1024, help="side of the large mosaic scene (pixels)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep scenes and bundles here")
    a = ap.parse_args()
    console = Console(width=160)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="hsiedge-export-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    d = sio.loadmat(JASPER / "JasperRidge2_R198.mat")
    nr, nc = int(d["nRow"][0, 0]), int(d["nCol"][0, 0])
    cube = d["Y"].reshape(-1, nr, nc, order="F").transpose(1, 2, 0)
    big = work / f"jasper-mosaic-{a.side}.tif"
    if not big.exists():
        write_mosaic(big, a.side, a.side, cube)
    console.print(f"machine: {os.cpu_count()} CPUs; large scene {big.name}: {a.side} x {a.side} x "
                  f"{cube.shape[2]} {cube.dtype}, {big.stat().st_size / 2**20:,.0f} MiB; work folder {work}")

    table = Table(title="hsiedge export --precision int8 (plugin scan): peak RSS and wall time per run")
    for col in ("model", "held-out / calibration scene", "peak MiB", "seconds", "calibration samples",
                "parity pixels", "verdict"):
        table.add_column(col, justify="left" if col in ("model", "held-out / calibration scene", "verdict")
                         else "right")
    for model in a.models:
        ckpt = work / f"{model}.pt"
        if not ckpt.exists():
            log = work / f"{model}.train.log"
            rc, _, _ = run_measured(["train", model, "--scene", str(JASPER / "JasperRidge2_R198.mat"),
                                     "--labels", str(JASPER / "_EndJasperRidge2_R198.mat"),
                                     "--epochs", str(EPOCHS[model]), "-o", str(ckpt)], log)
            if rc:
                raise SystemExit(f"training {model} failed: see {log}")
        for label, extra in (("Jasper Ridge test split (100 x 100)", []),
                             (f"mosaic {a.side} x {a.side} (--calib)", ["--calib", str(big)])):
            out = work / f"{model}-int8-{'big' if extra else 'jasper'}"
            log = work / f"{out.name}.log"
            rc, peak, seconds = run_measured(["export", str(ckpt), "-o", str(out), "--precision", "int8",
                                              "--force", *extra], log)
            if rc:
                table.add_row(model, label, f"{peak:,.0f}", f"{seconds:.1f}", "", "",
                              "FAIL: " + log.read_text().strip().splitlines()[-1][:60])
                continue
            m = json.loads((out / "manifest.json").read_text())
            table.add_row(model, label, f"{peak:,.0f}", f"{seconds:.1f}", str(m["calibration"]["samples"]),
                          str(m["parity"]["pixels"]), "pass" if m["parity"]["passed"] else "FAIL")
            console.print(f"[dim]{model}, {label}: {peak:,.0f} MiB, {seconds:.1f} s[/dim]")
    console.print(table)


if __name__ == "__main__":
    main()
