"""Bundles (DESIGN.md Contract 3): a directory with `manifest.json` and its artifacts.

The manifest states everything a runtime needs and nothing it must guess (model, input
layout and geometry, preprocessing, classes, precision, scan mode, plugin, parity results),
and the sha256 of every artifact.  `open_bundle` refuses a bundle whose schema or checksums
do not match.  `BundleWriter` builds a bundle in a hidden sibling folder and renames it into
place only when complete, so an interrupted export never leaves a bundle under its name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsiedge.atomic import atomic_path, publish_dir
from hsiedge.preprocess import Chain

SCHEMA = "hsiedge-bundle/1"
INPUT_NAME = "x"  # the graph input: preprocessed patches, spectra or image tiles, float32
OUTPUT_NAME = "logits"  # the graph output: per-pixel logits, float32
MANIFEST = "manifest.json"
# artifact kind -> file name inside the bundle (TensorRT engines and their plugin libraries,
# "engine-<target>" / "plugin-<target>", are named by `hsiedge engine` after their content)
ARTIFACT_FILES = {"checkpoint": "checkpoint.pt", "onnx": "model.onnx", "heldout": "heldout.npz"}

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

    def artifact(self, kind: str) -> Path:
        entry = self.manifest["artifacts"].get(kind)
        if entry is None:
            raise BundleError(f"{self.path}: the bundle has no {kind} artifact "
                              f"(it has: {', '.join(sorted(self.manifest['artifacts']))})")
        return self.path / entry["file"]

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


def open_bundle(path: str | Path) -> Bundle:
    """Read and verify a bundle: schema version and the sha256 of every artifact."""
    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: expected a bundle directory (written by `hsiedge export`), found "
                          f"{'a file' if path.exists() else 'nothing'}")
    try:
        manifest = json.loads(mf.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: no {MANIFEST}; not a bundle written by `hsiedge export`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf}: expected JSON, reading failed at {e}") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        found = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{mf}: expected schema {SCHEMA!r}, found {found!r}")
    for kind, entry in manifest.get("artifacts", {}).items():
        f = path / entry["file"]
        if not f.is_file():
            raise BundleError(f"{f}: the manifest lists this {kind} artifact but the file is missing")
        digest = sha256_file(f)
        if digest != entry["sha256"]:
            raise BundleError(f"{f}: sha256 is {digest[:16]}…, the manifest expects {entry['sha256'][:16]}…; "
                              "the file was changed or damaged after export")
    return Bundle(path, manifest)


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
    """Write `manifest` (with its artifact table) as the bundle's manifest.json in one rename."""
    body = {"schema": SCHEMA, **{k: v for k, v in manifest.items() if k != "schema"}}
    with atomic_path(Path(path) / MANIFEST) as tmp:
        tmp.write_text(json.dumps(body, indent=2, default=_plain) + "\n")
    return Bundle(Path(path), body)


def _plain(v: Any) -> Any:
    import numpy as np

    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON-serialisable: {type(v).__name__}")
