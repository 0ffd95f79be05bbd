"""The TensorRT plugin library (plugins/CMakeLists.txt): where TensorRT headers are found it
configures and builds with CMake, under -Werror, for the default GPU set, exports only the
entry points TensorRT looks up, and honours HSIEDGE_JETSON and CMAKE_CUDA_ARCHITECTURES.

Headers come from TENSORRT_ROOT (e.g. `include/` of NVIDIA's public TensorRT repository at a
10.x or 11.x tag, kept outside the project) or the system places the CMakeLists searches;
without them every test here skips and says so."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hsiedge.export.plugin_library import tensorrt_include
from hsiedge.ops import cuda
from hsiedge.plugins import source_dir

PLUGINS = source_dir()  # the installed package's sources (plugins/ in an editable install)
PORTABLE_ARCHS = "75-real;80-real;86-real;89-real;120"
# What the library exports: TensorRT's two entry points and the kernel's C API (hsiedge_*).
EXPORTS = {"getCreators", "setLoggerFinder", "hsiedge_scan_cuda", "hsiedge_scan_cuda_status",
           "hsiedge_scan_cuda_workspace"}


def _missing() -> str | None:
    if shutil.which("cmake") is None:
        return "cmake is not installed here"
    if cuda.nvcc() is None:
        return "nvcc is not installed here"
    if tensorrt_include() is None:
        return ("no TensorRT headers here: set TENSORRT_ROOT to a folder holding include/NvInfer.h "
                "(e.g. include/ of NVIDIA's TensorRT repository at a 10.x or 11.x tag)")
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def _configure(build: Path, *options: str) -> str:
    args = ["cmake", "-S", str(PLUGINS), "-B", str(build), f"-DCMAKE_CUDA_COMPILER={cuda.nvcc()}", *options]
    if os.environ.get("TENSORRT_ROOT"):
        args.append(f"-DTENSORRT_ROOT={os.environ['TENSORRT_ROOT']}")
    env = {k: v for k, v in os.environ.items() if k != "CUDAARCHS"}  # the test decides the architectures
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def _cached(build: Path, name: str) -> str:
    for line in (build / "CMakeCache.txt").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split("=", 1)[1]
    raise AssertionError(f"{name} is not in {build / 'CMakeCache.txt'}")


def _cuda_flags(build: Path) -> str:
    return (build / "CMakeFiles" / "hsiedge_trt_plugins.dir" / "flags.make").read_text()


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """The library as a user builds it by default (portable GPU set), warnings as errors."""
    build = tmp_path_factory.mktemp("plugins")
    out = _configure(build, "-DCMAKE_CXX_FLAGS=-Werror", "-DCMAKE_CUDA_FLAGS=-Werror=all-warnings")
    assert f"CUDA architectures: {PORTABLE_ARCHS}" in out
    r = subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return build / "libhsiedge_trt_plugins.so"


def test_default_build_covers_the_portable_gpus_with_ptx(library):
    flags = _cuda_flags(library.parent)
    for arch in (75, 80, 86, 89):  # machine code only
        assert f"arch=compute_{arch},code=[sm_{arch}]" in flags, flags
    # sm_120 machine code plus compute_120 PTX, which newer GPUs compile at load time
    assert "arch=compute_120,code=[compute_120,sm_120]" in flags, flags
    assert "sm_87" not in flags


def _run(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def test_library_exports_only_the_tensorrt_entry_points_and_the_kernel_api(library):
    nm = _run("nm", "-D", "--defined-only", str(library))
    exported = {m.group(1) for m in re.finditer(r"^\S+ [TWDBVR] (\S+)$", nm, re.M)}
    assert exported == EXPORTS
    # getCreators and setLoggerFinder are functions: what IPluginRegistry::loadLibrary looks up
    for entry in ("getCreators", "setLoggerFinder"):
        assert re.search(rf" T {entry}$", nm, re.M), nm
    # headers only: no libnvinfer / libtensorrt soname and no shared cudart to find at load time
    names = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", _run("readelf", "-d", str(library)))
    assert names and not [n for n in names if re.match(r"lib(nvinfer|tensorrt|cudart)", n)], names


def test_jetson_option_and_explicit_architectures(tmp_path):
    build = tmp_path / "b"
    assert "CUDA architectures: 87\n" in _configure(build, "-DHSIEDGE_JETSON=ON")
    assert _cached(build, "CMAKE_CUDA_ARCHITECTURES") == "87"
    # switching the option back in the same build folder takes effect (the value was the default)
    _configure(build, "-DHSIEDGE_JETSON=OFF")
    assert _cached(build, "CMAKE_CUDA_ARCHITECTURES") == PORTABLE_ARCHS
    # an explicit list wins over the option, with a warning
    out = _configure(build, "-DHSIEDGE_JETSON=ON", "-DCMAKE_CUDA_ARCHITECTURES=89")
    assert "CUDA architectures: 89\n" in out
    assert "HSIEDGE_JETSON=ON, but CMAKE_CUDA_ARCHITECTURES=89" in out
    assert _cached(build, "CMAKE_CUDA_ARCHITECTURES") == "89"
