"""hsiedge.manifest: strict parsing, self-consistency and the cross-check against the ONNX graph.

Real bundles are exported once per module from tiny checkpoints trained on a 24 x 24 crop of
Jasper Ridge (MD2F-Mamba patch fp32 plugin, MambaHSI image fp32 plugin, SpectralMamba pixel
fp16 plugin and int8 portable); every manifest hsiedge writes must pass, every mutation that
matters must be refused with one sentence naming the field.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsiedge import manifest as mf
from hsiedge.manifest import ManifestError, check_semantics, parse_manifest
from hsiedge.manifest_graph import check_against_graph

HYPOTHESIS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EXPORTS = {  # bundle -> (checkpoint, export options)
    "md2f-fp32-plugin": ("md2f-mamba", []),
    "mambahsi-fp32-plugin": ("mambahsi", []),
    "sm-fp16-plugin": ("spectralmamba", ["--precision", "fp16"]),
    "sm-int8-portable": ("spectralmamba", ["--precision", "int8", "--scan", "portable"]),
}
TRAIN = {"md2f-mamba": ["--protocol", "ratio:0.1", "--option", "hidden_dim=16"],
         "mambahsi": ["--protocol", "per-class:5", "--option", "hidden_dim=8", "--option", "use_att=false"],
         "spectralmamba": ["--protocol", "per-class:5", "--option", "patch_size=0"]}


@pytest.fixture(scope="module")
def bundles(jasper_cube, datasets, tmp_path_factory) -> dict[str, Path]:
    """The four bundles, written by `hsiedge train` and `hsiedge export` (about 25 s in all)."""
    import scipy.io as sio
    from typer.testing import CliRunner

    from hsiedge.cli import app

    out = tmp_path_factory.mktemp("manifest")
    abundances = sio.loadmat(datasets / "jasper_ridge" / "_EndJasperRidge2_R198.mat")["A"]
    labels = abundances.argmax(0).reshape(100, 100, order="F")[:24, :24] + 1
    np.save(out / "cube.npy", jasper_cube[:24, :24].astype(np.float32))
    np.save(out / "gt.npy", labels.astype(np.int32))
    runner = CliRunner()
    for model, options in TRAIN.items():
        args = ["--scene", str(out / "cube.npy"), "--labels", str(out / "gt.npy"), "--epochs", "1"]
        res = runner.invoke(app, ["train", model, *args, "-o", str(out / f"{model}.pt"), *options])
        assert res.exit_code == 0, res.output
    for name, (model, options) in EXPORTS.items():
        res = runner.invoke(app, ["export", str(out / f"{model}.pt"), "-o", str(out / name), *options])
        assert res.exit_code == 0, res.output
    return {name: out / name for name in EXPORTS}


def _manifest(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_bytes())


def _refusal(manifest: Any, onnx_path: Path | None = None) -> str | None:
    """None if the manifest passes parsing and the semantic check (and the graph check, given a
    graph), else the ManifestError's message, checked to be one short line."""
    try:
        parsed = parse_manifest(json.dumps(manifest).encode())
        check_semantics(parsed)
        if onnx_path is not None:
            check_against_graph(parsed, onnx_path)
    except ManifestError as e:
        msg = str(e)
        assert "\n" not in msg and "\r" not in msg and "Traceback" not in msg and len(msg) < 400, msg
        return msg
    return None


def _field(msg: str) -> str:
    return msg.split(": ", 1)[0]


def _dotted(path: tuple[Any, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths of every dict key (and of the first two items of lists of objects)."""
    out: list[tuple[Any, ...]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += [(*prefix, k), *_paths(v, (*prefix, k))]
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:2]):
            if isinstance(v, dict | list):
                out += [(*prefix, i), *_paths(v, (*prefix, i))]
    return out


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


def _related(msg: str, path: str) -> bool:
    f = _field(msg)
    return (f == path or f.startswith((path + ".", path + "[", path + " "))
            or path.startswith((f + ".", f + "[")))


# --- every manifest hsiedge writes is accepted --------------------------------------------------

@pytest.mark.parametrize("name", list(EXPORTS))
def test_every_manifest_hsiedge_writes_passes_all_checks(bundles, name):
    raw = (bundles[name] / "manifest.json").read_bytes()
    parsed = parse_manifest(raw)
    assert parsed == json.loads(raw)  # the plain dict, unchanged
    check_semantics(parsed)
    check_against_graph(parsed, bundles[name] / "model.onnx")
    kind, precision, scan = parsed["input"]["kind"], parsed["precision"], parsed["scan"]
    assert (kind, precision, scan) == {"md2f-fp32-plugin": ("patch", "fp32", "plugin"),
                                       "mambahsi-fp32-plugin": ("image", "fp32", "plugin"),
                                       "sm-fp16-plugin": ("pixel", "fp16", "plugin"),
                                       "sm-int8-portable": ("pixel", "int8", "portable")}[name]


@pytest.mark.parametrize("name", ["sm-fp16-plugin", "sm-int8-portable"])
def test_engines_section_as_hsiedge_engine_writes_it(bundles, tmp_path, name):
    """`record_engine` (what `hsiedge engine` calls after a build) writes the section; no TensorRT needed."""
    from hsiedge.bundle import open_bundle, replace_manifest
    from hsiedge.export.bundle_engine import default_profile, record_engine
    from hsiedge.export.engine import BuiltEngine

    path = shutil.copytree(bundles[name], tmp_path / name)
    bundle = open_bundle(path)
    info = {"target": "rtx", "library": "tensorrt_rtx", "version": "1.7.1.116", "compute_capabilities": [89],
            "profile": default_profile(bundle).to_dict(), "build_seconds": 0.5,
            "network": {"layers": 9, "plugin_layers": 1, "loops": 0}}
    lib = None
    if bundle.scan == "plugin":
        lib = tmp_path / "libhsiedge_trt_plugins.so"
        lib.write_bytes(b"not really a library")
    record_engine(bundle, BuiltEngine(b"not really an engine", info), lib)
    manifest = _manifest(path)
    manifest["engines"]["rtx"]["parity"] = "not checked at export: no RTX GPU here"  # as export --engine adds
    replace_manifest(path, manifest)
    assert _refusal(_manifest(path), path / "model.onnx") is None
    engine = _manifest(path)["engines"]["rtx"]
    assert (engine["plugin"] is None) == (name == "sm-int8-portable")

    def tampered(change: Callable[[dict[str, Any]], None]) -> str | None:
        m = _manifest(path)
        change(m["engines"]["rtx"])
        return _refusal(m)

    assert _field(tampered(lambda e: e.__setitem__("precision", "fp32"))) == "engines.rtx.precision"
    assert _field(tampered(lambda e: e.__setitem__("artifact", "engine-trt"))) == "engines.rtx.artifact"
    assert _field(tampered(lambda e: e["profile"]["max"].__setitem__(1, 7))) == "engines.rtx.profile.max"
    assert _field(tampered(lambda e: e["profile"]["min"].__setitem__(0, 999))) == "engines.rtx.profile"
    assert _field(tampered(lambda e: e.__setitem__("compute_capabilities", [89.5]))) == \
        "engines.rtx.compute_capabilities"
    assert _field(tampered(lambda e: e.__setitem__("target", "trt"))) == "engines.rtx.target"
    if lib is not None:
        wrong_sha = tampered(lambda e: e["plugin"].__setitem__("sha256", "0" * 64))
        assert _field(wrong_sha) == "engines.rtx.plugin.sha256"
        assert _field(tampered(lambda e: e.__setitem__("plugin", None))) == "engines.rtx.plugin"


# --- hypothesis: mutations of a real manifest ---------------------------------------------------

DROPPABLE = {"created", "scan_calls", "calibration", "exporters", "training", "parity", "export_seconds",
             "input.wavelengths", "input.tile_multiple", "input.batch_dynamic", "model.parameters",
             "artifacts.checkpoint", "artifacts.heldout", "artifacts.reference", "heldout.labelled",
             "heldout.window", "heldout.sha256"}
DROPPABLE_UNDER = ("exporters.", "training.", "model.config.", "parity.results[", "parity.original",
                   "parity.data", "parity.pixels", "parity.forced", "parity.thresholds.")


def test_dropping_a_key_is_refused_unless_it_is_optional(bundles):
    """Every key of a real manifest, dropped in turn (all: a sample once missed a new optional key)."""
    base = _manifest(bundles["md2f-fp32-plugin"])
    wrong = []
    for path in [p for p in _paths(base) if not isinstance(p[-1], int)]:
        m = copy.deepcopy(base)
        del _get(m, path[:-1])[path[-1]]
        where, msg = _dotted(path), _refusal(m)
        if where in DROPPABLE or where.startswith(DROPPABLE_UNDER):
            if msg is not None:
                wrong.append(f"dropping optional {where} was refused: {msg}")
        elif msg is None or not _related(msg, where):
            wrong.append(f"dropping {where}: {msg}")
    assert not wrong, "\n".join(wrong)


DEEP: list[Any] = []
for _ in range(40):
    DEEP = [DEEP]
BAD_VALUES = ["30", "NaN", "", "x" * 200, [], {}, None, 1.5, -1, 10**12, 2**70, math.nan, math.inf, -math.inf,
              DEEP]
STRICT_PATHS = [("schema",), ("model",), ("model", "config", "num_classes"),
                ("model", "config", "in_channels"), ("input", "bands"), ("input", "scene_bands"),
                ("input", "patch_size"), ("input", "kind"), ("input", "layout"), ("input", "dtype"),
                ("output", "layout"), ("precision",), ("scan",), ("preprocessing", "version"),
                ("preprocessing", "in_bands"), ("preprocessing", "transforms", 0),
                ("preprocessing", "transforms", 0, "std"), ("preprocessing", "transforms", 1, "k"),
                ("preprocessing", "transforms", 1, "components", 0), ("classes",), ("classes", 0, "id"),
                ("classes", 1, "colour"), ("classes", 1, "colour", 2), ("opset", "ai.onnx"), ("heldout",),
                ("artifacts",), ("artifacts", "onnx"), ("artifacts", "onnx", "sha256")]


@HYPOTHESIS
@given(path=st.sampled_from(STRICT_PATHS), value=st.sampled_from(BAD_VALUES))
def test_wrong_values_are_refused_naming_the_field(bundles, path, value):
    m = _manifest(bundles["md2f-fp32-plugin"])
    _get(m, path[:-1])[path[-1]] = value
    msg = _refusal(m)
    assert msg is not None, f"{_dotted(path)} = {value!r} was accepted"
    if value is DEEP:
        assert msg.startswith("document: expected JSON nested at most"), msg
    else:
        assert _related(msg, _dotted(path)), msg
    assert "x" * 61 not in msg  # found values are cut short


@settings(HYPOTHESIS, max_examples=6)  # each example tries every object
@given(key=st.from_regex(r"x_[a-z]{1,10}", fullmatch=True))
def test_unknown_keys_are_allowed_except_where_they_cannot_be(bundles, key):
    """An unknown key added to every object of a real manifest in turn."""
    base = _manifest(bundles["md2f-fp32-plugin"])
    for path in [()] + [p for p in _paths(base) if isinstance(_get(base, p), dict)]:
        m = copy.deepcopy(base)
        _get(m, path)[key] = "extra value"
        where = _dotted(path)
        closed = where.startswith(("artifacts", "preprocessing.transforms[", "opset", "parity.thresholds"))
        msg = _refusal(m)
        if closed:
            assert msg is not None and _field(msg).startswith(f"{where}.{key}"), f"{where}: {msg}"
        else:
            assert msg is None, f"{where}: {msg}"
            assert _get(parse_manifest(json.dumps(m).encode()), path)[key] == "extra value"


BAD_FILE_NAMES = ["../x", "/etc/hostname", ".hidden", "a/b", "a\\b", "..", ".", "", "C:x", "model..onnx",
                  "manifest.json", "x\x00y", "ok\n", " model.onnx", "~", "x" * 256]


@pytest.mark.parametrize("name", BAD_FILE_NAMES)
def test_artifact_file_names_must_be_plain(bundles, name):
    m = _manifest(bundles["md2f-fp32-plugin"])
    m["artifacts"]["onnx"]["file"] = name
    msg = _refusal(m)
    assert msg is not None and msg.startswith("artifacts.onnx.file: expected a plain file name"), msg


@HYPOTHESIS
@given(name=st.text(alphabet=st.sampled_from([*"ab./\\:-_+ ~", "\x00", "\n", "é", "\u202e"]), max_size=10))
def test_accepted_file_names_stay_inside_the_bundle(bundles, name):
    m = _manifest(bundles["md2f-fp32-plugin"])
    m["artifacts"]["heldout"]["file"] = name
    if _refusal(m) is None:
        assert name and not name.startswith(".") and ".." not in name and "/" not in name and "\\" not in name
        assert name.isascii() and name.isprintable() and " " not in name and ":" not in name
        assert Path(name).name == name and not Path(name).is_absolute()


def test_class_ids_run_from_1_in_order(bundles):
    m = _manifest(bundles["md2f-fp32-plugin"])
    m["classes"][0]["id"], m["classes"][1]["id"] = 2, 1
    assert _refusal(m) == "classes[0].id: expected 1 (ids 1..4 in order), found 2"


def test_two_artifacts_may_not_share_a_file(bundles):
    m = _manifest(bundles["md2f-fp32-plugin"])
    m["artifacts"]["heldout"]["file"] = m["artifacts"]["onnx"]["file"]
    assert _field(_refusal(m)) == "artifacts"


# --- the document itself -----------------------------------------------------------------------

DEPTH_100K = r"^document: expected JSON nested at most 32 levels deep, found 100000$"


@pytest.mark.parametrize("raw", [b"[" * 10**5 + b"]" * 10**5, b'{"a": ' * 10**5 + b"1" + b"}" * 10**5])
def test_deep_nesting_is_refused_quickly(raw):
    t0 = time.perf_counter()
    with pytest.raises(ManifestError, match=DEPTH_100K):
        parse_manifest(raw)
    assert time.perf_counter() - t0 < 2.0


def test_deep_nesting_past_the_scan_still_gives_a_manifest_error(monkeypatch):
    monkeypatch.setattr(mf, "MAX_DEPTH", 10**9)  # only json's own recursion limit is left
    with pytest.raises(ManifestError, match=r"^document: expected JSON nested at most"):
        parse_manifest(b"[" * 10**5 + b"]" * 10**5)


@pytest.mark.parametrize("raw", [b'\\"' * 200_000, b'"' * 400_000 + b"[" * 40, b'{"a": "\\\\' * 100_000])
def test_the_nesting_scan_takes_linear_time(raw):
    """Unterminated strings full of escapes: a backtracking scan would take hours on these."""
    t0 = time.perf_counter()
    with pytest.raises(ManifestError, match=r"^document: expected JSON"):
        parse_manifest(raw)
    assert time.perf_counter() - t0 < 2.0


def test_brackets_inside_strings_are_not_nesting(bundles):
    m = _manifest(bundles["md2f-fp32-plugin"])
    m["heldout"]["description"] = '[{"\\' * 1000
    assert _refusal(m) is None
    m["schema"] = "[" * 10**5
    assert _field(_refusal(m)) == "schema"


def test_size_cap(bundles, monkeypatch):
    raw = (bundles["md2f-fp32-plugin"] / "manifest.json").read_bytes()
    monkeypatch.setattr(mf, "MAX_BYTES", len(raw) - 1)
    expected = rf"^document: expected at most {len(raw) - 1} bytes, found {len(raw)}$"
    with pytest.raises(ManifestError, match=expected):
        parse_manifest(raw)


@pytest.mark.parametrize(("raw", "expected"), [
    (b"\xff\xfe{}", "document: expected UTF-8 text"),
    (b'{"schema": ', "document: expected JSON, found a syntax error at line 1"),
    (b'{"schema": 1, "schema": 2}', "'schema': expected each key once"),
    (b"[]", "document: expected an object, found a list of 0 items"),
    (b"null", "document: expected an object, found null"),
    (b'{"n": ' + b"7" * 5000 + b"}", "document: expected JSON, found"),
])
def test_broken_documents(raw, expected):
    with pytest.raises(ManifestError) as e:
        parse_manifest(raw)
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)


# --- self-consistency -------------------------------------------------------------------------

def _pca(m):
    return m["preprocessing"]["transforms"][1]


SEMANTIC = {  # tamper -> the field named
    "preprocessing.in_bands": lambda m: m["input"].__setitem__("scene_bands", 197),
    "preprocessing.transforms[0].std": lambda m: m["preprocessing"]["transforms"][0]["std"].pop(),
    "preprocessing.transforms[1].components[3]": lambda m: _pca(m)["components"][3].pop(),
    "preprocessing.transforms[1].components": lambda m: _pca(m)["components"].pop(),
    "input.bands": lambda m: m["input"].__setitem__("bands", 29),
    "input.wavelengths": lambda m: m["input"].__setitem__("wavelengths", [450.0] * 197),
    "model.config.num_classes": lambda m: m["classes"].pop(),
    "input.patch_size": lambda m: m["input"].__setitem__("patch_size", 12),
    "input.layout": lambda m: m["input"].__setitem__("layout", "NC"),
    "output.layout": lambda m: m["output"].__setitem__("layout", "NKHW"),
    "input.padding": lambda m: m["input"].__setitem__("padding", None),
    "plugin": lambda m: m.__setitem__("scan", "portable"),
    "opset.hsiedge": lambda m: m["opset"].pop("hsiedge"),
    "calibration": lambda m: m.__setitem__("precision", "int8"),
}


@pytest.mark.parametrize("field", list(SEMANTIC))
def test_inconsistent_manifests_are_refused(bundles, field):
    m = _manifest(bundles["md2f-fp32-plugin"])
    SEMANTIC[field](m)
    parsed = parse_manifest(json.dumps(m).encode())  # the schema alone passes it ...
    with pytest.raises(ManifestError) as e:  # ... the semantic check does not
        check_semantics(parsed)
    assert _field(str(e.value)) == field and "\n" not in str(e.value), e.value


# --- the manifest against its ONNX graph -------------------------------------------------------

def _fewer_bands(m):
    t = _pca(m)
    t["k"] -= 1
    t["components"].pop()
    m["input"]["bands"] = m["model"]["config"]["in_channels"] = t["k"]


def _fewer_classes(m):
    m["classes"].pop()
    m["model"]["config"]["num_classes"] -= 1


def _portable(m):
    m.update(scan="portable", plugin=None)
    m["opset"].pop("hsiedge")


def _plugin(m):
    m.update(scan="plugin", plugin={"name": "SelectiveScan", "version": "1", "namespace": "hsiedge"})
    m["opset"]["hsiedge"] = 1


def _as_patch(m):
    m["input"].update(kind="patch", patch_size=13, padding="reflect", tile_multiple=None)
    m["output"]["layout"] = "NK"


CALIBRATION = {"method": "percentile", "samples": 10}
GRAPH = [  # (bundle, tamper, the field named)
    ("md2f-fp32-plugin", _fewer_bands, "input.bands"),
    ("md2f-fp32-plugin", lambda m: m["input"].__setitem__("patch_size", 11), "input.patch_size"),
    ("md2f-fp32-plugin", _fewer_classes, "classes"),
    ("md2f-fp32-plugin", lambda m: m.__setitem__("precision", "fp16"), "precision"),
    ("md2f-fp32-plugin", lambda m: m.update(precision="int8", calibration=CALIBRATION), "precision"),
    ("md2f-fp32-plugin", _portable, "scan"),
    ("md2f-fp32-plugin", lambda m: m.__setitem__("scan_calls", 2), "scan_calls"),
    ("md2f-fp32-plugin", lambda m: m["input"].__setitem__("name", "input"), "input.name"),
    ("md2f-fp32-plugin", lambda m: m["output"].__setitem__("name", "probs"), "output.name"),
    ("md2f-fp32-plugin", lambda m: m["opset"].__setitem__("ai.onnx", 17), "opset.ai.onnx"),
    ("md2f-fp32-plugin", lambda m: m["opset"].__setitem__("hsiedge", 2), "opset.hsiedge"),
    ("mambahsi-fp32-plugin", _as_patch, "input.kind"),
    ("mambahsi-fp32-plugin", _fewer_classes, "classes"),
    ("sm-fp16-plugin", lambda m: m.__setitem__("precision", "fp32"), "precision"),
    ("sm-int8-portable", lambda m: m.update(precision="fp32", calibration=None), "precision"),
    ("sm-int8-portable", _plugin, "scan"),
]


@pytest.mark.parametrize(("name", "tamper", "field"), GRAPH)
def test_consistent_tampering_is_caught_by_the_graph(bundles, name, tamper, field):
    m = _manifest(bundles[name])
    tamper(m)
    assert _refusal(m) is None  # the manifest is consistent in itself ...
    msg = _refusal(m, bundles[name] / "model.onnx")  # ... but not with its graph
    assert msg is not None and _field(msg) == field and "as in the ONNX graph" in msg, msg


def test_external_data_is_refused_without_reading_it(bundles, tmp_path):
    src = bundles["md2f-fp32-plugin"]
    model = onnx.load(str(src / "model.onnx"))
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    (tmp_path / "weights.bin").unlink()  # reading it would fail differently
    with pytest.raises(ManifestError, match=r"^artifacts\.onnx: expected a self-contained model"):
        check_against_graph(_manifest(src), tmp_path / "model.onnx")


def test_external_data_in_a_function_body_is_refused(bundles, tmp_path):
    from onnx.external_data_helper import set_external_data

    src = bundles["md2f-fp32-plugin"]
    model = onnx.load(str(src / "model.onnx"))
    constant = next(n for f in model.functions for n in f.node if n.op_type == "Constant")
    tensor = constant.attribute[0].t
    set_external_data(tensor, "elsewhere.bin")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    with pytest.raises(ManifestError, match=r"^artifacts\.onnx: expected a self-contained model"):
        check_against_graph(_manifest(src), tmp_path / "model.onnx")
    check_against_graph(_manifest(src), src / "model.onnx")  # the untouched model passes


def test_a_file_that_is_not_onnx(bundles, tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(ManifestError, match=r"^artifacts\.onnx: expected an ONNX model"):
        check_against_graph(_manifest(bundles["md2f-fp32-plugin"]), tmp_path / "model.onnx")


F, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64


@pytest.mark.parametrize(("inputs", "outputs", "field"), [
    ([("x", F, ["N", 30])], [("logits", F, ["N", 4])], "input.layout"),
    ([("x", I64, ["N", 30, 13, 13])], [("logits", F, ["N", 4])], "input.dtype"),
    ([("x", F, [30])], [("logits", F, ["N", 4])], "input.layout"),
    ([("x", F, None)], [("logits", F, ["N", 4])], "input.layout"),
    ([("x", F, ["N", 30, 13, 13]), ("y", F, [1])], [("logits", F, ["N", 4])], "input"),
    ([("x", F, ["N", 30, 13, 13])], [("logits", F, ["N"])], "output.layout"),
    ([("x", F, ["N", 30, 13, 13])], [("logits", F, ["N", "K"])], "classes"),
    ([("x", F, ["N", 30, "H", "W"])], [("logits", F, ["N", 4])], "input.kind"),
    ([("x", F, [8, 30, 13, 13])], [("logits", F, [8, 4])], "input.batch_dynamic"),
    ([("x", F, ["N", 30, 13, 13])], [("logits", F, ["N", 4])], "scan"),  # no SelectiveScan node
])
def test_odd_graphs_give_one_sentence_not_a_crash(bundles, tmp_path, inputs, outputs, field):
    from onnx import helper

    values = [[helper.make_tensor_value_info(n, t, s) for n, t, s in group] for group in (inputs, outputs)]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["logits"])], "odd", *values)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
                    str(tmp_path / "model.onnx"))
    with pytest.raises(ManifestError) as e:
        check_against_graph(_manifest(bundles["md2f-fp32-plugin"]), tmp_path / "model.onnx")
    assert _field(str(e.value)) == field and "as in the ONNX graph" in str(e.value), e.value
