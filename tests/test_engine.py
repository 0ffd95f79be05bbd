"""TensorRT engines: every bundle builds, `hsiedge engine` records it safely, and clear refusals.

Engines are built with TensorRT for RTX, whose builder runs ahead of time on a machine
without a GPU (this one and CI).  Portable bundles build everywhere it is installed; plugin
bundles need the plugin library, compiled where TensorRT headers are found.  No engine
runs here: that needs an RTX GPU (the runner's refusal is tested instead).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import SCAN_CALLS
from typer.testing import CliRunner

from hsiedge.bundle import open_bundle
from hsiedge.cli import app
from hsiedge.export import engine as engine_mod
from hsiedge.export.bundle_engine import add_engine, default_profile
from hsiedge.export.engine import EngineBuildError, Profile
from hsiedge.runtimes import default_runtime, why_unavailable
from hsiedge.runtimes.trt_library import (
    PORTABLE_CCS,
    TensorRTUnavailableError,
    ensure_unversioned_rtx_library,
    native_stdout_to_stderr,
)

runner = CliRunner()


def _rtx() -> str | None:
    return importlib.util.find_spec("tensorrt_rtx_bindings") or importlib.util.find_spec("tensorrt_rtx")


# `make setup` installs TensorRT for RTX; CI must build engines, so there its absence fails.
needs_rtx = pytest.mark.skipif(not _rtx() and not os.environ.get("CI"),
                               reason="TensorRT for RTX is not installed (pip install 'hsiedge[rtx]')")


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(src, dst)
    return dst


@needs_rtx
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("scan", ["portable", "plugin"])
@pytest.mark.parametrize("model", list(SCAN_CALLS))
def test_every_bundle_builds_an_rtx_engine(exported, request, tmp_path, model, scan, precision):
    """3 models x {portable, plugin} x {fp32, fp16, int8}: a TensorRT for RTX engine in the bundle."""
    plugins = request.getfixturevalue("trt_plugin_library") if scan == "plugin" else None
    path = _copy(exported(model, scan, precision)[0], tmp_path)
    entry = add_engine(path, target="rtx", plugins=plugins)
    bundle = open_bundle(path)  # verifies every artifact, the new engine included
    assert bundle.engines == {"rtx": entry}
    engine_file = bundle.artifact("engine-rtx")
    assert engine_file.stat().st_size > 100_000 and engine_file.parent == path
    rtx = engine_mod.tensorrt_library("rtx")
    assert (entry["library"], entry["version"]) == ("tensorrt_rtx", rtx.version)
    assert entry["compute_capabilities"] == list(PORTABLE_CCS)
    assert (entry["precision"], entry["scan"]) == (precision, scan)
    assert entry["profile"] == default_profile(bundle).to_dict()
    # the parser mapped every SelectiveScan node to the plugin, not to its function body
    assert entry["network"]["plugin_layers"] == (SCAN_CALLS[model] if scan == "plugin" else 0)
    if scan == "plugin":
        lib = bundle.artifact("plugin-rtx")
        assert lib.read_bytes() == Path(plugins).read_bytes()
        assert entry["plugin"]["sha256"] == bundle.manifest["artifacts"]["plugin-rtx"]["sha256"]
        assert entry["plugin"]["name"] == "SelectiveScan" and entry["plugin"]["namespace"] == "hsiedge"
    else:
        assert entry["plugin"] is None and not bundle.has("plugin-rtx")
    assert {p.name for p in path.iterdir() if p.name.startswith(".")} == set()  # nothing half-written


@pytest.fixture
def sm_bundle(exported, tmp_path) -> Path:
    return _copy(exported("spectralmamba", "portable", "fp32")[0], tmp_path)


@needs_rtx
def test_engine_cli_profile_and_rebuild_replaces_the_old_engine(sm_bundle):
    res = runner.invoke(app, ["engine", str(sm_bundle), "--compute-capability", "89", "--json"])
    assert res.exit_code == 0, res.output
    first = json.loads(res.stdout)
    assert first["compute_capabilities"] == [89] and first["profile"]["max"] == [128, 198, 7, 7]
    old_file = open_bundle(sm_bundle).manifest["artifacts"]["engine-rtx"]["file"]
    res = runner.invoke(app, ["engine", str(sm_bundle), "--min", "1x198x7x7", "--opt", "32x198x7x7",
                              "--max", "64x198x7x7"])
    assert res.exit_code == 0, res.output
    assert "engine rtx: tensorrt_rtx" in res.output
    bundle = open_bundle(sm_bundle)
    assert bundle.engines["rtx"]["profile"] == {"min": [1, 198, 7, 7], "opt": [32, 198, 7, 7],
                                                "max": [64, 198, 7, 7]}
    engines = sorted(p.name for p in sm_bundle.glob("*.engine"))
    assert engines == [bundle.manifest["artifacts"]["engine-rtx"]["file"]]  # the old one is gone
    assert old_file not in engines or old_file == engines[0]


@needs_rtx
def test_export_engine_builds_into_the_new_bundle(checkpoints, tmp_path):
    out = tmp_path / "b"
    res = runner.invoke(app, ["export", str(checkpoints["spectralmamba"]), "-o", str(out),
                              "--scan", "portable", "--engine", "--compute-capability", "89"])
    assert res.exit_code == 0, res.output
    assert "engine rtx" in res.output
    entry = open_bundle(out).engines["rtx"]
    assert entry["compute_capabilities"] == [89]
    # no RTX GPU here: the engine's parity cannot run, and the manifest says so
    assert entry["parity"].startswith("not checked at export")


def test_refusals_are_one_sentence_and_leave_the_bundle_as_it_was(exported, sm_bundle, tmp_path, monkeypatch):
    before = {p.name: p.read_bytes() for p in sm_bundle.iterdir()}
    res = runner.invoke(app, ["engine", str(sm_bundle), "--target", "gpu"])  # a usage error: exit 2
    assert res.exit_code == 2 and "Invalid value for --target" in res.output and "Traceback" not in res.output
    cases = [
        (["--target", "rtx", "--compute-capability", "90"], "compute capability 90"),
        (["--max", "64x100x7x7"], "dimension 1 must be 198"),
        (["--min", "8x198x7x7", "--max", "4x198x7x7"], "min <= opt <= max"),
        (["--max", "64by198"], "expected a shape like"),
    ]
    for args, message in cases:
        res = runner.invoke(app, ["engine", str(sm_bundle), *args])
        assert res.exit_code == 1, (args, res.output)
        assert message in res.output and len(res.output.strip().splitlines()) <= 2, res.output
    plugin_bundle = _copy(exported("spectralmamba", "plugin", "fp32")[0], tmp_path / "p")
    monkeypatch.delenv("HSIEDGE_TRT_PLUGINS", raising=False)
    monkeypatch.setenv("HSIEDGE_CACHE_DIR", str(tmp_path / "cache"))  # no `hsiedge plugin build` either
    res = runner.invoke(app, ["engine", str(plugin_bundle)])
    assert res.exit_code == 1 and "--plugins" in res.output and "hsiedge plugin build" in res.output
    res = runner.invoke(app, ["engine", str(plugin_bundle), "--plugins", str(tmp_path / "none.so")])
    assert res.exit_code == 1 and "found no file" in res.output

    def broken_build(*args, **kwargs):
        raise EngineBuildError("the builder gave up")

    monkeypatch.setattr("hsiedge.export.bundle_engine.build_engine", broken_build)
    res = runner.invoke(app, ["engine", str(sm_bundle)])
    assert res.exit_code == 1 and "the builder gave up" in res.output
    assert {p.name: p.read_bytes() for p in sm_bundle.iterdir()} == before  # untouched


def test_no_tensorrt_library_says_what_to_install(sm_bundle, monkeypatch):
    monkeypatch.setattr("hsiedge.runtimes.trt_library.MODULES", {"rtx": ("no_such_trt_rtx",),
                                                                 "trt": ("no_such_tensorrt",)})
    res = runner.invoke(app, ["engine", str(sm_bundle)])
    assert res.exit_code == 1 and "hsiedge[rtx]" in res.output
    res = runner.invoke(app, ["engine", str(sm_bundle), "--target", "trt"])
    assert res.exit_code == 1 and "no TensorRT library for target 'trt'" in res.output


def test_native_prints_go_to_stderr_while_an_engine_builds(capfd):
    """TensorRT's graph compiler printf()s some warnings; `--json` output must stay clean."""
    import ctypes

    libc = ctypes.CDLL(None)
    print("before", flush=True)
    with native_stdout_to_stderr():
        libc.printf(b"native warning\n")  # buffered by C stdio: flushed before fd 1 comes back
    print("after", flush=True)
    out, err = capfd.readouterr()
    assert out.split() == ["before", "after"]
    assert "native warning" in err


def test_profile_shapes():
    p = Profile.for_input("patch", 30, 13, 128, 32, 256, 512)
    assert (p.min, p.opt, p.max) == ((1, 30, 13, 13), (128, 30, 13, 13), (128, 30, 13, 13))
    p = Profile.for_input("pixel", 103, 0, 64)
    assert (p.min, p.max) == ((1, 103), (64, 103))
    p = Profile.for_input("image", 198, 0)
    assert (p.min, p.opt, p.max) == ((1, 198, 32, 32), (1, 198, 256, 256), (1, 198, 512, 512))
    p.check((1, 198, None, None))
    with pytest.raises(ValueError, match="dimension 0 must be 1"):
        Profile((2, 198, 32, 32), (2, 198, 32, 32), (2, 198, 32, 32)).check((1, 198, None, None))
    with pytest.raises(ValueError, match="has 3 dimensions"):
        Profile((1, 198, 32), (1, 198, 32), (1, 198, 32)).check((1, 198, None, None))


@needs_rtx
def test_tensorrt_runner_refuses_where_it_cannot_run(sm_bundle):
    assert "no TensorRT engine" in why_unavailable(open_bundle(sm_bundle), "tensorrt")
    add_engine(sm_bundle, target="rtx", compute_capabilities=(89,))
    bundle = open_bundle(sm_bundle)
    reason = why_unavailable(bundle, "tensorrt")
    assert reason is not None and ("cuda-python" in reason or "GPU" in reason)  # no GPU on this machine
    # an fp32 portable-scan bundle: ONNX Runtime would run its scans as the portable body
    assert bundle.manifest["scan"] == "portable" and default_runtime(bundle) == "torch"


def test_unversioned_rtx_library_link(tmp_path, monkeypatch):
    """The link TensorRT for RTX's parser needs is made next to the wheel's library, once, atomically."""
    import types

    libs = tmp_path / "tensorrt_rtx_libs"
    libs.mkdir()
    (libs / "libtensorrt_rtx.so.1").write_bytes(b"\x7fELF")
    fake = types.SimpleNamespace(__file__=str(tmp_path / "bindings" / "__init__.py"),
                                 tensorrt_rtx_libs=types.SimpleNamespace(__file__=str(libs / "__init__.py")))
    link = ensure_unversioned_rtx_library(fake)
    assert link == libs / "libtensorrt_rtx.so" and os.readlink(link) == "libtensorrt_rtx.so.1"
    assert ensure_unversioned_rtx_library(fake) == link  # idempotent
    assert sorted(p.name for p in libs.iterdir()) == ["libtensorrt_rtx.so", "libtensorrt_rtx.so.1"]
    link.unlink()

    def refused(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("os.replace", refused)  # a folder this user cannot write to
    with pytest.raises(TensorRTUnavailableError, match=r"ln -s libtensorrt_rtx\.so\.1"):
        ensure_unversioned_rtx_library(fake)
    assert sorted(p.name for p in libs.iterdir()) == ["libtensorrt_rtx.so.1"]  # nothing left behind


def test_plugin_build_without_headers_says_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORRT_ROOT", raising=False)
    res = runner.invoke(app, ["plugin", "build", "--tensorrt-root", str(tmp_path), "-o",
                              str(tmp_path / "p.so")])
    assert res.exit_code == 1 and "include/NvInfer.h" in res.output
    assert not (tmp_path / "p.so").exists()


def _engine_runs_here() -> str | None:
    from hsiedge.runtimes.tensorrt import why_not_here

    return why_not_here()


@pytest.mark.gpu
@pytest.mark.skipif("_engine_runs_here() is not None",
                    reason="needs a GPU TensorRT can run on (RTX for TensorRT for RTX) and cuda-python")
@pytest.mark.parametrize("scan", ["portable", "plugin"])
def test_engine_runs_and_matches_the_original(checkpoints, request, tmp_path, scan):
    """Where an engine can run: export --engine checks the engine's parity against the original."""
    from hsiedge.export.bundle_export import export_bundle

    plugins = request.getfixturevalue("trt_plugin_library") if scan == "plugin" else None
    out = tmp_path / "b"
    manifest = export_bundle(checkpoints["spectralmamba"], out, scan=scan, precision="fp16", engine=True,
                             plugin_library=plugins)
    results = [r for r in manifest["parity"]["results"] if r["runtime"] == "tensorrt"]
    assert len(results) == 1 and results[0]["passed"], results
    assert results[0]["figures"]["pixels"] > 9000
