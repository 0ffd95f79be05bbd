"""The runner interface (DESIGN.md Contract 4) that `infer`, `parity-check` and `bench` use.

A runner opens one artifact of a verified bundle, runs batches of preprocessed model input
(patches, spectra or image tiles as float32 NumPy) to float32 logits, reports where and at
what precision it runs, and closes.  Nothing else about a runtime leaks out of its module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from hsiedge.bundle import Bundle


class RuntimeUnavailableError(RuntimeError):
    """This runtime cannot run this bundle here; the message says why in one sentence."""


class Runner(ABC):
    """One artifact of a bundle, ready to run."""

    name: str = "?"

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    @property
    @abstractmethod
    def device(self) -> str:
        """Where it runs, in words (e.g. "cpu", "cuda:0 (NVIDIA ...)")."""

    @property
    @abstractmethod
    def precision(self) -> str:
        """fp32, fp16 or int8: the precision of the artifact it runs."""

    @property
    def artifact(self) -> str:
        """The bundle artifact it runs (checkpoint, onnx, engine)."""
        return "?"

    @property
    def notes(self) -> str:
        """Anything a reader of a parity report should know about how it runs."""
        return ""

    @abstractmethod
    def run(self, x: np.ndarray) -> np.ndarray:
        """A batch of model input -> float32 logits ((n, K) per pixel, (n, K, H, W) per tile)."""

    @property
    def runs_tiles(self) -> bool:
        """Whether `run_tile` classifies a patch model's whole tile in one call, sharing the work
        of overlapping patches; `infer` and parity then give it tiles instead of patch batches."""
        return False

    def run_tile(self, tile: np.ndarray) -> np.ndarray:
        """A patch model's tile with its halo (C, h + 2r, w + 2r), r = patch // 2 -> float32
        logits (K, h, w) of its core pixels, as `run` gives them for their patches."""
        raise RuntimeUnavailableError(f"{self.bundle.path}: the {self.name} runtime classifies this model's "
                                      "patches in batches, not whole tiles (see `runs_tiles`)")

    def close(self) -> None:  # noqa: B027  (optional hook: most runners hold nothing to release)
        """Release sessions, engines and device memory."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class RuntimeSpec:
    name: str
    opener: Callable[[Bundle, str | None, int | None], Runner]  # (bundle, device, CPU threads)
    available: Callable[[Bundle], str | None]  # None when usable, else the reason it is not
    # lower is faster: the default runtime is the fastest available; a function of the bundle
    # where the order depends on it (precision)
    speed_rank: int | Callable[[Bundle], int]

    def rank(self, bundle: Bundle) -> int:
        """Where this runtime stands for `bundle` (lower: tried first by default)."""
        return self.speed_rank(bundle) if callable(self.speed_rank) else self.speed_rank


_RUNTIMES: dict[str, RuntimeSpec] = {}


def register_runtime(spec: RuntimeSpec) -> None:
    _RUNTIMES[spec.name] = spec


def runtime_names() -> list[str]:
    return list(_RUNTIMES)


def why_unavailable(bundle: Bundle, name: str) -> str | None:
    """None when runtime `name` can run `bundle` here, else the reason."""
    if name not in _RUNTIMES:
        return f"unknown runtime {name!r}; choose one of: {', '.join(_RUNTIMES)}"
    return _RUNTIMES[name].available(bundle)


def default_runtime(bundle: Bundle) -> str:
    """The fastest runtime that can run this bundle here."""
    for spec in sorted(_RUNTIMES.values(), key=lambda s: s.rank(bundle)):
        if spec.available(bundle) is None:
            return spec.name
    raise RuntimeUnavailableError(f"{bundle.path}: no runtime can run this bundle here")


def open_runner(bundle: Bundle, name: str | None = None, device: str | None = None,
                threads: int | None = None) -> Runner:
    """Open runtime `name` (default: the fastest available) on `bundle`; `threads` caps the CPU
    threads it computes with (None: the runtime's default, every core), for a process that
    shares the machine with others."""
    name = name or default_runtime(bundle)
    reason = why_unavailable(bundle, name)
    if reason is not None:
        raise RuntimeUnavailableError(reason)
    return _RUNTIMES[name].opener(bundle, device, threads)
