"""Training the seed models on one labelled scene (what `hsiedge train` runs).

Each model has a recipe: its preprocessing, optimiser settings and epochs.

- MambaHSI: the official code's settings. Percentile stretch, Adam at lr 3e-4, 200 epochs.
  Each epoch is one step on the whole image, with the loss on the full-resolution
  (upsampled) logits of the training pixels.
- SpectralMamba: the paper states no training settings. We use standardisation and Adam at
  lr 5e-4 (the same group's SpectralFormer setting), batches of 64 patches.
- MD2F-Mamba: standardisation then PCA to 30 components fitted on the training pixels,
  Adam at lr 1e-3, batches of 64 patches.

Patch models sample each pixel's neighbourhood from the preprocessed scene, reflect-padded
at the edges. After every epoch the model is scored on the validation pixels. The weights
with the best validation OA are kept (later epochs win ties, as in the official MambaHSI
code) and scored on the test pixels.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hsiedge.bundle import default_class_names
from hsiedge.checkpoint import Checkpoint
from hsiedge.metrics import accuracy_report
from hsiedge.models import MODELS, build_model
from hsiedge.preprocess import PCA, Chain, PercentileStretch, Standardize, Transform
from hsiedge.splits import Split, make_split
from hsiedge.tensor_inputs import TensorPixelInputs, image_logits
from hsiedge.train_state import TrainState, data_sha256, load_state, save_state


@dataclass(frozen=True)
class Recipe:
    """How a model is trained: preprocessing steps (given the band count), optimiser, epochs."""

    steps: Callable[[int], list[Transform]]
    lr: float
    epochs: int
    batch_size: int | None  # None: one step on the whole image per epoch
    weight_decay: float = 0.0
    augment: bool = False  # random flips / quarter turns of training patches


RECIPES: dict[str, Recipe] = {
    "mambahsi": Recipe(lambda bands: [PercentileStretch()], lr=3e-4, epochs=200, batch_size=None),
    "spectralmamba": Recipe(lambda bands: [Standardize()], lr=5e-4, epochs=100, batch_size=64, augment=True),
    "md2f-mamba": Recipe(lambda bands: [Standardize(), PCA(min(30, bands))], lr=1e-3, epochs=60, augment=True,
                         batch_size=64),
}


@dataclass
class TrainResult:
    checkpoint: Checkpoint
    report: dict[str, Any]  # accuracy on the test pixels
    history: list[dict[str, float]] = field(default_factory=list)


class ScenePredictor:
    """A model and one preprocessed scene (C, H, W): logits or class ids for flat pixel indices."""

    def __init__(self, model: nn.Module, image: torch.Tensor, batch: int = 256) -> None:
        self.model, self.image, self.batch = model, image, batch  # image: (C, H, W)
        self.kind = getattr(model, "input_kind", "patch")
        self.inputs = None if self.kind == "image" else TensorPixelInputs(image, self.kind,
                                                                           getattr(model, "patch_size", 0))

    def logits(self, idx: np.ndarray) -> torch.Tensor:
        if self.kind == "image":
            full = image_logits(self.model, self.image)  # (K, H, W), padded as deployed
            return full.flatten(1).T[torch.from_numpy(idx)]
        return torch.cat([self.model(self.inputs(idx[i:i + self.batch]))
                          for i in range(0, idx.size, self.batch)])

    @torch.no_grad()
    def predict(self, idx: np.ndarray) -> np.ndarray:
        self.model.eval()
        return self.logits(idx).argmax(1).cpu().numpy()


def predict_scene(ckpt: Checkpoint, cube: np.ndarray) -> np.ndarray:
    """Class ids (0-based) of every pixel of a (rows, cols, bands) cube, raster order."""
    x, _ = ckpt.preprocessing.apply(cube)
    predictor = ScenePredictor(ckpt.build(), torch.from_numpy(x).permute(2, 0, 1).contiguous())
    return predictor.predict(np.arange(cube.shape[0] * cube.shape[1]))


def _augment(patches: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One of the 8 flips / quarter turns of the square, per batch (the centre pixel stays put)."""
    k, flip = torch.randint(0, 4, (1,), generator=gen).item(), torch.randint(0, 2, (1,), generator=gen).item()
    out = torch.rot90(patches, k, dims=(2, 3))
    return out.flip(3) if flip else out


def train_model(
    model_name: str,
    cube: np.ndarray,
    labels: np.ndarray,
    *,
    protocol: str = "per-class:30",
    seed: int = 0,
    epochs: int | None = None,
    device: str = "cpu",
    class_names: list[str] | None = None,
    nodata: float | None = None,
    model_config: dict[str, Any] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    state_path: str | Path | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train `model_name` on a (rows, cols, bands) cube and its (rows, cols) label map (0 = none).

    `state_path`: the run's state is written there atomically after every epoch; with `resume`
    the run continues from it (and must be defined exactly as the interrupted one), ending with
    the checkpoint an uninterrupted run gives."""
    if resume and state_path is None:
        raise ValueError("resume needs the state_path of the interrupted run")
    if model_name not in RECIPES:
        raise ValueError(f"unknown model '{model_name}'; choose one of: {', '.join(MODELS)}")
    if cube.shape[:2] != labels.shape:
        raise ValueError(f"label map is {labels.shape} but the scene is {cube.shape[:2]}")
    recipe = RECIPES[model_name]
    epochs = recipe.epochs if epochs is None else epochs
    t0 = time.perf_counter()
    split: Split = make_split(labels, protocol, seed)
    if split.train.size == 0:
        raise ValueError("the label map has no labelled pixels (all 0)")
    bands = cube.shape[2]
    flat = cube.reshape(-1, bands)
    chain = Chain(recipe.steps(bands)).fit(flat, flat[split.train], nodata=nodata)
    x, valid = chain.apply(cube, nodata)
    y = labels.reshape(-1).astype(np.int64) - 1
    for name, part in (("train", split.train), ("val", split.val), ("test", split.test)):
        if part.size and not valid.reshape(-1)[part].all():
            raise ValueError(f"some {name} pixels are nodata/NaN in the scene; relabel them as 0")
    num_classes = int(labels.max())

    torch.manual_seed(seed)
    config = {"in_channels": chain.out_bands, "num_classes": num_classes, **(model_config or {})}
    model = build_model(model_name, **config).to(device)
    image = torch.from_numpy(x).permute(2, 0, 1).contiguous().to(device)
    scorer = ScenePredictor(model, image)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    y_t = torch.from_numpy(y).to(device)
    gen = torch.Generator().manual_seed(seed)
    val_idx = split.val if split.val.size else split.train
    best_oa, best_state, history = -1.0, None, []
    run = {"model": model_name, "config": config, "protocol": protocol, "seed": seed, "epochs": epochs,
           "lr": recipe.lr, "device": device, "data": data_sha256(cube, labels)}
    first, seconds_before = 1, 0.0
    if resume:
        state = load_state(state_path, run)
        model.load_state_dict(state.model)
        opt.load_state_dict(state.optimizer)
        gen.set_state(state.generator)
        torch.set_rng_state(state.torch_rng)
        best_oa, best_state, history = state.best_oa, state.best_state, state.history
        first, seconds_before = state.epoch + 1, state.seconds
        t0 = time.perf_counter()  # preprocessing is redone, not counted twice

    for epoch in range(first, epochs + 1):
        model.train()
        losses = []
        if recipe.batch_size is None:
            batches = [split.train]
        else:
            order = split.train[torch.randperm(split.train.size, generator=gen).numpy()]
            batches = [order[i:i + recipe.batch_size] for i in range(0, order.size, recipe.batch_size)]
        for idx in batches:
            if recipe.augment and scorer.kind == "patch":
                xb = _augment(scorer.inputs(idx), gen)
                logits = model(xb)
            else:
                logits = scorer.logits(idx)
            loss = F.cross_entropy(logits, y_t[torch.from_numpy(idx).to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        val_oa = float((scorer.predict(val_idx) == y[val_idx]).mean())
        if val_oa >= best_oa:
            best_oa, best_state = val_oa, copy.deepcopy(model.state_dict())
        record = {"epoch": epoch, "epochs": epochs, "loss": float(np.mean(losses)), "val_oa": val_oa,
                  "best_val_oa": best_oa, "seconds": seconds_before + time.perf_counter() - t0}
        history.append(record)
        if state_path is not None:
            save_state(state_path, TrainState(
                run, epoch, model.state_dict(), opt.state_dict(), best_oa, best_state, history,
                gen.get_state(), torch.get_rng_state(), record["seconds"]))
        if on_epoch:
            on_epoch(record)
    train_seconds = seconds_before + time.perf_counter() - t0

    model.load_state_dict(best_state)
    test_idx = split.test if split.test.size else split.val
    report = accuracy_report(y[test_idx], scorer.predict(test_idx), num_classes)
    report["train_seconds"] = train_seconds
    named = class_names and len(class_names) == num_classes
    names = class_names if named else default_class_names(num_classes)
    ckpt = Checkpoint(
        model_name, config, {k: v.detach().cpu() for k, v in best_state.items()}, chain, names, split,
        metrics={"test": report, "best_val_oa": best_oa},
        train_info={"protocol": protocol, "seed": seed, "epochs": epochs, "lr": recipe.lr,
                    "batch_size": recipe.batch_size, "device": device, "seconds": train_seconds,
                    "scene_shape": list(cube.shape)})
    return TrainResult(ckpt, report, history)
