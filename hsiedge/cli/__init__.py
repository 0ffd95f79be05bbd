"""The `hsiedge` command line (Typer + Rich): one module per group of commands, all on the
app of `hsiedge.cli.common`."""

# each registers its commands, in the order `hsiedge --help` lists them
from hsiedge.cli import train, export, engine, infer, bench  # noqa: F401, I001
from hsiedge.cli.common import app

__all__ = ["app"]
