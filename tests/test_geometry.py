"""What was trained is what runs: MambaHSI on a real crop whose sides are not multiples of 4
gives the same labels in training, at export, in parity-check and in infer on the whole scene."""

from __future__ import annotations

import json

import numpy as np
import rasterio
from conftest import write_geotiff
from test_infer import runner

from hsiedge.checkpoint import load_checkpoint
from hsiedge.cli import app
from hsiedge.io import read_labels
from hsiedge.metrics import accuracy_report
from hsiedge.train import predict_scene


def test_one_geometry_from_training_to_deployment(datasets, jasper_cube, tmp_path):
    labels = read_labels(datasets / "jasper_ridge" / "_EndJasperRidge2_R198.mat", shape=(100, 100)).labels
    rows, cols = slice(10, 61), slice(20, 70)  # 51 x 50: neither side a multiple of 4
    cube, gt = jasper_cube[rows, cols], labels[rows, cols]
    scene = write_geotiff(tmp_path / "crop.tif", cube)
    gt_path = write_geotiff(tmp_path / "crop_gt.tif", gt[..., None].astype(np.uint8))
    ckpt_path, bundle = tmp_path / "m.pt", tmp_path / "bundle"

    res = runner.invoke(app, ["train", "mambahsi", "--scene", str(scene), "--labels", str(gt_path),
                              "--protocol", "per-class:10", "--epochs", "8", "-o", str(ckpt_path), "--json"])
    assert res.exit_code == 0, res.output
    trained_oa = json.loads(res.stdout)["oa"]
    ckpt = load_checkpoint(ckpt_path)
    trained = predict_scene(ckpt, cube)  # (H*W,) 0-based, as training scored them
    test = ckpt.split.test
    y = gt.reshape(-1)[test].astype(np.int64) - 1
    assert accuracy_report(y, trained[test], 4)["oa"] == trained_oa

    res = runner.invoke(app, ["export", str(ckpt_path), "-o", str(bundle), "--json"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["parity"]["results"][0]["figures"]["oa_original"] == trained_oa

    res = runner.invoke(app, ["parity-check", str(bundle), "--scene", str(scene), "--json",
                              "--save-polygraphy", str(tmp_path / "pg")])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["results"][0]["figures"]["oa_original"] == trained_oa
    from polygraphy.comparator import RunResults

    original = RunResults.load(str(tmp_path / "pg" / "outputs.json"))["original"][0]["logits"]
    assert original.shape[2:] == (52, 52)  # padded to multiples of 4, then cropped back
    checked = original[0, :, :51, :50].argmax(0).reshape(-1)
    np.testing.assert_array_equal(checked[test], trained[test])
    assert report["original"]["tiling_effect"]["whole_scene"]

    for runtime in ("torch", "onnxruntime"):
        out = tmp_path / f"{runtime}.tif"
        res = runner.invoke(app, ["infer", str(scene), "--bundle", str(bundle), "--runtime", runtime,
                                  "-o", str(out), "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["tiles"] == 1
        with rasterio.open(out) as m:
            mapped = m.read(1).reshape(-1).astype(np.int64) - 1
        if runtime == "torch":
            np.testing.assert_array_equal(mapped, trained)
        else:  # fp32 ONNX Runtime: the same labels bar a float near-tie
            assert (mapped == trained).mean() > 0.999
