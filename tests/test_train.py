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
    report = json.loads(r.stdout)  # progress lines go to stderr
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


def test_killed_training_resumes_to_the_uninterrupted_checkpoint(datasets, tmp_path):
    """`hsiedge train` killed (SIGKILL) mid-run, then `--resume`: the same checkpoint, tensor for
    tensor, as a run never interrupted; plain progress lines off a terminal; the state is removed."""
    import os
    import subprocess
    import sys
    import time

    from hsiedge.train_state import state_path_for

    jasper = datasets / "jasper_ridge"
    args = [sys.executable, "-m", "hsiedge.cli", "train", "spectralmamba", "--scene",
            str(jasper / "JasperRidge2_R198.mat"), "--labels", str(jasper / "_EndJasperRidge2_R198.mat"),
            "--epochs", "24", "--seed", "3"]
    env = {**os.environ, "HSIEDGE_PROGRESS_SECONDS": "0"}
    clean, killed = tmp_path / "clean.pt", tmp_path / "killed.pt"
    r = subprocess.run([*args, "-o", str(clean)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "training spectralmamba: epoch 24/24, loss" in r.stderr and "left" in r.stderr

    state = state_path_for(killed)
    proc = subprocess.Popen([*args, "-o", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = 0
    deadline = time.monotonic() + 300
    while done < 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
        if state.is_file():
            done = int(torch.load(state, weights_only=True)["epoch"])
    proc.kill()
    assert proc.wait() != 0, "the run ended before it could be killed"
    done = int(torch.load(state, weights_only=True)["epoch"])  # the state as the kill left it
    assert 4 <= done < 24 and state.is_file() and not killed.exists()

    again = subprocess.run([*args, "-o", str(killed)], capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode != 0 and "pass --resume to continue it" in again.stderr
    other = subprocess.run([*args[:-1], "4", "-o", str(killed), "--resume"], capture_output=True, text=True,
                           env=env, timeout=600)
    assert other.returncode != 0 and "belongs to another run: its seed was 3, now 4" in other.stderr
    resumed = subprocess.run([*args, "-o", str(killed), "--resume"], capture_output=True, text=True, env=env,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"training spectralmamba: epoch {done + 1}/24" in resumed.stderr  # continues, not restarts
    assert "epoch 1/24" not in resumed.stderr
    assert not state.exists()

    a, b = torch.load(clean, weights_only=True), torch.load(killed, weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    strip = lambda m: {k: v for k, v in m["test"].items() if k != "train_seconds"}  # noqa: E731
    assert strip(a["metrics"]) == strip(b["metrics"])
    assert a["metrics"]["best_val_oa"] == b["metrics"]["best_val_oa"]


def test_train_names_and_colours_the_classes(datasets, tmp_path):
    """--class-names (a list or a file) and --class-colours reach the checkpoint, and export's maps."""
    from hsiedge.export.bundle_export import export_bundle

    jasper = datasets / "jasper_ridge"
    base = ["train", "spectralmamba", "--scene", str(jasper / "JasperRidge2_R198.mat"), "--labels",
            str(jasper / "_EndJasperRidge2_R198.mat"), "--epochs", "1", "-o", str(tmp_path / "m.pt")]
    runner = CliRunner()
    bad = runner.invoke(app, [*base, "--class-names", "a,b,c"])
    assert bad.exit_code == 1
    assert "--class-names has 3 names (a, b, c); the labels have 4 classes" in bad.output
    assert not (tmp_path / "m.pt").exists()
    bad = runner.invoke(app, [*base, "--class-names", "a,b,c,d", "--class-colours", "e=#ff0000"])
    assert bad.exit_code == 1 and "--class-colours" in bad.output
    names = tmp_path / "names.txt"
    names.write_text("forest\nlake\n\nbare soil\nroad\n")
    res = runner.invoke(app, [*base, "--class-names", str(names),
                              "--class-colours", "lake=#0000ff,4=#808080"])
    assert res.exit_code == 0, res.output
    ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt.class_names == ["forest", "lake", "bare soil", "road"]
    assert ckpt.class_colours == {2: (0, 0, 255), 4: (128, 128, 128)}
    export_bundle(tmp_path / "m.pt", tmp_path / "b")
    classes = json.loads((tmp_path / "b" / "manifest.json").read_text())["classes"]
    assert [(c["name"], c["colour"]) for c in classes][1:] == [
        ("lake", [0, 0, 255]), ("bare soil", classes[2]["colour"]), ("road", [128, 128, 128])]
