"""`hsiedge plugin build`: compile libhsiedge_trt_plugins.so (plugins/, CMake) for TensorRT.

The library needs TensorRT's headers at compile time, which are on no package index: they
come with a TensorRT install (JetPack: /usr/include/aarch64-linux-gnu) or from `include/` of
NVIDIA's public TensorRT repository at a 10.x / 11.x tag, unpacked anywhere and named by
`TENSORRT_ROOT`.  The build runs CMake on the checkout's `plugins/` folder into a build
folder, and copies the library to its destination only once it is complete.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from hsiedge.atomic import atomic_path
from hsiedge.ops.native import nvcc

SOURCE_DIR = Path(__file__).resolve().parents[1] / "plugins"
LIBRARY = "libhsiedge_trt_plugins.so"
# Where TensorRT installs put NvInfer.h when TENSORRT_ROOT is not given (as plugins/CMakeLists.txt).
SYSTEM_INCLUDES = ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu",
                   "/usr/local/tensorrt/include", "/opt/tensorrt/include", "/usr/include")


class PluginBuildError(RuntimeError):
    """The plugin library cannot be built here; one sentence says why."""


def tensorrt_include(root: str | Path | None = None) -> Path | None:
    """The folder holding NvInfer.h: under `root` (or $TENSORRT_ROOT), else a system place; None if none."""
    root = root or os.environ.get("TENSORRT_ROOT")
    places = [Path(root) / "include", Path(root)] if root else [Path(p) for p in SYSTEM_INCLUDES]
    return next((p for p in places if (p / "NvInfer.h").is_file()), None)


def build_plugin_library(output: str | Path, *, tensorrt_root: str | Path | None = None,
                         archs: list[str] | None = None, jetson: bool = False,
                         build_dir: str | Path | None = None,
                         on_line: Callable[[str], None] | None = None) -> Path:
    """Configure and build the plugin library with CMake; the finished library is written to `output`."""
    root = tensorrt_root or os.environ.get("TENSORRT_ROOT")
    if root and tensorrt_include(root) is None:
        raise PluginBuildError(f"{root}: expected TensorRT headers (include/NvInfer.h) there, found none")
    if not root and tensorrt_include() is None:
        raise PluginBuildError("no TensorRT headers found: pass --tensorrt-root DIR (a folder with "
                               "include/NvInfer.h, e.g. include/ of NVIDIA's TensorRT repository at a 10.x "
                               "tag) or set TENSORRT_ROOT")
    if not (SOURCE_DIR / "CMakeLists.txt").is_file():
        raise PluginBuildError(f"{SOURCE_DIR}: the plugin sources are not here; build from a checkout of "
                               "hsiedge")
    compiler = os.environ.get("CUDACXX") or nvcc()
    if shutil.which("cmake") is None or compiler is None:
        missing = "cmake" if shutil.which("cmake") is None else "nvcc"
        raise PluginBuildError(f"`{missing}` is not on PATH; the plugin library needs CMake and the CUDA "
                               "toolkit")
    build = Path(build_dir) if build_dir else Path(output).resolve().parent / ".hsiedge-plugin-build"
    configure = ["cmake", "-S", str(SOURCE_DIR), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_CUDA_COMPILER={compiler}"]
    if root:
        configure.append(f"-DTENSORRT_ROOT={Path(root).resolve()}")
    if archs:
        configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs)}")
    if jetson:
        configure.append("-DHSIEDGE_JETSON=ON")
    for cmd in (configure, ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)]):
        _run(cmd, on_line)
    built = build / LIBRARY
    if not built.is_file():
        raise PluginBuildError(f"{built}: CMake finished but the library is not there")
    with atomic_path(Path(output)) as tmp:
        shutil.copyfile(built, tmp)
    return Path(output)


def _run(cmd: list[str], on_line: Callable[[str], None] | None) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = [*tail[-20:], line.rstrip()]
        if on_line:
            on_line(line.rstrip())
    if proc.wait() != 0:
        first_error = next((t for t in tail if "error" in t.lower()), tail[-1] if tail else "")
        raise PluginBuildError(f"`{' '.join(cmd[:2])}` failed (exit {proc.returncode}): "
                               f"{first_error.strip()}")
