"""Preprocessing in NumPy (the edge runtime must not need torch): fitted once, applied anywhere."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PCA:
    """Principal components fitted on training pixels: x -> (x - mean) @ components.T."""

    mean: np.ndarray  # (bands,)
    components: np.ndarray  # (k, bands)

    @classmethod
    def fit(cls, pixels: np.ndarray, k: int) -> PCA:
        """Fit k components on (n_pixels, bands) samples (float64 SVD)."""
        x = np.asarray(pixels, dtype=np.float64)
        if x.ndim != 2 or not 0 < k <= min(x.shape):
            raise ValueError(f"PCA.fit: need (n_pixels, bands) with k <= min of them, got {x.shape}, k={k}")
        mean = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        # Fix each component's sign so that fitting is deterministic across LAPACK builds.
        signs = np.sign(vt[:k][np.arange(k), np.abs(vt[:k]).argmax(axis=1)])
        return cls(mean, vt[:k] * signs[:, None])

    def apply(self, cube: np.ndarray) -> np.ndarray:
        """(..., bands) -> (..., k) float32."""
        return ((np.asarray(cube, dtype=np.float64) - self.mean) @ self.components.T).astype(np.float32)


def standardize(cube: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Per-band (x - mean) / std over the last axis, float32."""
    return ((np.asarray(cube, dtype=np.float32) - mean) / np.maximum(std, 1e-12)).astype(np.float32)
