"""`hsiedge export` and `hsiedge parity-check`, with their parity tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from hsiedge.cli.common import (
    CC_OPTION,
    PLUGINS_OPTION,
    SIGN_OPTION,
    TARGET_OPTION,
    TRUSTED_KEY_OPTION,
    app,
    console,
    engine_line,
    fail,
    finite,
    need_torch,
    one_of,
    open_verified_bundle,
    safe_outputs,
    sign_bundle,
    spinner,
    writable,
)

if TYPE_CHECKING:
    from hsiedge.bundle import Bundle
    from hsiedge.original import Original
    from hsiedge.parity import ParityData


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _sci(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


def _parity_table(report: dict, title: str) -> Table:
    orig = report["original"]
    said = (f"torch on {orig['device']}" if orig.get("runtime", "torch") == "torch"
            else "the PyTorch original's logits stored in the bundle at export")
    t = Table(title=title, caption=f"original: {said}; "
              + "; ".join(f"{r['runtime']}: {r['artifact']} on {r['device']}"
                          + (f" ({r['notes']})" if r["notes"] else "") for r in report["results"])
              + "; confident flips: changed labels where the original's top-1/top-2 margin exceeds twice "
                "the logit error 99 % of pixels stay within")
    for col in ("runtime", "prec.", "max |Δ|", "mean |Δ|", "rel L2", "cosine", "agree", "differ",
                "confident flips", "OA orig→art", "ΔOA pt", "verdict"):
        t.add_column(col, justify="left" if col in ("runtime", "verdict") else "right")
    for r in report["results"]:
        f = r["figures"]
        d_oa = f.get("delta_oa")
        oa = "-" if d_oa is None else f"{100 * f['oa_original']:.2f}→{100 * f['oa_artifact']:.2f}"
        t.add_row(r["runtime"], r["precision"], _sci(f["max_abs_error"]), _sci(f["mean_abs_error"]),
                  _sci(f["rel_l2"]), f"{f['cosine']:.6f}", _pct(f["agreement"]),
                  f"{f['labels_differ']}/{f['pixels']}", _confident_flips(f), oa,
                  "-" if d_oa is None else f"{100 * d_oa:+.2f}",
                  "[green]pass[/green]" if r["passed"] else "[red]FAIL[/red]")
    return t


def _confident_flips(figures: dict) -> str:
    """Flips on confident pixels over their count ("-" for reports from before the figure)."""
    if "flips_confident" not in figures:
        return "-"
    return f"{figures['flips_confident']}/{figures['confident_pixels']}"


def _tiling_table(report: dict) -> Table:
    orig = report["original"]
    rows = [("torch", "original", orig["tiling_effect"])] if "tiling_effect" in orig else []
    rows += [(r["runtime"], r["precision"], r["tiling_effect"])
             for r in report["results"] if "tiling_effect" in r]
    t = Table(title="tiling effect (not parity): the tiles `hsiedge infer --runtime R` uses on this scene, "
                    "against a whole-scene run of the same runtime",
              caption=f"infer's default runtime for this bundle: {report.get('infer_default_runtime', '?')}")
    for col in ("runtime", "tiles infer uses", "agree", "differ", "OA whole→tiled", "ΔOA pt"):
        t.add_column(col, justify="left" if col in ("runtime", "tiles infer uses") else "right")
    for name, what, e in rows:
        d = e.get("delta_oa")
        tiles = (f"whole scene ({e['tile']} px)" if e["whole_scene"] else
                 f"{e['tiles']} of {e['tile']} px, overlap {e['overlap']}")
        t.add_row(f"{name} ({what})", tiles, _pct(e["agreement"]), f"{e['labels_differ']}/{e['pixels']}",
                  "-" if d is None else f"{100 * e['oa_whole']:.2f}→{100 * e['oa_tiled']:.2f}",
                  "-" if d is None else f"{100 * d:+.2f}")
    return t


def _failure_line(report: dict) -> str:
    return "; ".join(f"{r['runtime']} ({r['precision']}): {', '.join(r['failures'])}"
                     for r in report["results"] if not r["passed"])


# The engine options `hsiedge export --engine` and `hsiedge engine` share.
@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="Checkpoint written by `hsiedge train` (.pt)."),
    output: Path = typer.Option(..., "-o", "--output", help="Bundle directory to write."),
    scan: str = typer.Option("plugin", callback=one_of("--scan", "plugin", "portable"),
                             help="plugin: one SelectiveScan node per scan (TensorRT plugin); "
                             "portable: standard ONNX ops only."),
    precision: str = typer.Option("fp32", callback=one_of("--precision", "fp32", "fp16", "int8"),
                                  help="fp32, fp16 or int8 (explicit Q/DQ)."),
    calib: Path | None = typer.Option(None, "--calib", help="Scene for int8 calibration and the parity "
                                      "check (default: the checkpoint's training scene, test split)."),
    calib_key: str | None = typer.Option(None, "--calib-key", help="Array of a .mat --calib scene."),
    calib_method: str = typer.Option("percentile",
                                     callback=one_of("--calib-method", "percentile", "entropy"),
                                     help="int8 calibrator: percentile or entropy."),
    weight_bits: int = typer.Option(8, "--weight-bits", min=7, max=8,
                                    help="int8 weights in 8 bits, or 7: ONNX Runtime then keeps its fast "
                                    "int8 kernels on x86 CPUs without VNNI, where 8-bit weights need slower "
                                    "ones (one bit of weight precision less everywhere)."),
    engine: bool = typer.Option(False, "--engine", help="Then also build a TensorRT engine into the bundle "
                                "(as `hsiedge engine` does)."),
    target: str | None = TARGET_OPTION,
    compute_capability: list[int] = CC_OPTION,
    plugins: Path | None = PLUGINS_OPTION,
    force: bool = typer.Option(False, "--force", help="Write the bundle even if parity fails (recorded)."),
    class_colours: str | None = typer.Option(None, "--class-colours", help="Colours of the classes in maps "
                                             "and quick looks: NAME=#RRGGBB,... (a class name or its id; "
                                             "the others keep the default palette)."),
    sign: Path | None = SIGN_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Export a checkpoint to a bundle (ONNX + manifest) and prove it with a parity check."""
    need_torch("hsiedge export")
    from hsiedge.bundle import BundleError
    from hsiedge.checkpoint import CheckpointError
    from hsiedge.export.bundle_export import ExportError, ParityFailedError, export_bundle
    from hsiedge.signing import SignatureError, load_private_key

    if sign is not None:
        try:
            load_private_key(sign)  # a bad key is found before the export, not after
        except SignatureError as e:
            fail(str(e))
    safe_outputs({"bundle": output}, {f"the checkpoint {checkpoint.name}": checkpoint,
                                       **({f"the calibration scene {calib.name}": calib} if calib else {})})
    if output.exists() and not (output / "manifest.json").is_file():
        fail(f"{output}: exists and is not a bundle; refusing to replace it (choose another -o)")
    writable(output, "bundle")
    with spinner("exporting") as update:
        try:
            manifest = export_bundle(checkpoint, output, scan=scan, precision=precision, calib=calib,
                                     calib_key=calib_key, calib_method=calib_method,
                                     weight_bits=weight_bits, force=force,
                                     engine=engine, target=target,
                                     compute_capabilities=tuple(compute_capability or ()) or None,
                                     plugin_library=plugins, class_colours=class_colours, on_step=update)
        except ParityFailedError as e:
            console.print(_parity_table(e.report, "parity at export"))
            fail(str(e))
        except (ExportError, CheckpointError, BundleError) as e:
            fail(str(e))
    if sign is not None:
        sign_bundle(output, sign)
    if as_json:
        typer.echo(json.dumps(manifest, indent=2))
    else:
        console.print(_parity_table(manifest["parity"], f"parity at export on {manifest['parity']['data']}"))
        forced = " [yellow](parity failed; written because of --force)[/yellow]" if manifest["parity"][
            "forced"] else ""
        console.print(f"wrote {output} ({manifest['model']['name']}, {precision}, scan {scan}, "
                      f"{manifest['scan_calls']} scan calls, {manifest['export_seconds']:.1f} s){forced}")
        for t, e in (manifest.get("engines") or {}).items():
            console.print(engine_line(t, e))


@app.command("parity-check")
def parity_check(
    bundle_path: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle directory (`hsiedge export`)."),
    scene: Path | None = typer.Option(None, "--scene", help="Scene to check on (default: the bundle's "
                                      "held-out data)."),
    key: str | None = typer.Option(None, "--key", help="Array of a .mat scene."),
    labels: Path | None = typer.Option(None, "--labels", help="Ground truth of --scene (OA, AA, kappa)."),
    labels_key: str | None = typer.Option(None, "--labels-key", help="Array of a .mat label file."),
    runtime: list[str] = typer.Option(None, "--runtime",
                                      callback=one_of("--runtime", "onnxruntime", "tensorrt"),
                                      help="Runtime(s) to check against the original: "
                                      "onnxruntime, tensorrt (default: onnxruntime, and tensorrt when "
                                      "the bundle has an engine and TensorRT is here)."),
    report: Path | None = typer.Option(None, "--report", help="Write the full figures as JSON here."),
    save_polygraphy: Path | None = typer.Option(None, "--save-polygraphy", help="Folder for the inputs "
                                                "and every runtime's outputs in Polygraphy's JSON formats."),
    min_agreement: float | None = typer.Option(None, callback=finite("--min-agreement", 0, 1),
                                               help="Override: minimum label agreement (0-1)."),
    max_rel_l2: float | None = typer.Option(None, callback=finite("--max-rel-l2", 0),
                                            help="Override: maximum relative L2 logit error."),
    max_delta_oa: float | None = typer.Option(None, callback=finite("--max-delta-oa", 0, 1),
                                              help="Override: maximum |ΔOA| (fraction, 0.001 = 0.1 point)."),
    tile: int | None = typer.Option(None, "--tile", min=1, help="MambaHSI: tile side whose tiling effect is "
                                    "reported (default: what `hsiedge infer` picks for this scene)."),
    overlap: int | None = typer.Option(None, "--overlap", min=0, help="MambaHSI: overlap for --tile."),
    memory: float | None = typer.Option(None, "--memory", callback=finite("--memory", 0, above=True),
                                        help="MambaHSI: memory budget (MiB) for the default tile, as in "
                                        "`hsiedge infer`."),
    every_pixel: bool = typer.Option(False, "--every-pixel", help="Check on every valid pixel of --scene, "
                                     "also when it is the scene the bundle was exported on (whose held-out "
                                     "pixels are used otherwise)."),
    original: str = typer.Option("auto", "--original",
                                 callback=one_of("--original", "auto", "stored", "torch"),
                                 help="What the runtimes are compared with: `stored`, the original's "
                                 "logits the bundle stores from export (held-out pixels only; no PyTorch "
                                 "needed); `torch`, the original run now from the bundle's checkpoint; "
                                 "`auto` (default): torch where PyTorch is installed, else stored."),
    trusted_key: list[Path] = TRUSTED_KEY_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Prove a bundle computes what the PyTorch original computes, on a real scene.

    The original runs from the bundle's checkpoint where PyTorch is installed; on a device
    without it (or with `--original stored`) the runtimes are compared, on the export scene's
    held-out pixels, with the original's logits the bundle stores from export.

    For MambaHSI it also reports the tiling effect: how far `hsiedge infer`'s tiles change the
    labels against a whole-scene run of the same runtime (not part of the pass/fail verdict).
    """
    import numpy as np

    from hsiedge.io import SceneReadError, Window, open_scene, read_labels
    from hsiedge.parity import check_bundle, parity_data
    from hsiedge.runtimes import RuntimeUnavailableError, default_runtime, why_unavailable

    if report is not None:
        writable(report, "report")
    bundle = open_verified_bundle(bundle_path, trusted_key)
    names = runtime or [r for r in ("onnxruntime", "tensorrt") if why_unavailable(bundle, r) is None]
    for r in names:
        reason = why_unavailable(bundle, r)
        if reason:
            fail(f"runtime {r} cannot run here: {reason}")
    thresholds = dict(bundle.manifest["parity"]["thresholds"] if bundle.manifest.get("parity") else {})
    for name, value in (("min_agreement", min_agreement), ("max_rel_l2", max_rel_l2),
                        ("max_abs_delta_oa", max_delta_oa)):
        if value is not None:
            thresholds[name] = value
    held = bundle.manifest["heldout"]
    pixels = label_ids = window = None
    if scene is None:
        # a path the manifest names is never opened on its word: the user names the scene
        fail(f"pass --scene with the scene the bundle was exported on ({Path(held['scene']).name}"
             f"{', --key ' + held['key'] if held.get('key') else ''}) to check on its held-out pixels, or "
             "any other scene to check on every valid pixel")
    if not every_pixel and _is_export_scene(scene, key, held):
        try:
            with np.load(bundle.artifact("heldout"), allow_pickle=False) as h:
                pixels = h["pixels"] if h["pixels"].size else None
                label_ids = h.get("labels")
        except (ValueError, OSError, KeyError, EOFError) as e:
            fail(f"{bundle.artifact('heldout')}: expected held-out pixel indices and labels, reading failed "
                 f"({str(e).splitlines()[0][:100]})")
        source = held["description"]
        window = held.get("window")  # export read only this part of a large scene
    else:
        source = f"{scene.name}: every valid pixel"
    try:
        with open_scene(scene, key=key) as s:
            cube, nodata = s.read(None if window is None else Window(*window)), s.nodata
        if labels is not None:
            label_ids = read_labels(labels, key=labels_key, shape=cube.shape[:2]).labels
    except SceneReadError as e:
        fail(str(e))
    chain = bundle.preprocessing
    if cube.shape[2] != chain.in_bands:
        fail(f"{scene}: the bundle expects {chain.in_bands} bands, the scene has {cube.shape[2]}")
    data = parity_data(chain, cube, bundle.input_kind, bundle.patch_size, nodata=nodata, pixels=pixels,
                       labels=label_ids, source=source)
    the_original = _stored_original(bundle, data, original, held_out=pixels is not None)
    tiling = None
    if bundle.input_kind == "image":
        from hsiedge.infer import DEFAULT_MEMORY_MIB, Geometry, InferError

        def tiling(runtime: str) -> Geometry:  # exactly what `hsiedge infer --runtime R` would use
            return Geometry.for_bundle(bundle, tile, overlap, runtime=runtime,
                                       memory_mib=DEFAULT_MEMORY_MIB if memory is None else memory,
                                       scene_shape=cube.shape[:2])

        for r in ("torch", *names) if the_original is None else names:
            try:
                tiling(r)  # a budget that fits no tile is said before any work
            except InferError as e:
                fail(str(e))
    try:
        result = check_bundle(bundle, data, names, thresholds, save_dir=save_polygraphy, tiling=tiling,
                              original=the_original)
    except RuntimeUnavailableError as e:
        fail(str(e))
    result["infer_default_runtime"] = default_runtime(bundle)
    result["bundle"] = str(bundle_path)
    if report is not None:
        report.write_text(json.dumps(result, indent=2) + "\n")
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        console.print(_parity_table(result, f"parity: {bundle_path.name} on {source}"))
        if tiling is not None:
            console.print(_tiling_table(result))
    if not result["passed"]:
        fail(f"parity failed: {_failure_line(result)}")


def _stored_original(bundle: Bundle, data: ParityData, choice: str, held_out: bool) -> Original | None:
    """The stored original to compare with, or None to run it now with torch (`auto`: where
    PyTorch is installed); fails in one line where the choice cannot be honoured here."""
    from hsiedge.optional import torch_missing
    from hsiedge.original import REFERENCE, ReferenceError, stored_original

    missing = torch_missing("running the PyTorch original")
    if choice == "torch" or (choice == "auto" and missing is None):
        if missing:
            fail(missing)
        return None
    if not held_out:
        if choice == "stored":
            fail("--original stored compares on the held-out pixels of the export scene only: pass that "
                 "scene with --scene and leave out --every-pixel, or use --original torch")
        fail(f"{missing}; the bundle's stored logits cover only the held-out pixels of the export scene, "
             "not this one")
    if choice == "auto" and not bundle.has(REFERENCE):
        fail(f"{missing}; the bundle stores no reference logits (exported by an older hsiedge)")
    try:
        return stored_original(bundle, data)
    except ReferenceError as e:
        fail(str(e))


def _is_export_scene(scene: Path, key: str | None, held: dict) -> bool:
    """Whether `scene` is the one the bundle was exported on: by content where the manifest
    records its sha256, else (bundles before 0.3) by file name and key."""
    from hsiedge.bundle import sha256_file

    if key != held.get("key"):
        return False
    if held.get("sha256"):
        return scene.is_file() and sha256_file(scene) == held["sha256"]
    return scene.name == Path(held["scene"]).name
