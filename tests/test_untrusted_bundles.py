"""Bundles are untrusted input: nothing outside the bundle is read, the manifest must agree
with its artifacts, and a bundle signed by its owner runs only while nothing in it changed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import write_geotiff
from test_infer import runner

from hsiedge.bundle import MANIFEST, BundleError, open_bundle, replace_manifest, sha256_file
from hsiedge.cli import app
from hsiedge.signing import SIGNATURE


def _copy(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest)
    return dest


def _edit(bundle: Path, change) -> None:
    """Rewrite manifest.json after `change(manifest)`, bypassing every check (as an attacker would)."""
    mf = bundle / MANIFEST
    manifest = json.loads(mf.read_text())
    change(manifest)
    mf.write_text(json.dumps(manifest))


def _one_line(res) -> str:
    out = res.output.strip()
    assert res.exit_code != 0 and "Traceback" not in out and len(out.splitlines()) == 1, out
    return out


@pytest.fixture()
def outside(tmp_path) -> Path:
    """A file outside any bundle whose content must never leak."""
    secret = tmp_path / "elsewhere" / "secret.onnx"
    secret.parent.mkdir()
    secret.write_bytes(b"not yours " * 100)
    return secret


@pytest.mark.parametrize("name", ["../elsewhere/secret.onnx", "ABSOLUTE", "sub/model.onnx", ".hidden",
                                  "..", "", "model.onnx/"])
def test_artifact_names_must_stay_inside_the_bundle(sm_bundle, tmp_path, outside, name):
    b = _copy(sm_bundle, tmp_path / "b")
    name = str(outside) if name == "ABSOLUTE" else name

    def point(m):
        m["artifacts"]["onnx"]["file"] = name
        m["artifacts"]["onnx"]["sha256"] = sha256_file(outside)  # consistent, as a careful attacker makes it
    _edit(b, point)
    with pytest.raises(BundleError) as e:
        open_bundle(b)
    msg = str(e.value)
    assert "\n" not in msg and sha256_file(outside)[:16] not in msg and "not yours" not in msg
    res = runner.invoke(app, ["infer", str(outside), "--bundle", str(b), "-o", str(tmp_path / "m.tif")])
    assert "Traceback" not in _one_line(res) and not (tmp_path / "m.tif").exists()


def test_a_symlink_out_of_the_bundle_is_refused(sm_bundle, tmp_path, outside):
    b = _copy(sm_bundle, tmp_path / "b")
    (b / "model.onnx").unlink()
    (b / "model.onnx").symlink_to(outside)
    _edit(b, lambda m: m["artifacts"]["onnx"].update(sha256=sha256_file(outside)))
    with pytest.raises(BundleError, match="symbolic link") as e:
        open_bundle(b)
    assert sha256_file(outside)[:16] not in str(e.value)
    (b / MANIFEST).rename(b / "real.json")
    (b / MANIFEST).symlink_to(b / "real.json")
    with pytest.raises(BundleError, match="regular file"):
        open_bundle(b)


def test_unlisted_external_data_is_refused(sm_bundle, tmp_path):
    b = _copy(sm_bundle, tmp_path / "b")
    model = onnx.load(str(b / "model.onnx"))
    onnx.save_model(model, str(b / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert (b / "weights.bin").is_file()
    _edit(b, lambda m: m["artifacts"]["onnx"].update(sha256=sha256_file(b / "model.onnx")))
    with pytest.raises(BundleError, match="external data"):
        open_bundle(b)


@pytest.mark.parametrize("field,value", [
    (("input", "scene_bands"), 199),          # preprocessing says 198
    (("input", "bands"), 7),                  # the graph takes 198
    (("precision",), "int8"),                 # an fp32 graph
    (("scan",), "portable"),                  # the graph has SelectiveScan nodes
    (("model", "config", "num_classes"), 9),  # 4 classes in the graph and the class table
])
def test_a_consistently_tampered_manifest_is_refused_before_anything_runs(sm_bundle, tmp_path,
                                                                          field, value):
    b = _copy(sm_bundle, tmp_path / "b")

    def change(m):
        node = m
        for k in field[:-1]:
            node = node[k]
        node[field[-1]] = value
    _edit(b, change)
    with pytest.raises(BundleError) as e:
        open_bundle(b)
    assert "\n" not in str(e.value)


def test_tampered_weights_with_updated_hashes_are_refused_by_the_signature(sm_bundle, tmp_path):
    b = _copy(sm_bundle, tmp_path / "b")
    key = tmp_path / "keys" / "owner.key"
    res = runner.invoke(app, ["keygen", str(key)])
    assert res.exit_code == 0, res.output
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    pub = key.with_name("owner.key.pub")
    assert runner.invoke(app, ["sign", str(b), str(key)]).exit_code == 0
    assert open_bundle(b, [pub]).signed_by

    # weights changed, and the manifest's hash with them: checksums pass, the signature does not
    model = onnx.load(str(b / "model.onnx"))
    init = model.graph.initializer[0]
    arr = onnx.numpy_helper.to_array(init).copy()
    arr.flat[0] += 1.0
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(b / "model.onnx"))
    _edit(b, lambda m: m["artifacts"]["onnx"].update(sha256=sha256_file(b / "model.onnx")))
    open_bundle(b)  # without a trusted key the tampering is consistent
    with pytest.raises(BundleError, match="does not match the manifest"):
        open_bundle(b, [pub])
    res = runner.invoke(app, ["infer", "x.tif", "--bundle", str(b), "--trusted-key", str(pub)])
    assert "signature does not match" in _one_line(res)


def test_trusted_keys_refuse_unsigned_and_foreign_bundles(sm_bundle, tmp_path, monkeypatch):
    b = _copy(sm_bundle, tmp_path / "b")
    for name in ("owner", "stranger"):
        assert runner.invoke(app, ["keygen", str(tmp_path / f"{name}.key")]).exit_code == 0
    owner, stranger = tmp_path / "owner.key.pub", tmp_path / "stranger.key.pub"
    with pytest.raises(BundleError, match="not signed"):
        open_bundle(b, [owner])
    assert runner.invoke(app, ["sign", str(b), str(tmp_path / "stranger.key")]).exit_code == 0
    with pytest.raises(BundleError, match="not a trusted key"):
        open_bundle(b, [owner])
    assert open_bundle(b, [owner, stranger]).signed_by
    # a private key where a public one belongs, a missing key, a key that is not Ed25519
    for bad in (tmp_path / "owner.key", tmp_path / "missing.pub"):
        with pytest.raises(BundleError):
            open_bundle(b, [bad])
    # the environment variable stands for --trusted-key on every command that runs a bundle
    monkeypatch.setenv("HSIEDGE_TRUSTED_KEY", str(owner))
    res = runner.invoke(app, ["parity-check", str(b)])
    assert "not a trusted key" in _one_line(res)


def test_a_replaced_manifest_drops_the_signature_it_invalidates(sm_bundle, tmp_path):
    b = _copy(sm_bundle, tmp_path / "b")
    assert runner.invoke(app, ["keygen", str(tmp_path / "k")]).exit_code == 0
    assert runner.invoke(app, ["sign", str(b), str(tmp_path / "k")]).exit_code == 0
    assert (b / SIGNATURE).is_file()
    bundle = open_bundle(b)
    replace_manifest(b, {**bundle.manifest, "created": "2026-12-02T00:00:00+00:00"})
    assert not (b / SIGNATURE).exists()
    assert open_bundle(b).manifest_sha256 == hashlib.sha256((b / MANIFEST).read_bytes()).hexdigest()


def test_sign_refuses_a_bundle_that_does_not_verify(sm_bundle, tmp_path):
    b = _copy(sm_bundle, tmp_path / "b")
    assert runner.invoke(app, ["keygen", str(tmp_path / "k")]).exit_code == 0
    (b / "heldout.npz").write_bytes(b"changed")
    res = runner.invoke(app, ["sign", str(b), str(tmp_path / "k")])
    assert "sha256" in _one_line(res) and not (b / SIGNATURE).exists()
    res = runner.invoke(app, ["keygen", str(tmp_path / "k")])
    assert "refusing to replace" in _one_line(res)


def test_parity_check_never_opens_the_scene_path_a_manifest_names(sm_bundle, tmp_path, jasper_cube):
    b = _copy(sm_bundle, tmp_path / "b")
    fifo = tmp_path / "never.tif"
    os.mkfifo(fifo)  # opening it would hang

    def point(m):
        m["heldout"]["scene"] = str(fifo)
        m["heldout"].pop("sha256", None)
    _edit(b, point)
    res = runner.invoke(app, ["parity-check", str(b)])
    assert "--scene" in _one_line(res)
    scene = write_geotiff(tmp_path / "other.tif", jasper_cube[:20, :20])
    res = runner.invoke(app, ["parity-check", str(b), "--scene", str(scene), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["pixels"] == 400  # every pixel of the scene given, not the held-out set


def test_heldout_file_is_read_without_pickle(sm_bundle, tmp_path):
    b = _copy(sm_bundle, tmp_path / "b")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))
    with open(b / "heldout.npz", "wb") as f:
        np.savez(f, pixels=np.array([Payload()], dtype=object), allow_pickle=True)
    _edit(b, lambda m: m["artifacts"]["heldout"].update(sha256=sha256_file(b / "heldout.npz")))
    scene = Path(json.loads((b / MANIFEST).read_text())["heldout"]["scene"])
    res = runner.invoke(app, ["parity-check", str(b), "--scene", str(scene)])
    assert "heldout.npz" in _one_line(res) and not marker.exists()


def test_a_manifest_that_names_another_model_than_its_checkpoint_is_refused(sm_bundle, tmp_path, scene_tif):
    b = _copy(sm_bundle, tmp_path / "b")
    _edit(b, lambda m: m["model"].update(name="mambahsi"))  # the map would be labelled with it
    res = runner.invoke(app, ["infer", str(scene_tif), "--bundle", str(b), "--runtime", "torch",
                              "-o", str(tmp_path / "m.tif")])
    assert "disagree on the model's name" in _one_line(res) and not (tmp_path / "m.tif").exists()
