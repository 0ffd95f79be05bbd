"""Parity's split of label flips into near-ties and confident pixels, against a plain loop."""

from __future__ import annotations

import numpy as np
import pytest

from hsiedge.parity import ERROR_BOUND_QUANTILE, compare, flip_figures


def _loop_counts(ref: np.ndarray, cand: np.ndarray) -> dict:
    """The definition, pixel by pixel in float64: bound = quantile of per-pixel max |error|."""
    errors = sorted(max(abs(float(c) - float(r)) for r, c in zip(rr, cc, strict=True))
                    for rr, cc in zip(ref, cand, strict=True))
    # numpy's default quantile: linear interpolation between order statistics
    pos = ERROR_BOUND_QUANTILE * (len(errors) - 1)
    lo = int(np.floor(pos))
    bound = errors[lo] + (errors[min(lo + 1, len(errors) - 1)] - errors[lo]) * (pos - lo)
    near = conf = n_conf = 0
    for rr, cc in zip(ref, cand, strict=True):
        order = sorted(range(len(rr)), key=lambda j: float(rr[j]))
        margin = float(rr[order[-1]]) - float(rr[order[-2]])
        flipped = int(np.argmax(rr)) != int(np.argmax(cc))
        if margin > 2 * bound:
            n_conf += 1
            conf += flipped
        else:
            near += flipped
    return {"bound": bound, "confident_pixels": n_conf, "near": near, "confident": conf}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flip_split_matches_the_definition(seed):
    rng = np.random.default_rng(seed)
    n, k = 3000, 7
    ref = rng.normal(size=(n, k)) * 3
    cand = ref + rng.normal(size=(n, k)) * 0.05  # usual errors: near-ties flip
    outliers = rng.choice(n, 10, replace=False)  # a few pixels get a large error: confident flips
    cand[outliers] = ref[outliers] + rng.normal(size=(10, k)) * 20
    ref, cand = ref.astype(np.float32), cand.astype(np.float32)
    got = flip_figures(ref.astype(np.float64), cand.astype(np.float64))
    want = _loop_counts(ref, cand)
    assert got["error_bound"] == pytest.approx(want["bound"], rel=1e-12)
    assert got["confident_pixels"] == want["confident_pixels"]
    assert got["flips_near_tie"] == want["near"]
    assert got["flips_confident"] == want["confident"]
    assert want["near"] > 0 and want["confident"] > 0  # the data exercises both kinds


def test_identical_logits_have_no_flips_and_compare_reports_them():
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(500, 4)).astype(np.float32)
    figures, _ = compare(ref, ref.copy(), None, {"min_agreement": 0.9999})
    assert figures["flips_confident"] == figures["flips_near_tie"] == 0
    assert figures["error_bound"] == 0.0
    # every pixel without an exact tie is confident when nothing differs
    assert figures["confident_pixels"] == int((np.diff(np.sort(ref, 1)[:, -2:], axis=1) > 0).sum())


def test_a_single_class_or_no_pixels_is_handled():
    assert flip_figures(np.zeros((0, 3)), np.zeros((0, 3)))["flips_confident"] == 0
    assert flip_figures(np.ones((5, 1)), np.ones((5, 1)))["confident_pixels"] == 5
