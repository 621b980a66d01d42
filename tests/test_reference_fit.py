"""Fit quality against a SciPy implementation of the reference two-stage fit, on every
(model, ratio, set) fit of the shipped curves."""

import multiprocessing as mp

import numpy as np
import pytest

from baselines import rectified_reference as ref
from lensjax.selection.curves import load_embedded
from lensjax.selection.fit import fit_curves
from lensjax.selection.selectors import RATIOS, Protocol


def _problems():
    out = []
    for name in ("flan", "gigaword"):
        c = load_embedded(name)
        for r in RATIOS:
            cols = np.isin(c.sizes, np.concatenate([[0.0], Protocol(ratio=r).ladder(c.sizes)]))
            out += [(c.sizes[cols], c.loss[i, cols]) for i in range(len(c.models))]
    return out


def _ref_fit(args):
    return ref.fit_one(*args, repeats=1)  # the reference's 3 repeats are identical


def _check(probs):
    with mp.get_context("spawn").Pool(2) as pool:
        res = pool.map(_ref_fit, probs, chunksize=10)
    n, m = len(probs), max(len(p[0]) for p in probs)
    d = np.ones((n, m)); y = np.ones((n, m)); mask = np.zeros((n, m), bool)
    for i, (x, l) in enumerate(probs):
        d[i, : len(x)], y[i, : len(x)], mask[i, : len(x)] = x, l, True
    ours = fit_curves("rectified", d, y, mask)
    # Same objective for both: log-MSE with the zero-shot point at D = 0 exactly (L(0) = A).
    theirs = np.array([
        np.mean((np.log(np.where(x > 0, ref.predict(p, x), p[0])) - np.log(l)) ** 2) if np.isfinite(p[0]) else np.inf
        for (x, l), (p, _) in zip(probs, res)
    ])
    better = ours.objective <= theirs * (1 + 1e-9)
    assert better.mean() >= 0.95, better.mean()
    # And on the reference's own objective (zero-shot point at D = 1e-10), fitting that problem.
    ours_ref = fit_curves("rectified", np.where(d > 0, d, ref.ZERO), y, mask)
    own = np.array([l for _, l in res])
    assert (ours_ref.objective <= own * (1 + 1e-9)).mean() >= 0.95


@pytest.mark.slow
def test_ours_at_least_as_good_as_reference_on_every_third_fit():
    """.ci/run's share: every third of the 420 problems (140: both sets, every ratio, 10 of each
    set's 30 models per ratio, a different 10 from ratio to ratio), ≈ 40 s instead of 120 s on 2 cores."""
    probs = [p for i, p in enumerate(_problems()) if (i % 30 + i // 30) % 3 == 0]  # 30 models per (set, ratio)
    assert len(probs) == 140
    _check(probs)


@pytest.mark.slow
@pytest.mark.heavy  # all 420 SciPy reference fits: ≈ 120 s of 2 cores (2026-12-07 EPYC); the slow test runs a third
def test_ours_at_least_as_good_as_reference_on_95_percent():
    probs = _problems()
    assert len(probs) == 420
    _check(probs)
