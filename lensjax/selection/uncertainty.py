"""Prediction intervals and selection probabilities by a residual bootstrap, batched.

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
from lensjax.selection.fit import CurveFit


@dataclasses.dataclass
class Bootstrap:
    draws: np.ndarray  # [N, B] predicted loss at the target per replicate
    level: float

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
