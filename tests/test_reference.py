"""The PyTorch original's logits stored in the bundle at export (`reference.npz`), and
`parity-check --original stored | torch | auto` against them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_edge_install import export_scene
from typer.testing import CliRunner

from hsiedge.bundle import open_bundle, replace_manifest
from hsiedge.checkpoint import load_checkpoint
from hsiedge.cli import app
from hsiedge.io import open_scene


def _check(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["parity-check", *args])
    return res.exit_code, res.stdout if res.exit_code == 0 else " ".join(res.output.split())


def test_the_stored_logits_are_the_originals_on_the_held_out_pixels(sm_bundle):
    """Against the checkpoint's model on patches cut by a plain loop."""
    bundle = open_bundle(sm_bundle)
    with np.load(bundle.artifact("reference")) as ref, np.load(bundle.artifact("heldout")) as held:
        pixels, logits = ref["pixels"], ref["logits"]
        np.testing.assert_array_equal(pixels, held["pixels"])
    assert logits.dtype == np.float32 and logits.shape == (pixels.size, len(bundle.manifest["classes"]))
    args = export_scene(sm_bundle)
    with open_scene(args[1], key=args[3] if len(args) > 2 else None) as s:
        x, _ = bundle.preprocessing.apply(s.read(), s.nodata)
    w = x.shape[1]
    padded = np.pad(x, ((3, 3), (3, 3), (0, 0)), mode="reflect")
    pick = np.random.default_rng(7).choice(pixels.size, size=24, replace=False)
    patches = np.stack([padded[p // w:p // w + 7, p % w:p % w + 7].transpose(2, 0, 1) for p in pixels[pick]])
    model = load_checkpoint(bundle.artifact("checkpoint")).build().eval()
    with torch.no_grad():
        want = model(torch.from_numpy(patches.astype(np.float32))).numpy()
    np.testing.assert_allclose(logits[pick], want, rtol=1e-4, atol=1e-4)


def test_stored_and_rerun_originals_give_the_same_figures(sm_bundle):
    code, out = _check(str(sm_bundle), *export_scene(sm_bundle), "--original", "stored", "--json")
    assert code == 0, out
    stored = json.loads(out)
    code, out = _check(str(sm_bundle), *export_scene(sm_bundle), "--original", "torch", "--json")
    assert code == 0, out
    rerun = json.loads(out)
    assert stored["original"]["runtime"] == "stored reference" and rerun["original"]["runtime"] == "torch"
    for a, b in zip(stored["results"], rerun["results"], strict=True):
        for k in ("max_abs_error", "rel_l2", "agreement", "labels_differ"):
            assert a["figures"][k] == pytest.approx(b["figures"][k], rel=1e-6, abs=1e-9), k


def test_the_stored_original_covers_the_held_out_pixels_only(sm_bundle, scene_tif):
    code, said = _check(str(sm_bundle), "--scene", str(scene_tif), "--original", "stored")
    assert code == 1 and "--original stored compares on the held-out pixels of the export scene only" in said


def test_a_bundle_without_stored_logits(sm_bundle, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(sm_bundle, old)
    manifest = dict(open_bundle(old).manifest)
    manifest["artifacts"] = {k: v for k, v in manifest["artifacts"].items() if k != "reference"}
    (old / "reference.npz").unlink()
    replace_manifest(old, manifest)
    code, said = _check(str(old), *export_scene(old), "--original", "stored")
    assert code == 1 and "the bundle stores no reference logits" in said and "--original torch" in said
    code, out = _check(str(old), *export_scene(old), "--json")  # auto: torch is here, so it runs
    assert code == 0 and json.loads(out)["original"]["runtime"] == "torch"
