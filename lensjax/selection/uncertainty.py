"""Prediction intervals and selection probabilities by a residual bootstrap, batched.

:func:`bootstrap_rows` serves every predictor of :mod:`.predictors`. Each row (a curve under one
budget) is smoothed by a law (the method's own law, or the no-floor rectified law for AtS and the
local power law), its log-residuals are resampled (with replacement, inflated by
sqrt(m/(m − p))) onto the smooth curve, and the *whole method* is rerun on all K × B replicate
rows in one batched call (joint laws tie the candidates of each replicate, never across
replicates). The replicate predictions are re-centred on the method's own prediction (in log
space: the bootstrap supplies the spread, not the centre, which for a local method differs from
the smoother's). Noise in the measured points is then the only error the draws know; the error of
the law itself, which dominates far extrapolation, is added as a log-normal term of s.d.
``model_error · scale``. The scale is, for the ``ensemble`` method, the root-mean-square
disagreement (in log loss) between its short- and long-range predictions over the candidates of
the budget (in-budget data only: where two sensible extrapolations disagree, the truth is
uncertain), and for every other method the extrapolation distance ``ln(target / budget)``. Both
coefficients are calibrated on the shipped curves by ``scripts/choose_default_method.py``.

The older :func:`residual_bootstrap` bootstraps one law fit alone, without the model-error term.

For a law fitted to N curves, replicate b of curve n keeps the fitted curve and adds residuals
resampled (with replacement) from that curve's own log-residuals, inflated by sqrt(m/(m − p)) for
m points and p parameters (fitted residuals are smaller than the noise). All N × B refits run in
one batched kernel call, started at the original fit. From the replicate predictions at the target:

* ``interval[n]`` — the (α/2, 1 − α/2) percentiles;
* ``p_best[n]`` — fraction of replicates in which candidate n has the lowest predicted loss (the
  replicates of all candidates are drawn jointly, so these sum to 1);
* ``p_within[n]`` — fraction in which candidate n is within ε of that replicate's best.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from lensjax.kernels import lsq
from lensjax.selection.fit import CurveFit, fit_curves
from lensjax.selection.laws import LAWS


@dataclasses.dataclass
class Bootstrap:
    draws: np.ndarray  # [N, B] predicted loss at the target per replicate
    level: float
    parts: "RowBootstrap | None" = None  # the noise draws and model-error normals behind ``draws``

    def with_model_error(self, model_error: float, corr: float = 0.0) -> "Bootstrap":
        """The same replicates with another model-error coefficient (needs ``parts``)."""
        if self.parts is None:
            raise ValueError("this bootstrap has no parts to recombine")
        return Bootstrap(draws=self.parts.draws(model_error, corr), level=self.level, parts=self.parts)

    def interval(self, level: float | None = None) -> np.ndarray:
        a = 1.0 - (self.level if level is None else level)
        return np.quantile(self.draws, [a / 2, 1 - a / 2], axis=1).T  # [N, 2]

    def p_best(self) -> np.ndarray:
        winners = np.argmin(self.draws, axis=0)
        return np.bincount(winners, minlength=self.draws.shape[0]) / self.draws.shape[1]

    def p_within(self, eps: float) -> np.ndarray:
        return np.mean(self.draws <= self.draws.min(axis=0, keepdims=True) + eps, axis=1)


def residual_bootstrap(fit: CurveFit, d, loss, mask, target_size: float, *, extra=None, extra_target=None,
                       n_boot: int = 200, seed: int = 0, level: float = 0.95, max_steps: int = 200) -> Bootstrap:
    """Bootstrap the fits of ``fit`` (made on ``d``, ``loss``, ``mask`` [N, M]) and predict at the target."""
    d = np.asarray(d, np.float64)
    mask = np.asarray(mask, bool)
    n, m = d.shape
    law = fit.law
    extra = np.zeros_like(d) if extra is None else np.broadcast_to(np.asarray(extra, np.float64), d.shape)
    with jax.enable_x64(True):
        logy = np.log(np.where(mask, loss, 1.0))
        pred = np.log(fit.predict(d, extra if law.uses_extra else None))
        resid = np.where(mask, logy - pred, 0.0)
        cnt = mask.sum(axis=1)
        resid *= np.sqrt(cnt / np.maximum(cnt - law.n_params, 1))[:, None]
        rng = np.random.default_rng(seed)
        # For each replicate and point, the index of a resampled valid point of the same curve.
        valid_idx = [np.flatnonzero(mask[i]) for i in range(n)]
        pick = np.stack([vi[rng.integers(0, len(vi), size=(n_boot, m))] for vi in valid_idx])  # [N, B, M]
        e = np.take_along_axis(np.broadcast_to(resid[:, None, :], (n, n_boot, m)), pick, axis=2)
        y_star = (pred[:, None, :] + e).reshape(n * n_boot, m)
        rep = lambda a: np.repeat(a, n_boot, axis=0)  # noqa: E731
        theta0 = rep(fit.theta)[:, None, :]
        res = lsq.fit(law.log_predict, theta0, rep(d), y_star, rep(mask), rep(extra), max_steps=max_steps,
                      screen_steps=0)
        theta = np.asarray(res.params).reshape(n, n_boot, -1)
        et = np.zeros((n, n_boot, 1)) if extra_target is None else np.broadcast_to(
            np.asarray(extra_target, np.float64).reshape(n, 1, 1), (n, n_boot, 1))
        dt = np.full((n, n_boot, 1), float(target_size))
        draws = np.exp(np.asarray(jax.vmap(jax.vmap(law.log_predict))(theta, dt, et)))[..., 0]
    return Bootstrap(draws=draws, level=level)


@dataclasses.dataclass
class RowBootstrap:
    """Replicate predictions of K rows: ``log_noise`` [K, B] (re-centred log draws); standard
    normal draws for the model-error term, ``z`` [K, B] per row and ``z_common`` [K, B] shared by
    the rows of one group (the candidates of one budget); ``scale`` [K], the model-error s.d. per
    unit coefficient (see the module docstring)."""

    log_noise: np.ndarray
    z: np.ndarray
    z_common: np.ndarray
    scale: np.ndarray
    n_failed: int = 0  # replicate fits that gave no finite prediction (replaced by the point prediction)

    def draws(self, model_error: float, corr: float = 0.0) -> np.ndarray:
        """[K, B] loss draws with a model error of s.d. ``model_error · scale`` of which
        the fraction ``corr`` of the variance is common to all candidates of a budget (a law that
        errs on a task tends to err the same way for every model: that part moves all predictions
        together and leaves the ranking alone)."""
        if not 0.0 <= corr <= 1.0:
            raise ValueError(f"corr must be in [0, 1]; got {corr}")
        z = np.sqrt(corr) * self.z_common + np.sqrt(1.0 - corr) * self.z
        return np.exp(self.log_noise + model_error * self.scale[:, None] * z)

    def rows(self, sl: slice) -> "RowBootstrap":
        return RowBootstrap(self.log_noise[sl], self.z[sl], self.z_common[sl], self.scale[sl], self.n_failed)


def bootstrap_rows(method: str, sizes, loss, budget, target: float, *, base: float, st, point, group=None,
                   extra=None, extra_target=None, n_boot: int = 200, seed: int = 0, mesh=None,
                   scale=None) -> RowBootstrap:
    """Residual-bootstrap ``method`` on K rows (see the module docstring); ``point`` is the
    :class:`~lensjax.selection.predictors.RowPrediction` of the method on the measured rows;
    ``scale`` [K]: the model-error unit (default :func:`model_error_scale`)."""
    from lensjax.selection import predictors as P

    sizes = np.asarray(sizes, np.float64)
    loss = np.asarray(loss, np.float64)
    budget = np.asarray(budget, np.float64)
    k_rows, m = loss.shape
    if n_boot < 2:
        raise ValueError(f"n_boot must be >= 2; got {n_boot}")
    if group is None:
        group = np.unique(budget, return_inverse=True)[1]
    law_name = P.law_of(method, st) or "rectified_nofloor"
    law = LAWS[law_name]
    mask = P.fit_mask(law_name, sizes, loss, budget, base)
    d = np.broadcast_to(sizes, loss.shape)
    ex = None if extra is None else np.broadcast_to(np.asarray(extra, np.float64), loss.shape)
    smooth = point.fit if point.fit is not None and point.fit.law.name == law_name else None
    if smooth is None:
        few = np.flatnonzero(mask.sum(axis=1) < law.n_params)
        if few.size:
            raise ValueError(f"intervals smooth each curve with the {law_name} law, which needs {law.n_params} "
                             f"points; rows {few.tolist()} have fewer (use n_boot=0 for no intervals)")
        smooth = fit_curves(law_name, d, loss, mask, ex, n_starts=st.n_starts, seed=st.seed, solver=st.solver,
                            max_steps=st.max_steps, mesh=mesh)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_hat = np.log(smooth.predict(d, ex))
        resid = np.where(mask, np.log(np.where(mask, loss, 1.0)) - log_hat, 0.0)
    cnt = mask.sum(axis=1)
    resid *= np.sqrt(cnt / np.maximum(cnt - law.n_params, 1))[:, None]
    rng = np.random.default_rng(seed)
    # Index of a resampled valid point of the same row, for every (row, replicate, point).
    order = np.argsort(~mask, axis=1, kind="stable")  # valid points first
    u = rng.random((k_rows, n_boot, m))
    pick = np.take_along_axis(order[:, None, :].repeat(n_boot, 1),
                              np.floor(u * np.maximum(cnt, 1)[:, None, None]).astype(int), axis=2)
    e = np.take_along_axis(np.broadcast_to(resid[:, None, :], (k_rows, n_boot, m)), pick, axis=2)
    y_star = np.where(mask[:, None, :], np.exp(log_hat[:, None, :] + e), np.nan).reshape(k_rows * n_boot, m)
    rep = lambda a: None if a is None else np.repeat(np.asarray(a), n_boot, axis=0)  # noqa: E731
    groups = (np.asarray(group)[:, None] * n_boot + np.arange(n_boot)[None, :]).reshape(-1)
    theta0 = None if point.fit is None else rep(point.fit.theta)
    rp = P.predict_rows(method, sizes, y_star, rep(budget), target, base=base, st=st, group=groups,
                        extra=rep(ex), extra_target=rep(extra_target), theta0=theta0, mesh=mesh)
    with np.errstate(divide="ignore", invalid="ignore"):
        logd = np.log(rp.pred.reshape(k_rows, n_boot))
    bad = ~np.isfinite(logd)
    logd = np.where(bad, np.nan, logd)
    logd += (np.log(point.pred) - np.nanmedian(logd, axis=1))[:, None]
    # A failed replicate (no finite prediction) is replaced by the point prediction: rare, counted.
    logd = np.where(bad, np.log(point.pred)[:, None], logd)
    z = rng.standard_normal((k_rows, n_boot))
    gid = np.unique(np.asarray(group), return_inverse=True)[1]
    z_common = rng.standard_normal((int(gid.max()) + 1, n_boot))[gid]
    if scale is None:
        scale = model_error_scale(method, point, budget, target, group)
    return RowBootstrap(log_noise=logd, z=z, z_common=z_common, scale=np.asarray(scale, np.float64),
                        n_failed=int(bad.sum()))


def model_error_scale(method: str, point, budget, target: float, group) -> np.ndarray:
    """[K] model-error s.d. per unit coefficient: for ``ensemble`` the RMS over each group's rows of
    the short/long disagreement, otherwise ln(target / budget)."""
    if method == "ensemble" and point.disagreement is not None:
        gid = np.unique(np.asarray(group), return_inverse=True)[1]
        ms = np.bincount(gid, weights=point.disagreement ** 2) / np.bincount(gid)
        return np.sqrt(ms)[gid]
    return np.log(target / np.asarray(budget, np.float64))
