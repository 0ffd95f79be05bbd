"""Bundles (DESIGN.md Contract 3): a directory with `manifest.json` and its artifacts.

The manifest states everything a runtime needs and nothing it must guess (model, input
layout and geometry, preprocessing, classes, precision, scan mode, plugin, parity results),
and the sha256 of every artifact.  Bundles are untrusted input: `open_bundle` refuses one
whose signature (when trusted keys are given), schema (`hsiedge.manifest`), consistency with
its ONNX graph or checksums do not hold, and every artifact must be a regular file inside the
bundle directory.  `BundleWriter` builds a bundle in a hidden sibling folder and renames it into
place only when complete, so an interrupted export never leaves a bundle under its name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsiedge.atomic import atomic_path, publish_dir
from hsiedge.files import file_kind
from hsiedge.manifest import SCHEMA
from hsiedge.preprocess import Chain

INPUT_NAME = "x"  # the graph input: preprocessed patches, spectra or image tiles, float32
OUTPUT_NAME = "logits"  # the graph output: per-pixel logits, float32
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # a 400-band PCA manifest is about 3 MB
# artifact kind -> file name inside the bundle (TensorRT engines and their plugin libraries,
# "engine-<target>" / "plugin-<target>", are named by `hsiedge engine` after their content)
ARTIFACT_FILES = {"checkpoint": "checkpoint.pt", "onnx": "model.onnx", "heldout": "heldout.npz",
                  "reference": "reference.npz"}

# Distinct colours for class maps (tab20-like, written by hand); cycled past 20 classes.
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
    (219, 219, 141), (158, 218, 229),
)


class BundleError(ValueError):
    """A bundle cannot be used; the message says which file and why, in one sentence."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_class_names(count: int) -> list[str]:
    """Names for classes 1..count when nothing names them: "class 1", "class 2", ..."""
    return [f"class {i}" for i in range(1, count + 1)]


def class_table(names: list[str],
                colours: dict[int, tuple[int, int, int]] | None = None) -> list[dict[str, Any]]:
    """Classes as the manifest lists them: id (1-based, 0 is nodata in maps), name, RGB colour
    (`colours[id]` where given, else the palette's)."""
    colours = colours or {}
    return [{"id": i + 1, "name": n, "colour": list(colours.get(i + 1, PALETTE[i % len(PALETTE)]))}
            for i, n in enumerate(names)]


def parse_class_colours(text: str, names: list[str]) -> dict[int, tuple[int, int, int]]:
    """`NAME=#RRGGBB,...` (a class name, or its 1-based id) -> {class id: (r, g, b)}; ValueError
    with one sentence for anything else."""
    colours: dict[int, tuple[int, int, int]] = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        key, sep, value = item.rpartition("=")
        key, value = key.strip(), value.strip().lstrip("#")
        if not sep or len(value) != 6 or any(ch not in "0123456789abcdefABCDEF" for ch in value):
            raise ValueError(f"--class-colours: expected CLASS=#RRGGBB, found {item!r}")
        if key in names:
            cid = names.index(key) + 1
        elif key.isdigit() and 1 <= int(key) <= len(names):
            cid = int(key)
        else:
            raise ValueError(f"--class-colours: {key!r} is neither a class name nor an id 1-{len(names)} "
                             f"(the classes are {', '.join(names)})")
        colours[cid] = (int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16))
    return colours


@dataclass
class Bundle:
    """An opened, verified bundle."""

    path: Path
    manifest: dict[str, Any]
    manifest_sha256: str  # of manifest.json's bytes as verified
    signed_by: str | None = None  # the id of the trusted key that signed it, when one was asked for

    def artifact(self, kind: str) -> Path:
        entry = self.manifest["artifacts"].get(kind)
        if entry is None:
            raise BundleError(f"{self.path}: the bundle has no {kind} artifact "
                              f"(it has: {', '.join(sorted(self.manifest['artifacts']))})")
        return _artifact_path(self.path, kind, entry["file"])

    def has(self, kind: str) -> bool:
        return kind in self.manifest["artifacts"]

    @property
    def engines(self) -> dict[str, dict[str, Any]]:
        """TensorRT engines by target ("rtx", "trt"): library, version, compute capabilities, profile..."""
        return dict(self.manifest.get("engines") or {})

    @property
    def model_name(self) -> str:
        return self.manifest["model"]["name"]

    @property
    def input_kind(self) -> str:
        return self.manifest["input"]["kind"]

    @property
    def patch_size(self) -> int:
        return int(self.manifest["input"].get("patch_size", 0))

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def scan(self) -> str:
        return self.manifest["scan"]

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.manifest["classes"]]

    @property
    def preprocessing(self) -> Chain:
        return Chain.from_dict(self.manifest["preprocessing"])


def _artifact_path(bundle: Path, kind: str, name: Any) -> Path:
    """The artifact file `name` inside `bundle`: a plain file name, a regular file, not a link.
    Nothing outside the bundle is opened, and errors say nothing about what is there."""
    if not isinstance(name, str) or not name or name in (".", "..") or name != Path(name).name \
            or "\\" in name or name.startswith("."):
        raise BundleError(f"{bundle}: the manifest's {kind} artifact {str(name)[:60]!r} is not a plain file "
                          "name inside the bundle; refusing it")
    f = bundle / name
    try:
        mode = os.lstat(f).st_mode
    except FileNotFoundError:
        raise BundleError(f"{f}: the manifest lists this {kind} artifact but the file is missing") from None
    if not stat.S_ISREG(mode):
        raise BundleError(f"{f}: the {kind} artifact is {file_kind(mode)}; a bundle's artifacts must be "
                          "regular files inside it")
    return f


def read_manifest_bytes(path: Path) -> bytes:
    """manifest.json's bytes: a regular file inside the bundle, of bounded size."""
    mf = path / MANIFEST
    try:
        st = os.lstat(mf)
    except FileNotFoundError:
        raise BundleError(f"{path}: no {MANIFEST}; not a bundle written by `hsiedge export`") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{mf}: expected a regular file inside the bundle, found {file_kind(st.st_mode)}")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mf}: expected at most {MAX_MANIFEST_BYTES >> 20} MiB, found "
                          f"{st.st_size:,} bytes")
    return mf.read_bytes()


def open_bundle(path: str | Path, trusted_keys: Sequence[str | Path] = ()) -> Bundle:
    """Read and verify a bundle: its signature (when `trusted_keys` are given, required), the
    manifest's schema and consistency, the sha256 of every artifact, and the manifest against
    the ONNX graph (input, classes, precision, scan)."""
    from hsiedge.manifest import ManifestError, check_semantics, parse_manifest
    from hsiedge.manifest_graph import check_against_graph
    from hsiedge.signing import SignatureError, verify_manifest

    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: expected a bundle directory (written by `hsiedge export`), found "
                          f"{'a file' if path.exists() else 'nothing'}")
    raw = read_manifest_bytes(path)
    signer = None
    if trusted_keys:
        try:
            signer = verify_manifest(path, raw, trusted_keys)
        except SignatureError as e:
            raise BundleError(str(e)) from None
    try:
        manifest = parse_manifest(raw)
        check_semantics(manifest)
    except ManifestError as e:
        raise BundleError(f"{mf}: {e}") from None
    for kind, entry in manifest["artifacts"].items():
        f = _artifact_path(path, kind, entry["file"])
        digest = sha256_file(f)
        if digest != entry["sha256"]:
            raise BundleError(f"{f}: sha256 is {digest[:16]}…, the manifest expects {entry['sha256'][:16]}…; "
                              "the file was changed or damaged after export")
    if "onnx" in manifest["artifacts"]:
        onnx_path = path / manifest["artifacts"]["onnx"]["file"]
        try:
            check_against_graph(manifest, onnx_path)
        except ManifestError as e:
            raise BundleError(f"{mf}: does not match {onnx_path.name}: {e}") from None
    return Bundle(path, manifest, hashlib.sha256(raw).hexdigest(), signer)


class BundleWriter:
    """Assemble a bundle in a hidden temporary folder next to `dest`; `commit` puts it in place."""

    def __init__(self, dest: str | Path) -> None:
        self.dest = Path(dest)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", suffix=".partial",
                                         dir=self.dest.parent))
        self.artifacts: dict[str, dict[str, Any]] = {}

    def add(self, kind: str, source: str | Path | bytes) -> Path:
        """Copy a file (or write bytes) as the artifact `kind`, and record its sha256 and size."""
        target = self.tmp / ARTIFACT_FILES[kind]
        if isinstance(source, bytes):
            target.write_bytes(source)
        else:
            shutil.copyfile(source, target)
        self.artifacts[kind] = {"file": target.name, "sha256": sha256_file(target),
                                "bytes": target.stat().st_size}
        return target

    def write_manifest(self, manifest: dict[str, Any]) -> Bundle:
        """Write the manifest (with the artifact table) into the unfinished bundle; return it opened."""
        return replace_manifest(self.tmp, {**manifest, "artifacts": self.artifacts})

    def commit(self) -> Path:
        """Move the finished bundle to `dest`, replacing an older bundle there only now."""
        publish_dir(self.tmp)
        if self.dest.exists():
            if not (self.dest / MANIFEST).is_file():
                raise BundleError(f"{self.dest}: exists and is not a bundle; refusing to replace it")
            old = self.dest.with_name(f".{self.dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.dest, old)
            os.replace(self.tmp, self.dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dest)
        return self.dest

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def replace_manifest(path: str | Path, manifest: dict[str, Any]) -> Bundle:
    """Write `manifest` (with its artifact table) as the bundle's manifest.json in one rename.
    A signature over the manifest it replaces no longer holds, so it is removed (first)."""
    from hsiedge.signing import SIGNATURE

    body = {"schema": SCHEMA, **{k: v for k, v in manifest.items() if k != "schema"}}
    raw = (json.dumps(body, indent=2, default=_plain) + "\n").encode()
    (Path(path) / SIGNATURE).unlink(missing_ok=True)
    with atomic_path(Path(path) / MANIFEST) as tmp:
        tmp.write_bytes(raw)
    return Bundle(Path(path), json.loads(raw), hashlib.sha256(raw).hexdigest())


def _plain(v: Any) -> Any:
    import numpy as np

    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON-serialisable: {type(v).__name__}")
