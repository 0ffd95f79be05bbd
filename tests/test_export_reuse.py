"""Exports of one checkpoint in one process share its float ONNX graph and the original's
logits (`export/reuse.py`): only for the same checkpoint bytes, and what is reused is exactly
what the export would compute afresh."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hsiedge.checkpoint import load_checkpoint, save_checkpoint
from hsiedge.export import reuse
from hsiedge.export.bundle_export import export_bundle

REUSED = "earlier export of the checkpoint"


def _export(ckpt: Path, out: Path, **options) -> list[str]:
    steps: list[str] = []
    export_bundle(ckpt, out, on_step=steps.append, **options)
    return [s for s in steps if REUSED in s]


def _logits(bundle: Path) -> np.ndarray:
    with np.load(bundle / "reference.npz") as npz:
        return npz["logits"]


def test_exports_of_one_checkpoint_reuse_its_graph_and_logits_only(checkpoints, tmp_path):
    ckpt = checkpoints["spectralmamba"]
    reuse.forget()
    assert _export(ckpt, tmp_path / "fp32") == []  # nothing kept yet: both computed
    assert len(_export(ckpt, tmp_path / "fp16", scan="portable", precision="fp16")) == 2  # both reused

    reuse.forget()  # the same export again, computed afresh: the same bytes
    assert _export(ckpt, tmp_path / "fresh", scan="portable", precision="fp16") == []
    assert (tmp_path / "fp16" / "model.onnx").read_bytes() == (tmp_path / "fresh" / "model.onnx").read_bytes()
    assert np.array_equal(_logits(tmp_path / "fp16"), _logits(tmp_path / "fresh"))

    # other weights (a new file, another sha256) are never served the first checkpoint's work
    changed = load_checkpoint(ckpt)
    name = next(k for k, v in changed.state_dict.items() if v.is_floating_point() and v.ndim >= 2)
    changed.state_dict[name] = changed.state_dict[name] * 1.5
    other = save_checkpoint(tmp_path / "changed.pt", changed)
    assert _export(other, tmp_path / "changed") == []
    assert not np.allclose(_logits(tmp_path / "changed"), _logits(tmp_path / "fp32"))
    onnx_bytes = {b: (tmp_path / b / "model.onnx").read_bytes() for b in ("changed", "fp32")}
    assert onnx_bytes["changed"] != onnx_bytes["fp32"]
