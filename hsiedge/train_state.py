"""The resumable state of a training run: written atomically after every epoch, checked on resume.

It holds the latest weights, the optimiser's moments, both random generators, the best
weights so far and the history, so a resumed run continues exactly where the killed one
stopped and ends with the checkpoint an uninterrupted run would have written.  It also records
what defines the run (model, config, split, epochs, optimiser, the data's sha256); resuming
with anything else is refused, naming the difference.  Read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hsiedge.atomic import atomic_path

FORMAT = "hsiedge-train-state/1"
SUFFIX = ".train-state"


class TrainStateError(ValueError):
    """A training state cannot be used to resume; the message says why in one sentence."""


@dataclass
class TrainState:
    run: dict[str, Any]  # what defines the run; a resume must match it exactly
    epoch: int  # epochs completed
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    best_oa: float
    best_state: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    generator: torch.Tensor  # batch order and augmentation
    torch_rng: torch.Tensor  # the global generator (dropout)
    seconds: float  # training time so far, over every session


def state_path_for(checkpoint: str | Path) -> Path:
    """Where the run writing `checkpoint` keeps its state: CHECKPOINT.train-state beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.name + SUFFIX)


def data_sha256(*arrays: np.ndarray) -> str:
    """sha256 over the arrays' shapes, types and bytes (the scene and its labels)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.shape}{a.dtype.str}".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def save_state(path: str | Path, state: TrainState) -> None:
    """Write atomically (a killed write leaves the previous state in place)."""
    obj = {"format": FORMAT, "run": state.run, "epoch": state.epoch, "model": state.model,
           "optimizer": state.optimizer, "best_oa": state.best_oa, "best_state": state.best_state,
           "history": state.history, "generator": state.generator, "torch_rng": state.torch_rng,
           "seconds": state.seconds}
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_state(path: str | Path, run: dict[str, Any]) -> TrainState:
    """The state at `path`, if it belongs to a run defined exactly as `run`."""
    path = Path(path)
    if not path.is_file():
        raise TrainStateError(f"nothing to resume: {path} is not there (it is written after each epoch)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or pickled code
        why = type(e).__name__
        raise TrainStateError(f"{path}: expected a training state readable with "
                              f"torch.load(weights_only=True), but reading failed ({why})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise TrainStateError(f"{path}: expected a training state ({FORMAT}), found something else")
    try:
        state = TrainState(obj["run"], int(obj["epoch"]), obj["model"], obj["optimizer"],
                           float(obj["best_oa"]), obj["best_state"], list(obj["history"]), obj["generator"],
                           obj["torch_rng"], float(obj["seconds"]))
    except (KeyError, TypeError, ValueError) as e:
        raise TrainStateError(f"{path}: the training state is incomplete ({e})") from None
    for key in sorted(set(run) | set(state.run)):
        if state.run.get(key) != run.get(key):
            what = "the data (scene or labels) differs" if key == "data" else (
                f"its {key} was {state.run.get(key)!r}, now {run.get(key)!r}")
            raise TrainStateError(f"{path} belongs to another run: {what}; resume with the same settings, "
                                  f"or delete it to start over")
    return state
