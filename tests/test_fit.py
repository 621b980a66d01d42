"""Laws and the batched fitting kernel against NumPy/SciPy float64 references."""

import numpy as np
import pytest
from scipy.optimize import least_squares

from lensjax.selection.curves import load_embedded
from lensjax.selection.fit import fit_curves
from lensjax.selection.laws import LAWS, RECTIFIED, predict, rectified_reference_form
from lensjax.selection.selectors import RATIOS, Protocol

SIZES = np.array([0.0] + [200.0 * 2**k for k in range(14)])


def rectified_np(d, B, D_l, beta, E):
    return B / (D_l + np.where(d > 0, d, 0.0) ** beta) + E


def test_rectified_equals_reference_log_form():
    B, D_l, beta, E = 35.0, 12.0, 0.4, 0.9
    p = {"B": B, "D_l": D_l, "beta": beta, "E": E}
    ref = {k: float(v) for k, v in rectified_reference_form(p).items()}
    d = SIZES[1:]
    ref_form = (ref["A"] - ref["E"]) / (1 + np.exp(ref["b"]) * d ** ref["beta"]) + ref["E"]
    np.testing.assert_allclose(rectified_np(d, B, D_l, beta, E), ref_form, rtol=1e-12)
    assert ref["A"] == pytest.approx(rectified_np(np.array(0.0), B, D_l, beta, E))


def test_zero_shot_point_is_exact():
    theta = np.log(np.array([35.0, 12.0, 0.4, 0.9]))
    got = np.asarray(predict(RECTIFIED, theta.astype(np.float32), np.array([0.0, 200.0], np.float32)))
    np.testing.assert_allclose(got, rectified_np(np.array([0.0, 200.0]), 35.0, 12.0, 0.4, 0.9), rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_exact_rectified_curves(seed):
    rng = np.random.default_rng(seed)
    n = 16
    B = np.exp(rng.uniform(1, 5, n))
    D_l = np.exp(rng.uniform(0, 4, n))
    beta = rng.uniform(0.2, 0.8, n)
    E = rng.uniform(0.2, 1.0, n)
    loss = rectified_np(SIZES[None, :], B[:, None], D_l[:, None], beta[:, None], E[:, None])
    fit = fit_curves("rectified", np.broadcast_to(SIZES, loss.shape), loss)
    assert fit.converged.all()
    assert np.all(fit.objective < 1e-18)
    np.testing.assert_allclose(fit.predict(3.2e6), rectified_np(3.2e6, B, D_l, beta, E), rtol=1e-7)
    np.testing.assert_allclose(fit.params["beta"], beta, rtol=1e-5)


def test_vanilla_and_lensllm_recover_exact_curves():
    rng = np.random.default_rng(3)
    n, d = 8, SIZES[1:]
    alpha, B, beta, E = rng.uniform(0.5, 2, n), np.exp(rng.uniform(-3, 0, n)), rng.uniform(0.1, 0.6, n), rng.uniform(0.2, 1.0, n)
    loss = (1.0 / (B[:, None] * d[None] ** beta[:, None]) + E[:, None]) ** alpha[:, None]
    fit = fit_curves("vanilla", np.broadcast_to(d, loss.shape), loss)
    np.testing.assert_allclose(fit.predict(3.2e6), (1.0 / (B * 3.2e6**beta) + E) ** alpha, rtol=1e-6)
    # LensLLM with F per (curve, size) given, B, beta, E fitted.
    F = np.exp(rng.uniform(0, 3, (n, SIZES.size)))
    B2, beta2, E2 = np.exp(rng.uniform(1, 4, n)), rng.uniform(0.2, 0.8, n), rng.uniform(0.2, 1.0, n)
    loss2 = B2[:, None] / (F + SIZES[None] ** beta2[:, None]) + E2[:, None]
    fit2 = fit_curves("lensllm_fixed", np.broadcast_to(SIZES, loss2.shape), loss2, extra=np.log(F))
    assert np.all(fit2.objective < 1e-18)
    np.testing.assert_allclose(fit2.params["beta"], beta2, rtol=1e-5)
    # The scaled law D_l = s·F recovers s, also when F spans 300 orders of magnitude (log F given).
    s = np.exp(rng.uniform(-2, 2, n))
    log_f = np.log(F) - np.linspace(0, 700, SIZES.size)[None, :]
    loss3 = B2[:, None] / (s[:, None] * np.exp(log_f) + SIZES[None] ** beta2[:, None]) + E2[:, None]
    fit3 = fit_curves("lensllm", np.broadcast_to(SIZES, loss3.shape), loss3, extra=log_f, n_starts=16)
    assert np.all(fit3.objective < 1e-16), fit3.objective
    np.testing.assert_allclose(fit3.params["s"], s, rtol=1e-4)


@pytest.mark.slow
def test_masked_curves_equal_separate_fits():
    """Irregular and missing sizes in one batch give the same optimum as each curve alone."""
    curves = load_embedded("gigaword")
    rng = np.random.default_rng(0)
    mask = np.isfinite(curves.loss) & (rng.uniform(size=curves.loss.shape) > 0.3)
    mask[:, :6] = True
    d = np.broadcast_to(curves.sizes, mask.shape)
    batch = fit_curves("rectified", d, curves.loss, mask)
    for i in range(0, 30, 7):
        keep = mask[i]
        alone = fit_curves("rectified", curves.sizes[keep][None], curves.loss[i, keep][None])
        assert batch.objective[i] == pytest.approx(alone.objective[0], rel=1e-9)


def _sample_problems(k=12):
    out = []
    for name in ("flan", "gigaword"):
        c = load_embedded(name)
        for r in (8, 64, 512):
            lad = np.concatenate([[0.0], Protocol(ratio=r).ladder(c.sizes)])
            cols = np.isin(c.sizes, lad)
            for i in (0, 11, 23):
                out.append((c.sizes[cols], c.loss[i, cols]))
    return out[:k] if k else out


def test_matches_scipy_least_squares_at_optimum():
    probs = _sample_problems(12)
    m = max(len(p[0]) for p in probs)
    d = np.ones((len(probs), m)); y = np.ones((len(probs), m)); mask = np.zeros((len(probs), m), bool)
    for i, (x, l) in enumerate(probs):
        d[i, : len(x)], y[i, : len(x)], mask[i, : len(x)] = x, l, True
    fit = fit_curves("rectified", d, y, mask)
    assert fit.converged.all()
    for i, (x, l) in enumerate(probs):
        def resid(p):
            return (np.log(rectified_np(x, *p)) - np.log(l)) / np.sqrt(len(x))
        ours = np.array([fit.params[k][i] for k in ("B", "D_l", "beta", "E")])
        # SciPy from our optimum and from a generic start, in the natural (bounded) parameters.
        starts = [ours, np.array([10.0 * l[0], 10.0, 0.5, 0.5 * l.min()])]
        best = min((least_squares(resid, np.maximum(s, 1e-300), bounds=(0.0, np.inf), xtol=1e-15, ftol=1e-15, gtol=1e-15,
                                  max_nfev=20000) for s in starts), key=lambda r: 2 * r.cost)
        scipy_obj = 2 * best.cost
        assert fit.objective[i] <= scipy_obj * (1 + 1e-6) + 1e-300
        assert scipy_obj <= fit.objective[i] * (1 + 1e-6)
        np.testing.assert_allclose(np.sum(resid(ours) ** 2), fit.objective[i], rtol=1e-9)


def test_lbfgs_solver_reaches_similar_optima():
    c = load_embedded("flan")
    d = np.broadcast_to(c.sizes, c.loss.shape)
    lm = fit_curves("rectified", d[:6], c.loss[:6])
    lb = fit_curves("rectified", d[:6], c.loss[:6], solver="lbfgs", max_steps=1000)
    assert np.all(lb.objective <= lm.objective * 1.05)


def test_not_converged_is_reported():
    c = load_embedded("flan")
    fit = fit_curves("rectified", np.broadcast_to(c.sizes, c.loss.shape), c.loss, max_steps=2)
    assert not fit.converged.any()


def test_fit_input_errors():
    d = np.broadcast_to(SIZES, (2, SIZES.size))
    loss = np.ones_like(d) * 2.0
    with pytest.raises(ValueError, match="undefined at D = 0"):
        fit_curves("vanilla", d, loss)
    with pytest.raises(ValueError, match="needs its per-point term"):
        fit_curves("lensllm", d, loss)
    with pytest.raises(ValueError, match="fewer than 4 points"):
        fit_curves("rectified", d, loss, np.arange(SIZES.size)[None, :] < np.array([[15], [3]]))
    bad = loss.copy(); bad[0, 3] = np.nan
    with pytest.raises(ValueError, match="finite"):
        fit_curves("rectified", d, bad, np.ones_like(d, bool))
    assert set(LAWS) == {"rectified", "vanilla", "lensllm", "lensllm_fixed", "lensllm_tfit", "rectified_nofloor",
                         "lensllm_nofloor"}
    assert len(RATIOS) == 7
