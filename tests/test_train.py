"""Short training runs on a real crop: the loss goes down, checkpoints round-trip, the CLI works."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hsiedge.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from hsiedge.cli import app
from hsiedge.io import read_labels
from hsiedge.metrics import accuracy_report
from hsiedge.models import build_model
from hsiedge.train import predict_scene, train_model


@pytest.fixture(scope="module")
def crop(datasets, jasper_cube):
    labels = read_labels(datasets / "jasper_ridge" / "_EndJasperRidge2_R198.mat", shape=(100, 100)).labels
    return jasper_cube[20:52, 30:62], labels[20:52, 30:62]


@pytest.mark.parametrize("model,epochs", [("spectralmamba", 12), ("md2f-mamba", 4), ("mambahsi", 12)])
def test_short_training_learns_and_round_trips(crop, tmp_path, model, epochs):
    cube, labels = crop
    res = train_model(model, cube, labels, protocol="per-class:10", seed=1, epochs=epochs,
                      class_names=["tree", "water", "dirt", "road"])
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < losses[0], losses
    ckpt = res.checkpoint
    assert ckpt.preprocessing.fitted and ckpt.split.train.size > 0
    # The stored test metrics are what the kept weights give on the test pixels.
    pred = predict_scene(ckpt, cube)
    y = labels.ravel().astype(np.int64) - 1
    test = ckpt.split.test
    assert accuracy_report(y[test], pred[test], 4)["oa"] == pytest.approx(res.report["oa"])
    path = save_checkpoint(tmp_path / "m.pt", ckpt)
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # nothing half-written left behind
    back = load_checkpoint(path)
    assert back.model_name == model and back.class_names == ["tree", "water", "dirt", "road"]
    np.testing.assert_array_equal(back.split.test, ckpt.split.test)
    np.testing.assert_array_equal(predict_scene(back, cube), pred)


def test_checkpoint_is_plain_data(crop, tmp_path):
    cube, labels = crop
    res = train_model("spectralmamba", cube, labels, protocol="per-class:10", epochs=1)
    path = save_checkpoint(tmp_path / "c.pt", res.checkpoint)
    obj = torch.load(path, weights_only=True)  # raises if anything but tensors / plain data is inside
    assert obj["format"] == "hsiedge-checkpoint/1" and obj["model_name"] == "spectralmamba"
    json.dumps({k: v for k, v in obj.items() if k not in ("state_dict", "split")})


def test_official_bare_mambahsi_state_dict(tmp_path):
    torch.manual_seed(0)
    official = build_model("mambahsi", in_channels=103, num_classes=9, hidden_dim=64).eval()
    torch.save(official.state_dict(), tmp_path / "best_tr30_val10.pth")
    ckpt = load_checkpoint(tmp_path / "best_tr30_val10.pth", model="mambahsi")
    assert ckpt.config == {"in_channels": 103, "num_classes": 9, "hidden_dim": 64, "token_num": 4}
    x = torch.randn(1, 103, 16, 20)
    with torch.no_grad():
        torch.testing.assert_close(ckpt.build()(x), official(x))
    with pytest.raises(CheckpointError, match="bare state_dict; name its model"):
        load_checkpoint(tmp_path / "best_tr30_val10.pth")
    with pytest.raises(CheckpointError, match="does not fit spectralmamba"):
        load_checkpoint(tmp_path / "best_tr30_val10.pth", model="spectralmamba", in_channels=103,
                        num_classes=9)


def test_checkpoint_from_another_version_that_does_not_fit_says_so(tmp_path):
    """MD2F-Mamba's structure changed in 0.2.0: an older checkpoint is refused, naming both versions."""
    from hsiedge.checkpoint import Checkpoint, save_checkpoint

    other = build_model("md2f-mamba", in_channels=30, num_classes=4, hidden_dim=32).state_dict()
    config = {"in_channels": 30, "num_classes": 4}
    path = save_checkpoint(tmp_path / "old.pt",
                           Checkpoint("md2f-mamba", config, other, hsiedge_version="0.1.0"))
    with pytest.raises(CheckpointError, match=r"saved by hsiedge 0\.1\.0, this is .*retrain it"):
        load_checkpoint(path).build()


class _NotData:
    pass


def test_bad_checkpoints_are_refused(tmp_path):
    torch.save({"model": _NotData()}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match=r"weights_only=True\), but reading failed"):
        load_checkpoint(tmp_path / "code.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "code.pt").read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"cut\.pt"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")
    torch.save({"format": "other/9"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="format 'other/9'"):
        load_checkpoint(tmp_path / "other.pt")


def test_cli_train(datasets, tmp_path):
    jasper = datasets / "jasper_ridge"
    out = tmp_path / "sm.pt"
    args = ["train", "spectralmamba", "--scene", str(jasper / "JasperRidge2_R198.mat"),
            "--labels", str(jasper / "_EndJasperRidge2_R198.mat"), "--epochs", "2", "--seed", "3",
            "-o", str(out)]
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["class_names"] == ["tree", "water", "dirt", "road"] and 0 <= report["oa"] <= 1
    assert len(report["confusion"]) == 4 and out.is_file()
    assert load_checkpoint(out).train_info["seed"] == 3
    r = CliRunner().invoke(app, args)  # the human-readable tables
    assert r.exit_code == 0 and "OA" in r.output and "road" in r.output


@pytest.mark.parametrize("change,message", [
    ({"--scene": "jasper_ridge/missing.mat"}, "file not found"),
    ({"--protocol": "half"}, "protocol must be"),
    ({"--labels": "indian_pines/Indian_pines_gt.mat"}, "label map is 145 x 145 but the scene is 100 x 100"),
])
def test_cli_train_errors(datasets, tmp_path, change, message):
    jasper = datasets / "jasper_ridge"
    opts = {"--scene": str(jasper / "JasperRidge2_R198.mat"),
            "--labels": str(jasper / "_EndJasperRidge2_R198.mat"), "-o": str(tmp_path / "x.pt"),
            "--epochs": "1"}
    # Paths in `change` are relative to the datasets folder; other values are taken as they are.
    opts.update({k: str(datasets / v) if k != "--protocol" else v for k, v in change.items()})
    args = ["train", "spectralmamba"] + [a for kv in opts.items() for a in kv]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1 and message in r.output.replace("\n", " ")
    assert not Path(tmp_path / "x.pt").exists()
