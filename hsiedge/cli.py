"""The `hsiedge` command line (Typer + Rich).  Commands arrive with the stages they drive."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table

from hsiedge import __version__

app = typer.Typer(
    name="hsiedge",
    help="Take Mamba hyperspectral classifiers from PyTorch to edge hardware, and prove they agree.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """One line on stderr, exit code 1."""
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


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
    epochs: int | None = typer.Option(None, help="Epochs (default: the model's recipe)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    key: str | None = typer.Option(None, "--key", help="Array of a .mat scene holding the cube."),
    labels_key: str | None = typer.Option(None, "--labels-key", help="Array of a .mat label file."),
    as_json: bool = typer.Option(False, "--json", help="Print the test metrics as JSON."),
) -> None:
    """Train a seed model on a labelled scene and write a checkpoint."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from hsiedge.checkpoint import save_checkpoint
    from hsiedge.io import SceneReadError, open_scene, read_labels
    from hsiedge.models import MODELS
    from hsiedge.splits import parse_protocol
    from hsiedge.train import RECIPES, train_model

    if model not in MODELS:
        fail(f"unknown model '{model}'; choose one of: {', '.join(MODELS)}")
    if device not in ("cpu", "cuda"):
        fail(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail("--device cuda asked for, but PyTorch sees no CUDA GPU here")
    try:
        parse_protocol(protocol)
    except ValueError as e:
        fail(str(e))
    try:
        with open_scene(scene, key=key) as s:
            cube, nodata = s.read(), s.nodata
        lm = read_labels(labels, key=labels_key, shape=cube.shape[:2])
    except SceneReadError as e:
        fail(str(e))
    n_epochs = RECIPES[model].epochs if epochs is None else epochs
    progress = Progress(TextColumn(f"training {model}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"),
                        TextColumn("loss {task.fields[loss]:.4f} val OA {task.fields[val]:.3f}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=err_console,
                        disable=not err_console.is_terminal, transient=True)
    with progress:
        task = progress.add_task("train", total=n_epochs, loss=float("nan"), val=float("nan"))
        try:
            result = train_model(model, cube, lm.labels, protocol=protocol, seed=seed, epochs=n_epochs,
                                 device=device, class_names=lm.class_names, nodata=nodata,
                                 on_epoch=lambda r: progress.update(
                                     task, completed=r["epoch"], loss=r["loss"], val=r["val_oa"]))
        except ValueError as e:
            fail(str(e))
    save_checkpoint(output, result.checkpoint)
    report = result.report
    if as_json:
        typer.echo(json.dumps({"checkpoint": str(output), "model": model, "protocol": protocol, "seed": seed,
                               "class_names": result.checkpoint.class_names, **report}, indent=2))
        return
    for t in _accuracy_tables(report, result.checkpoint.class_names):
        console.print(t)
    console.print(f"wrote {output} ({model}, {protocol}, seed {seed}, {n_epochs} epochs, "
                  f"{report['train_seconds']:.1f} s)")


if __name__ == "__main__":
    sys.exit(app())
