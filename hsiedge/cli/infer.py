"""`hsiedge infer` (one scene) and `hsiedge infer-many` (a catalogue on Dask)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from hsiedge.cli.common import (
    RUNTIMES,
    TRUSTED_KEY_OPTION,
    app,
    console,
    duration,
    err_console,
    fail,
    finite,
    open_verified_bundle,
    progress_seconds,
    writable,
)


@app.command()
def infer(
    scene: Path = typer.Argument(..., help="Scene to classify (any format `hsiedge.io` reads)."),
    bundle_path: Path = typer.Option(..., "--bundle", help="Bundle directory (`hsiedge export`)."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Class map GeoTIFF "
                                       "(default: SCENE.classes.tif in the current directory)."),
    runtime: str | None = typer.Option(None, "--runtime", callback=RUNTIMES, help="torch, onnxruntime or "
                                       "tensorrt (default: the fastest available for the bundle)."),
    tile: int | None = typer.Option(None, "--tile", min=1, help="Tile side in pixels (patch models: the core "
                                    "classified per step, default 128; MambaHSI: the tile, default: the "
                                    "largest that --memory allows, the whole scene when it fits)."),
    overlap: int | None = typer.Option(None, "--overlap", min=0, help="MambaHSI: overlap between tiles "
                                       "(default: a quarter of the tile; centres are kept)."),
    memory: float | None = typer.Option(None, "--memory", callback=finite("--memory", 0, above=True),
                                        help="MambaHSI: memory budget in MiB from which "
                                        "the default tile is chosen (default 900)."),
    batch: int | None = typer.Option(None, "--batch", min=1, help="Pixels per runner call (patch and pixel "
                                     "models; default 64); memory grows with it."),
    probs: bool = typer.Option(False, "--probs", help="Also write per-class probabilities (uint8, 255 = 1) "
                               "to MAP.probs.tif."),
    quicklook: Path | None = typer.Option(None, "--quicklook", help="Also write a PNG of the map with a "
                                          "legend."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run of the same output."),
    key: str | None = typer.Option(None, "--key", help="Array of a .mat scene."),
    trusted_key: list[Path] = TRUSTED_KEY_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Classify a scene of any size, tile by tile, into a georeferenced class map."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from hsiedge.infer import DEFAULT_BATCH, InferError, infer_scene

    bundle = open_verified_bundle(bundle_path, trusted_key)
    progress = Progress(TextColumn("classifying"), BarColumn(), TextColumn("{task.fields[tiles]} tiles"),
                        TextColumn("{task.fields[rate]} px/s"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=err_console, disable=not err_console.is_terminal, transient=True)
    with progress:
        task = progress.add_task("infer", total=None, tiles="0", rate="-")
        state = {"t0": 0.0, "pixels": 0, "tiles": 0, "of": 0}
        every = None if err_console.is_terminal else progress_seconds()  # plain lines for logs

        def start(total_pixels: int, done_pixels: int, n_tiles: int) -> None:
            state.update(t0=time.perf_counter(), of=n_tiles)
            progress.update(task, total=total_pixels, completed=done_pixels, tiles=f"0/{n_tiles}")

        def tile_done(pixels: int) -> None:
            state["pixels"] += pixels
            state["tiles"] += 1
            now = time.perf_counter()
            rate = state["pixels"] / max(now - state["t0"], 1e-9)
            progress.update(task, advance=pixels, tiles=f"{state['tiles']}/{state['of']}",
                            rate=f"{rate:,.0f}")
            if every is not None and now - state.get("said", state["t0"]) >= every:
                state["said"] = now  # a log (CI, nohup, a scheduler) gets a plain line now and then
                t = progress.tasks[0]
                left = (t.total - t.completed) / rate if t.total else 0.0
                err_console.print(f"classifying: {state['tiles']}/{state['of']} tiles, "
                                  f"{100 * t.completed / max(t.total or 1, 1):.1f} % of pixels, "
                                  f"{rate:,.0f} px/s, about {duration(left)} left",
                                  highlight=False, soft_wrap=True)

        try:
            summary = infer_scene(scene, bundle, output, key=key, runtime=runtime, tile=tile, overlap=overlap,
                                  batch=DEFAULT_BATCH if batch is None else batch, probs=probs,
                                  quicklook=quicklook, resume=resume,
                                  memory_mib=memory, on_start=start, on_tile=tile_done)
        except InferError as e:
            fail(str(e))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    console.print(f"wrote {summary['output']}: {summary['pixels']:,} pixels in {summary['seconds']:.1f} s "
                  f"({summary['pixels_per_second']:,} px/s), runtime {summary['runtime']} on "
                  f"{summary['device']}, {summary['precision']}, "
                  f"{summary['tiles']} tiles of {summary['tile']} px"
                  + (f" overlapping by {summary['overlap']}" if summary["overlap"] else "")
                  + (f", {summary['tiles_resumed']} of {summary['tiles']} tiles resumed"
                     if summary["tiles_resumed"] else "")
                  + (f", peak memory {summary['peak_memory_mib']:,} MiB"
                     if summary["peak_memory_mib"] else ""))
    for warning in summary["warnings"]:
        err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False, soft_wrap=True)


@app.command("infer-many")
def infer_many(
    scenes: list[str] = typer.Argument(..., help="Scenes: files, globs ('*.tif'), text lists (.txt: one path "
                                       "per line) or STAC ItemCollections (.json)."),
    bundle_path: Path = typer.Option(..., "--bundle", help="Bundle directory (`hsiedge export`)."),
    out_dir: Path = typer.Option(..., "--out-dir", help="Folder for the maps (SCENE.classes.tif each) and "
                                 "the run report (hsiedge-run.json)."),
    scheduler: str | None = typer.Option(None, "--scheduler", help="Address of a running Dask scheduler "
                                         "(tcp://host:8786); default: a local cluster on this machine."),
    workers: int | None = typer.Option(None, "--workers", min=1, help="Worker processes of the local "
                                       "cluster, one scene at a time each; memory grows with them (default: "
                                       "one per core, at most 4)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads per worker (default: the "
                                       "cores shared out among the local workers; every core of a remote "
                                       "worker's machine)."),
    runtime: str | None = typer.Option(None, "--runtime", callback=RUNTIMES, help="torch, onnxruntime or "
                                       "tensorrt (default: the fastest available for the bundle)."),
    tile: int | None = typer.Option(None, "--tile", min=1, help="Tile side in pixels, as for `infer`."),
    overlap: int | None = typer.Option(None, "--overlap", min=0, help="MambaHSI: overlap between tiles."),
    memory: float | None = typer.Option(None, "--memory", callback=finite("--memory", 0, above=True),
                                        help="MambaHSI: memory budget in MiB of each worker (default 900)."),
    batch: int | None = typer.Option(None, "--batch", min=1, help="Pixels per runner call (default 64)."),
    probs: bool = typer.Option(False, "--probs", help="Also write MAP.probs.tif for each scene."),
    quicklook: bool = typer.Option(False, "--quicklook", help="Also write a PNG of each map "
                                   "(SCENE.classes.png)."),
    resume: bool = typer.Option(False, "--resume", help="Skip the scenes a previous run finished (checked by "
                                "sha256) and continue the interrupted ones."),
    key: str | None = typer.Option(None, "--key", help="Array of .mat scenes."),
    asset: str | None = typer.Option(None, "--asset", help="STAC: the asset holding the scene (default: the "
                                     "one with role 'data')."),
    trusted_key: list[Path] = TRUSTED_KEY_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the run report as JSON."),
) -> None:
    """Classify many scenes on Dask (a local cluster or a scheduler), one task per scene."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hsiedge.infer import DEFAULT_BATCH

    try:
        from hsiedge.many.catalogue import CatalogueError, expand_scenes
        from hsiedge.many.report import REPORT_NAME, ReportError
        from hsiedge.many.run import ManyError
        from hsiedge.many.run import infer_many as run_many
    except ImportError as e:
        fail(f"infer-many needs Dask ({e.name} is missing): pip install 'hsiedge[cluster]'")
    try:
        scene_paths = expand_scenes(scenes, asset)
    except CatalogueError as e:
        fail(str(e))
    bundle = open_verified_bundle(bundle_path, trusted_key)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"{out_dir}: cannot create the output folder ({e.strerror or e})")
    report_file = out_dir / REPORT_NAME
    writable(report_file, "the run report")
    options = {"tile": tile, "overlap": overlap, "batch": DEFAULT_BATCH if batch is None else batch,
               "probs": probs, "memory_mib": memory, "key": key}
    progress = Progress(TextColumn("classifying scenes"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[pixels]} px, {task.fields[failed]} failed"),
                        TimeElapsedColumn(),
                        console=err_console, disable=not err_console.is_terminal, transient=True)
    state = {"pixels": 0, "failed": 0, "done": 0, "said": time.perf_counter()}
    every = None if err_console.is_terminal else progress_seconds()

    def start(dashboard: str | None, count: int) -> None:
        if dashboard:
            err_console.print(f"Dask dashboard: {dashboard}", highlight=False, soft_wrap=True)
        progress.update(task, total=count)

    def scene_done(entry: dict[str, Any]) -> None:
        state["done"] += 1
        state["pixels"] += (entry.get("pixels") or 0) if entry["status"] == "done" else 0
        state["failed"] += entry["status"] == "failed"
        progress.update(task, advance=1, pixels=f"{state['pixels']:,}", failed=state["failed"])
        if entry["status"] == "failed":
            err_console.print(f"[yellow]failed:[/yellow] {escape(entry['error'] or '')}", highlight=False,
                              soft_wrap=True)
        now = time.perf_counter()
        if every is not None and now - state["said"] >= every:
            state["said"] = now
            err_console.print(f"classifying: {state['done']}/{len(scene_paths)} scenes, {state['pixels']:,} "
                              f"pixels, {state['failed']} failed", highlight=False, soft_wrap=True)

    with progress:
        task = progress.add_task("many", total=len(scene_paths), pixels="0", failed=0)
        try:
            report = run_many(scene_paths, bundle, out_dir, scheduler=scheduler,
                              workers=workers,
                              threads=threads, runtime=runtime, resume=resume, options=options,
                              quicklook=quicklook, trusted_keys=trusted_key, on_start=start,
                              on_scene=scene_done)
        except (CatalogueError, ReportError, ManyError) as e:
            fail(str(e))
    t = report["totals"]
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        console.print(f"{t['done']} scenes classified, {t['skipped']} skipped (finished before), "
                      f"{t['failed']} failed: {t['pixels_classified']:,} pixels in {t['wall_seconds']:.1f} s "
                      f"({t['pixels_per_second']:,} px/s); report {report_file}",
                      highlight=False)
    warned = [e for e in report["scenes"] if e.get("warnings")]
    if warned:
        err_console.print(f"[yellow]warning:[/yellow] {len(warned)} scene(s) with warnings in the report; "
                          f"the first: {escape(warned[0]['warnings'][0])}", highlight=False, soft_wrap=True)
    if t["failed"]:
        first = next(e for e in report["scenes"] if e["status"] == "failed")
        fail(f"{t['failed']} of {t['scenes']} scenes failed (see {report_file}); the first: "
             f"{first['error']}")
