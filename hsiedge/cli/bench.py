"""`hsiedge bench`: each runtime's throughput, latency and memory on a bundle."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import typer

from hsiedge.cli.common import (
    RUNTIMES,
    TRUSTED_KEY_OPTION,
    app,
    console,
    err_console,
    fail,
    finite,
    open_verified_bundle,
    spinner,
)


@app.command()
def bench(
    bundle_path: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle directory (`hsiedge export`)."),
    runtime: list[str] = typer.Option(None, "--runtime", callback=RUNTIMES, help="Runtime(s) to measure "
                                      "(repeat; default: every one that can run the bundle here)."),
    batch: int | None = typer.Option(None, "--batch", help="Patch and pixel models: pixels per call "
                                     "(default 64, as `hsiedge infer`); with --tile, patches per runner "
                                     "call within the tile."),
    tile: int | None = typer.Option(None, "--tile", help="Image models (MambaHSI): tile side per call, a "
                                    "multiple of 4 (default 128). Patch models: one tile of N x N pixels per "
                                    "call, run as `hsiedge infer` runs it (the runner's tile form where it "
                                    "has one, else patches cut and run in batches)."),
    seconds: float = typer.Option(10.0, "--seconds", callback=finite("--seconds", 0, above=True),
                                  help="Timed seconds per runtime (at least 3 calls)."),
    warmup: float = typer.Option(2.0, "--warmup", callback=finite("--warmup", 0),
                                 help="Warm-up seconds per runtime before timing (at least 1 call)."),
    scene: Path | None = typer.Option(None, "--scene", help="Cut the input from the middle of this scene, "
                                      "preprocessed as the bundle says (default: standard-normal values)."),
    key: str | None = typer.Option(None, "--key", help="Array of a .mat scene."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads per runtime "
                                       "(default: every core)."),
    trusted_key: list[Path] = TRUSTED_KEY_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Measure each runtime on one input, trtexec-style: warm-up, then pixels/s, latency
    percentiles per call and peak memory. The runners only: no reading or writing."""
    from hsiedge.benchmark import BenchInputError, bench_input, bench_runtime
    from hsiedge.infer.errors import InferError
    from hsiedge.io import SceneReadError
    from hsiedge.runtimes import RuntimeUnavailableError, runtime_names, why_unavailable

    bundle = open_verified_bundle(bundle_path, trusted_key)
    names = runtime or [r for r in runtime_names() if why_unavailable(bundle, r) is None]
    for r in names:
        reason = why_unavailable(bundle, r)
        if reason:
            fail(f"runtime {r} cannot run here: {reason}")
    try:
        x = bench_input(bundle, batch, tile, scene, key)
    except (BenchInputError, SceneReadError, InferError) as e:  # InferError: the scene's bands
        fail(str(e))
    results = []
    for r in names:
        with spinner(f"{r}: opening") as update:
            def said(phase: str, elapsed: float, r: str = r, update=update) -> None:
                if update:
                    total = warmup if phase == "warm-up" else seconds
                    update(f"{r}: {phase} {min(elapsed, total):.0f}/{total:.0f} s")

            try:
                results.append(bench_runtime(bundle, r, x, seconds, warmup, threads, said))
            except RuntimeUnavailableError as e:
                fail(f"runtime {r} cannot run here: {e}")
        if not as_json and not err_console.is_terminal:
            err_console.print(f"{r}: {results[-1].pixels_per_second:,.0f} px/s", highlight=False)
    report = {"bundle": str(bundle_path), "model": bundle.model_name, "precision": bundle.precision,
              "input": {"shape": list(x.shape), "pixels_per_call": x.pixels, "source": x.source},
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "load_average": [round(v, 2) for v in os.getloadavg()]},
              "seconds": seconds, "warmup": warmup, "threads": threads,
              "results": [r.as_dict() for r in results]}
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    console.print(_table(report))


def _table(report: dict):
    from rich.table import Table

    shape = "x".join(str(d) for d in report["input"]["shape"])
    load = ", ".join(f"{v:.2f}" for v in report["machine"]["load_average"])
    table = Table(title=f"{report['model']} ({report['precision']} bundle): input {shape} "
                        f"({report['input']['pixels_per_call']:,} px per call) of "
                        f"{report['input']['source']}; "
                        f"{report['machine']['cpus']} CPUs, load average {load}")
    for col in ("runtime", "device", "precision", "px/s", "calls", "latency ms median", "p90", "p99",
                "peak RSS MiB (+ from opening)", "open s"):
        table.add_column(col, justify="left" if col in ("runtime", "device", "precision") else "right")
    for r in report["results"]:
        lat = r["latency_ms"]
        peak, before = r["peak_rss_mib"], r["rss_before_mib"]
        grew = "" if peak is None or before is None else f" (+{peak - before:,.0f})"
        memory = "-" if peak is None else f"{peak:,.0f}{grew}"
        table.add_row(r["runtime"], r["device"], r["precision"], f"{r['pixels_per_second']:,.0f}",
                      str(r["calls"]), f"{lat['median']:.1f}", f"{lat['p90']:.1f}", f"{lat['p99']:.1f}",
                      memory, f"{r['open_seconds']:.2f}")
    return table
