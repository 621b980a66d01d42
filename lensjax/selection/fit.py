"""Fit a law to many loss curves at once with the batched kernel of :mod:`lensjax.kernels.lsq`."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lensjax.kernels import lsq
from lensjax.selection.laws import LAWS, Law


@dataclasses.dataclass(frozen=True)
class CurveFit:
    """Result of fitting N curves (numpy arrays, float64)."""

    law: Law
    theta: np.ndarray  # [N, P] unconstrained
    params: dict[str, np.ndarray]  # name -> [N] positive
    objective: np.ndarray  # [N] weighted mean squared error in log L
    converged: np.ndarray  # [N] bool
    steps: np.ndarray  # [N]
    start_objective: np.ndarray  # [N, S]

    def predict(self, d, extra=None) -> np.ndarray:
        """Loss at sizes ``d`` (scalar, [M] shared, or [N, M]) for every curve: [N] or [N, M]."""
        with jax.enable_x64(True):
            d_arr = np.asarray(d, np.float64)
            scalar = d_arr.ndim == 0
            d2 = np.broadcast_to(np.atleast_1d(d_arr), (self.theta.shape[0],) + np.atleast_1d(d_arr).shape[-1:])
            e2 = np.zeros_like(d2) if extra is None else np.broadcast_to(np.asarray(extra, np.float64), d2.shape)
            out = np.asarray(_predict(self.law, jnp.asarray(self.theta), jnp.asarray(d2), jnp.asarray(e2)))
        return out[:, 0] if scalar else out


def _validate(law, d, loss, mask, extra):
    law = LAWS[law] if isinstance(law, str) else law
    d = np.asarray(d, np.float64)
    loss = np.asarray(loss, np.float64)
    if d.shape != loss.shape or d.ndim != 2:
        raise ValueError(f"d and loss must both be [N, M]; got {d.shape} and {loss.shape}")
    mask = np.isfinite(loss) if mask is None else np.asarray(mask, bool)
    if np.any(mask & ~(np.isfinite(loss) & (loss > 0))):
        raise ValueError("masked-in losses must be finite and > 0")
    if np.any(mask & (d < 0)):
        raise ValueError("data sizes must be >= 0")
    if not law.allows_zero and np.any(mask & (d == 0)):
        raise ValueError(f"the {law.name} law is undefined at D = 0; mask the zero-shot point out")
    if law.uses_extra:
        if extra is None:
            raise ValueError(f"the {law.name} law needs its per-point term (log F)")
        extra = np.broadcast_to(np.asarray(extra, np.float64), d.shape)
        if np.any(mask & (np.isnan(extra) | (extra == np.inf))):
            raise ValueError("log F must be a number or -inf (F = 0) at every fitted point")
        if np.any(mask & (d == 0) & (extra == -np.inf)):
            raise ValueError("F = 0 with D = 0 makes the LensLLM law infinite")
    else:
        extra = np.zeros_like(d)
    counts = mask.sum(axis=1)
    if np.any(counts < law.n_params):
        bad = np.flatnonzero(counts < law.n_params).tolist()
        raise ValueError(f"curves {bad} have fewer than {law.n_params} points for the {law.name} law")
    return law, d, loss, mask, extra


def _given_start(theta0, n, law, dtype):
    theta0 = np.asarray(theta0, np.float64)
    if theta0.shape != (n, law.n_params) or not np.all(np.isfinite(theta0)):
        raise ValueError(f"theta0 must be finite with shape {(n, law.n_params)}; got {theta0.shape}")
    return jnp.asarray(theta0[:, None, :], dtype)


@functools.partial(jax.jit, static_argnames=("law",))
def _predict(law, theta, d, extra):
    return jnp.exp(jax.vmap(law.log_predict)(theta, d, extra))


@functools.partial(jax.jit, static_argnames=("law", "n_starts"))
def _starts(law, key, d, logl, mask, extra, n_starts):
    keys = jax.random.split(key, d.shape[0])
    d_safe = jnp.where(mask, d, 1.0)
    logl_safe = jnp.where(mask, logl, 0.0)
    return jax.vmap(law.init, in_axes=(0, 0, 0, 0, 0, None))(keys, d_safe, logl_safe, mask, extra, n_starts)


def fit_curves(
    law: Law | str,
    d,
    loss,
    mask=None,
    extra=None,
    *,
    n_starts: int = 8,
    seed: int = 0,
    solver: str = "lm",
    max_steps: int = 400,
    screen_steps: int = 30,
    x64: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    theta0=None,
) -> CurveFit:
    """Fit ``law`` to N curves in one jitted, vmapped call.

    Args:
      d: [N, M] data sizes (may contain 0 for the zero-shot point if the law allows it).
      loss: [N, M] measured losses (> 0 where masked in).
      mask: [N, M] which points exist (default: finite losses).
      extra: [N, M] per-point side input (the LensLLM log F).
      n_starts: seeded multi-start count per curve; ``seed`` makes it reproducible.
      screen_steps: steps every start runs before only each curve's best start goes on (0: all
        starts run to convergence); see :func:`lensjax.kernels.lsq.fit_arrays`.
      x64: run in float64 (default; the curves need it to resolve optima to 1e-6 relative).
      mesh: shard the curve axis over ``mesh['candidate']``.
      theta0: [N, P] unconstrained starting points (instead of the seeded multi-start).
    """
    law, d, loss, mask, extra = _validate(law, d, loss, mask, extra)
    dtype = jnp.float64 if x64 else jnp.float32
    with jax.enable_x64(x64):
        logl = np.log(np.where(mask, loss, 1.0))
        args = [jnp.asarray(a, dtype) for a in (d, logl)]
        jmask, jextra = jnp.asarray(mask), jnp.asarray(extra, dtype)
        if theta0 is None:
            theta0 = _starts(law, jax.random.key(seed), args[0], args[1], jmask, jextra, n_starts)
        else:
            theta0 = _given_start(theta0, d.shape[0], law, dtype)
        res = lsq.fit(law.log_predict, theta0, args[0], args[1], jmask, jextra, solver=solver,
                      max_steps=max_steps, screen_steps=screen_steps, mesh=mesh)
        theta = np.asarray(res.params, np.float64)
        out = CurveFit(
            law=law,
            theta=theta,
            params={k: np.asarray(v, np.float64) for k, v in law.natural(theta).items()},
            objective=np.asarray(res.objective, np.float64),
            converged=np.asarray(res.converged, bool),
            steps=np.asarray(res.steps),
            start_objective=np.asarray(res.start_objective, np.float64),
        )
    return out


@dataclasses.dataclass(frozen=True)
class JointFit(CurveFit):
    """A :class:`CurveFit` from :func:`fit_curves_joint`, with the empirical-Bayes hyperparameters."""

    independent: CurveFit | None = None  # the first, independent fits
    group_mean: dict[str, np.ndarray] | None = None  # name -> [G] prior mean of log(parameter)
    group_tau: dict[str, np.ndarray] | None = None  # name -> [G] prior s.d. of log(parameter)
    group_sigma: np.ndarray | None = None  # [G] pooled residual s.d. (log loss)


def fit_curves_joint(
    law: Law | str,
    d,
    loss,
    mask=None,
    extra=None,
    group=None,
    *,
    tied: tuple[str, ...] = ("beta",),
    tau_floor: float = 1e-2,
    tau_scale: float = 1.0,
    n_starts: int = 8,
    seed: int = 0,
    solver: str = "lm",
    max_steps: int = 400,
    screen_steps: int = 30,
    mesh: jax.sharding.Mesh | None = None,
    theta0=None,
) -> JointFit:
    """Fit N curves with the parameters named in ``tied`` drawn from one Gaussian prior per group
    (on the log scale), its mean and spread estimated from the group's own curves (empirical
    Bayes; :func:`lensjax.kernels.lsq.fit_joint`). ``group`` [N] (default: all one group) holds
    integer ids, e.g. one per budget so that each budget's candidates inform each other only.
    One jitted call, float64.
    """
    law, d, loss, mask, extra = _validate(law, d, loss, mask, extra)
    unknown = [t for t in tied if t not in law.param_names]
    if unknown:
        raise ValueError(f"cannot tie {unknown}: the {law.name} law has parameters {law.param_names}")
    tied_flags = tuple(p in tied for p in law.param_names)
    group = np.zeros(d.shape[0], np.int64) if group is None else np.asarray(group)
    if group.shape != (d.shape[0],) or not np.issubdtype(group.dtype, np.integer) or np.any(group < 0):
        raise ValueError(f"group must be {d.shape[0]} non-negative integer ids; got {group!r}")
    _, group = np.unique(group, return_inverse=True)  # dense ids 0..G-1
    n_groups = int(group.max()) + 1
    with jax.enable_x64(True):
        logl = np.log(np.where(mask, loss, 1.0))
        dj, lj = jnp.asarray(d), jnp.asarray(logl)
        jmask, jextra = jnp.asarray(mask), jnp.asarray(extra)
        if theta0 is None:
            theta0 = _starts(law, jax.random.key(seed), dj, lj, jmask, jextra, n_starts)
        else:
            theta0 = _given_start(theta0, d.shape[0], law, jnp.float64)
        res = lsq.fit_joint_sharded(law.log_predict, theta0, dj, lj, jmask, jextra, jnp.asarray(group, jnp.int32),
                                    n_groups=n_groups, tied=tied_flags, tau_floor=tau_floor, tau_scale=tau_scale,
                                    solver=solver, max_steps=max_steps, screen_steps=screen_steps, mesh=mesh)
        theta = np.asarray(res.params, np.float64)
        ind = res.independent
        ind_theta = np.asarray(ind.params, np.float64)
        independent = CurveFit(
            law=law, theta=ind_theta,
            params={k: np.asarray(v, np.float64) for k, v in law.natural(ind_theta).items()},
            objective=np.asarray(ind.objective, np.float64), converged=np.asarray(ind.converged, bool),
            steps=np.asarray(ind.steps), start_objective=np.asarray(ind.start_objective, np.float64),
        )
        gm, gt = np.asarray(res.group_mean), np.asarray(res.group_tau2)
        return JointFit(
            law=law, theta=theta,
            params={k: np.asarray(v, np.float64) for k, v in law.natural(theta).items()},
            objective=np.asarray(res.objective, np.float64), converged=np.asarray(res.converged, bool),
            steps=np.asarray(res.steps), start_objective=independent.start_objective,
            independent=independent,
            group_mean={p: gm[:, i] for i, p in enumerate(law.param_names) if tied_flags[i]},
            group_tau={p: np.sqrt(gt[:, i]) for i, p in enumerate(law.param_names) if tied_flags[i]},
            group_sigma=np.sqrt(np.asarray(res.group_sigma2)),
        )
