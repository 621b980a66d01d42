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
* **LensLLM** (Zeng et al., ICML 2025): ``L(D) = B / (D_l(D) + D^β) + E`` with the pre-learned
  data size tied to the NTK term ``F = F(Θ, t)`` (given, as ``log F``, per curve or per point):
  ``lensllm`` has ``D_l = s·F`` with a scale s (the joint fit ties it across candidates, so F
  carries information between them and a common rescaling of F changes nothing);
  ``lensllm_fixed`` has ``D_l = F`` as it is; ``lensllm_tfit`` has ``D_l = F(t)`` with t fitted per
  curve, i.e. ``D_l = F(0)·e^(−q)`` bounded by F(0), the reference's prediction mode.

A law also supplies seeded, data-driven starting points: for sampled (β, E) the remaining
parameters follow from a weighted linear regression (``1/(L − E)`` is linear in ``D^β`` (and F) for the
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
    uses_extra: bool  # does it read a per-point side input (the LensLLM log F)?

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


# ------------------------------------------------------------------------- LensLLM (F given)
# The side input of every LensLLM law is log F, per point: F spans hundreds of orders of magnitude
# once t(D) is large (F = Σ_k exp(−2ηλ_k t)(u_kᵀr₀)²), so it is carried in log space and never
# underflows; log F = −inf (F = 0) is allowed at D > 0.
def _lensllm_scaled_log_predict(theta, d, log_f):
    """B/(s·F + D^β) + E: D_l = s·F with the scale s fitted (tied across candidates by the joint fit)."""
    b, s, c, e = theta[0], theta[1], theta[2], theta[3]
    log_denom = jnp.logaddexp(s + log_f, _log_d_pow(jnp.exp(c), d))
    return jnp.logaddexp(b - log_denom, e)


def _two_regressor(x1, x2, z, w):
    """Weighted least squares z ≈ a·x1 + b·x2 through the origin (2×2 normal equations)."""
    s11, s12, s22 = jnp.sum(w * x1 * x1), jnp.sum(w * x1 * x2), jnp.sum(w * x2 * x2)
    r1, r2 = jnp.sum(w * x1 * z), jnp.sum(w * x2 * z)
    det = s11 * s22 - s12 * s12
    ok = det > 1e-12 * jnp.maximum(s11 * s22, 1e-300)
    a = jnp.where(ok, (r1 * s22 - r2 * s12) / jnp.where(ok, det, 1.0), 0.0)
    b = jnp.where(ok, (r2 * s11 - r1 * s12) / jnp.where(ok, det, 1.0), 0.0)
    return a, b


def _lensllm_scaled_init(key, d, logl, mask, log_f, n_starts):
    w = mask.astype(logl.dtype)
    beta, e = _sample_beta_e(key, logl, w, n_starts, 0.1, 1.5)
    # Regress on F / F_ref with F_ref the largest F of the curve, so the starts are exactly
    # equivariant under a common rescaling of F (s moves by the inverse factor, nothing else).
    ref = jnp.max(jnp.where(w > 0, log_f, -jnp.inf))
    ref = jnp.where(jnp.isfinite(ref), ref, 0.0)
    f_rel = jnp.exp(jnp.where(w > 0, log_f, -jnp.inf) - ref)

    def one(beta_s, e_s):
        d_pow = jnp.where(d > 0, jnp.exp(beta_s * _safe_log(d)), 0.0)
        z = 1.0 / jnp.maximum(jnp.exp(logl) - e_s, 1e-12)
        # 1/(L − E) = (s·F + D^β)/B = a·F_rel + b·D^β with b = 1/B and a = s·F_ref/B.
        a, b = _two_regressor(f_rel, d_pow, z, w)
        b_fb = jnp.sum(w * d_pow * z) / jnp.maximum(jnp.sum(w * d_pow * d_pow), 1e-30)
        b = jnp.where(b > 0, b, jnp.where(b_fb > 0, b_fb, 1.0))
        dpm = jnp.sum(w * d_pow) / jnp.maximum(jnp.sum(w), 1.0)
        a = jnp.where(a > 0, a, 1e-2 * b * jnp.maximum(dpm, 1e-6))
        log_s = jnp.log(a / b) - ref
        return jnp.stack([-jnp.log(b), log_s, jnp.log(beta_s), jnp.log(e_s)])

    return jax.vmap(one)(beta, e)


LENSLLM = Law(
    name="lensllm",
    param_names=("B", "s", "beta", "E"),
    log_predict=_lensllm_scaled_log_predict,
    init=_lensllm_scaled_init,
    allows_zero=True,
    uses_extra=True,
)


def _lensllm_fixed_log_predict(theta, d, log_f):
    """B/(F + D^β) + E with F given as it is (no scale)."""
    b, c, e = theta[0], theta[1], theta[2]
    log_denom = jnp.logaddexp(log_f, _log_d_pow(jnp.exp(c), d))  # log(F + D^β)
    return jnp.logaddexp(b - log_denom, e)


def _lensllm_fixed_init(key, d, logl, mask, log_f, n_starts):
    w = mask.astype(logl.dtype)
    beta, e = _sample_beta_e(key, logl, w, n_starts, 0.1, 1.5)
    f = jnp.exp(jnp.where(w > 0, log_f, -jnp.inf))

    def one(beta_s, e_s):
        x = jnp.where(d > 0, jnp.exp(beta_s * _safe_log(d)), 0.0) + f
        z = 1.0 / jnp.maximum(jnp.exp(logl) - e_s, 1e-12)
        # 1/(L-E) = (F + D^β)/B: least squares through the origin for 1/B.
        inv_b = jnp.sum(w * x * z) / jnp.maximum(jnp.sum(w * x * x), 1e-30)
        inv_b = jnp.where(inv_b > 0, inv_b, 1.0)
        return jnp.stack([-jnp.log(inv_b), jnp.log(beta_s), jnp.log(e_s)])

    return jax.vmap(one)(beta, e)


LENSLLM_FIXED = Law(
    name="lensllm_fixed",
    param_names=("B", "beta", "E"),
    log_predict=_lensllm_fixed_log_predict,
    init=_lensllm_fixed_init,
    allows_zero=True,
    uses_extra=True,
)


def _lensllm_tfit_log_predict(theta, d, log_f0):
    """B/(F(t) + D^β) + E with t fitted: F(t) runs monotonically from F(0) down, so D_l = F(t) is
    parameterised as D_l = F(0)·exp(−q), q > 0 (q = 2ηλt for a single eigen-mode): D_l < F(0)."""
    b, q, c, e = theta[0], theta[1], theta[2], theta[3]
    log_denom = jnp.logaddexp(log_f0 - jnp.exp(q), _log_d_pow(jnp.exp(c), d))
    return jnp.logaddexp(b - log_denom, e)


def _lensllm_tfit_init(key, d, logl, mask, log_f0, n_starts):
    th = _rectified_init(key, d, logl, mask, None, n_starts)  # (B, D_l, β, E)
    lf0 = jnp.max(jnp.where(mask, log_f0, -jnp.inf))
    # D_l from the rectified start, pushed below F(0): q = log F(0) − log D_l (at least 1e-2).
    q = jnp.maximum(lf0 - th[:, 1], 1e-2)
    return th.at[:, 1].set(jnp.log(q))


LENSLLM_TFIT = Law(
    name="lensllm_tfit",
    param_names=("B", "q", "beta", "E"),
    log_predict=_lensllm_tfit_log_predict,
    init=_lensllm_tfit_init,
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


def _lensllm_nofloor_log_predict(theta, d, log_f):
    b, s, c = theta[0], theta[1], theta[2]
    return b - jnp.logaddexp(s + log_f, _log_d_pow(jnp.exp(c), d))


def _lensllm_nofloor_init(key, d, logl, mask, log_f, n_starts):
    return _lensllm_scaled_init(key, d, logl, mask, log_f, n_starts)[:, :3]


LENSLLM_NOFLOOR = Law(
    name="lensllm_nofloor",
    param_names=("B", "s", "beta"),
    log_predict=_lensllm_nofloor_log_predict,
    init=_lensllm_nofloor_init,
    allows_zero=True,
    uses_extra=True,
)

LAWS = {law.name: law for law in (RECTIFIED, VANILLA, LENSLLM, LENSLLM_FIXED, LENSLLM_TFIT, RECTIFIED_NOFLOOR,
                                  LENSLLM_NOFLOOR)}


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
