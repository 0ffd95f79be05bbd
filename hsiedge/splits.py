"""Train / validation / test splits of labelled pixels, seeded and reproducible.

- ``per-class:N`` (MambaHSI's protocol with N = 30): N training and N // 3 validation pixels
  per class (30 and 10); a class with no more than N pixels gets N // 2 training pixels (15),
  and at most half of what is left for validation; the rest of each class is the test set.
- ``ratio:R`` (e.g. 0.05, as MD2F-Mamba): round(R * n) training and as many validation pixels
  per class (at least 1 each, and at least 1 left for testing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    """Flat pixel indices (row * width + col) of each part, and how they were drawn."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    protocol: str
    seed: int
    test_labels: np.ndarray | None = None  # label ids (1-based) of the test pixels, for held-out scoring


def parse_protocol(protocol: str) -> tuple[str, float]:
    kind, _, value = protocol.partition(":")
    try:
        if kind == "per-class" and int(value) >= 2:
            return kind, int(value)  # an int, so per-class counts stay whole
        if kind == "ratio" and 0 < float(value) < 0.5:
            return kind, float(value)
    except ValueError:
        pass
    raise ValueError(f"protocol must be 'per-class:N' (N >= 2) or 'ratio:R' (0 < R < 0.5), got {protocol!r}")


def _counts(kind: str, value: float, n: int) -> tuple[int, int]:  # (train, val) of a class of n
    if kind == "per-class":
        big = value
        if n > big:
            return big, min(big // 3, n - big - 1) if n - big > 1 else 0
        train = max(1, min(big // 2, n - 1))
        return train, (n - train) // 2
    k = max(1, round(value * n))
    train = min(k, max(n - 1, 1))
    val = min(k, max(n - train - 1, 0))
    return train, val


def make_split(labels: np.ndarray, protocol: str = "per-class:30", seed: int = 0) -> Split:
    """Split the labelled pixels (label > 0) of a (rows, cols) map per class."""
    kind, value = parse_protocol(protocol)
    rng = np.random.default_rng(seed)
    flat = np.asarray(labels).ravel()
    parts: tuple[list, list, list] = ([], [], [])
    for c in np.unique(flat[flat > 0]):
        idx = rng.permutation(np.flatnonzero(flat == c))
        n_train, n_val = _counts(kind, value, idx.size)
        for part, chunk in zip(parts, (idx[:n_train], idx[n_train:n_train + n_val], idx[n_train + n_val:]),
                               strict=True):
            part.append(chunk)
    train, val, test = (np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64)
                        for p in parts)
    return Split(train, val, test, protocol, seed, flat[test].astype(np.int64))
