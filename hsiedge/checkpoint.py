"""Checkpoints (DESIGN.md Contract 3): tensors and plain data only, read with weights_only=True.

A checkpoint written by `hsiedge train` holds the model name and config, the state_dict, the
fitted preprocessing chain, class names, the split and the test metrics.  A bare state_dict
(the official MambaHSI code saves those) is accepted too when the model is named: MambaHSI's
bands, classes and width are read off the tensor shapes; other models need their config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hsiedge import __version__
from hsiedge.atomic import atomic_path
from hsiedge.models import MODELS, build_model
from hsiedge.preprocess import Chain
from hsiedge.splits import Split

FORMAT = "hsiedge-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint could not be used; the message says why in one sentence."""


@dataclass
class Checkpoint:
    model_name: str
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    preprocessing: Chain | None = None  # None for an imported bare state_dict
    class_names: list[str] | None = None
    split: Split | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    train_info: dict[str, Any] = field(default_factory=dict)
    hsiedge_version: str = __version__
    class_colours: dict[int, tuple[int, int, int]] | None = None  # class id (1-based) -> RGB, for maps

    def build(self) -> nn.Module:
        """The model with these weights, in eval mode."""
        model = build_model(self.model_name, **self.config)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            older = "" if self.hsiedge_version == __version__ else (
                f" (saved by hsiedge {self.hsiedge_version}, this is {__version__}: the model's "
                f"structure may have changed since; retrain it)")
            raise CheckpointError(f"state_dict does not fit {self.model_name} {self.config}{older}: "
                                  f"{first[1].strip() if len(first) > 1 else first[0]}") from None
        return model.eval()


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write atomically: a temporary file in the same folder, renamed when complete."""
    path = Path(path)
    obj = {
        "format": FORMAT, "hsiedge_version": ckpt.hsiedge_version, "model_name": ckpt.model_name,
        "config": dict(ckpt.config), "state_dict": {k: v.detach().cpu() for k, v in ckpt.state_dict.items()},
        "preprocessing": None if ckpt.preprocessing is None else ckpt.preprocessing.to_dict(),
        "class_names": list(ckpt.class_names) if ckpt.class_names else None,
        "split": None if ckpt.split is None else {
            "train": torch.from_numpy(ckpt.split.train), "val": torch.from_numpy(ckpt.split.val),
            "test": torch.from_numpy(ckpt.split.test), "protocol": ckpt.split.protocol,
            "seed": ckpt.split.seed,
            **({} if ckpt.split.test_labels is None else
               {"test_labels": torch.from_numpy(ckpt.split.test_labels)})},
        "metrics": ckpt.metrics, "train_info": ckpt.train_info,
        "class_colours": None if not ckpt.class_colours else {
            int(k): [int(c) for c in v] for k, v in ckpt.class_colours.items()},
    }
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def _infer_mambahsi_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    try:
        hidden, bands = sd["patch_embedding.0.weight"].shape[:2]
        classes = sd["cls_head.3.weight"].shape[0]
        token_dim = sd["mamba.0.spe_mamba.mamba.in_proj.weight"].shape[1]
    except KeyError as e:
        raise CheckpointError(f"not a MambaHSI state_dict: key {e.args[0]!r} is missing") from None
    return {"in_channels": int(bands), "num_classes": int(classes), "hidden_dim": int(hidden),
            "token_num": int(-(-hidden // token_dim))}


def _optional_numpy(t: torch.Tensor | None):
    return None if t is None else t.numpy()


def load_checkpoint(path: str | Path, model: str | None = None, **config: Any) -> Checkpoint:
    """Read a checkpoint (or a bare state_dict, given `model` and, if not MambaHSI, `config`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code, not a torch file at all
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: expected a checkpoint readable with torch.load(weights_only=True), "
                              f"but reading failed ({reason})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    if obj.get("format") == FORMAT:
        missing = {"model_name", "config", "state_dict"} - obj.keys()
        if missing:
            raise CheckpointError(f"{path}: checkpoint lacks {sorted(missing)}")
        split = obj.get("split")
        return Checkpoint(
            obj["model_name"], dict(obj["config"]), obj["state_dict"],
            None if obj.get("preprocessing") is None else Chain.from_dict(obj["preprocessing"]),
            obj.get("class_names"),
            None if split is None else Split(split["train"].numpy(), split["val"].numpy(),
                                             split["test"].numpy(), split["protocol"], int(split["seed"]),
                                             _optional_numpy(split.get("test_labels"))),
            obj.get("metrics") or {}, obj.get("train_info") or {}, obj.get("hsiedge_version", "?"),
            {int(k): tuple(v) for k, v in obj["class_colours"].items()} if obj.get("class_colours") else None)
    if "format" in obj:
        raise CheckpointError(f"{path}: checkpoint format {obj['format']!r} is not {FORMAT!r}")
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected an hsiedge checkpoint or a bare state_dict of tensors")
    if model is None:
        raise CheckpointError(f"{path}: a bare state_dict; name its model ({', '.join(MODELS)})")
    if model not in MODELS:
        raise CheckpointError(f"unknown model '{model}'; choose one of: {', '.join(MODELS)}")
    if model == "mambahsi":
        config = {**_infer_mambahsi_config(obj), **config}
    elif not config:
        raise CheckpointError(f"{path}: a bare {model} state_dict needs its config "
                              "(in_channels, num_classes, ...)")
    ckpt = Checkpoint(model, config, obj, train_info={"imported_from": str(path)})
    ckpt.build()  # fails here, with the reason, if the weights do not fit
    return ckpt

