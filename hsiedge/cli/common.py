"""What the `hsiedge` commands share: the Typer app, the consoles, one-line failures, option
checks, progress pacing, opening a bundle or an output safely, and the engine options and
helpers both `export --engine` and `engine` use."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

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


def need_torch(what: str) -> None:
    """Fail in one line, with the install line, where `what` needs PyTorch and it is not installed."""
    from hsiedge.optional import torch_missing

    missing = torch_missing(what)
    if missing:
        fail(missing)


@contextlib.contextmanager
def spinner(text: str) -> Iterator[Callable[[str], None] | None]:
    """A status line with a spinner on a terminal; yields its update function (None elsewhere)."""
    if not err_console.is_terminal:
        yield None
        return
    with err_console.status(text, spinner="dots") as status:
        yield status.update


def progress_seconds() -> float:
    """Seconds between plain progress lines when stderr is not a terminal
    (`$HSIEDGE_PROGRESS_SECONDS`, default 60)."""
    try:
        return float(os.environ.get("HSIEDGE_PROGRESS_SECONDS", "60"))
    except ValueError:
        return 60.0


def duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def finite(option: str, low: float | None = None, high: float | None = None, *,
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


def one_of(option: str, *values: str) -> Callable[[Any], Any]:
    """An option callback refusing a value (or a repeated option's values) not in `values`."""
    def check(value: Any) -> Any:
        for v in [value] if isinstance(value, str) else value or []:
            if v not in values:
                raise typer.BadParameter(f"expected one of {', '.join(values)}, got {v!r}", param_hint=option)
        return value
    return check


RUNTIMES = one_of("--runtime", "torch", "onnxruntime", "tensorrt")
TRUSTED_KEY_OPTION = typer.Option(None, "--trusted-key", envvar="HSIEDGE_TRUSTED_KEY",
                                  help="Ed25519 public key (PEM or OpenSSH) the bundle must be signed with "
                                       "(repeat for several; or $HSIEDGE_TRUSTED_KEY). Unsigned or "
                                       "wrongly signed bundles are refused.")
SIGN_OPTION = typer.Option(None, "--sign", help="Ed25519 private key to sign the bundle's manifest with "
                           "(as `hsiedge sign` does).")


def open_verified_bundle(path: Path, trusted_keys: list[Path] | None = None) -> Bundle:
    """The verified bundle at `path`, or one line and exit 1."""
    from hsiedge.bundle import BundleError, open_bundle

    try:
        return open_bundle(path, trusted_keys or ())
    except BundleError as e:
        fail(str(e))


def safe_outputs(outputs: dict[str, Path], inputs: dict[str, Path]) -> None:
    """Fail now if an output would replace an input or another output (`hsiedge.files.output_clash`)."""
    from hsiedge.files import output_clash

    clash = output_clash(outputs, inputs)
    if clash:
        fail(clash)


def writable(path: Path, what: str) -> None:
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


TARGET_OPTION = typer.Option(None, "--target", callback=one_of("--target", "rtx", "trt"),
                             help="Engine target. rtx: TensorRT for RTX, ahead of time "
                             "on any machine; trt: TensorRT 10/11 on the device itself (default: rtx where "
                             "installed, else trt).")
CC_OPTION = typer.Option(None, "--compute-capability", help="--target rtx: GPU compute capability to build "
                         "for, e.g. 89 for the RTX 4090 (repeat; default 80 86 89 120).")
PLUGINS_OPTION = typer.Option(None, "--plugins", help="libhsiedge_trt_plugins.so, needed for plugin-mode "
                              "bundles (default: $HSIEDGE_TRT_PLUGINS, else the library `hsiedge plugin "
                              "build` cached); it is copied into the bundle.")


def engine_line(target: str, e: dict) -> str:
    ccs = e["compute_capabilities"]
    ccs = ", ".join(f"SM{c}" for c in ccs) if isinstance(ccs, list) else ccs
    plugin = f", plugin library sha256 {e['plugin']['sha256'][:12]}…" if e.get("plugin") else ""
    return (f"engine {target}: {e['library']} {e['version']}, {ccs}, {e['precision']}, scan {e['scan']}, "
            f"profile {_shape(e['profile']['min'])} … {_shape(e['profile']['max'])}, "
            f"built in {e['build_seconds']:.1f} s{plugin}")


def _shape(dims: list[int]) -> str:
    return "x".join(str(d) for d in dims)


def sign_bundle(bundle_path: Path, key: Path) -> str:
    """Verify the bundle, sign its manifest with `key`, say so; return the key id."""
    from hsiedge.bundle import read_manifest_bytes
    from hsiedge.signing import SignatureError, sign_manifest

    bundle = open_verified_bundle(bundle_path)
    raw = read_manifest_bytes(bundle.path)
    if hashlib.sha256(raw).hexdigest() != bundle.manifest_sha256:
        fail(f"{bundle_path}: the manifest changed while it was being verified; sign again")
    try:
        kid = sign_manifest(bundle.path, raw, key)
    except SignatureError as e:
        fail(str(e))
    err_console.print(f"signed {bundle_path} with key {kid}", highlight=False)
    return kid
