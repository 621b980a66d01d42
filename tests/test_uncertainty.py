"""Residual bootstrap of batched fits (groundwork for intervals and P(best))."""

import numpy as np
import pytest

from lensjax.selection.fit import fit_curves
from lensjax.selection.uncertainty import residual_bootstrap


@pytest.mark.slow
def test_bootstrap_coverage_on_curves_from_a_known_law():
    rng = np.random.default_rng(0)
    n = 120
    sizes = np.array([0.0] + [200.0 * 2**k for k in range(8)])
    B, Dl = np.exp(rng.uniform(1, 4, n)), np.exp(rng.uniform(0, 3, n))
    beta, E = rng.uniform(0.2, 0.6, n), rng.uniform(0.3, 1.0, n)

    def law(d):
        return B[:, None] / (Dl[:, None] + np.where(d > 0, d, 0) ** beta[:, None]) + E[:, None]

    loss = law(sizes[None]) * np.exp(0.01 * rng.normal(size=(n, sizes.size)))
    d, mask = np.broadcast_to(sizes, loss.shape), np.ones(loss.shape, bool)
    fit = fit_curves("rectified", d, loss, mask)
    bs = residual_bootstrap(fit, d, loss, mask, 1_638_400.0, n_boot=100, seed=1)
    true = law(np.array([[1_638_400.0]]))[:, 0]
    cover = {lv: np.mean((true >= bs.interval(lv)[:, 0]) & (true <= bs.interval(lv)[:, 1])) for lv in (0.8, 0.95)}
    print(cover)
    # Measured 0.72 / 0.87 here: a residual bootstrap under-covers a far extrapolation somewhat.
    assert 0.6 <= cover[0.8] <= 0.95 and 0.75 <= cover[0.95] <= 1.0, cover
    p = bs.p_best()
    assert p.shape == (n,) and abs(p.sum() - 1) < 1e-12
    assert np.all(bs.p_within(0.05) >= p)
