"""Fine-tuning scaling laws as pure functions of unconstrained parameters.

All laws predict ``log L`` (the fit's objective is the mean squared error in log loss, as in the
reference code) and keep every parameter positive by re-parameterisation ``p = exp(theta)``;
nothing is clipped.

* **vanilla** (Kaplan-style, as in Lin et al. 2024): ``L(D) = (1 / (B·D^β) + E)^α``; undefined at
  D = 0, so it is fitted on D > 0 only.
* **rectified** (Lin et al., ICML 2024, eq. 3): ``L(D) = B / (D_l + D^β) + E``. ``D_l`` is the
  "pre-learned data size". At D = 0, ``D^β`` is exactly 0 and ``L(0) = B/D_l + E``. The reference
  code fits the equivalent log-space form ``L = (A − E) / (1 + exp(b)·D^β) + E`` with the
  zero-shot point at D = 1e-10; the two are the same law with ``A = L(0) = B/D_l + E``,
  ``b = −log D_l`` and ``A − E = B/D_l`` (see :func:`rectified_reference_form`).
* **lensllm** (Zeng et al., ICML 2025): ``L(D) = B / (F + D^β) + E`` where ``F = F(Θ, t)`` is an
  NTK-based term given per curve or per (curve, size), not fitted. With F fitted as a free
  constant it is the rectified law.

A law also supplies seeded, data-driven starting points: for sampled (β, E) the remaining
parameters follow from a weighted linear regression (``1/(L − E)`` is linear in ``D^β`` for the
rectified and LensLLM laws), which puts every start near the right basin.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Law:
    """A law: names, a log-prediction function, and a starting-point sampler.

    ``log_predict(theta [P], D [M], extra [M]) -> log L [M]``;
    ``init(key, D [M], logL [M], mask [M], extra [M], n_starts) -> theta [S, P]``.
    """

    name: str
    param_names: tuple[str, ...]
    log_predict: Callable[[Array, Array, Array], Array]
    init: Callable[..., Array]
    allows_zero: bool  # may D = 0 (the zero-shot point) be fitted?
    uses_extra: bool  # does it read a per-point side input (the LensLLM F)?

    @property
    def n_params(self) -> int:
        return len(self.param_names)

    def natural(self, theta) -> dict[str, Array]:
        """Positive parameters by name, from unconstrained ``theta [..., P]``."""
        theta = jnp.asarray(theta)
        return {n: jnp.exp(theta[..., i]) for i, n in enumerate(self.param_names)}


def _safe_log(x):
    return jnp.log(jnp.where(x > 0, x, 1.0))


def _log_d_pow(beta, d):
    """log(D^β), −inf at D = 0 exactly (with a finite gradient)."""
    return jnp.where(d > 0, beta * _safe_log(d), -jnp.inf)


# ---------------------------------------------------------------- rectified: B, D_l, beta, E
def _rectified_log_predict(theta, d, extra):
    del extra
    b, dl, c, e = theta[0], theta[1], theta[2], theta[3]
    log_denom = jnp.logaddexp(dl, _log_d_pow(jnp.exp(c), d))  # log(D_l + D^β)
    return jnp.logaddexp(b - log_denom, e)


def _wmean(v, w):
    return jnp.sum(w * v) / jnp.maximum(jnp.sum(w), 1e-30)


def _sample_beta_e(key, logl, w, n_starts, beta_lo, beta_hi):
    """(β, E) starts: start 0 is (sqrt(lo·hi), half the smallest loss); the rest random."""
    kb, ke = jax.random.split(key)
    lmin = jnp.exp(jnp.min(jnp.where(w > 0, logl, jnp.inf)))
    u_b = jax.random.uniform(kb, (n_starts,), dtype=logl.dtype).at[0].set(0.5)
    u_e = jax.random.uniform(ke, (n_starts,), dtype=logl.dtype).at[0].set(0.5)
    beta = jnp.exp(jnp.log(beta_lo) + u_b * (jnp.log(beta_hi) - jnp.log(beta_lo)))
    e = jnp.maximum(0.95 * u_e * lmin, 1e-6 * lmin)
    return beta, e


def _inverse_gap_regression(d_pow, logl, w, e, offset):
    """Weighted fit of 1/(L − E) = (offset + c0) · s + s·D^β; returns (s, c0 = intercept/s)."""
    z = 1.0 / jnp.maximum(jnp.exp(logl) - e, 1e-12)
    xm, zm = _wmean(d_pow + offset, w), _wmean(z, w)
    cov = _wmean((d_pow + offset - xm) * (z - zm), w)
    var = _wmean((d_pow + offset - xm) ** 2, w)
    slope = jnp.where(var > 0, cov / jnp.maximum(var, 1e-30), zm / jnp.maximum(xm, 1e-30))
    slope = jnp.where(slope > 0, slope, zm / jnp.maximum(xm, 1e-30))
    intercept = zm - slope * xm
    return slope, intercept


def _rectified_init(key, d, logl, mask, extra, n_starts):
    del extra
    w = mask.astype(logl.dtype)
    beta, e = _sample_beta_e(key, logl, w, n_starts, 0.1, 1.5)

    def one(beta_s, e_s):
        d_pow = jnp.where(d > 0, jnp.exp(beta_s * _safe_log(d)), 0.0)
        slope, intercept = _inverse_gap_regression(d_pow, logl, w, e_s, 0.0)
        # 1/(L-E) = D_l/B + D^β/B: slope = 1/B, intercept = D_l/B.
        big_b = 1.0 / slope
        d_l = jnp.maximum(intercept, 1e-3 * slope) / slope
        return jnp.stack([jnp.log(big_b), jnp.log(d_l), jnp.log(beta_s), jnp.log(e_s)])

    return jax.vmap(one)(beta, e)


RECTIFIED = Law(
    name="rectified",
    param_names=("B", "D_l", "beta", "E"),
    log_predict=_rectified_log_predict,
    init=_rectified_init,
    allows_zero=True,
    uses_extra=False,
)


# ---------------------------------------------------------------- vanilla: alpha, B, beta, E
def _vanilla_log_predict(theta, d, extra):
    del extra
    a, b, c, e = theta[0], theta[1], theta[2], theta[3]
    # log L = α · log(1/(B D^β) + E) = α · logaddexp(−b − β log D, e)
    return jnp.exp(a) * jnp.logaddexp(-b - jnp.exp(c) * _safe_log(d), e)


def _vanilla_init(key, d, logl, mask, extra, n_starts):
    del extra
    w = mask.astype(logl.dtype)
    ka, kb = jax.random.split(key)
    u_a = jax.random.uniform(ka, (n_starts,), dtype=logl.dtype).at[0].set(0.5)
    alpha = jnp.exp(jnp.log(0.2) + u_a * (jnp.log(3.0) - jnp.log(0.2)))
    beta, frac = _sample_beta_e(kb, logl, w, n_starts, 0.02, 1.0)
    lmin = jnp.exp(jnp.min(jnp.where(w > 0, logl, jnp.inf)))

    def one(alpha_s, beta_s, frac_s):
        # L^(1/α) = 1/(B D^β) + E: take E below the smallest L^(1/α), then B from the mean gap.
        l_pow = jnp.exp(logl / alpha_s)
        e_s = (frac_s / lmin) * jnp.min(jnp.where(w > 0, l_pow, jnp.inf))
        gap = jnp.maximum(l_pow - e_s, 1e-12)
        minus_b = _wmean(jnp.log(gap) + beta_s * _safe_log(d), w)
        return jnp.stack([jnp.log(alpha_s), -minus_b, jnp.log(beta_s), jnp.log(e_s)])

    return jax.vmap(one)(alpha, beta, frac)


VANILLA = Law(
    name="vanilla",
    param_names=("alpha", "B", "beta", "E"),
    log_predict=_vanilla_log_predict,
    init=_vanilla_init,
    allows_zero=False,
    uses_extra=False,
)


# ---------------------------------------------------------------- LensLLM: B, beta, E (F given)
def _lensllm_log_predict(theta, d, f):
    b, c, e = theta[0], theta[1], theta[2]
    log_f = jnp.where(f > 0, _safe_log(f), -jnp.inf)
    log_denom = jnp.logaddexp(log_f, _log_d_pow(jnp.exp(c), d))  # log(F + D^β)
    return jnp.logaddexp(b - log_denom, e)


def _lensllm_init(key, d, logl, mask, f, n_starts):
    w = mask.astype(logl.dtype)
    beta, e = _sample_beta_e(key, logl, w, n_starts, 0.1, 1.5)

    def one(beta_s, e_s):
        x = jnp.where(d > 0, jnp.exp(beta_s * _safe_log(d)), 0.0) + f
        z = 1.0 / jnp.maximum(jnp.exp(logl) - e_s, 1e-12)
        # 1/(L-E) = (F + D^β)/B: least squares through the origin for 1/B.
        inv_b = jnp.sum(w * x * z) / jnp.maximum(jnp.sum(w * x * x), 1e-30)
        inv_b = jnp.where(inv_b > 0, inv_b, 1.0)
        return jnp.stack([-jnp.log(inv_b), jnp.log(beta_s), jnp.log(e_s)])

    return jax.vmap(one)(beta, e)


LENSLLM = Law(
    name="lensllm",
    param_names=("B", "beta", "E"),
    log_predict=_lensllm_log_predict,
    init=_lensllm_init,
    allows_zero=True,
    uses_extra=True,
)

# ------------------------------------------------------------ no-floor variants (E = 0 exactly)
# A floor E > 0 fitted on a short ladder tends to flatten the extrapolation, while the shipped
# curves keep steepening in log–log up to the target. Without the floor, B/(D_l + D^β) has a
# log–log slope that steepens from 0 towards −β as D^β outgrows D_l.
def _rectified_nofloor_log_predict(theta, d, extra):
    del extra
    b, dl, c = theta[0], theta[1], theta[2]
    return b - jnp.logaddexp(dl, _log_d_pow(jnp.exp(c), d))


def _rectified_nofloor_init(key, d, logl, mask, extra, n_starts):
    w = mask.astype(logl.dtype)
    beta, _ = _sample_beta_e(key, logl, w, n_starts, 0.02, 1.5)

    def one(beta_s):
        d_pow = jnp.where(d > 0, jnp.exp(beta_s * _safe_log(d)), 0.0)
        slope, intercept = _inverse_gap_regression(d_pow, logl, w, 0.0, 0.0)
        big_b = 1.0 / slope
        d_l = jnp.maximum(intercept, 1e-3 * slope) / slope
        return jnp.stack([jnp.log(big_b), jnp.log(d_l), jnp.log(beta_s)])

    return jax.vmap(one)(beta)


RECTIFIED_NOFLOOR = Law(
    name="rectified_nofloor",
    param_names=("B", "D_l", "beta"),
    log_predict=_rectified_nofloor_log_predict,
    init=_rectified_nofloor_init,
    allows_zero=True,
    uses_extra=False,
)


def _lensllm_nofloor_log_predict(theta, d, f):
    b, c = theta[0], theta[1]
    log_f = jnp.where(f > 0, _safe_log(f), -jnp.inf)
    return b - jnp.logaddexp(log_f, _log_d_pow(jnp.exp(c), d))


def _lensllm_nofloor_init(key, d, logl, mask, f, n_starts):
    return _lensllm_init(key, d, logl, mask, f, n_starts)[:, :2]


LENSLLM_NOFLOOR = Law(
    name="lensllm_nofloor",
    param_names=("B", "beta"),
    log_predict=_lensllm_nofloor_log_predict,
    init=_lensllm_nofloor_init,
    allows_zero=True,
    uses_extra=True,
)

LAWS = {law.name: law for law in (RECTIFIED, VANILLA, LENSLLM, RECTIFIED_NOFLOOR, LENSLLM_NOFLOOR)}


def rectified_reference_form(params: dict) -> dict:
    """The reference code's (A, b, β, E) of ``L = (A−E)/(1 + e^b D^β) + E`` from (B, D_l, β, E)."""
    return {
        "A": params["B"] / params["D_l"] + params["E"],
        "b": -np.log(params["D_l"]),
        "beta": params["beta"],
        "E": params["E"],
    }


def predict(law: Law, theta, d, extra=None):
    """Loss (not log) predicted by ``law`` at sizes ``d`` for parameters ``theta [..., P]``."""
    d = jnp.asarray(d, dtype=jnp.asarray(theta).dtype)
    extra = jnp.zeros_like(d) if extra is None else jnp.asarray(extra, d.dtype)
    fn = law.log_predict
    for _ in range(jnp.ndim(theta) - 1):
        fn = jax.vmap(fn, in_axes=(0, 0 if jnp.ndim(d) > 1 else None,
                                   0 if jnp.ndim(extra) > 1 else None))
    return jnp.exp(fn(theta, d, extra))
