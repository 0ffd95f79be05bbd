"""Bad checkpoint files are refused with one sentence of ours, before anything big is built.

A small valid SpectralMamba checkpoint is damaged by hypothesis (truncations, bit flips,
entries removed or replaced, absurd configs); each outcome must be either a checkpoint whose
model gives exactly the original's outputs, or a CheckpointError of one line naming the file.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import threading
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsiedge.checkpoint import MAX_WEIGHTS, Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from hsiedge.models import SpectralMamba, build_model
from hsiedge.preprocess import Chain, Standardize
from hsiedge.splits import Split

MODEL = "spectralmamba"
CONFIG = {"in_channels": 12, "num_classes": 3, "patch_size": 3, "d_model": 8, "pieces": 3, "d_state": 4}
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# torch's own wording, which must never reach the user
TORCH_WORDS = ("Traceback", "PytorchStreamReader", "miniz", "WeightsUnpickler", "weights_only` argument",
               "Unsupported operand", "safe_globals", "Error(s) in loading")


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, Any]:
    """A small complete checkpoint on disk, its bytes, its model and an input for it."""
    torch.manual_seed(0)
    model = build_model(MODEL, **CONFIG).eval()
    chain = Chain([Standardize()]).fit(np.random.default_rng(0).normal(size=(50, 12)))
    split = Split(np.arange(5), np.arange(5, 8), np.arange(8, 20), "per-class:2", 1, np.ones(12, np.int64))
    ckpt = Checkpoint(MODEL, dict(CONFIG), model.state_dict(), chain, ["a", "b", "c"], split,
                      {"oa": 0.5}, {"epochs": 1}, class_colours={1: (255, 0, 0), 2: (0, 255, 0)})
    folder = tmp_path_factory.mktemp("bad")
    path = save_checkpoint(folder / "valid.pt", ckpt)
    return {"folder": folder, "path": path, "bytes": path.read_bytes(), "model": model,
            "x": torch.randn(4, 12, 3, 3)}


def assert_one_sentence(err: CheckpointError, path: Path) -> None:
    text = str(err)
    assert str(path) in text and "\n" not in text and len(text) < 600, text
    assert not any(w in text for w in TORCH_WORDS), text


def outcome(path: Path, valid: dict[str, Any]) -> str:
    """'loaded' (and then the model gives exactly the original outputs) or 'refused' (one sentence)."""
    try:
        ckpt = load_checkpoint(path)
        model = ckpt.build()
    except CheckpointError as e:
        assert_one_sentence(e, path)
        return "refused"
    with torch.no_grad():
        assert torch.equal(model(valid["x"]), valid["model"](valid["x"]))
    return "loaded"


def write(valid: dict[str, Any], name: str, data: bytes | dict[str, Any]) -> Path:
    path = valid["folder"] / name
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        torch.save(data, path)
    return path


def entries(valid: dict[str, Any], checksum: bool = False) -> dict[str, Any]:
    """The valid checkpoint's dict, without its checksum unless asked (so that the structure checks,
    not the checksum, meet each change)."""
    obj = torch.load(io.BytesIO(valid["bytes"]), weights_only=True)
    if not checksum:
        del obj["checksum"]
    return obj


def test_valid_checkpoint_loads(valid):
    assert outcome(valid["path"], valid) == "loaded"
    assert outcome(write(valid, "no_checksum.pt", entries(valid)), valid) == "loaded"  # older files
    ckpt = load_checkpoint(valid["path"])
    assert ckpt.class_names == ["a", "b", "c"] and ckpt.class_colours == {1: (255, 0, 0), 2: (0, 255, 0)}
    np.testing.assert_array_equal(ckpt.split.test, np.arange(8, 20))


@pytest.mark.parametrize("name,config,shape", [
    ("mambahsi", {"in_channels": 6, "num_classes": 3, "hidden_dim": 16}, (1, 6, 8, 8)),
    ("spectralmamba", {"in_channels": 7, "num_classes": 2, "patch_size": 0, "depth": 2}, (3, 7)),
    ("md2f-mamba", {"in_channels": 6, "num_classes": 3, "patch_size": 5, "hidden_dim": 16, "d_state": 4,
                    "pooling": "centre-weighted"}, (2, 6, 5, 5)),
])
def test_each_seed_model_round_trips(tmp_path, name, config, shape):
    torch.manual_seed(1)
    model = build_model(name, **config).eval()
    path = save_checkpoint(tmp_path / "m.pt", Checkpoint(name, config, model.state_dict()))
    x = torch.randn(shape)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path).build()(x), model(x))
    torch.save(model.state_dict(), tmp_path / "bare.pt")  # a bare state_dict, with its config
    back = load_checkpoint(tmp_path / "bare.pt", model=name, **({} if name == "mambahsi" else config))
    with torch.no_grad():
        assert torch.equal(back.build()(x), model(x))


@SETTINGS
@given(cut=st.integers(min_value=0, max_value=10**9))
def test_truncated_files_are_refused(valid, cut):
    data = valid["bytes"]
    path = write(valid, "cut.pt", data[:cut % len(data)])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert_one_sentence(e.value, path)


@SETTINGS
@given(flips=st.lists(st.tuples(st.integers(min_value=0, max_value=10**9), st.integers(0, 7)),
                      min_size=1, max_size=4))
def test_bit_flips_load_the_same_model_or_are_refused(valid, flips):
    data = bytearray(valid["bytes"])
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    outcome(write(valid, "flipped.pt", bytes(data)), valid)


@SETTINGS
@given(start=st.integers(min_value=0, max_value=10**9), junk=st.binary(min_size=1, max_size=64))
def test_overwritten_bytes_load_the_same_model_or_are_refused(valid, start, junk):
    data = bytearray(valid["bytes"])
    start %= len(data)
    data[start:start + len(junk)] = junk
    outcome(write(valid, "overwritten.pt", bytes(data)), valid)


JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-10**15, max_value=10**15),
    st.sampled_from([0, -1, 10**6, 10**9, 10**12, 65_536, 10**40, 2.5, float("nan"), float("inf")]),
    st.floats(), st.text(max_size=30), st.text(min_size=100, max_size=200), st.binary(max_size=10),
    st.recursive(st.integers(), lambda inner: st.lists(inner, max_size=3), max_leaves=8),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.builds(torch.zeros, st.integers(0, 4)),
)
TOP_KEYS = ["format", "hsiedge_version", "model_name", "config", "state_dict", "preprocessing",
            "class_names", "split", "metrics", "train_info", "class_colours"]
CONFIG_KEYS = [*CONFIG, "depth", "expand", "nope", "hidden_dim", "patch"]


def _bad_tensor(t: torch.Tensor, how: str) -> Any:
    """A change of one weight that no valid checkpoint of the same config could hold."""
    if how == "nan":
        t = t.clone()
        t.view(-1)[0] = float("nan")
        return t
    return {"int": lambda: t.to(torch.int32), "flat": lambda: t.reshape(-1)[:-1],
            "bigger": lambda: torch.zeros(*t.shape, 2), "bool": lambda: t > 0}[how]()


@SETTINGS
@given(data=st.data())
def test_changed_entries_load_the_same_model_or_are_refused(valid, data):
    obj = entries(valid)
    where = data.draw(st.sampled_from(["drop", "replace", "config", "config-drop", "weight", "weight-drop",
                                       "weight-add"]))
    sd = obj["state_dict"]
    if where == "drop":
        del obj[data.draw(st.sampled_from(TOP_KEYS))]
    elif where == "replace":
        obj[data.draw(st.sampled_from(TOP_KEYS))] = data.draw(JUNK)
    elif where == "config":
        obj["config"][data.draw(st.sampled_from(CONFIG_KEYS))] = data.draw(JUNK)
    elif where == "config-drop":
        del obj["config"][data.draw(st.sampled_from(list(CONFIG)))]
    elif where == "weight":
        key = data.draw(st.sampled_from(sorted(sd)))
        sd[key] = _bad_tensor(sd[key], data.draw(st.sampled_from(["nan", "int", "flat", "bigger", "bool"])))
    elif where == "weight-drop":
        del sd[data.draw(st.sampled_from(sorted(sd)))]
    else:
        sd[data.draw(st.text(min_size=1, max_size=10))] = data.draw(JUNK)
    outcome(write(valid, "changed.pt", obj), valid)


@SETTINGS
@given(key=st.sampled_from([*CONFIG, "depth"]),
       value=st.one_of(st.sampled_from([0, -1, -(10**9), 10**6, 10**9, 10**12, 65_536, 65_535, 9]),
                       st.integers(min_value=13, max_value=10**15)))
def test_absurd_config_is_refused_before_a_real_build(valid, key, value):
    """The config is checked, and the weights compared on the meta device, before any real build:
    a constructor that counts its non-meta builds sees none."""
    real_init, real_builds = SpectralMamba.__init__, []

    @functools.wraps(real_init)  # keeps the signature, which the config check reads
    def counting_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        if next(self.parameters()).device.type != "meta":
            real_builds.append(kwargs)

    bare = write(valid, "bare.pt", dict(valid["model"].state_dict()))
    config = {**CONFIG, key: value}
    obj = entries(valid)
    obj["config"] = config
    full = write(valid, "absurd.pt", obj)
    with mock.patch.object(SpectralMamba, "__init__", counting_init):
        for path, kwargs in ((full, {}), (bare, {"model": MODEL, **config})):
            with pytest.raises(CheckpointError) as e:
                load_checkpoint(path, **kwargs)
            assert_one_sentence(e.value, path)
        assert real_builds == []
        load_checkpoint(bare, model=MODEL, **CONFIG)  # the count works: a good bare state_dict is built
    assert len(real_builds) == 1


def test_messages_name_what_was_expected_and_found(valid):
    def refused(name: str, obj: dict[str, Any], **kwargs: Any) -> str:
        path = write(valid, name, obj)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path, **kwargs)
        assert_one_sentence(e.value, path)
        return str(e.value)

    obj = entries(valid)
    obj["config"]["d_model"] = 10**9
    assert "d_model must be between 1 and 65536, got 1000000000" in refused("huge.pt", obj)
    obj = entries(valid)
    obj["config"]["d_model"] = 16
    assert "'pos_embed' has shape (1, 3, 8), expected (1, 3, 16)" in refused("shape.pt", obj)
    obj = entries(valid)
    obj["config"]["nope"] = 1
    assert "spectralmamba has no option 'nope'" in refused("unknown.pt", obj)
    obj = entries(valid)
    obj["config"].update(d_model=8192, depth=64)  # in range, but more weights than MAX_WEIGHTS
    assert f"at most {MAX_WEIGHTS:,} weights" in refused("big.pt", obj)
    obj = entries(valid)
    obj["state_dict"]["head.weight"] = obj["state_dict"]["head.weight"].to(torch.int64)
    assert "expected 'head.weight' to hold floating-point values, found torch.int64" in refused("int.pt", obj)
    obj = entries(valid)
    obj["state_dict"]["head.bias"] = torch.tensor([0.0, float("inf"), 0.0])
    assert "'head.bias' to hold finite values, found NaN or infinity" in refused("inf.pt", obj)
    obj = entries(valid)
    del obj["state_dict"]["head.bias"]
    assert "'head.bias' is missing (1 missing, 0 unexpected)" in refused("missing.pt", obj)
    obj = entries(valid)
    obj["state_dict"]["head.weight"] = torch.zeros(1).expand(3, 8)  # 24 elements over 1 stored number
    assert "dense array of stored numbers" in refused("expanded.pt", obj)
    obj = entries(valid)
    obj["class_names"] = ["a", 2]
    assert "expected class_names to be a list of strings, found a list" in refused("names.pt", obj)
    obj = entries(valid)
    obj["config"] = [1, 2]
    assert "expected config to be a dict of model options, found a list" in refused("config.pt", obj)
    obj = entries(valid)
    obj["split"]["train"] = None
    assert "expected split to be a split (train, val and test pixel indices), found a dict" in refused(
        "split.pt", obj)
    obj = entries(valid)
    obj["class_colours"] = {1: [255, 0]}
    assert "expected class_colours to be a map of class ids to RGB colours" in refused("rgb.pt", obj)
    obj = entries(valid)
    obj["model_name"] = "resnet"
    assert "expected model_name to be one of" in refused("name.pt", obj)
    assert "expected a dict, found list" in refused("list.pt", [1, 2])  # type: ignore[arg-type]
    sd = dict(valid["model"].state_dict())
    assert "unknown model 'resnet'" in refused("bare.pt", sd, model="resnet")


def test_checksum_catches_a_changed_weight(valid):
    obj = entries(valid, checksum=True)
    obj["state_dict"]["head.bias"] = obj["state_dict"]["head.bias"] + 1  # finite, same shape: plausible
    path = write(valid, "edited.pt", obj)
    with pytest.raises(CheckpointError, match="to match the checksum saved with it") as e:
        load_checkpoint(path)
    assert_one_sentence(e.value, path)
    del obj["checksum"]  # a file without one (written before checksums) is taken as it is
    load_checkpoint(write(valid, "edited.pt", obj))


class _Touch:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch '{self.marker}'",)
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("how", ["system", "open"])
def test_pickled_code_never_runs(tmp_path, how):
    marker = tmp_path / "marker"
    torch.save(_Touch(marker, how), tmp_path / "saved.pt")
    torch.save({"format": "hsiedge-checkpoint/1", "model_name": MODEL, "config": {},
                "state_dict": {"w": _Touch(marker, how)}}, tmp_path / "nested.pt")
    (tmp_path / "pickle2.pkl").write_bytes(pickle.dumps(_Touch(marker, how), protocol=2))
    (tmp_path / "pickle4.pkl").write_bytes(pickle.dumps({"x": _Touch(marker, how)}, protocol=4))
    for name in ("saved.pt", "nested.pt", "pickle2.pkl", "pickle4.pkl"):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(tmp_path / name)
        assert_one_sentence(e.value, tmp_path / name)
        if name != "pickle4.pkl":  # protocol 4 framing is refused before the global is reached
            assert "holds Python objects other than tensors and plain data" in str(e.value)
    assert not marker.exists()


def test_files_that_are_not_checkpoints(tmp_path):
    cases = {"empty.pt": b"", "text.pt": b"hello, not a checkpoint\n", "zip.pt": b"PK\x03\x04" + b"\0" * 40}
    damaged = r"not a readable PyTorch checkpoint \(truncated or damaged\)"
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=damaged):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="expected a checkpoint file, found a directory"):
        load_checkpoint(tmp_path)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="expected a dict, found Tensor"):
        load_checkpoint(tmp_path / "tensor.pt")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    result: list[CheckpointError] = []

    def attempt() -> None:
        try:
            load_checkpoint(fifo)
        except CheckpointError as e:
            result.append(e)

    worker = threading.Thread(target=attempt, daemon=True)  # a daemon: a hung open cannot hang pytest
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "load_checkpoint waited on a FIFO"
    assert "expected a checkpoint file, found a FIFO" in str(result[0])
