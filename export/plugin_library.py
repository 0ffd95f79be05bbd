"""`hsiedge plugin build`: compile libhsiedge_trt_plugins.so (package `hsiedge.plugins`, CMake) for TensorRT.

The library needs TensorRT's headers at compile time, which are on no package index: they
come with a TensorRT install (JetPack: /usr/include/aarch64-linux-gnu) or from `include/` of
NVIDIA's public TensorRT repository at a 10.x / 11.x tag, unpacked anywhere and named by
`TENSORRT_ROOT`.  The sources (CMakeLists.txt, the CUDA kernel, the plugin) ship inside the
installed package (`hsiedge.plugins.source_dir()`), so a pip install builds it with no checkout.

Built libraries are kept per user under `<cache>/trt-plugins/` (the cache of the compiled CPU
kernel, `$HSIEDGE_CACHE_DIR` or `~/.cache/hsiedge`), one file per (plugin sources, TensorRT
header version, CUDA architectures): `hsiedge engine` finds the newest one there when neither
`--plugins` nor `$HSIEDGE_TRT_PLUGINS` names a library, and a second `hsiedge plugin build` for
the same inputs reuses it.  Every library reaches its final name in one rename.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hsiedge.atomic import atomic_path
from hsiedge.bundle import sha256_file
from hsiedge.ops.cpu import cache_dir
from hsiedge.ops.native import nvcc
from hsiedge.plugins import source_dir

SOURCE_DIR = source_dir()
LIBRARY = "libhsiedge_trt_plugins.so"
CACHE_FOLDER = "trt-plugins"
# Where TensorRT installs put NvInfer.h when TENSORRT_ROOT is not given (as plugins/CMakeLists.txt).
SYSTEM_INCLUDES = ("/usr/include/x86_64-linux-gnu", "/usr/include/aarch64-linux-gnu",
                   "/usr/local/tensorrt/include", "/opt/tensorrt/include", "/usr/include")
# A CUDA architecture as CMAKE_CUDA_ARCHITECTURES takes it: 89, 90a, 120-real, 87-virtual.
_ARCH = re.compile(r"\d{2,3}[af]?(-real|-virtual)?")
# Cached library names: libhsiedge_trt_plugins-trt10.16.0-sm89-0123456789ab.so
_CACHED = re.compile(r"libhsiedge_trt_plugins-trt(\d+)\.(\d+)\.(\d+)-[\w.]+-[0-9a-f]{12}\.so")


class PluginBuildError(RuntimeError):
    """The plugin library cannot be built here; one sentence says why."""


@dataclass(frozen=True)
class PluginBuild:
    """What `ensure_plugin_library` produced: the library, its sha256 and what it was built for."""

    path: Path
    sha256: str
    tensorrt_version: str
    archs: str
    rebuilt: bool  # False when an earlier build for the same inputs was reused


def tensorrt_include(root: str | Path | None = None) -> Path | None:
    """The folder holding NvInfer.h: under `root` (or $TENSORRT_ROOT), else a system place; None if none."""
    root = root or os.environ.get("TENSORRT_ROOT")
    places = [Path(root) / "include", Path(root)] if root else [Path(p) for p in SYSTEM_INCLUDES]
    return next((p for p in places if (p / "NvInfer.h").is_file()), None)


def tensorrt_version(include: str | Path) -> tuple[int, int, int]:
    """(major, minor, patch) from `include`/NvInferVersion.h.

    TensorRT 10 and later define NV_TENSORRT_MAJOR as an alias (TRT_MAJOR_ENTERPRISE) of the
    number; older headers give the number directly.  Both are read."""
    header = Path(include) / "NvInferVersion.h"
    try:
        text = header.read_text(errors="replace")
    except OSError:
        raise PluginBuildError(f"{header}: cannot read the TensorRT version, the file is missing or "
                               "unreadable") from None
    defines = dict(re.findall(r"^\s*#\s*define\s+(\w+)\s+(\w+)", text, re.M))
    parts = []
    for part in ("MAJOR", "MINOR", "PATCH"):
        value = defines.get(f"NV_TENSORRT_{part}") or defines.get(f"TRT_{part}_ENTERPRISE")
        value = defines.get(value, value) if value and not value.isdigit() else value
        if not (value and value.isdigit()):
            raise PluginBuildError(f"{header}: cannot read the TensorRT version, it defines no numeric "
                                   f"NV_TENSORRT_{part}")
        parts.append(int(value))
    return parts[0], parts[1], parts[2]


def check_archs(archs: Sequence[str] | None) -> list[str]:
    """The CUDA architectures given, deduplicated and sorted; PluginBuildError for one that is not like 89."""
    for arch in archs or ():
        if not _ARCH.fullmatch(str(arch)):
            raise PluginBuildError(f"--arch takes a CUDA architecture number such as 89 (RTX 4090) or 87 "
                                   f"(Jetson Orin), got {arch!r}")
    return sorted({str(a) for a in archs or ()}, key=lambda a: (int(re.match(r"\d+", a)[0]), a))


def plugin_sources() -> list[Path]:
    """The files the library is built from: CMakeLists.txt and selective_scan/*.cu, *.h, *.cpp."""
    found = [SOURCE_DIR / "CMakeLists.txt", *sorted((SOURCE_DIR / "selective_scan").glob("*"))]
    return [p for p in found if p.is_file() and p.suffix in (".txt", ".cu", ".h", ".cpp")]


def plugin_cache_dir() -> Path:
    """The per-user folder of built plugin libraries (`<hsiedge cache>/trt-plugins`)."""
    return cache_dir() / CACHE_FOLDER


def _arch_tag(archs: list[str], jetson: bool) -> str:
    """A short name for the architectures a build covers (CMake's: --arch wins over --jetson)."""
    if archs:
        return "sm" + "_".join(archs)
    return "jetson" if jetson else "portable"


def plugin_key(include: str | Path, archs: Sequence[str] | None = None, jetson: bool = False) -> str:
    """sha256 over the plugin sources, the TensorRT header version and the architecture options."""
    sources = plugin_sources()
    if not any(p.name == "CMakeLists.txt" for p in sources):
        raise PluginBuildError(f"{SOURCE_DIR}: the plugin sources (CMakeLists.txt) are not there; "
                               "reinstall hsiedge")
    h = hashlib.sha256()
    for src in sources:
        h.update(f"{src.relative_to(SOURCE_DIR).as_posix()}\0".encode())
        h.update(src.read_bytes())
        h.update(b"\0")
    h.update("trt {}.{}.{}".format(*tensorrt_version(include)).encode())
    h.update(f"archs {';'.join(check_archs(archs))} jetson {bool(jetson)}".encode())
    return h.hexdigest()


def default_plugin_path(include: str | Path, archs: Sequence[str] | None = None,
                        jetson: bool = False) -> Path:
    """Where `hsiedge plugin build` keeps the library for these headers and architectures.

    A different TensorRT version, architecture list or plugin source gets its own file."""
    version = "{}.{}.{}".format(*tensorrt_version(include))
    tag = _arch_tag(check_archs(archs), jetson)
    key = plugin_key(include, archs, jetson)
    return plugin_cache_dir() / f"libhsiedge_trt_plugins-trt{version}-{tag}-{key[:12]}.so"


def cached_plugin_library(tensorrt_major: int | None = None) -> Path | None:
    """The most recently built library in the cache (built against TensorRT `tensorrt_major`
    headers, when given), or None when `hsiedge plugin build` has made none."""
    folder = plugin_cache_dir()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return None
    found = []
    for p in entries:
        m = _CACHED.fullmatch(p.name)
        if m and (tensorrt_major is None or int(m[1]) == tensorrt_major):
            with contextlib.suppress(OSError):  # removed meanwhile: not a candidate
                if p.is_file():
                    found.append((p.stat().st_mtime, p.name, p))
    return max(found)[2] if found else None


def _headers(tensorrt_root: str | Path | None) -> tuple[str | Path | None, Path]:
    """(the TensorRT root given or from $TENSORRT_ROOT, the folder with NvInfer.h); PluginBuildError
    when there are no headers or they are older than TensorRT 10."""
    root = tensorrt_root or os.environ.get("TENSORRT_ROOT")
    include = tensorrt_include(root)
    if root and include is None:
        raise PluginBuildError(f"{root}: expected TensorRT headers (include/NvInfer.h) there, found none")
    if include is None:
        raise PluginBuildError("no TensorRT headers found: pass --tensorrt-root DIR (a folder with "
                               "include/NvInfer.h, e.g. include/ of NVIDIA's TensorRT repository at a 10.x "
                               "tag) or set TENSORRT_ROOT")
    major, minor, _ = tensorrt_version(include)
    if major < 10:
        raise PluginBuildError(f"{include}: these are TensorRT {major}.{minor} headers, and the plugin needs "
                               "TensorRT 10 or newer (its IPluginV3 API)")
    return root, include


def build_plugin_library(output: str | Path, *, tensorrt_root: str | Path | None = None,
                         archs: list[str] | None = None, jetson: bool = False,
                         build_dir: str | Path | None = None,
                         on_line: Callable[[str], None] | None = None) -> Path:
    """Configure and build the plugin library with CMake; the finished library is written to `output`."""
    root, include = _headers(tensorrt_root)
    archs = check_archs(archs)
    if not (SOURCE_DIR / "CMakeLists.txt").is_file():
        raise PluginBuildError(f"{SOURCE_DIR}: the plugin sources (CMakeLists.txt) are not there; "
                               "reinstall hsiedge")
    compiler = os.environ.get("CUDACXX") or nvcc()
    if shutil.which("cmake") is None or compiler is None:
        missing = "cmake" if shutil.which("cmake") is None else "nvcc"
        raise PluginBuildError(f"`{missing}` is not on PATH; the plugin library needs CMake and the CUDA "
                               "toolkit")
    build = Path(build_dir) if build_dir else Path(output).resolve().parent / ".hsiedge-plugin-build"
    # The header folder is named, so CMake compiles against the headers whose version keys the cache.
    configure = ["cmake", "-S", str(SOURCE_DIR), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_CUDA_COMPILER={compiler}", f"-DTENSORRT_INCLUDE_DIR={include.resolve()}"]
    if root:
        configure.append(f"-DTENSORRT_ROOT={Path(root).resolve()}")
    if archs:
        configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs)}")
    if jetson:
        configure.append("-DHSIEDGE_JETSON=ON")
    # CMAKE_BUILD_PARALLEL_LEVEL, where set, chooses the parallel jobs; else one per CPU.
    jobs = [] if os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") else ["-j", str(os.cpu_count() or 2)]
    for cmd in (configure, ["cmake", "--build", str(build), *jobs]):
        _run(cmd, on_line)
    built = build / LIBRARY
    if not built.is_file():
        raise PluginBuildError(f"{built}: CMake finished but the library is not there")
    with atomic_path(Path(output)) as tmp:
        shutil.copyfile(built, tmp)
    return Path(output)


def ensure_plugin_library(output: str | Path | None = None, *, tensorrt_root: str | Path | None = None,
                          archs: list[str] | None = None, jetson: bool = False, force: bool = False,
                          on_line: Callable[[str], None] | None = None) -> PluginBuild:
    """Build the library into the cache unless a build for the same inputs is there (or `force`);
    with `output`, also copy it there.  `hsiedge plugin build` is this."""
    root, include = _headers(tensorrt_root)
    archs = check_archs(archs)
    cached = default_plugin_path(include, archs, jetson)
    rebuilt = force or not cached.is_file()
    if rebuilt:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.TemporaryDirectory(prefix=".build-", dir=cached.parent)
        except OSError as e:
            raise PluginBuildError(f"{cached.parent}: cannot build there ({e.strerror or e}); set "
                                   "HSIEDGE_CACHE_DIR to a writable folder") from None
        with tmp as build:
            build_plugin_library(cached, tensorrt_root=root, archs=archs, jetson=jetson,
                                 build_dir=Path(build) / "cmake", on_line=on_line)
    path = cached
    if output is not None and Path(output).resolve() != cached.resolve():
        try:
            with atomic_path(Path(output)) as part:
                shutil.copyfile(cached, part)
        except OSError as e:
            raise PluginBuildError(f"{output}: cannot write the library there ({e.strerror or e})") from None
        path = Path(output)
    return PluginBuild(path, sha256_file(path), "{}.{}.{}".format(*tensorrt_version(include)),
                       _arch_tag(archs, jetson), rebuilt)


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
