"""The native sources ship as the package `hsiedge.plugins`, so a pip-installed hsiedge, with no
checkout, builds the CUDA backend and the TensorRT plugin library from them; and the per-user
cache of plugin libraries that `hsiedge plugin build` fills and engine builds read.

The wheel is built offline and installed with `pip --target` into a temporary folder, then run
from outside the checkout with the main venv's Python.  The CUDA build needs nvcc and the
plugin build TensorRT headers (TENSORRT_ROOT or a system install); each skips and says so
where they are missing.  The cache-key and lookup tests need neither."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from hsiedge.cli import app
from hsiedge.export import plugin_library as pl
from hsiedge.export.bundle_engine import plugin_library_for
from hsiedge.export.engine import EngineBuildError
from hsiedge.ops.native import nvcc
from hsiedge.runtimes.trt_library import PLUGIN_ENV, PluginLibraryNotFoundError, find_plugin_library

runner = CliRunner()
SHIPPED = ["hsiedge/plugins/__init__.py", "hsiedge/plugins/CMakeLists.txt",
           *(f"hsiedge/plugins/selective_scan/{f}" for f in ("selective_scan.cu", "selective_scan.h",
                                                              "selective_scan_plugin.cpp")),
           "hsiedge/ops/csrc/selective_scan_cpu.c"]


# --- the wheel, installed outside the checkout -------------------------------------------------

@pytest.fixture(scope="module")
def site(hsiedge_wheel, tmp_path_factory) -> Path:
    """The wheel installed (no dependencies: the venv has them) into a folder of its own."""
    target = tmp_path_factory.mktemp("site")
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                          "--target", str(target), str(hsiedge_wheel)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PIP_NO_INPUT": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    return target


def _installed(site: Path, cache: Path, code: str, *args: str, timeout: int = 300) -> list[str]:
    """Run the main venv's Python on the installed hsiedge, from a folder outside the checkout."""
    env = {**os.environ, "PYTHONPATH": str(site), "HSIEDGE_CACHE_DIR": str(cache),
           "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    env.pop(PLUGIN_ENV, None)
    res = subprocess.run([sys.executable, "-c", code, *args], cwd=cache.parent, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout.splitlines()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_wheel_ships_the_native_sources(hsiedge_wheel):
    names = set(zipfile.ZipFile(hsiedge_wheel).namelist())
    assert not [f for f in SHIPPED if f not in names], sorted(n for n in names if "plugins" in n)


@pytest.mark.skipif(nvcc() is None, reason="nvcc is not installed here: the CUDA backend cannot be compiled")
def test_installed_package_builds_the_cuda_backend(site, tmp_path):
    cache = tmp_path / "cache"
    code = ("import sys, hsiedge; from hsiedge.ops import cuda; print(hsiedge.__file__); "
            "print(cuda.SOURCE_DIR); sys.exit(cuda.main([]))")
    where, sources, built, sha = _installed(site, cache, code, timeout=240)
    assert Path(where).is_relative_to(site) and Path(sources).is_relative_to(site)  # not the checkout
    lib = Path(built.removeprefix("built "))
    assert built.startswith("built ") and lib.is_relative_to(cache / "ops") and lib.is_file()
    assert sha == f"sha256 {_sha256(lib)}" and lib.read_bytes()[:4] == b"\x7fELF"
    # a second run reuses it and says so, with the same checksum
    assert _installed(site, cache, code)[2:] == [f"already built: {lib}; --force rebuilds it", sha]


def _plugin_build_missing() -> str | None:
    if shutil.which("cmake") is None or nvcc() is None:
        return "cmake and nvcc are needed to build the plugin library, and one is not installed here"
    if pl.tensorrt_include() is None:
        return ("no TensorRT headers here (set TENSORRT_ROOT to a folder holding include/NvInfer.h, e.g. "
                "include/ of NVIDIA's TensorRT repository at a 10.x or 11.x tag)")
    return None


@pytest.mark.skipif(_plugin_build_missing() is not None, reason=_plugin_build_missing() or "")
def test_installed_package_builds_and_caches_the_plugin_library(site, tmp_path):
    cache = tmp_path / "cache"
    cli = "import sys; from hsiedge.cli import app; sys.argv[0] = 'hsiedge'; app()"
    out = _installed(site, cache, cli, "plugin", "build", "--arch", "89", timeout=400)
    built, sha = out[-2:]
    lib = Path(built.removeprefix("built ").rsplit(" (", 1)[0])
    assert built.startswith("built ") and lib.parent == cache / "trt-plugins" and "-sm89-" in lib.name
    assert sha == f"sha256 {_sha256(lib)}"
    assert sorted(p.name for p in lib.parent.iterdir()) == [lib.name]  # no build folder or partial file left
    # the same inputs again: not rebuilt; -o gets a copy of the cached library
    again = _installed(site, cache, cli, "plugin", "build", "--arch", "89", "-o", str(tmp_path / "p.so"))
    assert again[0].startswith("already built") and str(tmp_path / "p.so") in again[0] and again[1] == sha
    # the installed engine builder finds the cached library without --plugins or $HSIEDGE_TRT_PLUGINS
    code = ("import hsiedge, hsiedge.export.plugin_library as pl; "
            "from hsiedge.runtimes.trt_library import find_plugin_library; "
            "print(hsiedge.__file__); print(pl.SOURCE_DIR); print(find_plugin_library())")
    where, sources, found = _installed(site, cache, code)
    assert Path(where).is_relative_to(site) and Path(sources).is_relative_to(site)
    assert found == str(lib)


# --- the cache key and the lookup order ------------------------------------------------------------

def _headers(root: Path, version: tuple[int, int, int], alias: bool = True) -> Path:
    """A folder that looks like TensorRT headers of `version` (NvInfer.h itself is not read)."""
    include = root / "include"
    include.mkdir(parents=True, exist_ok=True)
    (include / "NvInfer.h").write_text("// stand-in\n")
    parts = dict(zip(("MAJOR", "MINOR", "PATCH"), version, strict=True))
    if alias:  # TensorRT 10 and later
        text = "".join(f"#define TRT_{k}_ENTERPRISE {v}\n" for k, v in parts.items())
        text += "".join(f"#define NV_TENSORRT_{k} TRT_{k}_ENTERPRISE //!< TensorRT version.\n" for k in parts)
    else:
        text = "".join(f"#define NV_TENSORRT_{k} {v} //!< TensorRT version.\n" for k, v in parts.items())
    (include / "NvInferVersion.h").write_text(text + "#define NV_TENSORRT_BUILD 0\n")
    return include


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HSIEDGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(PLUGIN_ENV, raising=False)
    monkeypatch.delenv("TENSORRT_ROOT", raising=False)
    return tmp_path / "cache" / "trt-plugins"


def test_tensorrt_version_reads_both_header_styles(tmp_path):
    assert pl.tensorrt_version(_headers(tmp_path / "a", (10, 16, 1))) == (10, 16, 1)
    assert pl.tensorrt_version(_headers(tmp_path / "b", (10, 3, 0), alias=False)) == (10, 3, 0)
    with pytest.raises(pl.PluginBuildError, match=r"NvInferVersion\.h: cannot read the TensorRT version"):
        pl.tensorrt_version(tmp_path)


def test_cache_path_differs_with_arch_tensorrt_version_and_sources(cache, tmp_path, monkeypatch):
    inc = _headers(tmp_path / "trt10.16.1", (10, 16, 1))
    path = pl.default_plugin_path(inc, ["89"])
    assert path.parent == cache and path.name.startswith("libhsiedge_trt_plugins-trt10.16.1-sm89-")
    assert pl.default_plugin_path(inc, ["89", "89"]) == path  # the same options, written differently
    assert pl.default_plugin_path(inc, ["89", "87"]) == pl.default_plugin_path(inc, ["87", "89"])
    others = [pl.default_plugin_path(inc, a, j) for a, j in ((["87"], False), (["87", "89"], False),
                                                             (None, False), (None, True))]
    others.append(pl.default_plugin_path(_headers(tmp_path / "trt10.16.2", (10, 16, 2)), ["89"]))
    others.append(pl.default_plugin_path(_headers(tmp_path / "trt11.1.0", (11, 1, 0)), ["89"]))
    src = tmp_path / "src"
    shutil.copytree(pl.SOURCE_DIR, src, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(pl, "SOURCE_DIR", src)
    assert pl.default_plugin_path(inc, ["89"]) == path  # a copy of the same sources
    with (src / "selective_scan" / "selective_scan.cu").open("a") as f:
        f.write("\n// changed\n")
    others.append(pl.default_plugin_path(inc, ["89"]))
    assert len({path, *others}) == 1 + len(others), others


def test_bad_arch_and_old_headers_are_one_sentence(cache, tmp_path):
    with pytest.raises(pl.PluginBuildError, match=r"^--arch takes a CUDA architecture number such as 89 .*"
                                                  r"got 'sm_89'$"):
        pl.check_archs(["sm_89"])
    _headers(tmp_path / "old", (8, 6, 1))
    res = runner.invoke(app, ["plugin", "build", "--tensorrt-root", str(tmp_path / "old")])
    assert res.exit_code == 1 and "TensorRT 8.6 headers" in res.output
    assert "TensorRT 10 or newer" in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


def _library(path: Path, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF stand-in")
    os.utime(path, (mtime, mtime))
    return path


def test_lookup_order_is_explicit_then_environment_then_cache(cache, tmp_path, monkeypatch):
    old = _library(pl.default_plugin_path(_headers(tmp_path / "a", (10, 16, 1)), ["89"]), 1_000_000)
    new = _library(pl.default_plugin_path(_headers(tmp_path / "b", (11, 1, 0)), ["89"]), 2_000_000)
    _library(cache / ".libhsiedge_trt_plugins-trt11.1.0-sm89-0123456789ab.so.x.partial", 3_000_000)
    assert pl.cached_plugin_library() == find_plugin_library() == new  # the newest complete one
    assert pl.cached_plugin_library(10) == find_plugin_library(tensorrt_major=10) == old
    assert pl.cached_plugin_library(9) is None
    from_env = _library(tmp_path / "env.so", 0)
    monkeypatch.setenv(PLUGIN_ENV, str(from_env))
    assert find_plugin_library() == from_env
    explicit = _library(tmp_path / "explicit.so", 0)
    assert find_plugin_library(explicit) == explicit
    # a library that is named but missing is an error, not a reason to take the next place
    with pytest.raises(PluginLibraryNotFoundError, match=r"found no file$") as e:
        find_plugin_library(tmp_path / "gone.so")
    assert str(tmp_path / "gone.so") in str(e.value)
    monkeypatch.setenv(PLUGIN_ENV, str(tmp_path / "gone.so"))
    with pytest.raises(PluginLibraryNotFoundError, match=r"\(from \$HSIEDGE_TRT_PLUGINS\)"):
        find_plugin_library()


def test_nothing_found_says_to_run_plugin_build(cache, tmp_path):
    with pytest.raises(PluginLibraryNotFoundError) as e:
        find_plugin_library()
    message = str(e.value)
    assert "`hsiedge plugin build`" in message and "--plugins" in message and "\n" not in message
    bundle = SimpleNamespace(scan="plugin", path=tmp_path / "b")
    with pytest.raises(EngineBuildError) as e:
        plugin_library_for(bundle, None, "rtx")
    message = str(e.value)
    assert message.startswith(f"{bundle.path}: a plugin-mode bundle needs the hsiedge TensorRT plugin")
    assert "`hsiedge plugin build`" in message and "--scan portable" in message and "\n" not in message
    assert plugin_library_for(SimpleNamespace(scan="portable", path=bundle.path), None, "rtx") is None
    lib = _library(pl.default_plugin_path(_headers(tmp_path / "a", (10, 16, 1)), ["89"]), 1_000_000)
    assert plugin_library_for(bundle, None, "rtx") == lib


def test_plugin_build_reuses_the_cached_library(cache, tmp_path, monkeypatch):
    """The command's own logic, with CMake replaced by a stand-in that writes a file."""
    builds = []

    def fake_build(output, **kwargs):
        builds.append(kwargs)
        Path(output).write_bytes(b"library %d" % len(builds))
        return Path(output)

    monkeypatch.setattr(pl, "build_plugin_library", fake_build)
    root = _headers(tmp_path / "trt", (10, 16, 1)).parent
    args = ["plugin", "build", "--tensorrt-root", str(root), "--arch", "89"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    (lib,) = cache.iterdir()
    assert f"built {lib} (TensorRT 10.16.1 headers, sm89" in res.output
    assert f"sha256 {_sha256(lib)}" in res.output and builds[0]["archs"] == ["89"]
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "out.so")])
    assert res.exit_code == 0 and len(builds) == 1, res.output
    assert "already built" in res.output and "--force" in res.output
    assert (tmp_path / "out.so").read_bytes() == lib.read_bytes() == b"library 1"
    res = runner.invoke(app, [*args, "--force"])
    assert res.exit_code == 0 and len(builds) == 2 and lib.read_bytes() == b"library 2"
    assert f"sha256 {_sha256(lib)}" in res.output
    assert sorted(p.name for p in cache.iterdir()) == [lib.name]  # the build folders are gone
    res = runner.invoke(app, [*args[:-1], "sm_89"])
    assert res.exit_code == 1 and "--arch takes a CUDA architecture number" in res.output
