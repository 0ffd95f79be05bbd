"""Which TensorRT library serves a target, shared by the engine builder and the TensorRT runner.

Two targets, three libraries, one Python API family:

- `rtx`: TensorRT for RTX, module `tensorrt_rtx_bindings` (the package-index wheel) or
  `tensorrt_rtx` (NVIDIA's own packaging, which Polygraphy imports);
- `trt`: TensorRT 10 or 11, module `tensorrt` (JetPack 6 on Jetson Orin, workstations).

TensorRT for RTX's ONNX parser `dlopen`s `libtensorrt_rtx.so` by its unversioned name when it
maps a node to a plugin; the wheel ships only `libtensorrt_rtx.so.1`, and the failed dlopen
ends the process (std::terminate).  The wheel's libraries carry RPATH `$ORIGIN`, so the name
resolves once a link of that name sits next to the versioned library: hsiedge makes that
link itself the first time it loads TensorRT for RTX, so users never make one by hand.

A plugin-mode graph also needs the hsiedge plugin library (`find_plugin_library`): the one
named by `--plugins`, else by `$HSIEDGE_TRT_PLUGINS`, else the newest one `hsiedge plugin build`
left in the per-user cache.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

TARGETS = ("rtx", "trt")
# Module names per target, in the order tried.
MODULES = {"rtx": ("tensorrt_rtx_bindings", "tensorrt_rtx"), "trt": ("tensorrt",)}
UNVERSIONED = "libtensorrt_rtx.so"
PLUGIN_ENV = "HSIEDGE_TRT_PLUGINS"  # the plugin library to build with when --plugins is not given
# What to do when no plugin library is found (the end of a sentence).
NO_PLUGIN_LIBRARY = ("run `hsiedge plugin build` (engine builds find its library), pass --plugins "
                     f"PATH/libhsiedge_trt_plugins.so or set {PLUGIN_ENV}")
# The GPUs an `rtx` engine is built for by default: A100-class, RTX 30, RTX 40 (the RTX 4090), RTX 50.
PORTABLE_CCS = (80, 86, 89, 120)


class TensorRTUnavailableError(RuntimeError):
    """No TensorRT library for a target here, or it cannot be made usable; one sentence says why."""


class PluginLibraryNotFoundError(RuntimeError):
    """No hsiedge plugin library was given or built, or the one named is not there; one sentence says why."""


@dataclass(frozen=True)
class TensorRTLibrary:
    """The TensorRT module serving one target, and what the manifest records about it."""

    target: str
    module: ModuleType

    @property
    def name(self) -> str:
        return "tensorrt_rtx" if self.target == "rtx" else "tensorrt"

    @property
    def version(self) -> str:
        return str(self.module.__version__)


def tensorrt_library(target: str) -> TensorRTLibrary:
    """Import the TensorRT module for `target` ("rtx" or "trt")."""
    if target not in TARGETS:
        raise TensorRTUnavailableError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    for name in MODULES[target]:
        if importlib.util.find_spec(name) is None:
            continue
        module = importlib.import_module(name)
        if target == "rtx":
            ensure_unversioned_rtx_library(module)
        return TensorRTLibrary(target, module)
    install = ("pip install 'hsiedge[rtx]' installs TensorRT for RTX from the package index"
               if target == "rtx" else "TensorRT 10/11 comes with JetPack or NVIDIA's TensorRT packages")
    raise TensorRTUnavailableError(f"no TensorRT library for target {target!r} is installed here "
                                   f"(tried the modules {', '.join(MODULES[target])}); {install}")


def installed(target: str) -> bool:
    """Whether a TensorRT module for `target` is installed here (found, not imported)."""
    return any(importlib.util.find_spec(m) for m in MODULES[target])


def available_targets() -> list[str]:
    """The targets whose TensorRT module is installed here, `rtx` first."""
    return [t for t in TARGETS if installed(t)]


def default_target() -> str:
    """`rtx` where TensorRT for RTX is installed (it builds on any machine), else `trt`."""
    found = available_targets()
    if not found:
        raise TensorRTUnavailableError(
            "no TensorRT library is installed here: pip install 'hsiedge[rtx]' for TensorRT for RTX "
            "(builds engines on any machine), or use a TensorRT 10/11 install with --target trt")
    return found[0]


def find_plugin_library(explicit: str | Path | None = None, *, tensorrt_major: int | None = None) -> Path:
    """The plugin library to load: `explicit` (--plugins), else $HSIEDGE_TRT_PLUGINS, else the newest
    library `hsiedge plugin build` cached (built against TensorRT `tensorrt_major` headers, when given).

    A library that is named but missing is an error, never skipped for the next place: the user
    meant that one.  Raises PluginLibraryNotFoundError saying what to run when none is found."""
    from hsiedge.export.plugin_library import cached_plugin_library

    named = [(explicit, None), (os.environ.get(PLUGIN_ENV) or None, f"${PLUGIN_ENV}")]
    for lib, source in named:
        if lib:
            if not Path(lib).is_file():
                where = f" (from {source})" if source else ""
                raise PluginLibraryNotFoundError(f"{lib}{where}: expected the hsiedge TensorRT plugin "
                                                 "library, found no file")
            return Path(lib)
    cached = cached_plugin_library(tensorrt_major)
    if cached is None:
        built_for = f" built for TensorRT {tensorrt_major}" if tensorrt_major is not None else ""
        raise PluginLibraryNotFoundError(f"no hsiedge TensorRT plugin library{built_for} was found: "
                                         f"{NO_PLUGIN_LIBRARY}")
    return cached


def _libs_dir(module: ModuleType) -> Path | None:
    """The folder holding libtensorrt_rtx.so.1 for this module (None: not a wheel install)."""
    folders = [Path(module.__file__).parent]
    libs = getattr(module, "tensorrt_rtx_libs", None)
    if libs is not None and getattr(libs, "__file__", None):
        folders.insert(0, Path(libs.__file__).parent)
    for folder in folders:
        if (folder / f"{UNVERSIONED}.1").is_file():
            return folder
    return None


def ensure_unversioned_rtx_library(module: ModuleType) -> Path | None:
    """Create `libtensorrt_rtx.so -> libtensorrt_rtx.so.1` next to the wheel's library if missing.

    Returns the link, or None where the library is not a wheel install.  Idempotent, and safe
    when several processes do it at once (link under a private name, then rename).
    """
    folder = _libs_dir(module)
    if folder is None:
        return None
    link = folder / UNVERSIONED
    if link.exists():
        return link
    tmp = folder / f".{UNVERSIONED}.{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(f"{UNVERSIONED}.1")
        os.replace(tmp, link)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TensorRTUnavailableError(
            f"{link}: TensorRT for RTX needs this link to libtensorrt_rtx.so.1 to use plugins, and hsiedge "
            f"could not create it ({e.strerror}); ask the owner of that folder to run "
            f"`ln -s libtensorrt_rtx.so.1 {link}`") from None
    return link


def stderr_logger(trt: ModuleType) -> Any:
    """A TensorRT logger that writes warnings and errors to stderr (TensorRT's own writes to
    stdout, which would corrupt `--json` output)."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if severity <= trt.ILogger.Severity.WARNING:
                print(f"[{_library_name(trt)}] {severity.name}: {msg}", file=sys.stderr, flush=True)

    return Logger()


@contextlib.contextmanager
def native_stdout_to_stderr() -> Iterator[None]:
    """Send what native code writes to file descriptor 1 to stderr meanwhile: TensorRT's
    graph compiler prints some warnings with printf, past any logger, which would corrupt
    `--json` output on stdout."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)  # C stdio buffers still holding text for fd 1
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _library_name(trt: ModuleType) -> str:
    return "TensorRT for RTX" if "rtx" in trt.__name__ else "TensorRT"
