"""The `hsiedge` command line (Typer + Rich).  Commands arrive with the stages they drive."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hsiedge import __version__

if TYPE_CHECKING:
    from hsiedge.bundle import Bundle

app = typer.Typer(
    name="hsiedge",
    help="Take Mamba hyperspectral classifiers from PyTorch to edge hardware, and prove they agree.",
    no_args_is_help=True,
    add_completion=False,
)
# Piped output (logs, CI) gets wide tables rather than Rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """One line on stderr, exit code 1."""
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


@contextlib.contextmanager
def _spinner(text: str) -> Iterator[Callable[[str], None] | None]:
    """A status line with a spinner on a terminal; yields its update function (None elsewhere)."""
    if not err_console.is_terminal:
        yield None
        return
    with err_console.status(text, spinner="dots") as status:
        yield status.update


def _progress_seconds() -> float:
    """Seconds between plain progress lines when stderr is not a terminal
    (`$HSIEDGE_PROGRESS_SECONDS`, default 60)."""
    try:
        return float(os.environ.get("HSIEDGE_PROGRESS_SECONDS", "60"))
    except ValueError:
        return 60.0


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _finite(option: str, low: float | None = None, high: float | None = None, *,
            above: bool = False) -> Callable[[float | None], float | None]:
    """An option callback refusing NaN, infinities and values outside [low, high] (or above `low`)."""
    def check(value: float | None) -> float | None:
        if value is None:
            return value
        if value != value or value in (float("inf"), float("-inf")) \
                or (low is not None and (value <= low if above else value < low)) \
                or (high is not None and value > high):
            words = [] if low is None else [f"above {low:g}" if above else f"at least {low:g}"]
            words += [] if high is None else [f"at most {high:g}"]
            bounds = " and ".join(words)
            raise typer.BadParameter(f"expected a finite number {bounds}, got {value}", param_hint=option)
        return value
    return check


def _one_of(option: str, *values: str) -> Callable[[Any], Any]:
    """An option callback refusing a value (or a repeated option's values) not in `values`."""
    def check(value: Any) -> Any:
        for v in [value] if isinstance(value, str) else value or []:
            if v not in values:
                raise typer.BadParameter(f"expected one of {', '.join(values)}, got {v!r}", param_hint=option)
        return value
    return check


RUNTIMES = _one_of("--runtime", "torch", "onnxruntime", "tensorrt")
TRUSTED_KEY_OPTION = typer.Option(None, "--trusted-key", envvar="HSIEDGE_TRUSTED_KEY",
                                  help="Ed25519 public key (PEM or OpenSSH) the bundle must be signed with "
                                       "(repeat for several; or $HSIEDGE_TRUSTED_KEY). Unsigned or "
                                       "wrongly signed bundles are refused.")
SIGN_OPTION = typer.Option(None, "--sign", help="Ed25519 private key to sign the bundle's manifest with "
                           "(as `hsiedge sign` does).")


def _open_bundle(path: Path, trusted_keys: list[Path] | None = None) -> Bundle:
    """The verified bundle at `path`, or one line and exit 1."""
    from hsiedge.bundle import BundleError, open_bundle

    try:
        return open_bundle(path, trusted_keys or ())
    except BundleError as e:
        fail(str(e))


def _safe_outputs(outputs: dict[str, Path], inputs: dict[str, Path]) -> None:
    """Fail now if an output would replace an input or another output (`hsiedge.files.output_clash`)."""
    from hsiedge.files import output_clash

    clash = output_clash(outputs, inputs)
    if clash:
        fail(clash)


def _writable(path: Path, what: str) -> None:
    """Fail now, before long work, if `what` cannot be written at `path`."""
    from hsiedge.atomic import check_writable

    try:
        check_writable(path)
    except OSError as e:
        fail(f"{path}: cannot write the {what} there ({e.strerror or e})")


def _version(value: bool) -> None:
    if value:
        console.print(f"hsiedge {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """hsiedge: export, run and parity-check Mamba HSI classifiers."""


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the seed models: what each takes as input and its size in its default config."""
    from hsiedge.models import MODELS, build_model, count_parameters

    rows = [{"name": s.name, "input": s.input_desc, "default_config": s.defaults,
             "parameters": count_parameters(build_model(s.name)), "summary": s.summary}
            for s in MODELS.values()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="hsiedge seed models")
    table.add_column("model", style="bold")
    table.add_column("input")
    table.add_column("parameters (default config)", justify="right")
    table.add_column("default config")
    table.add_column("what it is")
    for r in rows:
        cfg = ", ".join(f"{k}={v}" for k, v in r["default_config"].items())
        table.add_row(r["name"], r["input"], f"{r['parameters']:,}", cfg, r["summary"])
    console.print(table)


def _accuracy_tables(report: dict, class_names: list[str]) -> list[Table]:
    summary = Table(title="test pixels")
    for col in ("pixels", "OA", "AA", "kappa"):
        summary.add_column(col, justify="right")
    summary.add_row(f"{report['pixels']:,}", f"{100 * report['oa']:.2f} %", f"{100 * report['aa']:.2f} %",
                    f"{report['kappa']:.4f}")
    per = Table(title="per class (rows: true, columns: predicted)")
    per.add_column("class")
    per.add_column("accuracy", justify="right")
    for i in range(len(class_names)):
        per.add_column(str(i + 1), justify="right")
    for i, (name, acc) in enumerate(zip(class_names, report["per_class"], strict=True)):
        per.add_row(f"{i + 1} {name}", "-" if acc is None else f"{100 * acc:.2f} %",
                    *[str(v) for v in report["confusion"][i]])
    return [summary, per]


@app.command()
def train(
    model: str = typer.Argument(..., help="Model name (see `hsiedge models`)."),
    scene: Path = typer.Option(..., "--scene", help="Hyperspectral cube (.mat, .npy, ENVI, GeoTIFF, ...)."),
    labels: Path = typer.Option(..., "--labels", help="Ground truth: label map (.mat/.tif/.npy, 0 = "
                                "unlabeled) or reference abundances (.mat with A, M)."),
    output: Path = typer.Option(..., "-o", "--output", help="Checkpoint to write (.pt)."),
    protocol: str = typer.Option("per-class:30", help="per-class:N or ratio:R (see README)."),
    seed: int = typer.Option(0, help="Seed of the split, the initialisation and the batch order."),
    epochs: int | None = typer.Option(None, min=1, help="Epochs (default: the model's recipe)."),
    device: str = typer.Option("cpu", callback=_one_of("--device", "cpu", "cuda"), help="cpu or cuda."),
    key: str | None = typer.Option(None, "--key", help="Array of a .mat scene holding the cube."),
    labels_key: str | None = typer.Option(None, "--labels-key", help="Array of a .mat label file."),
    as_json: bool = typer.Option(False, "--json", help="Print the test metrics as JSON."),
    options: list[str] = typer.Option([], "--option", help="Model option KEY=VALUE, repeatable "
                                      "(e.g. pooling=centre-weighted for md2f-mamba)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run that was writing "
                                "OUTPUT, from OUTPUT.train-state (same settings)."),
    class_names: str | None = typer.Option(None, "--class-names", help="Names of classes 1..K: NAME,NAME,... "
                                           "or a text file with one per line (default: the label file's, "
                                           "else 'class 1'...)."),
    class_colours: str | None = typer.Option(None, "--class-colours", help="Colours of the classes in maps: "
                                             "NAME=#RRGGBB,... (by name or id; kept in the checkpoint, used "
                                             "by export)."),
) -> None:
    """Train a seed model on a labelled scene and write a checkpoint.

    The run's state (latest and best weights, optimiser, random generators) is saved to
    OUTPUT.train-state after every epoch, so a killed run continues with --resume to the
    checkpoint an uninterrupted run gives; the state is removed once OUTPUT is written."""
    import numpy as np
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from hsiedge.bundle import default_class_names, parse_class_colours
    from hsiedge.checkpoint import save_checkpoint
    from hsiedge.io import SceneReadError, open_scene, read_labels
    from hsiedge.models import MODELS
    from hsiedge.models.registry import parse_model_options
    from hsiedge.splits import parse_protocol
    from hsiedge.train import RECIPES, train_model
    from hsiedge.train_state import state_path_for

    if model not in MODELS:
        fail(f"unknown model '{model}'; choose one of: {', '.join(MODELS)}")
    try:
        model_config = parse_model_options(model, options)
    except ValueError as e:
        fail(str(e))
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail("--device cuda asked for, but PyTorch sees no CUDA GPU here")
    try:
        parse_protocol(protocol)
    except ValueError as e:
        fail(str(e))
    state_path = state_path_for(output)
    _safe_outputs({"checkpoint": output, "training state": state_path},
                  {f"the scene {scene.name}": scene, f"the labels {labels.name}": labels})
    _writable(output, "checkpoint")  # found now, not after hours of training
    if resume and not state_path.is_file():
        fail(f"nothing to resume: {state_path} is not there (a run writes it after each epoch)")
    if not resume and state_path.exists():
        fail(f"{state_path} holds an interrupted run of {output}: pass --resume to continue it, "
             f"or delete it to start over")
    try:
        with open_scene(scene, key=key) as s:
            cube, nodata, wavelengths = s.read(), s.nodata, s.wavelengths
        lm = read_labels(labels, key=labels_key, shape=cube.shape[:2])
    except SceneReadError as e:
        fail(str(e))
    names = lm.class_names
    if class_names is not None:
        names = _class_names(class_names, lm.num_classes)
    colours = None
    if class_colours is not None:
        try:
            colours = parse_class_colours(class_colours, names or default_class_names(lm.num_classes))
        except ValueError as e:
            fail(str(e))
    n_epochs = RECIPES[model].epochs if epochs is None else epochs
    progress = Progress(TextColumn(f"training {model}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"),
                        TextColumn("loss {task.fields[loss]:.4f} val OA {task.fields[val]:.3f}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console,
                        disable=not err_console.is_terminal, transient=True)
    every = None if err_console.is_terminal else _progress_seconds()  # plain lines for logs
    said: dict[str, float] = {}

    def epoch_done(r: dict) -> None:
        progress.update(task, completed=r["epoch"], loss=r["loss"], val=r["val_oa"])
        now = time.perf_counter()
        said.setdefault("before", r["epoch"] - 1)  # epochs a resumed run had already done
        if every is None or (now - said.get("at", -every) < every and r["epoch"] != r["epochs"]):
            return
        said["at"] = now  # the first epoch, then every `every` seconds, and the last
        per_epoch = (now - t_start) / (r["epoch"] - said["before"])
        err_console.print(f"training {model}: epoch {r['epoch']}/{r['epochs']}, loss {r['loss']:.4f}, "
                          f"val OA {100 * r['val_oa']:.2f} % (best {100 * r['best_val_oa']:.2f} %), "
                          f"{_duration(r['seconds'])} so far, about "
                          f"{_duration(per_epoch * (r['epochs'] - r['epoch']))} left",
                          highlight=False, soft_wrap=True)

    with progress:
        task = progress.add_task("train", total=n_epochs, loss=float("nan"), val=float("nan"))
        t_start = time.perf_counter()
        try:
            result = train_model(model, cube, lm.labels, protocol=protocol, seed=seed, epochs=n_epochs,
                                 device=device, class_names=names, nodata=nodata,
                                 model_config=model_config, on_epoch=epoch_done,
                                 state_path=state_path, resume=resume)
        except ValueError as e:  # TrainStateError included
            fail(str(e))
    # Where the scene is, so that `hsiedge export` can score the test split without being told.
    result.checkpoint.train_info.update({
        "scene": str(scene.resolve()), "scene_key": key, "labels": str(labels.resolve()),
        "labels_key": labels_key,
        # wavelengths are checked against scenes only when every band has one
        "wavelengths": None if wavelengths is None or not np.isfinite(wavelengths).all()
        else wavelengths.tolist()})
    result.checkpoint.class_colours = colours
    save_checkpoint(output, result.checkpoint)
    state_path.unlink(missing_ok=True)  # the checkpoint now holds everything the state did
    report = result.report
    if as_json:
        typer.echo(json.dumps({"checkpoint": str(output), "model": model, "protocol": protocol, "seed": seed,
                               "class_names": result.checkpoint.class_names, **report}, indent=2))
        return
    for t in _accuracy_tables(report, result.checkpoint.class_names):
        console.print(t)
    console.print(f"wrote {output} ({model}, {protocol}, seed {seed}, {n_epochs} epochs, "
                  f"{report['train_seconds']:.1f} s)")


def _class_names(text: str, count: int) -> list[str]:
    """`--class-names`: NAME,NAME,... or a text file with one name per line; exactly `count`."""
    path = Path(text)
    if path.is_file():
        names = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        where = f"{path} has"
    else:
        names = [n.strip() for n in text.split(",")]
        where = "--class-names has"
    if len(names) != count or not all(names) or len(set(names)) != len(names):
        fail(f"{where} {len(names)} names ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}); "
             f"the labels have {count} classes, and each needs its own non-empty name")
    return names


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _sci(v: float | None) -> str:
    return "-" if v is None else f"{v:.2e}"


def _parity_table(report: dict, title: str) -> Table:
    orig = report["original"]
    t = Table(title=title, caption=f"original: torch on {orig['device']}; "
              + "; ".join(f"{r['runtime']}: {r['artifact']} on {r['device']}"
                          + (f" ({r['notes']})" if r["notes"] else "") for r in report["results"]))
    for col in ("runtime", "prec.", "max |Δ|", "mean |Δ|", "rel L2", "cosine", "agree", "differ",
                "OA orig→art", "ΔOA pt", "verdict"):
        t.add_column(col, justify="left" if col in ("runtime", "verdict") else "right")
    for r in report["results"]:
        f = r["figures"]
        d_oa = f.get("delta_oa")
        oa = "-" if d_oa is None else f"{100 * f['oa_original']:.2f}→{100 * f['oa_artifact']:.2f}"
        t.add_row(r["runtime"], r["precision"], _sci(f["max_abs_error"]), _sci(f["mean_abs_error"]),
                  _sci(f["rel_l2"]), f"{f['cosine']:.6f}", _pct(f["agreement"]),
                  f"{f['labels_differ']}/{f['pixels']}", oa, "-" if d_oa is None else f"{100 * d_oa:+.2f}",
                  "[green]pass[/green]" if r["passed"] else "[red]FAIL[/red]")
    return t


def _tiling_table(report: dict) -> Table:
    rows = [("torch", "original", report["original"]["tiling_effect"])]
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
TARGET_OPTION = typer.Option(None, "--target", callback=_one_of("--target", "rtx", "trt"),
                             help="Engine target. rtx: TensorRT for RTX, ahead of time "
                             "on any machine; trt: TensorRT 10/11 on the device itself (default: rtx where "
                             "installed, else trt).")
CC_OPTION = typer.Option(None, "--compute-capability", help="--target rtx: GPU compute capability to build "
                         "for, e.g. 89 for the RTX 4090 (repeat; default 80 86 89 120).")
PLUGINS_OPTION = typer.Option(None, "--plugins", help="libhsiedge_trt_plugins.so, needed for plugin-mode "
                              "bundles (default: $HSIEDGE_TRT_PLUGINS); it is copied into the bundle.")


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="Checkpoint written by `hsiedge train` (.pt)."),
    output: Path = typer.Option(..., "-o", "--output", help="Bundle directory to write."),
    scan: str = typer.Option("plugin", callback=_one_of("--scan", "plugin", "portable"),
                             help="plugin: one SelectiveScan node per scan (TensorRT plugin); "
                             "portable: standard ONNX ops only."),
    precision: str = typer.Option("fp32", callback=_one_of("--precision", "fp32", "fp16", "int8"),
                                  help="fp32, fp16 or int8 (explicit Q/DQ)."),
    calib: Path | None = typer.Option(None, "--calib", help="Scene for int8 calibration and the parity "
                                      "check (default: the checkpoint's training scene, test split)."),
    calib_key: str | None = typer.Option(None, "--calib-key", help="Array of a .mat --calib scene."),
    calib_method: str = typer.Option("percentile",
                                     callback=_one_of("--calib-method", "percentile", "entropy"),
                                     help="int8 calibrator: percentile or entropy."),
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
    from hsiedge.bundle import BundleError
    from hsiedge.checkpoint import CheckpointError
    from hsiedge.export.bundle_export import ExportError, ParityFailedError, export_bundle
    from hsiedge.signing import SignatureError, load_private_key

    if sign is not None:
        try:
            load_private_key(sign)  # a bad key is found before the export, not after
        except SignatureError as e:
            fail(str(e))
    _safe_outputs({"bundle": output}, {f"the checkpoint {checkpoint.name}": checkpoint,
                                       **({f"the calibration scene {calib.name}": calib} if calib else {})})
    if output.exists() and not (output / "manifest.json").is_file():
        fail(f"{output}: exists and is not a bundle; refusing to replace it (choose another -o)")
    _writable(output, "bundle")
    with _spinner("exporting") as update:
        try:
            manifest = export_bundle(checkpoint, output, scan=scan, precision=precision, calib=calib,
                                     calib_key=calib_key, calib_method=calib_method, force=force,
                                     engine=engine, target=target,
                                     compute_capabilities=tuple(compute_capability or ()) or None,
                                     plugin_library=plugins, class_colours=class_colours, on_step=update)
        except ParityFailedError as e:
            console.print(_parity_table(e.report, "parity at export"))
            fail(str(e))
        except (ExportError, CheckpointError, BundleError) as e:
            fail(str(e))
    if sign is not None:
        _sign(output, sign)
    if as_json:
        typer.echo(json.dumps(manifest, indent=2))
    else:
        console.print(_parity_table(manifest["parity"], f"parity at export on {manifest['parity']['data']}"))
        forced = " [yellow](parity failed; written because of --force)[/yellow]" if manifest["parity"][
            "forced"] else ""
        console.print(f"wrote {output} ({manifest['model']['name']}, {precision}, scan {scan}, "
                      f"{manifest['scan_calls']} scan calls, {manifest['export_seconds']:.1f} s){forced}")
        for t, e in (manifest.get("engines") or {}).items():
            console.print(_engine_line(t, e))


@app.command("parity-check")
def parity_check(
    bundle_path: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle directory (`hsiedge export`)."),
    scene: Path | None = typer.Option(None, "--scene", help="Scene to check on (default: the bundle's "
                                      "held-out data)."),
    key: str | None = typer.Option(None, "--key", help="Array of a .mat scene."),
    labels: Path | None = typer.Option(None, "--labels", help="Ground truth of --scene (OA, AA, kappa)."),
    labels_key: str | None = typer.Option(None, "--labels-key", help="Array of a .mat label file."),
    runtime: list[str] = typer.Option(None, "--runtime",
                                      callback=_one_of("--runtime", "onnxruntime", "tensorrt"),
                                      help="Runtime(s) to check against the original: "
                                      "onnxruntime, tensorrt (default: onnxruntime, and tensorrt when "
                                      "the bundle has an engine and TensorRT is here)."),
    report: Path | None = typer.Option(None, "--report", help="Write the full figures as JSON here."),
    save_polygraphy: Path | None = typer.Option(None, "--save-polygraphy", help="Folder for the inputs "
                                                "and every runtime's outputs in Polygraphy's JSON formats."),
    min_agreement: float | None = typer.Option(None, callback=_finite("--min-agreement", 0, 1),
                                               help="Override: minimum label agreement (0-1)."),
    max_rel_l2: float | None = typer.Option(None, callback=_finite("--max-rel-l2", 0),
                                            help="Override: maximum relative L2 logit error."),
    max_delta_oa: float | None = typer.Option(None, callback=_finite("--max-delta-oa", 0, 1),
                                              help="Override: maximum |ΔOA| (fraction, 0.001 = 0.1 point)."),
    tile: int | None = typer.Option(None, "--tile", min=1, help="MambaHSI: tile side whose tiling effect is "
                                    "reported (default: what `hsiedge infer` picks for this scene)."),
    overlap: int | None = typer.Option(None, "--overlap", min=0, help="MambaHSI: overlap for --tile."),
    memory: float | None = typer.Option(None, "--memory", callback=_finite("--memory", 0, above=True),
                                        help="MambaHSI: memory budget (MiB) for the default tile, as in "
                                        "`hsiedge infer`."),
    every_pixel: bool = typer.Option(False, "--every-pixel", help="Check on every valid pixel of --scene, "
                                     "also when it is the scene the bundle was exported on (whose held-out "
                                     "pixels are used otherwise)."),
    trusted_key: list[Path] = TRUSTED_KEY_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Prove a bundle computes what the PyTorch original computes, on a real scene.

    For MambaHSI it also reports the tiling effect: how far `hsiedge infer`'s tiles change the
    labels against a whole-scene run of the same runtime (not part of the pass/fail verdict).
    """
    import numpy as np

    from hsiedge.io import SceneReadError, Window, open_scene, read_labels
    from hsiedge.parity import check_bundle, parity_data
    from hsiedge.runtimes import RuntimeUnavailableError, default_runtime, why_unavailable

    if report is not None:
        _writable(report, "report")
    bundle = _open_bundle(bundle_path, trusted_key)
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
    tiling = None
    if bundle.input_kind == "image":
        from hsiedge.infer import DEFAULT_MEMORY_MIB, Geometry, InferError

        def tiling(runtime: str) -> Geometry:  # exactly what `hsiedge infer --runtime R` would use
            return Geometry.for_bundle(bundle, tile, overlap, runtime=runtime,
                                       memory_mib=DEFAULT_MEMORY_MIB if memory is None else memory,
                                       scene_shape=cube.shape[:2])

        for r in ("torch", *names):
            try:
                tiling(r)  # a budget that fits no tile is said before any work
            except InferError as e:
                fail(str(e))
    try:
        result = check_bundle(bundle, data, names, thresholds, save_dir=save_polygraphy, tiling=tiling)
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


def _is_export_scene(scene: Path, key: str | None, held: dict) -> bool:
    """Whether `scene` is the one the bundle was exported on: by content where the manifest
    records its sha256, else (bundles before 0.3) by file name and key."""
    from hsiedge.bundle import sha256_file

    if key != held.get("key"):
        return False
    if held.get("sha256"):
        return scene.is_file() and sha256_file(scene) == held["sha256"]
    return scene.name == Path(held["scene"]).name


def _engine_line(target: str, e: dict) -> str:
    ccs = e["compute_capabilities"]
    ccs = ", ".join(f"SM{c}" for c in ccs) if isinstance(ccs, list) else ccs
    plugin = f", plugin library sha256 {e['plugin']['sha256'][:12]}…" if e.get("plugin") else ""
    return (f"engine {target}: {e['library']} {e['version']}, {ccs}, {e['precision']}, scan {e['scan']}, "
            f"profile {_shape(e['profile']['min'])} … {_shape(e['profile']['max'])}, "
            f"built in {e['build_seconds']:.1f} s{plugin}")


def _shape(dims: list[int]) -> str:
    return "x".join(str(d) for d in dims)


@app.command()
def engine(
    bundle_path: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle directory (`hsiedge export`)."),
    target: str | None = TARGET_OPTION,
    compute_capability: list[int] = CC_OPTION,
    plugins: Path | None = PLUGINS_OPTION,
    min_shape: str | None = typer.Option(None, "--min", help="Smallest input shape, e.g. 1x198x32x32 "
                                         "(default: what `hsiedge infer` feeds this bundle)."),
    opt_shape: str | None = typer.Option(None, "--opt", help="Input shape to tune for."),
    max_shape: str | None = typer.Option(None, "--max", help="Largest input shape."),
    trusted_key: list[Path] = TRUSTED_KEY_OPTION,
    sign: Path | None = typer.Option(None, "--sign", help="Ed25519 private key to sign the new manifest "
                                     "with (adding an engine changes the manifest, so an old signature "
                                     "is removed)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest's engine entry as JSON."),
) -> None:
    """Build a TensorRT engine from a bundle's ONNX graph and add it to the bundle.

    Needs no checkpoint and no torch: build on the device from a bundle made elsewhere, or
    ahead of time for RTX GPUs on any machine.  The manifest is replaced atomically.
    """
    from hsiedge.bundle import BundleError
    from hsiedge.export.bundle_engine import add_engine, default_profile
    from hsiedge.export.engine import EngineBuildError, Profile, parse_shape
    from hsiedge.signing import SIGNATURE, SignatureError, load_private_key

    bundle = _open_bundle(bundle_path, trusted_key)
    was_signed = (bundle.path / SIGNATURE).is_file()
    if sign is not None:
        try:
            load_private_key(sign)
        except SignatureError as e:
            fail(str(e))
    profile = None
    if min_shape or opt_shape or max_shape:
        base = default_profile(bundle)
        try:
            lo = parse_shape(min_shape) if min_shape else base.min
            hi = parse_shape(max_shape) if max_shape else base.max
            profile = Profile(lo, parse_shape(opt_shape) if opt_shape else hi, hi)
        except ValueError as e:
            fail(f"{bundle_path}: {e}")
    with _spinner("building the TensorRT engine") as update:
        try:
            entry = add_engine(bundle, target=target, plugins=plugins, profile=profile,
                               compute_capabilities=tuple(compute_capability or ()) or None,
                               on_phase=(lambda p: update(f"building the TensorRT engine: {p}")) if update
                               else None)
        except (EngineBuildError, BundleError) as e:
            fail(str(e))
    if sign is not None:
        _sign(bundle_path, sign)
    elif was_signed:
        err_console.print(f"[yellow]warning:[/yellow] {escape(str(bundle_path))}: its signature covered the "
                          "old manifest and was removed; sign it again with `hsiedge sign`", highlight=False,
                          soft_wrap=True)
    if as_json:
        typer.echo(json.dumps(entry, indent=2))
    else:
        console.print(f"{bundle_path}: added {_engine_line(entry['target'], entry)}")


def _sign(bundle_path: Path, key: Path) -> str:
    """Verify the bundle, sign its manifest with `key`, say so; return the key id."""
    from hsiedge.bundle import read_manifest_bytes
    from hsiedge.signing import SignatureError, sign_manifest

    bundle = _open_bundle(bundle_path)
    raw = read_manifest_bytes(bundle.path)
    if hashlib.sha256(raw).hexdigest() != bundle.manifest_sha256:
        fail(f"{bundle_path}: the manifest changed while it was being verified; sign again")
    try:
        kid = sign_manifest(bundle.path, raw, key)
    except SignatureError as e:
        fail(str(e))
    err_console.print(f"signed {bundle_path} with key {kid}", highlight=False)
    return kid


@app.command()
def sign(
    bundle_path: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle directory (`hsiedge export`)."),
    key: Path = typer.Argument(..., metavar="KEY", help="Ed25519 private key (PEM from `hsiedge keygen`, or "
                               "an OpenSSH ed25519 key without a passphrase)."),
) -> None:
    """Sign a bundle's manifest (which lists every artifact's sha256) with an Ed25519 key.

    The bundle is verified first; devices given the public key with --trusted-key run it only
    while nothing in it has changed."""
    _sign(bundle_path, key)


@app.command()
def keygen(
    key: Path = typer.Argument(..., metavar="KEY", help="Private key file to write (KEY.pub gets the public "
                               "key)."),
) -> None:
    """Make an Ed25519 key pair for signing bundles: KEY (keep it private) and KEY.pub (for devices)."""
    from hsiedge.signing import SignatureError, generate_key, key_id, load_public_key

    try:
        private, public = generate_key(key)
    except SignatureError as e:
        fail(str(e))
    except OSError as e:
        fail(f"{key}: cannot write the key there ({e.strerror or e})")
    console.print(f"wrote {private} (private, mode 600) and {public} "
                  f"(key id {key_id(load_public_key(public))})")


plugin_app = typer.Typer(help="The hsiedge TensorRT plugin library (SelectiveScan).", no_args_is_help=True)
app.add_typer(plugin_app, name="plugin")


@plugin_app.command("build")
def plugin_build(
    output: Path = typer.Option(Path("libhsiedge_trt_plugins.so"), "-o", "--output",
                                help="Where to write the library."),
    tensorrt_root: Path | None = typer.Option(None, "--tensorrt-root", help="Folder with include/NvInfer.h "
                                              "(default: $TENSORRT_ROOT, else the system's TensorRT)."),
    arch: list[str] = typer.Option(None, "--arch", help="CUDA architecture to build for (repeat; default: "
                                   "80 86 89 120 and PTX, or 87 with --jetson)."),
    jetson: bool = typer.Option(False, "--jetson", help="Build for Jetson Orin (sm_87)."),
) -> None:
    """Compile libhsiedge_trt_plugins.so from plugins/ with CMake and nvcc (needs TensorRT headers)."""
    from hsiedge.export.plugin_library import PluginBuildError, build_plugin_library

    with _spinner("building the plugin library") as update:
        try:
            lib = build_plugin_library(output, tensorrt_root=tensorrt_root, archs=arch or None, jetson=jetson,
                                       on_line=(lambda t: update(t[:100])) if update else None)
        except PluginBuildError as e:
            fail(str(e))
    console.print(f"wrote {lib} ({lib.stat().st_size / 2**20:.1f} MiB); give it to "
                  "`hsiedge engine --plugins`")


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
    memory: float | None = typer.Option(None, "--memory", callback=_finite("--memory", 0, above=True),
                                        help="MambaHSI: memory budget in MiB from which "
                                        "the default tile is chosen (default 900)."),
    batch: int | None = typer.Option(None, "--batch", min=1, help="Pixels per runner call (patch and pixel "
                                     "models; default 128); memory grows with it."),
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

    bundle = _open_bundle(bundle_path, trusted_key)
    progress = Progress(TextColumn("classifying"), BarColumn(), TextColumn("{task.fields[tiles]} tiles"),
                        TextColumn("{task.fields[rate]} px/s"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=err_console, disable=not err_console.is_terminal, transient=True)
    with progress:
        task = progress.add_task("infer", total=None, tiles="0", rate="-")
        state = {"t0": 0.0, "pixels": 0, "tiles": 0, "of": 0}
        every = None if err_console.is_terminal else _progress_seconds()  # plain lines for logs

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
                                  f"{rate:,.0f} px/s, about {_duration(left)} left",
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
    memory: float | None = typer.Option(None, "--memory", callback=_finite("--memory", 0, above=True),
                                        help="MambaHSI: memory budget in MiB of each worker (default 900)."),
    batch: int | None = typer.Option(None, "--batch", min=1, help="Pixels per runner call (default 128)."),
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
        from hsiedge.many.report import ReportError
        from hsiedge.many.run import ManyError
        from hsiedge.many.run import infer_many as run_many
    except ImportError as e:
        fail(f"infer-many needs Dask ({e.name} is missing): pip install 'hsiedge[cluster]'")
    try:
        scene_paths = expand_scenes(scenes, asset)
    except CatalogueError as e:
        fail(str(e))
    bundle = _open_bundle(bundle_path, trusted_key)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"{out_dir}: cannot create the output folder ({e.strerror or e})")
    _writable(out_dir / "hsiedge-run.json", "the run report")
    options = {"tile": tile, "overlap": overlap, "batch": DEFAULT_BATCH if batch is None else batch,
               "probs": probs, "memory_mib": memory, "key": key}
    progress = Progress(TextColumn("classifying scenes"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[pixels]} px, {task.fields[failed]} failed"),
                        TimeElapsedColumn(),
                        console=err_console, disable=not err_console.is_terminal, transient=True)
    state = {"pixels": 0, "failed": 0, "done": 0, "said": time.perf_counter()}
    every = None if err_console.is_terminal else _progress_seconds()

    def start(dashboard: str | None, count: int) -> None:
        if dashboard:
            err_console.print(f"Dask dashboard: {dashboard}", highlight=False, soft_wrap=True)
        progress.update(task, total=count)

    def scene_done(entry: dict[str, Any]) -> None:
        state["done"] += 1
        state["pixels"] += entry.get("pixels") or 0 if entry["status"] == "done" else 0
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
                              workers=workers or min(4, len(os.sched_getaffinity(0))),
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
                      f"({t['pixels_per_second']:,} px/s); report {out_dir / 'hsiedge-run.json'}",
                      highlight=False)
    warned = [e for e in report["scenes"] if e.get("warnings")]
    if warned:
        err_console.print(f"[yellow]warning:[/yellow] {len(warned)} scene(s) with warnings in the report; "
                          f"the first: {escape(warned[0]['warnings'][0])}", highlight=False, soft_wrap=True)
    if t["failed"]:
        first = next(e for e in report["scenes"] if e["status"] == "failed")
        fail(f"{t['failed']} of {t['scenes']} scenes failed (see {out_dir / 'hsiedge-run.json'}); the first: "
             f"{first['error']}")


if __name__ == "__main__":
    sys.exit(app())
