"""`hsiedge engine`, `hsiedge plugin build`, `hsiedge sign` and `hsiedge keygen`."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import typer
from rich.markup import escape

from hsiedge.cli.common import (
    CC_OPTION,
    PLUGINS_OPTION,
    TARGET_OPTION,
    TRUSTED_KEY_OPTION,
    app,
    console,
    engine_line,
    err_console,
    fail,
    open_verified_bundle,
    sign_bundle,
    spinner,
)


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

    bundle = open_verified_bundle(bundle_path, trusted_key)
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
    with spinner("building the TensorRT engine") as update:
        try:
            entry = add_engine(bundle, target=target, plugins=plugins, profile=profile,
                               compute_capabilities=tuple(compute_capability or ()) or None,
                               on_phase=(lambda p: update(f"building the TensorRT engine: {p}")) if update
                               else None)
        except (EngineBuildError, BundleError) as e:
            fail(str(e))
    if sign is not None:
        sign_bundle(bundle_path, sign)
    elif was_signed:
        err_console.print(f"[yellow]warning:[/yellow] {escape(str(bundle_path))}: its signature covered the "
                          "old manifest and was removed; sign it again with `hsiedge sign`", highlight=False,
                          soft_wrap=True)
    if as_json:
        typer.echo(json.dumps(entry, indent=2))
    else:
        console.print(f"{bundle_path}: added {engine_line(entry['target'], entry)}")


@app.command()
def sign(
    bundle_path: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle directory (`hsiedge export`)."),
    key: Path = typer.Argument(..., metavar="KEY", help="Ed25519 private key (PEM from `hsiedge keygen`, or "
                               "an OpenSSH ed25519 key without a passphrase)."),
) -> None:
    """Sign a bundle's manifest (which lists every artifact's sha256) with an Ed25519 key.

    The bundle is verified first; devices given the public key with --trusted-key run it only
    while nothing in it has changed."""
    sign_bundle(bundle_path, key)


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


# CMake lines worth showing while the plugin library builds: versions found and build steps.
_PLUGIN_PROGRESS = re.compile(r"^(-- (TensorRT|CUDA architectures|The CUDA compiler identification)|"
                              r"\[ *\d+%\] (Building|Linking))")


@plugin_app.command("build")
def plugin_build(
    output: Path | None = typer.Option(None, "-o", "--output", help="Also copy the library here (it is "
                                       "always kept in the per-user cache, where `hsiedge engine` finds "
                                       "it)."),
    tensorrt_root: Path | None = typer.Option(None, "--tensorrt-root", help="Folder with include/NvInfer.h "
                                              "(default: $TENSORRT_ROOT, else the system's TensorRT)."),
    arch: list[str] = typer.Option(None, "--arch", help="CUDA architecture to build for, e.g. 89 or 87 "
                                   "(repeat; default: 75 80 86 89 120 and PTX, or 87 with --jetson)."),
    jetson: bool = typer.Option(False, "--jetson", help="Build for Jetson Orin (sm_87)."),
    force: bool = typer.Option(False, "--force", help="Rebuild even when the cache holds a library built "
                               "from the same sources, TensorRT version and architectures."),
) -> None:
    """Compile libhsiedge_trt_plugins.so (SelectiveScan) with CMake and nvcc; needs TensorRT headers.

    The sources ship with hsiedge.  The library is kept in the per-user cache
    ($HSIEDGE_CACHE_DIR/trt-plugins, default ~/.cache/hsiedge/trt-plugins), one per TensorRT
    version and architecture list, so `hsiedge engine` and `hsiedge export --engine` find it
    without --plugins; a second run for the same inputs reuses it.
    """
    from hsiedge.export.plugin_library import PluginBuildError, ensure_plugin_library

    def show(update: Callable[[str], None] | None) -> Callable[[str], None]:
        def line(text: str) -> None:
            if _PLUGIN_PROGRESS.match(text):
                if update:
                    update(f"building the plugin library: {escape(text.removeprefix('-- ')[:90])}")
                else:
                    err_console.print(text, highlight=False, markup=False, soft_wrap=True)
        return line

    with spinner("building the plugin library") as update:
        try:
            built = ensure_plugin_library(output, tensorrt_root=tensorrt_root, archs=arch or None,
                                          jetson=jetson, force=force, on_line=show(update))
        except PluginBuildError as e:
            fail(str(e))
    what = f"TensorRT {built.tensorrt_version} headers, {built.archs}"
    if built.rebuilt:
        console.print(f"built {built.path} ({what}, {built.path.stat().st_size / 2**20:.1f} MiB)",
                      highlight=False, soft_wrap=True)
    else:
        console.print(f"already built for the same sources, TensorRT version and architectures: {built.path} "
                      f"({what}); --force rebuilds it", highlight=False, soft_wrap=True)
    console.print(f"sha256 {built.sha256}", highlight=False)
