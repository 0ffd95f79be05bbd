"""Export every seed model to every scan mode and precision, and print the parity table.

Trains each model on Jasper Ridge (its recipe's epochs, or --epochs-scale of them) with
`hsiedge train`, exports it with `hsiedge export` for {plugin, portable} x {fp32, fp16, int8},
and prints what each export's parity check measured on the held-out test split (ONNX
Runtime CPU vs the PyTorch original).  With `--engine`, each bundle also gets a TensorRT
engine from `hsiedge engine` (TensorRT for RTX, ahead of time, on any machine; plugin bundles
need `--plugins` or $HSIEDGE_TRT_PLUGINS), and the table adds its size, build time, library,
compute capabilities and the parsed network's plugin layers and loops.  A benchmark, not a
test: it prints, it asserts nothing.
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

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
JASPER = REPO.parent / "shared" / "datasets" / "jasper_ridge"
MODELS = {"mambahsi": 200, "spectralmamba": 100, "md2f-mamba": 60}


def hsiedge(*args: str, check: bool = True) -> str:
    res = subprocess.run([sys.executable, "-m", "hsiedge.cli", *args], capture_output=True, text=True)
    if res.returncode != 0:
        if check:
            raise SystemExit(f"hsiedge {' '.join(args)} failed:\n{res.stderr}")
        return "FAIL: " + (res.stderr.strip().splitlines() or ["?"])[-1][:120]
    return res.stdout


def engine_cells(bundle: Path, scan: str, plugins: str | None) -> list[str]:
    """Build the bundle's TensorRT for RTX engine; its table cells (or why it failed)."""
    if scan == "plugin" and not plugins:
        return ["no plugin library"] + [""] * 5
    out = hsiedge("engine", str(bundle), "--target", "rtx", "--json",
                  *(["--plugins", plugins] if scan == "plugin" else []), check=False)
    if out.startswith("FAIL"):
        return [out] + [""] * 5
    try:
        e = json.loads(out)
    except json.JSONDecodeError:
        return [f"FAIL: not JSON: {out[:80]!r}"] + [""] * 5
    size = json.loads((bundle / "manifest.json").read_text())["artifacts"]["engine-rtx"]["bytes"]
    return [f"{size / 1e6:.2f} MB", f"{e['build_seconds']:.1f}", f"{e['library']} {e['version']}",
            " ".join(str(c) for c in e["compute_capabilities"]), str(e["network"]["plugin_layers"]),
            str(e["network"]["loops"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs-scale", type=float, default=1.0, help="fraction of each recipe's epochs")
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--engine", action="store_true", help="also build each bundle's TensorRT for RTX engine")
    ap.add_argument("--plugins", default=os.environ.get("HSIEDGE_TRT_PLUGINS"),
                    help="libhsiedge_trt_plugins.so for the plugin bundles' engines")
    args = ap.parse_args()
    table = Table(title="hsiedge export parity on Jasper Ridge (test split, ONNX Runtime CPU vs PyTorch)")
    for col in ("model", "scan", "precision", "max |Δ|", "mean |Δ|", "rel L2", "agreement", "labels differ",
                "OA orig %", "ΔOA pt", "export s", "verdict",
                *(("engine", "build s", "library", "compute caps", "plugin layers", "loops")
                  if args.engine else ())):
        table.add_column(col, justify="left" if col in ("model", "scan", "precision", "verdict") else "right")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            epochs = max(1, round(MODELS[model] * args.epochs_scale))
            ckpt = Path(tmp) / f"{model}.pt"
            t0 = time.perf_counter()
            hsiedge("train", model, "--scene", str(JASPER / "JasperRidge2_R198.mat"),
                    "--labels", str(JASPER / "_EndJasperRidge2_R198.mat"), "--epochs", str(epochs),
                    "-o", str(ckpt))
            print(f"trained {model} ({epochs} epochs) in {time.perf_counter() - t0:.0f} s", flush=True)
            for scan in ("plugin", "portable"):
                for precision in ("fp32", "fp16", "int8"):
                    out = Path(tmp) / f"{model}-{scan}-{precision}"
                    m = json.loads(hsiedge("export", str(ckpt), "-o", str(out), "--scan", scan,
                                           "--precision", precision, "--force", "--json"))
                    r = m["parity"]["results"][0]
                    f = r["figures"]
                    table.add_row(model, scan, precision, f"{f['max_abs_error']:.2e}",
                                  f"{f['mean_abs_error']:.2e}",
                                  f"{f['rel_l2']:.2e}", f"{100 * f['agreement']:.2f} %",
                                  f"{f['labels_differ']} / {f['pixels']}", f"{100 * f['oa_original']:.2f}",
                                  f"{100 * f['delta_oa']:+.2f}", f"{m['export_seconds']:.1f}",
                                  "pass" if r["passed"] else "FAIL: " + "; ".join(r["failures"]),
                                  *(engine_cells(out, scan, args.plugins) if args.engine else ()))
                    print(f"  {model} {scan} {precision}: {'pass' if r['passed'] else 'FAIL'}", flush=True)
    Console(width=260).print(table)


if __name__ == "__main__":
    main()
