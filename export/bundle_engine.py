"""`hsiedge engine`: add a TensorRT engine to an existing, verified bundle.

The bundle's own ONNX graph is built (`engine.build_engine`) for one target; the engine
and, for plugin-mode graphs, the plugin library it needs are written into the bundle under
names derived from their sha256, and only then the manifest is replaced in one rename.  An
interrupted run leaves the bundle as it was (at worst with an unlisted file), and an engine
for the same target built earlier is removed only after the new manifest is in place.
No checkpoint and no torch are needed: this is how a Jetson user builds on the device.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hsiedge.atomic import atomic_path
from hsiedge.bundle import Bundle, open_bundle, replace_manifest, sha256_file
from hsiedge.export.engine import BuiltEngine, EngineBuildError, Profile, build_engine
from hsiedge.runtimes.trt_library import (
    NO_PLUGIN_LIBRARY,
    PLUGIN_ENV,
    PluginLibraryNotFoundError,
    TensorRTUnavailableError,
    default_target,
    find_plugin_library,
    tensorrt_library,
)


def default_profile(bundle: Bundle) -> Profile:
    """The shapes `hsiedge infer` feeds this bundle: its batch or its range of tile sizes."""
    return Profile.for_input(bundle.input_kind, int(bundle.manifest["input"]["bands"]), bundle.patch_size)


def input_dims(bundle: Bundle) -> tuple[int | None, ...]:
    """The model input's shape with None for the dynamic dimensions (batch; an image's height, width)."""
    bands = int(bundle.manifest["input"]["bands"])
    kind = bundle.input_kind
    if kind == "image":
        return (1, bands, None, None)
    return (None, bands, bundle.patch_size, bundle.patch_size) if kind == "patch" else (None, bands)


def plugin_library_for(bundle: Bundle, plugins: str | Path | None, target: str | None = None) -> Path | None:
    """The plugin library a build of this bundle needs: --plugins, else $HSIEDGE_TRT_PLUGINS, else the
    newest one `hsiedge plugin build` cached (for `target` "trt": built against the installed
    TensorRT's major version; TensorRT for RTX loads libraries built against 10.x and 11.x headers)."""
    if bundle.scan != "plugin":
        return None
    major = None
    if target == "trt" and not plugins and not os.environ.get(PLUGIN_ENV):
        with contextlib.suppress(TensorRTUnavailableError, ValueError):
            major = int(tensorrt_library("trt").version.split(".")[0])
    try:
        return find_plugin_library(plugins, tensorrt_major=major)
    except PluginLibraryNotFoundError as e:
        if plugins or os.environ.get(PLUGIN_ENV):
            raise EngineBuildError(str(e)) from None
    built_for = f" built for TensorRT {major}" if major is not None else ""
    raise EngineBuildError(f"{bundle.path}: a plugin-mode bundle needs the hsiedge TensorRT plugin library "
                           f"to build an engine, and none{built_for} was found: {NO_PLUGIN_LIBRARY}, or "
                           "export with --scan portable")


def add_engine(bundle: Bundle | str | Path, *, target: str | None = None,
               compute_capabilities: tuple[int, ...] | None = None, plugins: str | Path | None = None,
               profile: Profile | None = None, on_phase: Callable[[str], None] | None = None
               ) -> dict[str, Any]:
    """Build the bundle's engine for `target` and record it in the manifest; return the engine entry.
    `bundle`: one opened (and verified) by the caller, or its path."""
    bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
    try:
        target = target or default_target()
    except TensorRTUnavailableError as e:
        raise EngineBuildError(str(e)) from None
    profile = profile or default_profile(bundle)
    try:
        profile.check(input_dims(bundle))
    except ValueError as e:
        raise EngineBuildError(f"{bundle.path}: {e}") from None
    lib = plugin_library_for(bundle, plugins, target)
    onnx_bytes = bundle.artifact("onnx").read_bytes()
    built = build_engine(onnx_bytes, profile, target=target, compute_capabilities=compute_capabilities,
                         plugin_library=lib, on_phase=on_phase)
    return record_engine(bundle, built, lib)


def _write_artifact(bundle: Bundle, data: bytes | Path, sha256: str, name: str) -> dict[str, Any]:
    """Write `data` under `name` in the bundle (kept if an identical file is already there)."""
    path = bundle.path / name
    if not (path.is_file() and not path.is_symlink() and sha256_file(path) == sha256):
        with atomic_path(path) as tmp:
            if isinstance(data, bytes):
                tmp.write_bytes(data)
            else:
                shutil.copyfile(data, tmp)
    return {"file": name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def record_engine(bundle: Bundle, built: BuiltEngine, plugin_library: Path | None) -> dict[str, Any]:
    """Write the engine (and plugin library) into the bundle and replace its manifest atomically."""
    target = built.info["target"]
    manifest = dict(bundle.manifest)
    artifacts = dict(manifest["artifacts"])
    old = {artifacts[k]["file"] for k in (f"engine-{target}", f"plugin-{target}") if k in artifacts}
    digest = hashlib.sha256(built.data).hexdigest()
    artifacts[f"engine-{target}"] = _write_artifact(bundle, built.data, digest,
                                                    f"model.{target}.{digest[:12]}.engine")
    plugin = None
    if plugin_library is not None:
        lib_sha = sha256_file(plugin_library)
        artifacts[f"plugin-{target}"] = _write_artifact(bundle, plugin_library, lib_sha,
                                                        f"libhsiedge_trt_plugins.{target}.{lib_sha[:12]}.so")
        plugin = {**(manifest.get("plugin") or {}), "artifact": f"plugin-{target}",
                  "sha256": artifacts[f"plugin-{target}"]["sha256"]}
    else:
        artifacts.pop(f"plugin-{target}", None)
    entry = {**built.info, "artifact": f"engine-{target}", "precision": bundle.precision, "scan": bundle.scan,
             "plugin": plugin, "built": datetime.now(UTC).isoformat(timespec="seconds")}
    manifest["artifacts"] = artifacts
    manifest["engines"] = {**(manifest.get("engines") or {}), target: entry}
    replace_manifest(bundle.path, manifest)
    kept = {a["file"] for a in artifacts.values()}
    for name in old - kept:
        (bundle.path / name).unlink(missing_ok=True)
    return entry
