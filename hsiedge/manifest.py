"""Strict reading of a bundle's manifest.json (DESIGN.md Contract 3), before anything runs.

`parse_manifest` caps size and nesting depth before decoding, then validates the JSON against
a pydantic schema (keys, types, enumerations, bounds, safe artifact file names); unknown keys
are allowed for forward compatibility except in artifact entries and preprocessing steps.
`check_semantics` checks the manifest against itself (`hsiedge.manifest_graph` checks it
against the ONNX graph it describes).  Each refuses with one `ManifestError` sentence naming the field (dotted
path), what was expected and what was found; callers prefix the file path.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_BYTES = 64 << 20
MAX_DEPTH = 32  # hsiedge writes at most 6 levels
MAX_BANDS, MAX_CLASSES = 10_000, 65_535
TRANSFORM_KINDS = ("percentile_stretch", "standardize", "pca", "band_select")
_FILE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,254}")
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.S)  # always matches: linear time
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,39}")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_STEP = np.zeros(256, dtype=np.int32)
_STEP[list(b"[{")], _STEP[list(b"]}")] = 1, -1


SCHEMA = "hsiedge-bundle/1"


class ManifestError(ValueError):
    """One sentence: which field, what was expected, what was found."""


def _found(v: Any) -> str:
    """A value as an error message shows it: JSON terms, one line, at most 60 characters."""
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    if isinstance(v, dict | list):
        return f"an object with {len(v)} keys" if isinstance(v, dict) else f"a list of {len(v)} items"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def expect(ok: bool, field: str, expected: str, found: Any) -> None:
    """Raise the one-sentence ManifestError for `field` unless `ok`."""
    if not ok:
        raise ManifestError(f"{field}: expected {expected}, found {_found(found)}")


def _iso(v: str) -> str:
    try:
        datetime.fromisoformat(v)
    except ValueError:
        raise ValueError(f"expected an ISO 8601 date and time, found {_found(v)}") from None
    return v


def _file_name(v: str) -> str:
    if not _FILE.fullmatch(v) or ".." in v or v == "manifest.json":
        raise ValueError(f"expected a plain file name inside the bundle (no '/', '\\', '..', leading '.' "
                         f"or absolute path), found {_found(v)}")
    return v


def _capabilities(v: Any) -> Any:
    ok = (isinstance(v, str) and len(v) <= 128) or (isinstance(v, list) and 0 < len(v) <= 64 and all(
        type(c) is int and 10 <= c <= 1000 for c in v))
    if not ok:
        raise ValueError(f"expected a list of compute capabilities like 89, or a note, found {_found(v)}")
    return v


def _ints(lo: int, hi: int) -> Any:
    return Annotated[int, Field(ge=lo, le=hi)]


Short = Annotated[str, Field(min_length=1, max_length=128)]
Text = Annotated[str, Field(max_length=4096)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:/-]{1,128}$")]
Key = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Iso = Annotated[str, AfterValidator(_iso)]
Bands = _ints(1, MAX_BANDS)
Vector = Annotated[list[float], Field(min_length=1, max_length=MAX_BANDS)]
Shape = Annotated[list[_ints(1, 1 << 24)], Field(min_length=1, max_length=8)]
Precision = Literal["fp32", "fp16", "int8"]
Scan = Literal["plugin", "portable"]


class _Open(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


class _Closed(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid")


class Artifact(_Closed):
    file: Annotated[str, AfterValidator(_file_name)]
    sha256: Sha256
    bytes: _ints(0, 1 << 50)


class ModelConfig(_Open):
    in_channels: Bands | None = None
    num_classes: _ints(1, MAX_CLASSES) | None = None
    patch_size: _ints(0, 255) | None = None


class ModelInfo(_Open):
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
    config: ModelConfig
    parameters: _ints(0, 1 << 40) | None = None


class InputInfo(_Open):
    name: Name
    dtype: Literal["float32"]
    kind: Literal["image", "patch", "pixel"]
    layout: Literal["NCHW", "NC"]
    bands: Bands
    scene_bands: Bands
    wavelengths: Annotated[list[float], Field(max_length=MAX_BANDS)] | None = None
    patch_size: _ints(0, 255)
    padding: Literal["reflect"] | None = None
    tile_multiple: _ints(1, 4096) | None = None
    batch_dynamic: bool = True


class OutputInfo(_Open):
    name: Name
    dtype: Literal["float32"]
    layout: Literal["NK", "NKHW"]


class Stretch(_Closed):
    kind: Literal["percentile_stretch"]
    low: Annotated[float, Field(ge=0, le=100)]
    high: Annotated[float, Field(ge=0, le=100)]
    quantize: bool
    lo: Vector
    hi: Vector


class Standardize(_Closed):
    kind: Literal["standardize"]
    mean: Vector
    std: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1, max_length=MAX_BANDS)]


class PCA(_Closed):
    kind: Literal["pca"]
    k: Bands
    mean: Vector
    components: Annotated[list[Vector], Field(min_length=1, max_length=MAX_BANDS)]


class BandSelect(_Closed):
    kind: Literal["band_select"]
    indices: Annotated[list[_ints(0, MAX_BANDS - 1)], Field(min_length=1, max_length=MAX_BANDS)]


Step = Annotated[Stretch | Standardize | PCA | BandSelect, Field(discriminator="kind")]


class Preprocessing(_Open):
    version: Literal[1]
    in_bands: Bands
    transforms: Annotated[list[Step], Field(max_length=64)]


class ClassInfo(_Open):
    id: _ints(1, MAX_CLASSES)
    name: Text
    colour: Annotated[list[_ints(0, 255)], Field(min_length=3, max_length=3)]


class Plugin(_Open):
    name: Short
    version: Short
    namespace: Short


class EnginePlugin(Plugin):
    artifact: Key
    sha256: Sha256


class Engine(_Open):
    target: Literal["rtx", "trt"]
    library: Short
    version: Short
    compute_capabilities: Annotated[Any, AfterValidator(_capabilities)]
    profile: dict[Literal["min", "opt", "max"], Shape]
    network: dict[Short, _ints(0, 1 << 31)] | None = None
    build_seconds: Annotated[float, Field(ge=0)] | None = None
    artifact: Key
    precision: Precision
    scan: Scan
    plugin: EnginePlugin | None = None
    built: Iso | None = None


class Calibration(_Open):
    method: Short
    samples: _ints(1, 1 << 40)


class HeldOut(_Open):
    scene: Text
    sha256: Sha256 | None = None
    key: Text | None  # required, like description: `hsiedge parity-check` reads both
    description: Text
    labelled: bool = False
    window: Annotated[list[_ints(0, 1 << 31)], Field(min_length=4, max_length=4)] | None = None


class Parity(_Open):
    thresholds: dict[Short, float]
    results: list[dict[str, Any]]
    passed: bool


class Manifest(_Open):
    schema_: Literal["hsiedge-bundle/1"] = Field(alias="schema")
    hsiedge_version: Short
    created: Iso | None = None
    model: ModelInfo
    input: InputInfo
    output: OutputInfo
    preprocessing: Preprocessing
    classes: Annotated[list[ClassInfo], Field(min_length=1, max_length=MAX_CLASSES)]
    precision: Precision
    scan: Scan
    scan_calls: _ints(0, 1 << 20) | None = None
    opset: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")], _ints(1, 1000)]
    plugin: Plugin | None = None
    calibration: Calibration | None = None
    heldout: HeldOut
    exporters: dict[Short, Text] | None = None
    training: dict[str, Any] | None = None
    parity: Parity | None = None
    export_seconds: Annotated[float, Field(ge=0)] | None = None
    artifacts: dict[Key, Artifact]
    engines: dict[Literal["rtx", "trt"], Engine] | None = None

    @field_validator("classes")
    @classmethod
    def _ids_in_order(cls, v: list[ClassInfo]) -> list[ClassInfo]:
        for i, c in enumerate(v):
            expect(c.id == i + 1, f"classes[{i}].id", f"{i + 1} (ids 1..{len(v)} in order)", c.id)
        return v

    @field_validator("opset")
    @classmethod
    def _default_domain(cls, v: dict[str, int]) -> dict[str, int]:
        expect("ai.onnx" in v, "opset.ai.onnx", "the ONNX opset version", None)
        return v

    @field_validator("artifacts")
    @classmethod
    def _onnx_and_distinct(cls, v: dict[str, Artifact]) -> dict[str, Artifact]:
        expect("onnx" in v, "artifacts.onnx", "the ONNX model's entry", None)
        files = [a.file for a in v.values()]
        expect(len(set(files)) == len(files), "artifacts", "a different file for every artifact", files)
        return v


def _where(loc: tuple[Any, ...]) -> str:
    """pydantic's error location as a dotted path: `classes[2].colour[0]`, `artifacts.onnx.file`."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            out += " (key)"
        elif not (i >= 2 and loc[i - 2] == "transforms" and part in TRANSFORM_KINDS):  # union tags
            out += ("." if out else "") + (part if _PLAIN_KEY.fullmatch(part) else _found(part))
    return out or "document"


def _sentence(err: dict[str, Any]) -> str:
    """One pydantic error as one line: field, what was expected, what was found."""
    where, kind, msg = _where(err["loc"]), err["type"], err["msg"]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, ManifestError):
        return str(cause)
    if kind == "missing":
        return f"{where}: expected a value, found nothing (the key is missing)"
    if kind == "extra_forbidden":
        return f"{where}: expected no such key (unknown keys are not allowed here), found one"
    if kind == "union_tag_invalid":
        ctx = err["ctx"]
        return f"{where}.kind: expected one of {ctx['expected_tags']}, found {_found(ctx['tag'])}"
    if kind == "union_tag_not_found":
        return f"{where}.kind: expected one of {', '.join(map(repr, TRANSFORM_KINDS))}, found nothing"
    if kind == "value_error":
        return f"{where}: {msg.removeprefix('Value error, ')}"
    for head, says in (("Input should be ", ""), ("String should ", "a string that should "),
                       ("List should ", "a list that should "), ("Value should ", "a value that should "),
                       ("Dictionary should ", "an object that should ")):
        msg = says + msg[len(head):] if msg.startswith(head) else msg
    msg = re.sub(r"^a valid dictionary.*", "an object", msg)
    msg = re.sub(r"^(greater|less) than", r"a number \1 than", msg)
    return f"{where}: expected {msg.replace(' after validation', '')}, found {_found(err['input'])}"


def _depth(raw: bytes) -> int:
    """The deepest nesting of [ and { outside JSON strings (fast on any size, no recursion)."""
    brackets = _STRING.sub(b'', raw).translate(None, _NOT_BRACKETS)
    steps = _STEP[np.frombuffer(brackets, dtype=np.uint8)]
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        key = next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i]))
        raise ManifestError(f"{_found(key)}: expected each key once in its object, found it twice")
    return out


def parse_manifest(raw: bytes) -> dict[str, Any]:
    """Validate manifest.json's bytes against the schema; return the plain dict (ManifestError if not)."""
    if len(raw) > MAX_BYTES:
        raise ManifestError(f"document: expected at most {MAX_BYTES} bytes, found {len(raw)}")
    if (depth := _depth(raw)) > MAX_DEPTH:
        raise ManifestError(f"document: expected JSON nested at most {MAX_DEPTH} levels deep, found {depth}")
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_object)
    except UnicodeDecodeError as e:
        raise ManifestError(f"document: expected UTF-8 text, found a bad byte at offset {e.start}") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"document: expected JSON, found a syntax error at line {e.lineno} column "
                            f"{e.colno} ({e.msg})") from None
    except RecursionError:
        raise ManifestError(f"document: expected JSON nested at most {MAX_DEPTH} levels deep, "
                            "found deeper nesting") from None
    except ManifestError:
        raise
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ManifestError(f"document: expected JSON, found {_found(str(e).split(';')[0])}") from None
    try:
        Manifest.model_validate(data)
    except ValidationError as e:
        raise ManifestError(_sentence(e.errors()[0]).replace("\n", " ")) from None
    return data


def check_semantics(manifest: dict[str, Any]) -> None:
    """Cross-check a parsed manifest against itself: bands through preprocessing, classes, kinds, engines."""
    inp, pre, cfg, n = manifest["input"], manifest["preprocessing"], manifest["model"]["config"], \
        len(manifest["classes"])
    expect(pre["in_bands"] == inp["scene_bands"], "preprocessing.in_bands",
           f"{inp['scene_bands']} (input.scene_bands)", pre["in_bands"])
    bands = pre["in_bands"]
    for i, t in enumerate(pre["transforms"]):
        at = f"preprocessing.transforms[{i}]"
        for key in ("lo", "hi", "mean", "std"):
            if key in t:
                expect(len(t[key]) == bands, f"{at}.{key}", f"{bands} values, one per band", t[key])
        if t["kind"] == "pca":
            expect(t["k"] <= bands, f"{at}.k", f"at most {bands} (the bands it gets)", t["k"])
            expect(len(t["components"]) == t["k"], f"{at}.components", f"{t['k']} rows (k)", t["components"])
            for r, row in enumerate(t["components"]):
                expect(len(row) == bands, f"{at}.components[{r}]", f"{bands} values, one per band", row)
            bands = t["k"]
        elif t["kind"] == "band_select":
            expect(max(t["indices"]) < bands, f"{at}.indices", f"indices below {bands}", max(t["indices"]))
            bands = len(t["indices"])
    expect(inp["bands"] == bands, "input.bands", f"{bands} (the bands preprocessing produces)", inp["bands"])
    if inp.get("wavelengths") is not None:
        expect(len(inp["wavelengths"]) == inp["scene_bands"], "input.wavelengths",
               f"{inp['scene_bands']} values (input.scene_bands)", inp["wavelengths"])
    for key, want, what in (("in_channels", inp["bands"], "input.bands"), ("num_classes", n, "the classes"),
                            ("patch_size", inp["patch_size"], "input.patch_size")):
        if key in cfg:
            expect(cfg[key] == want, f"model.config.{key}", f"{want} ({what})", cfg[key])
    kind, p = inp["kind"], inp["patch_size"]
    expect(inp["layout"] == ("NC" if kind == "pixel" else "NCHW"), "input.layout",
           f"{'NC' if kind == 'pixel' else 'NCHW'} for a {kind} model", inp["layout"])
    expect(manifest["output"]["layout"] == ("NKHW" if kind == "image" else "NK"), "output.layout",
           f"{'NKHW' if kind == 'image' else 'NK'} for a {kind} model", manifest["output"]["layout"])
    expect((p % 2 == 1) if kind == "patch" else p == 0, "input.patch_size",
           "an odd size for a patch model" if kind == "patch" else f"0 for a {kind} model", p)
    expect((inp.get("padding") is not None) == (kind == "patch"), "input.padding",
           "padding for a patch model" if kind == "patch" else f"null for a {kind} model", inp.get("padding"))
    if kind == "image":
        expect(inp.get("tile_multiple") is not None, "input.tile_multiple", "a tile multiple", None)
    plugin, scan = manifest.get("plugin"), manifest["scan"]
    expect((plugin is not None) == (scan == "plugin"), "plugin",
           "the plugin the graph needs" if scan == "plugin" else "null for a portable graph", plugin)
    expect(("hsiedge" in manifest["opset"]) == (scan == "plugin"), "opset.hsiedge",
           "the hsiedge opset version" if scan == "plugin" else "no hsiedge opset for a portable graph",
           manifest["opset"].get("hsiedge"))
    calibration = manifest.get("calibration")
    expect((calibration is not None) == (manifest["precision"] == "int8"), "calibration",
           "the int8 calibration" if manifest["precision"] == "int8" else "null unless int8", calibration)
    artifacts = manifest["artifacts"]
    rank = 2 if kind == "pixel" else 4
    for target, e in (manifest.get("engines") or {}).items():
        at = f"engines.{target}"
        expect(e["target"] == target, f"{at}.target", repr(target), e["target"])
        expect(e["artifact"] in artifacts, f"{at}.artifact", "an artifact the bundle lists", e["artifact"])
        for key in ("precision", "scan"):
            expect(e[key] == manifest[key], f"{at}.{key}", f"{manifest[key]!r} (the bundle's {key})", e[key])
        lib = e.get("plugin")
        expect((lib is not None) == (scan == "plugin"), f"{at}.plugin",
               "the plugin library's entry" if scan == "plugin" else "null for a portable graph", lib)
        if lib is not None:
            expect(lib["artifact"] in artifacts and artifacts[lib["artifact"]]["sha256"] == lib["sha256"],
                   f"{at}.plugin.sha256", "the sha256 of a plugin artifact the bundle lists", lib["sha256"])
        shapes = [e["profile"].get(k) for k in ("min", "opt", "max")]
        for k, s in zip(("min", "opt", "max"), shapes, strict=True):
            ok = (s is not None and len(s) == rank and s[1] == inp["bands"]
                  and (kind != "patch" or s[2] == s[3] == p))
            expect(ok, f"{at}.profile.{k}", f"a rank-{rank} {kind} input shape with {inp['bands']} bands", s)
        expect(all(a <= b <= c for a, b, c in zip(*shapes, strict=True)), f"{at}.profile",
               "min <= opt <= max in every dimension", shapes)
