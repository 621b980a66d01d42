"""SciPy baseline: the reference two-stage fit of the rectified law, one curve at a time.

Written here from the description of the algorithm in Lin et al.'s public code
(linhaowei1/Fine-tuning-Scaling-Law, ``src/fit_law.py``), to benchmark against and to compare fit
quality with; it is not part of the library. The algorithm:

* Work in log space with the log-space form ``log L = log((A − |E|) / (1 + e^b·D^β) + |E|)``;
  the zero-shot point enters as ``D = 1e-10``.
* Start from ``A = max L``, ``E = exp(mean(max log L, min log L))``, ``b = 0``, ``β = 1`` and one
  surrogate variable ``z_i = 1`` per point (``z_i²`` stands for ``e^b·D_i^β``).
* Stage 1: BFGS with finite-difference gradients (``scipy.optimize.minimize`` defaults) on
  ``mean((log(A + |E| z²) − log(1 + z²) − log L)²) + mean((log z² − β log D − b)²)`` over
  (A, b, β, E, z).
* Stage 2: fix b and β, BFGS again on the plain log-MSE over (A, E).
* The reference repeats this three times from the same deterministic start and keeps the best
  result with A > E; ``repeats`` keeps that cost (the repeats give identical results).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.optimize import minimize

ZERO = 1e-10


def log_form(log_d, a, b, beta, e):
    e = abs(e)
    return np.log((a - e) / (1.0 + np.exp(beta * log_d + b)) + e)


def fit_one(d, loss, repeats: int = 3):
    """Fit one curve. ``d`` may contain 0 (the zero-shot point). Returns ((A, b, β, E), log-MSE).

    Params are NaN if no repeat ends with A > E (where the reference would crash).
    """
    d = np.asarray(d, np.float64)
    log_d = np.log(np.where(d > 0, d, ZERO))
    log_y = np.log(np.asarray(loss, np.float64))
    hi, lo = log_y.max(), log_y.min()
    best, best_loss = None, np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(repeats):
            x0 = np.concatenate([[np.exp(hi), 0.0, 1.0, np.exp((hi + lo) / 2)], np.ones_like(log_d)])

            def stage1(v):
                a, b, beta, e = v[:4]
                z = v[4:] ** 2
                y_term = np.mean((np.log(a + abs(e) * z) - np.log(1.0 + z) - log_y) ** 2)
                x_term = np.mean((np.log(z) - beta * log_d - b) ** 2)
                return y_term + x_term

            v = minimize(stage1, x0).x
            b, beta = v[1], v[2]

            def stage2(ae):
                return np.mean((log_form(log_d, ae[0], b, beta, ae[1]) - log_y) ** 2)

            r = minimize(stage2, [v[0], v[3]])
            if r.fun < best_loss and r.x[0] > r.x[1]:
                best, best_loss = (r.x[0], b, beta, r.x[1]), r.fun
    if best is None:
        return (np.nan,) * 4, np.nan
    return best, float(best_loss)


def to_rectified(a, b, beta, e):
    """(A, b, β, E) of the log-space form → (B, D_l, β, E) of ``B/(D_l + D^β) + E``.

    Valid for β > 0 and A > |E|; otherwise returns NaNs.
    """
    e = abs(e)
    if not (beta > 0 and a > e):
        return (np.nan,) * 4
    d_l = np.exp(-b)
    return ((a - e) * d_l, d_l, beta, e)


def predict(params, d):
    a, b, beta, e = params
    d = np.asarray(d, np.float64)
    return np.exp(log_form(np.log(np.where(d > 0, d, ZERO)), a, b, beta, e))
