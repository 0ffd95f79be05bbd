"""`infer_scene`: one scene through a bundle to a class map, with every output safe.

It checks the scene against the bundle, refuses outputs that would overwrite the scene or
each other, takes the output's run lock, and runs the pipeline into the staging.  The GeoTIFF
(and probabilities, quick look) are written under temporary names, read back, and renamed
when complete; only then is the staging deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hsiedge import __version__
from hsiedge.bundle import Bundle, sha256_file
from hsiedge.files import output_clash
from hsiedge.infer.errors import InferError
from hsiedge.infer.pipeline import run_pipeline
from hsiedge.infer.policy import DEFAULT_BATCH, DEFAULT_MEMORY_MIB, Geometry, kept_heap_mib
from hsiedge.infer.staging import RunLock, Staging, remove_leftovers
from hsiedge.io import Scene, SceneReadError, open_scene
from hsiedge.io.writer import write_class_map, write_probabilities
from hsiedge.memory import bound_heap, heap_warning, peak_rss_mib

if TYPE_CHECKING:  # the runtimes package imports its runners (torch among them) when imported
    from hsiedge.runtimes.base import Runner


def _nm(wl: np.ndarray) -> np.ndarray:
    """Wavelengths in nanometres (values below 100 are taken as micrometres)."""
    wl = np.asarray(wl, dtype=np.float64)
    return wl * 1000.0 if np.nanmax(wl) < 100 else wl


def check_scene(bundle: Bundle, scene: Scene, tolerance_nm: float = 1.0) -> None:
    """The scene's band count (and wavelengths, when both sides know them) against the manifest."""
    want = bundle.manifest["input"]["scene_bands"]
    if scene.bands != want:
        raise InferError(f"{scene.path}: the bundle's {bundle.model_name} model expects {want} bands, "
                         f"the scene has {scene.bands}")
    ours = bundle.manifest["input"].get("wavelengths")
    if ours is not None and scene.wavelengths is not None:
        diff = np.abs(_nm(scene.wavelengths) - _nm(np.asarray(ours)))
        if np.nanmax(diff) > tolerance_nm:
            band = int(np.nanargmax(diff))
            raise InferError(f"{scene.path}: band {band + 1} is at {_nm(scene.wavelengths)[band]:.1f} nm "
                             f"but the bundle was trained at {_nm(np.asarray(ours))[band]:.1f} nm "
                             f"(tolerance {tolerance_nm} nm)")


def creation_time() -> str:
    """When a map is made, in UTC to the second: `$SOURCE_DATE_EPOCH` when set (the
    reproducible-builds convention, for byte-identical outputs of separate runs), else now."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    try:
        t = time.gmtime(int(epoch)) if epoch else time.gmtime()
    except ValueError:
        raise InferError(f"SOURCE_DATE_EPOCH must be whole seconds since 1970, got {epoch!r}") from None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", t)


def default_output(scene: Path) -> Path:
    """`.../scene.tif` -> `scene.classes.tif` in the current directory (a data folder is often
    shared or read-only, and outputs do not belong among the inputs)."""
    return Path.cwd() / f"{scene.stem}.classes.tif"


def scene_files(scene_path: Path, scene: Scene) -> list[Path]:
    """Every file the scene is read from: the path given, the data file, an ENVI header."""
    files = {scene_path.resolve(), Path(scene.path).resolve()}
    for f in list(files):
        if f.with_suffix(".hdr").is_file() and scene.info.layout.startswith("ENVI"):
            files.add(f.with_suffix(".hdr").resolve())
    return sorted(files)


def scene_fingerprint(files: list[Path]) -> dict[str, str]:
    """sha256 of each file of the scene: what a resumed run must find again."""
    return {f.name: sha256_file(f) for f in files}


def infer_scene(
    scene_path: str | Path,
    bundle: Bundle,
    output: str | Path | None = None,
    *,
    key: str | None = None,
    runtime: str | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    batch: int = DEFAULT_BATCH,
    probs: bool = False,
    quicklook: str | Path | None = None,
    resume: bool = False,
    memory_mib: float | None = None,
    on_start: Callable[[int, int, int], None] | None = None,
    on_tile: Callable[[int], None] | None = None,
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Classify a whole scene with `bundle`; return a summary (pixels, seconds, pixels/s, ...).

    `runner`: an open runner of `bundle` to use (and leave open), for a caller classifying many
    scenes with one; by default the `runtime` is opened for this scene and closed after it."""
    from hsiedge.runtimes import RuntimeUnavailableError, default_runtime

    scene_path = Path(scene_path)
    if runner is not None:
        if runner.bundle is not bundle or (runtime is not None and runtime != runner.name):
            raise ValueError(f"the {runner.name} runner given does not run this bundle's {runtime} runtime")
        runtime = runner.name
    output = Path(output) if output is not None else default_output(scene_path)
    if batch < 1:
        raise InferError(f"--batch must be at least 1, got {batch}")
    created = creation_time()
    try:
        runtime = runtime or default_runtime(bundle)
    except RuntimeUnavailableError as e:
        raise InferError(str(e)) from None
    if bundle.input_kind != "image" or tile is not None:  # bad arguments fail before any reading
        Geometry.for_bundle(bundle, tile, overlap)
    try:
        scene = open_scene(scene_path, key=key)
    except SceneReadError as e:
        raise InferError(str(e)) from None
    with scene:
        check_scene(bundle, scene)
        probs_path = output.with_name(f"{output.stem}.probs.tif") if probs else None
        files = scene_files(scene_path, scene)
        outputs = {"class map": output, "class map's sidecar": output.with_name(output.name + ".aux.xml"),
                   **({"probabilities": probs_path} if probs_path else {}),
                   **({"quick look": Path(quicklook)} if quicklook is not None else {})}
        clash = output_clash(outputs, {f"the scene's file {f.name}": f for f in files}, keep_out=bundle.path)
        if clash:
            raise InferError(clash)
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InferError(f"{output.parent}: cannot create the output folder "
                             f"({e.strerror or e})") from None
        budget = DEFAULT_MEMORY_MIB if memory_mib is None else memory_mib
        geometry = Geometry.for_bundle(bundle, tile, overlap, runtime=runtime, memory_mib=budget,
                                       scene_shape=(scene.height, scene.width))
        # MambaHSI's tile is chosen to fit the memory budget: within it, freed tiles stay
        # resident for the next one, large blocks included (hsiedge.memory)
        heap_budget = kept_heap_mib(bundle, runtime, budget, geometry.core + 2 * geometry.margin) \
            if bundle.input_kind == "image" else None
        bound_heap(large_blocks=heap_budget is not None)
        with RunLock(output):
            remove_leftovers(list(outputs.values()))
            summary = _run_locked(scene, scene_path, files, bundle, output, probs_path, quicklook, geometry,
                                  key, runtime, batch, resume, created, on_start, on_tile, runner,
                                  heap_budget)
    warnings = [] if scene.crs is not None else [
        f"{scene_path.name} has no georeferencing (no CRS), so neither has the map: its pixels have no "
        f"position on the ground"]
    if (heap := heap_warning()) is not None:
        warnings.append(heap)
    return {**summary, "georeferenced": scene.crs is not None, "warnings": warnings,
            "peak_memory_mib": None if (peak := peak_rss_mib()) is None else round(peak)}


def _run_locked(scene: Scene, scene_path: Path, files: list[Path], bundle: Bundle, output: Path,
                probs_path: Path | None, quicklook: str | Path | None, geometry: Geometry, key: str | None,
                runtime: str, batch: int, resume: bool, created: str,
                on_start: Callable[[int, int, int], None] | None,
                on_tile: Callable[[int], None] | None, runner: Runner | None,
                heap_budget_mib: float | None) -> dict[str, Any]:
    """The run proper, under the output's lock: staging, pipeline, outputs."""
    from hsiedge.runtimes import RuntimeUnavailableError, open_runner

    tiles = geometry.tiles(scene.height, scene.width)
    num_classes = len(bundle.manifest["classes"])
    owned = runner is None
    try:
        runner = open_runner(bundle, runtime) if owned else runner
    except RuntimeUnavailableError as e:
        raise InferError(str(e)) from None
    preprocessing = json.dumps(bundle.manifest["preprocessing"], sort_keys=True).encode()
    fingerprint = scene_fingerprint(files)
    header = {"scene": str(scene_path.resolve()), "scene_sha256": fingerprint, "key": key,
              "bundle_manifest_sha256": bundle.manifest_sha256,
              "preprocessing_sha256": hashlib.sha256(preprocessing).hexdigest(), "runtime": runner.name,
              "tiling": {"kind": geometry.kind, "core": geometry.core, "margin": geometry.margin,
                         "tiles": len(tiles)},
              "batch": batch, "probs": probs_path is not None, "shape": [scene.height, scene.width],
              "created": created}
    try:
        staging = Staging(output, header, (scene.height, scene.width), num_classes, probs_path is not None,
                          resume)
    except BaseException:
        if owned:
            runner.close()
        raise
    ran_on = {"runtime": runner.name, "device": runner.device, "precision": runner.precision}
    todo = [t for t in tiles if t.index not in staging.done]
    if on_start:  # (scene pixels, pixels already done by an interrupted run, tiles left)
        on_start(scene.height * scene.width,
                 sum(t.core.height * t.core.width for t in tiles if t.index in staging.done), len(todo))
    t0 = time.perf_counter()
    writing = output
    try:
        with runner if owned else contextlib.nullcontext():  # a runner given stays open for the next scene
            run_pipeline(scene, bundle.preprocessing, geometry, runner, todo, batch, staging,
                         probs_path is not None, on_tile, heap_budget_mib)
        compute_seconds = time.perf_counter() - t0
        staging.close()
        table = bundle.manifest["classes"]
        provenance = {"model": bundle.model_name, **ran_on, "bundle_manifest_sha256": bundle.manifest_sha256,
                      "version": __version__, "created": staging.created, "scene": scene_path.name}
        write_class_map(output, staging.classes, table, scene.crs, scene.transform, provenance)
        if probs_path is not None:
            writing = probs_path
            write_probabilities(probs_path, staging.probs, [c["name"] for c in table], scene.crs,
                                scene.transform, provenance)
        if quicklook is not None:
            from hsiedge.io.quicklook import write_quicklook

            writing = Path(quicklook)
            write_quicklook(quicklook, staging.classes, table,
                            title=f"{scene_path.name} - {bundle.model_name} ({bundle.precision})")
    except OSError as e:
        staging.close()
        raise InferError(f"writing {writing} failed ({e.strerror or e}); finished tiles are kept, "
                         "rerun with --resume once fixed") from None
    except SceneReadError as e:
        staging.close()
        raise InferError(f"{e}; finished tiles are kept, rerun with --resume once fixed") from None
    except BaseException:
        staging.close()
        raise
    staging.remove()
    done_pixels = sum(t.core.height * t.core.width for t in todo)
    return {"output": str(output), "probs": None if probs_path is None else str(probs_path),
            "quicklook": None if quicklook is None else str(quicklook),
            "pixels": scene.height * scene.width, "scene": str(scene_path),
            "scene_files_sha256": {str(f): fingerprint[f.name] for f in files},
            "pixels_this_run": done_pixels, "tiles": len(tiles), "tiles_resumed": len(tiles) - len(todo),
            "tile": geometry.core + 2 * geometry.margin if geometry.kind == "image" else geometry.core,
            "overlap": 2 * geometry.margin if geometry.kind == "image" else 0,
            "seconds": round(time.perf_counter() - t0, 3),
            "pixels_per_second": round(done_pixels / max(compute_seconds, 1e-9)), **ran_on}
