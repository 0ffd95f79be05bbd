"""The `hsiedge` command line (Typer + Rich).  Commands arrive with the stages they drive."""

from __future__ import annotations

import json

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


if __name__ == "__main__":
    app()
