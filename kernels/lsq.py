"""Batched, masked, multi-start nonlinear least squares.

One call fits N independent problems ("curves"), each from S starting points, with two solvers:

* ``"lm"``: Levenberg–Marquardt (Nielsen's damping update, Marquardt diagonal scaling, MINPACK
  style stopping tests). The problems here have 3–4 parameters, so each step is one forward-mode
  Jacobian and a P×P solve.
* ``"lbfgs"``: Optax L-BFGS with its zoom line search on the same objective.

The model is a pure function ``model_fn(theta_P, x_M, extra_M) -> prediction_M`` of unconstrained
parameters (positivity is the caller's re-parameterisation). The objective of problem n is the
weighted mean of squared residuals ``sum_m w_nm (model_fn(theta)_m - y_nm)^2 / sum_m w_nm`` over the
points with ``mask_nm``; masked points are replaced by safe values before the model sees them, so
curves may have different, irregular or missing sizes.

Everything is vmapped over curves × starts and jitted once per (shapes, model_fn, solver); the
leading curve axis can be sharded over a mesh axis (see :func:`fit`), which gives the same numbers
as one device because every problem is solved independently.

Cost: one LM step for a problem with M points and P parameters evaluates the model P+1 times
(P JVPs + the trial point) and solves a P×P system: O(M·P² + P³) flops, a few hundred flops here.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
ModelFn = Callable[[Array, Array, Array], Array]

SOLVERS = ("lm", "lbfgs")


class FitResult(NamedTuple):
    """Best start per problem, plus every start's outcome.

    params [N, P], objective [N], converged [N] (bool), steps [N] (int32);
    start_objective [N, S], start_converged [N, S].
    """

    params: Array
    objective: Array
    converged: Array
    steps: Array
    start_objective: Array
    start_converged: Array


class _Problem(NamedTuple):
    x: Array  # [M]
    y: Array  # [M]
    w: Array  # [M], zero where masked, sums to 1
    extra: Array  # [M]
    prior_mean: Array  # [P]
    prior_prec: Array  # [P], zero: no prior on that parameter


def _residual(model_fn: ModelFn, theta: Array, prob: _Problem) -> Array:
    """Data residuals, then one Gaussian-prior residual per parameter (zero without a prior)."""
    pred = model_fn(theta, prob.x, prob.extra)
    data = jnp.sqrt(prob.w) * (pred - prob.y)
    return jnp.concatenate([data, jnp.sqrt(prob.prior_prec) * (theta - prob.prior_mean)])


def _objective(model_fn: ModelFn, theta: Array, prob: _Problem) -> Array:
    r = _residual(model_fn, theta, prob)
    return jnp.sum(r * r)


def _lm_single(model_fn, theta0, prob, *, max_steps, ftol, xtol, gtol):
    """Levenberg–Marquardt for one problem. Returns (theta, f, converged, steps)."""
    res = functools.partial(_residual, model_fn)
    dtype = theta0.dtype
    eps = jnp.finfo(dtype).eps

    def lin(theta):
        r = res(theta, prob)
        jac = jax.jacfwd(res)(theta, prob)
        return r, jac

    r0, j0 = lin(theta0)
    f0 = jnp.sum(r0 * r0)
    h0 = j0.T @ j0
    # Initial damping relative to the largest curvature (Nielsen's tau = 1e-3).
    lam0 = 1e-3 * jnp.max(jnp.diag(h0)) + eps
    # state: theta, r, J, f, lam, nu, k, done, converged, scale
    init = (theta0, r0, j0, f0, lam0, jnp.asarray(2.0, dtype), jnp.asarray(0, jnp.int32),
            ~jnp.isfinite(f0), jnp.asarray(False), jnp.maximum(jnp.diag(h0), eps))

    def cond(state):
        k, done = state[6], state[7]
        return (~done) & (k < max_steps)

    def body(state):
        theta, r, jac, f, lam, nu, k, _, _, scale = state
        g = jac.T @ r
        h = jac.T @ jac
        scale = jnp.maximum(scale, jnp.diag(h))  # Marquardt scaling, non-decreasing (MINPACK)
        a = h + lam * jnp.diag(scale)
        delta = -jnp.linalg.solve(a, g)
        delta = jnp.where(jnp.all(jnp.isfinite(delta)), delta, jnp.zeros_like(delta))
        theta_new = theta + delta
        r_new, jac_new = lin(theta_new)
        f_new = jnp.sum(r_new * r_new)
        r_lin = r + jac @ delta
        pred_red = f - jnp.sum(r_lin * r_lin)
        act_red = f - f_new
        rho = act_red / jnp.where(pred_red > 0, pred_red, jnp.inf)
        accept = jnp.isfinite(f_new) & (act_red > 0) & (rho > 0)
        lam_acc = lam * jnp.maximum(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
        lam = jnp.where(accept, lam_acc, lam * nu)
        nu = jnp.where(accept, 2.0, 2.0 * nu)
        # Stopping tests (MINPACK lmder): relative reduction, relative step, gradient cosine.
        f_ref = jnp.maximum(f, jnp.finfo(dtype).tiny)
        small_red = accept & (jnp.abs(act_red) <= ftol * f_ref) & (pred_red <= ftol * f_ref)
        small_step = jnp.linalg.norm(delta) <= xtol * (jnp.linalg.norm(theta) + xtol)
        col = jnp.sqrt(jnp.diag(h))
        cosine = jnp.abs(g) / jnp.where(col > 0, col * jnp.sqrt(f_ref), jnp.inf)
        small_grad = jnp.max(cosine) <= gtol
        zero_res = f <= jnp.finfo(dtype).tiny
        # nu explodes when no step is accepted for ~60 tries: the damping has run away.
        stuck = nu > 2.0 ** 60
        theta = jnp.where(accept, theta_new, theta)
        r = jnp.where(accept, r_new, r)
        jac = jnp.where(accept, jac_new, jac)
        f = jnp.where(accept, f_new, f)
        conv = small_red | small_step | small_grad | zero_res
        done = conv | stuck | ~jnp.isfinite(f)
        return theta, r, jac, f, lam, nu, k + 1, done, conv & jnp.isfinite(f), scale

    out = jax.lax.while_loop(cond, body, init)
    theta, f, k, conv = out[0], out[3], out[6], out[8]
    return theta, f, conv, k


def _lbfgs_single(model_fn, theta0, prob, *, max_steps, ftol, xtol, gtol):
    """Optax L-BFGS (zoom line search) for one problem. Returns (theta, f, converged, steps)."""
    fun = lambda th: _objective(model_fn, th, prob)  # noqa: E731
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)
    dtype = theta0.dtype

    def cond(carry):
        _, _, _, k, done, _ = carry
        return (~done) & (k < max_steps)

    def body(carry):
        theta, state, f_prev, k, _, _ = carry
        f, g = value_and_grad(theta, state=state)
        updates, state = opt.update(g, state, theta, value=f, grad=g, value_fn=fun)
        theta_new = optax.apply_updates(theta, updates)
        f_new = optax.tree.get(state, "value")
        f_ref = jnp.maximum(f, jnp.finfo(dtype).tiny)
        small_red = jnp.abs(f - f_new) <= ftol * f_ref
        small_step = jnp.linalg.norm(updates) <= xtol * (jnp.linalg.norm(theta) + xtol)
        small_grad = jnp.max(jnp.abs(g)) <= gtol * f_ref
        conv = (small_red & small_step) | small_grad
        done = conv | ~jnp.isfinite(f_new)
        return theta_new, state, f_new, k + 1, done, conv & jnp.isfinite(f_new)

    init = (theta0, opt.init(theta0), fun(theta0), jnp.asarray(0, jnp.int32), jnp.asarray(False),
            jnp.asarray(False))
    theta, _, _, k, _, conv = jax.lax.while_loop(cond, body, init)
    return theta, fun(theta), conv, k


_SINGLE = {"lm": _lm_single, "lbfgs": _lbfgs_single}


@functools.partial(
    jax.jit,
    static_argnames=("model_fn", "solver", "max_steps", "ftol", "xtol", "gtol", "screen_steps"),
)
def fit_arrays(
    model_fn: ModelFn,
    theta0: Array,
    x: Array,
    y: Array,
    mask: Array,
    extra: Array,
    weight: Array | None = None,
    prior_mean: Array | None = None,
    prior_prec: Array | None = None,
    *,
    solver: str = "lm",
    max_steps: int = 400,
    ftol: float = 1e-12,
    xtol: float = 1e-12,
    gtol: float = 1e-10,
    screen_steps: int = 30,
) -> FitResult:
    """Fit N problems from S starts each.

    Args:
      model_fn: pure ``(theta [P], x [M], extra [M]) -> prediction [M]``; static (hashable).
      theta0: [N, S, P] starting points (unconstrained parameters).
      x, y, extra: [N, M] inputs, targets and per-point side data (e.g. an NTK term).
      mask: [N, M] bool, which points exist.
      weight: optional [N, M] non-negative point weights (default 1).
      prior_mean, prior_prec: optional [N, P] Gaussian prior on the parameters, in objective
        units: the objective becomes ``mean_w (pred − y)² + Σ_p prec_p (θ_p − mean_p)²``
        (precision 0: no prior on that parameter). :func:`fit_joint` sets them by empirical Bayes.
      screen_steps: multi-start screening. All S starts run at most this many solver steps; only
        the best start of each problem then runs on to convergence (``max_steps`` more at most).
        A vmapped ``while_loop`` costs its slowest member's step count for every member, so this
        cuts the work from ~S·max_steps to ~S·screen_steps + max_steps per problem.
        0 runs every start to convergence.

    Returns a :class:`FitResult` (``start_objective`` / ``start_converged`` are the screening
    results); a problem with no finite start has objective ``inf`` and ``converged`` False.
    """
    if solver not in _SINGLE:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    dtype = theta0.dtype
    mask = mask.astype(bool)
    w = jnp.ones_like(y, dtype) if weight is None else weight.astype(dtype)
    w = jnp.where(mask, w, 0.0)
    w = w / jnp.maximum(jnp.sum(w, axis=-1, keepdims=True), jnp.finfo(dtype).tiny)
    # Safe fill values so that masked points cannot produce NaN (x = 1 is valid for every law).
    prob = _Problem(
        x=jnp.where(mask, x, 1.0).astype(dtype),
        y=jnp.where(mask, y, 0.0).astype(dtype),
        w=w,
        extra=jnp.where(mask, extra, 0.0).astype(dtype),
        prior_mean=(jnp.zeros(theta0.shape[::2], dtype) if prior_mean is None else prior_mean.astype(dtype)),
        prior_prec=(jnp.zeros(theta0.shape[::2], dtype) if prior_prec is None else prior_prec.astype(dtype)),
    )

    def run(theta, steps):
        single = functools.partial(
            _SINGLE[solver], model_fn, max_steps=steps, ftol=ftol, xtol=xtol, gtol=gtol
        )
        return jax.vmap(single)(theta, prob)

    def over_starts(steps):
        th = jnp.swapaxes(theta0, 0, 1)  # [S, N, P]: loop-free vmap over starts, then problems
        out = jax.vmap(run, in_axes=(0, None))(th, steps)
        return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), out)

    def pick(theta_s, f_s):
        f_s = jnp.where(jnp.isfinite(f_s), f_s, jnp.inf)
        best = jnp.argmin(f_s, axis=1)
        return jnp.take_along_axis(theta_s, best[:, None, None], axis=1)[:, 0], f_s

    if screen_steps and theta0.shape[1] > 1:
        first = min(screen_steps, max_steps)  # the total step budget stays max_steps
        theta_s, f_s, conv_s, k_s = over_starts(first)
        theta_b, f_s = pick(theta_s, f_s)
        theta, f, conv, k = run(theta_b, max_steps - first)
        k = k + first
    else:
        theta_s, f_s, conv_s, k_s = over_starts(max_steps)
        theta, f_s = pick(theta_s, f_s)
        best = jnp.argmin(f_s, axis=1)
        take = lambda a: jnp.take_along_axis(a, best[:, None], axis=1)[:, 0]  # noqa: E731
        f, conv, k = take(f_s), take(conv_s), take(k_s)
    f = jnp.where(jnp.isfinite(f), f, jnp.inf)
    return FitResult(
        params=theta,
        objective=f,
        converged=conv & jnp.isfinite(f),
        steps=k,
        start_objective=f_s,
        start_converged=conv_s,
    )


def fit(
    model_fn: ModelFn,
    theta0,
    x,
    y,
    mask,
    extra,
    weight=None,
    prior_mean=None,
    prior_prec=None,
    *,
    solver: str = "lm",
    max_steps: int = 400,
    ftol: float = 1e-12,
    xtol: float = 1e-12,
    gtol: float = 1e-10,
    screen_steps: int = 30,
    mesh: jax.sharding.Mesh | None = None,
    axis: str = "candidate",
) -> FitResult:
    """:func:`fit_arrays`, optionally with the curve axis sharded over ``mesh[axis]``.

    The curve axis is padded to a multiple of the axis size with fully masked dummy problems (they
    are dropped from the result), so any number of curves runs on any mesh.
    """
    if mesh is None:
        return fit_arrays(model_fn, theta0, x, y, mask, extra, weight, prior_mean, prior_prec, solver=solver,
                          max_steps=max_steps, ftol=ftol, xtol=xtol, gtol=gtol,
                          screen_steps=screen_steps)
    n = theta0.shape[0]
    padded, mask_p = _padder(mesh, axis, n, mask)
    out = fit_arrays(
        model_fn, padded(theta0, 0.0), padded(x, 1.0), padded(y, 0.0), mask_p,
        padded(extra, 0.0), padded(weight, 1.0), padded(prior_mean, 0.0), padded(prior_prec, 0.0),
        solver=solver, max_steps=max_steps, ftol=ftol, xtol=xtol, gtol=gtol, screen_steps=screen_steps,
    )
    return jax.tree.map(lambda a: a[:n], _gathered(out))


def _padder(mesh, axis, n, mask):
    """Pad the leading (curve) axis to a multiple of ``mesh[axis]`` and shard it over that axis.

    Dummy problems get one point at x=1, y=0, so their objective is finite and they stop at once.
    """
    pad = (-n) % mesh.shape[axis]

    def padded(a, fill, first_true=False):
        if a is None:
            return None
        a = np.asarray(a)  # host copy: the same on every process of a multi-process mesh
        if pad:
            a = np.concatenate([a, np.full((pad,) + a.shape[1:], fill, a.dtype)], axis=0)
            if first_true:
                a[n:, 0] = True
        spec = jax.sharding.PartitionSpec(axis, *([None] * (a.ndim - 1)))
        # each process supplies the rows of its own devices (one process: all of them)
        return jax.make_array_from_callback(a.shape, jax.sharding.NamedSharding(mesh, spec), lambda idx: a[idx])

    return padded, padded(mask, False, first_true=True)


def _gathered(tree):
    """Results on a mesh that spans several processes, gathered onto every process (host arrays);
    one process: unchanged."""
    if all(getattr(a, "is_fully_addressable", True) for a in jax.tree.leaves(tree)):
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


# ------------------------------------------------------------------------- joint (empirical Bayes)
class JointFitResult(NamedTuple):
    """:func:`fit_joint`'s result.

    params [N, P], objective [N] (data part only: the weighted mean squared residual),
    converged [N], steps [N] (both fits together), independent: the :class:`FitResult` of the
    first, independent fits; prior_mean [N, P] and prior_prec [N, P] as used in the second fit;
    group_mean [G, P], group_tau2 [G, P] (between-candidate variance of each tied parameter),
    group_sigma2 [G] (pooled residual variance), param_var [N, P] (each independent fit's
    sampling variance of its parameters, from σ² (JᵀJ)⁻¹).
    """

    params: Array
    objective: Array
    converged: Array
    steps: Array
    independent: FitResult
    prior_mean: Array
    prior_prec: Array
    group_mean: Array
    group_tau2: Array
    group_sigma2: Array
    param_var: Array


@functools.partial(
    jax.jit,
    static_argnames=("model_fn", "n_groups", "tied", "solver", "max_steps", "screen_steps", "ftol", "xtol",
                     "gtol"),
)
def fit_joint(
    model_fn: ModelFn,
    theta0: Array,
    x: Array,
    y: Array,
    mask: Array,
    extra: Array,
    group: Array,
    *,
    n_groups: int,
    tied: tuple[bool, ...],
    tau_floor: float = 1e-2,
    tau_scale: float = 1.0,
    solver: str = "lm",
    max_steps: int = 400,
    screen_steps: int = 30,
    ftol: float = 1e-12,
    xtol: float = 1e-12,
    gtol: float = 1e-10,
) -> JointFitResult:
    """Fit N curves jointly: the ``tied`` parameters of the curves in a group share a Gaussian prior
    whose mean and spread are estimated from the curves themselves (empirical Bayes), all in one
    jitted call with no loop over curves or groups.

    1. Every curve is fitted alone (multi-start, as :func:`fit_arrays`): θ̂_n, residual sum of
       squares, and the sampling variance v_np = σ²_g [(JᵀJ)⁻¹]_pp with σ²_g the residual variance
       pooled over group g (Σ RSS / Σ (m − P)).
    2. Per group and tied parameter, the between-curve variance is estimated by moments
       (DerSimonian–Laird): τ² = max(var_n θ̂_np − mean_n v_np, tau_floor²) · tau_scale, and the
       prior mean is the precision-weighted mean μ = Σ θ̂/(v + τ²) / Σ 1/(v + τ²).
    3. Every curve is refitted from θ̂_n with the prior N(μ, τ²) on its tied parameters. On the
       log-likelihood scale of Gaussian log-residuals with variance σ², this is the objective
       ``mean (pred − y)² + (σ²_g / m_n) Σ_p (θ_p − μ_gp)² / τ²_gp``: the MAP estimate.

    A parameter the data pin down (small v) barely moves; a poorly identified one (large v: a
    flat direction, or a curve with few points) is pulled to its group's mean. A group of one
    curve gets μ = θ̂ and nothing changes. ``group`` [N] holds ids in ``[0, n_groups)``; ids
    outside that range (padding) take no part in any group's statistics.
    """
    dtype = theta0.dtype
    tied_v = jnp.asarray(tied, bool)
    if tied_v.shape != (theta0.shape[-1],):
        raise ValueError(f"tied must have one flag per parameter ({theta0.shape[-1]}); got {len(tied)}")
    common = dict(solver=solver, ftol=ftol, xtol=xtol, gtol=gtol)
    first = fit_arrays(model_fn, theta0, x, y, mask, extra, max_steps=max_steps, screen_steps=screen_steps,
                       **common)
    theta = first.params
    mask = mask.astype(bool)
    n_pts = jnp.sum(mask, axis=-1).astype(dtype)
    n_par = theta.shape[-1]
    xs, es = jnp.where(mask, x, 1.0).astype(dtype), jnp.where(mask, extra, 0.0).astype(dtype)

    def info(th, xi, ei, mi):
        jac = jax.jacfwd(model_fn)(th, xi, ei) * mi[:, None]
        return jac.T @ jac

    h = jax.vmap(info)(theta, xs, es, mask.astype(dtype))  # [N, P, P]
    valid = (group >= 0) & (group < n_groups) & jnp.isfinite(first.objective)
    gid = jnp.where(valid, group, n_groups)  # invalid rows go to a spare segment
    seg = functools.partial(jax.ops.segment_sum, segment_ids=gid, num_segments=n_groups + 1)
    rss = jnp.where(valid, first.objective * n_pts, 0.0)
    dof = jnp.where(valid, n_pts - n_par, 0.0)
    sigma2_g = seg(rss) / jnp.maximum(seg(dof), 1.0)  # [G+1]
    sigma2 = sigma2_g[gid]
    # (JᵀJ)⁻¹ through eigh, with eigenvalues floored: a flat direction gets a large, finite variance.
    lam, vec = jnp.linalg.eigh(h)
    lam = jnp.maximum(lam, jnp.finfo(dtype).eps * jnp.maximum(jnp.max(lam, axis=-1, keepdims=True), 1.0) + 1e-12)
    inv_diag = jnp.einsum("npk,nk,npk->np", vec, 1.0 / lam, vec)
    var = jnp.minimum(sigma2[:, None] * inv_diag, 1e6)  # [N, P]
    cnt = seg(valid.astype(dtype))[:, None]  # [G+1, 1]
    th_v = jnp.where(valid[:, None], theta, 0.0)
    mean_g = seg(th_v) / jnp.maximum(cnt, 1.0)
    between = seg(jnp.where(valid[:, None], (theta - mean_g[gid]) ** 2, 0.0)) / jnp.maximum(cnt - 1.0, 1.0)
    within = seg(jnp.where(valid[:, None], var, 0.0)) / jnp.maximum(cnt, 1.0)
    tau2_g = jnp.maximum(between - within, tau_floor ** 2) * tau_scale  # [G+1, P]
    wgt = jnp.where(valid[:, None], 1.0 / (var + tau2_g[gid]), 0.0)
    mu_g = seg(wgt * theta) / jnp.maximum(seg(wgt), jnp.finfo(dtype).tiny)
    prior_mean = mu_g[gid]
    prior_prec = jnp.where(valid[:, None] & tied_v[None, :],
                           sigma2[:, None] / (jnp.maximum(n_pts, 1.0)[:, None] * tau2_g[gid]), 0.0)
    second = fit_arrays(model_fn, theta[:, None, :], x, y, mask, extra, None, prior_mean, prior_prec,
                        max_steps=max_steps, screen_steps=0, **common)
    theta2 = jnp.where(jnp.isfinite(second.objective)[:, None], second.params, theta)
    pred = jax.vmap(model_fn)(theta2, xs, es)
    data_obj = jnp.sum(jnp.where(mask, (pred - y) ** 2, 0.0), axis=-1) / jnp.maximum(n_pts, 1.0)
    return JointFitResult(
        params=theta2, objective=data_obj, converged=second.converged & first.converged,
        steps=first.steps + second.steps, independent=first, prior_mean=prior_mean, prior_prec=prior_prec,
        group_mean=mu_g[:n_groups], group_tau2=tau2_g[:n_groups], group_sigma2=sigma2_g[:n_groups],
        param_var=var,
    )


def fit_joint_sharded(model_fn, theta0, x, y, mask, extra, group, *, n_groups, tied, mesh=None,
                      axis: str = "candidate", **kw) -> JointFitResult:
    """:func:`fit_joint` with the curve axis sharded over ``mesh[axis]`` (padding rows join no group);
    the per-group sums become cross-device reductions that XLA inserts."""
    if mesh is None:
        return fit_joint(model_fn, theta0, x, y, mask, extra, group, n_groups=n_groups, tied=tied, **kw)
    n = theta0.shape[0]
    padded, mask_p = _padder(mesh, axis, n, mask)
    out = fit_joint(model_fn, padded(theta0, 0.0), padded(x, 1.0), padded(y, 0.0), mask_p, padded(extra, 0.0),
                    padded(np.asarray(group, np.int32), n_groups), n_groups=n_groups, tied=tied, **kw)
    out = _gathered(out)
    cut = lambda a: a[:n]  # noqa: E731
    return out._replace(params=cut(out.params), objective=cut(out.objective), converged=cut(out.converged),
                        steps=cut(out.steps), independent=jax.tree.map(cut, out.independent),
                        prior_mean=cut(out.prior_mean), prior_prec=cut(out.prior_prec),
                        param_var=cut(out.param_var))
