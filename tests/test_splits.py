"""Splits: reproducible, disjoint, the protocols' counts, on real ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from hsiedge.io import read_labels
from hsiedge.splits import make_split, parse_protocol


@pytest.fixture(scope="module")
def indian_pines(datasets) -> np.ndarray:
    return read_labels(datasets / "indian_pines" / "Indian_pines_gt.mat").labels


def test_per_class_30(indian_pines):
    s = make_split(indian_pines, "per-class:30", seed=0)
    flat = indian_pines.ravel()
    assert np.intersect1d(s.train, s.val).size == np.intersect1d(s.train, s.test).size == 0
    assert np.intersect1d(s.val, s.test).size == 0
    assert np.array_equal(np.sort(np.concatenate([s.train, s.val, s.test])), np.flatnonzero(flat > 0))
    for c in range(1, 17):
        n = int((flat == c).sum())
        n_train, n_val = int((flat[s.train] == c).sum()), int((flat[s.val] == c).sum())
        if n > 30:  # 30 train / 10 val
            assert (n_train, n_val) == (30, 10), c
        else:  # Alfalfa 46 is large; Oats (20) and Grass-pasture-mowed (28) get 15 train
            assert n_train == 15 and n_val == (n - 15) // 2, c


def test_ratio(indian_pines):
    s = make_split(indian_pines, "ratio:0.05", seed=3)
    flat = indian_pines.ravel()
    for c in (2, 9, 11):
        n = int((flat == c).sum())
        assert int((flat[s.train] == c).sum()) == max(1, round(0.05 * n))


def test_reproducible_and_seeded(indian_pines):
    a, b, c = (make_split(indian_pines, "per-class:30", s) for s in (7, 7, 8))
    assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("train", "val", "test"))
    assert not np.array_equal(a.train, c.train)


@pytest.mark.parametrize("bad", ["per-class", "per-class:1", "ratio:0.7", "ratio:x", "random:3"])
def test_bad_protocols(bad):
    with pytest.raises(ValueError, match="protocol must be"):
        parse_protocol(bad)
