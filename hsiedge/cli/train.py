"""`hsiedge models` and `hsiedge train`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.table import Table

from hsiedge.cli.common import (
    app,
    console,
    duration,
    err_console,
    fail,
    need_torch,
    one_of,
    progress_seconds,
    safe_outputs,
    writable,
)


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the seed models: what each takes as input and its size in its default config."""
    need_torch("hsiedge models")
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
    device: str = typer.Option("cpu", callback=one_of("--device", "cpu", "cuda"), help="cpu or cuda."),
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
    need_torch("hsiedge train")
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
    safe_outputs({"checkpoint": output, "training state": state_path},
                  {f"the scene {scene.name}": scene, f"the labels {labels.name}": labels})
    writable(output, "checkpoint")  # found now, not after hours of training
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
    every = None if err_console.is_terminal else progress_seconds()  # plain lines for logs
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
                          f"{duration(r['seconds'])} so far, about "
                          f"{duration(per_epoch * (r['epochs'] - r['epoch']))} left",
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
