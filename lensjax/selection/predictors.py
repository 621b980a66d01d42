"""Row-wise predictors of the loss at the target: every method on a stack of curves at once.

A *row* is one curve seen under one budget: ``loss[k]`` over the shared ``sizes``, of which only
the ladder ``base <= D <= budget[k]`` (and, for laws that use it, the zero-shot point D = 0) is
used. Stacking rows lets one call serve every budget of a selection and every bootstrap replicate
of :mod:`.uncertainty`: law fits run as one batched kernel call, AtS and the local power law are
vectorised over rows, and joint (empirical-Bayes) fits tie only rows with the same ``group`` id.

Methods (see :data:`PREDICTORS`; each is a ``--method`` of ``lensjax select``):

* laws fitted per curve: ``rectified``, ``vanilla``, ``lensllm`` and the no-floor variants
  ``rectified_nofloor`` (``B/(D_l + D^β)``) and ``lensllm_nofloor`` (``B/(F + D^β)``);
* joint laws ``rectified_joint``, ``rectified_nofloor_joint``: the per-curve law with the
  parameters in ``tied`` (default β) drawn from one prior per group of candidates, its mean and
  spread estimated from the candidates' own in-budget data (:func:`fit_curves_joint`);
* ``ats``: Accept-then-Stop (k, δ); ``local``: a power law (a line in log–log) through the last
  ``local_k`` ladder points (``local_k <= 0``: all of them);
* ``ensemble``: ``exp((1 − w) log short + w log long)`` with ``short`` = AtS(ens_k, ens_delta)
  (or ``local``), ``long`` = a law method (default ``rectified_nofloor``), and the weight of the
  long-range law growing with the extrapolation distance r = target/budget:
  ``w = clip(log(r/r0) / log(r1/r0), 0, 1)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lensjax.selection.fit import CurveFit, fit_curves, fit_curves_joint
from lensjax.selection.laws import LAWS

# Law methods: method name -> (law, joint?)
LAW_METHODS = {
    "rectified": ("rectified", False),
    "vanilla": ("vanilla", False),
    "lensllm": ("lensllm", False),
    "rectified_nofloor": ("rectified_nofloor", False),
    "lensllm_nofloor": ("lensllm_nofloor", False),
    "rectified_joint": ("rectified", True),
    "rectified_nofloor_joint": ("rectified_nofloor", True),
}
LOCAL_METHODS = ("ats", "local")
PREDICTORS = tuple(LAW_METHODS) + LOCAL_METHODS + ("ensemble",)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every method's settings; each method reads only its own."""

    ats_k: int = 3
    ats_delta: float = 5.0
    ats_include_smallest: bool = False
    local_k: int = 3
    tied: tuple[str, ...] = ("beta",)
    tau_scale: float = 1.0
    tau_floor: float = 1e-2
    # The ensemble's defaults are the CLI default chosen by scripts/choose_default_method.py.
    ens_short: str = "ats"
    ens_k: int = 3
    ens_delta: float = 3.0
    ens_long: str = "rectified_nofloor_joint"
    ens_r0: float = 16.0
    ens_r1: float = 1024.0
    n_starts: int = 8
    seed: int = 0
    solver: str = "lm"
    max_steps: int = 400

    def validate(self):
        if self.ens_short not in LOCAL_METHODS:
            raise ValueError(f"ens_short must be one of {LOCAL_METHODS}; got {self.ens_short!r}")
        if self.ens_long not in LAW_METHODS or LAWS[LAW_METHODS[self.ens_long][0]].uses_extra:
            ok = [m for m, (law, _) in LAW_METHODS.items() if not LAWS[law].uses_extra]
            raise ValueError(f"ens_long must be one of {ok}; got {self.ens_long!r}")
        if not 0 < self.ens_r0 < self.ens_r1:
            raise ValueError(f"need 0 < ens_r0 < ens_r1; got {self.ens_r0}, {self.ens_r1}")
        if self.ats_k < 2 or self.ens_k < 2:
            raise ValueError("AtS needs k >= 2")
        if self.local_k == 1:
            raise ValueError("a local power law needs at least 2 points (local_k >= 2, or <= 0 for all)")


@dataclasses.dataclass
class RowPrediction:
    pred: np.ndarray  # [K] loss at the target
    converged: np.ndarray  # [K]
    n_points: np.ndarray  # [K] points the prediction used
    fit: CurveFit | None = None  # the law fit (for ``ensemble``: its long-range part)
    weight: np.ndarray | None = None  # [K] ensemble weight of the long-range law
    disagreement: np.ndarray | None = None  # [K] ensemble: log(short) − log(long) prediction


def law_of(method: str, st: Settings) -> str | None:
    """The law fitted by ``method`` (for ``ensemble``, its long-range part), or None."""
    if method == "ensemble":
        return LAW_METHODS[st.ens_long][0]
    return LAW_METHODS[method][0] if method in LAW_METHODS else None


def ladder_mask(sizes, loss, budget, base) -> np.ndarray:
    """[K, M]: measured points with ``base <= D <= budget[k]`` and D > 0."""
    sizes = np.asarray(sizes, np.float64)
    return np.isfinite(loss) & ((sizes > 0) & (sizes >= base))[None, :] & (sizes[None, :] <= np.asarray(budget)[:, None])


def fit_mask(law: str, sizes, loss, budget, base) -> np.ndarray:
    m = ladder_mask(sizes, loss, budget, base)
    if LAWS[law].allows_zero:
        m = m | (np.isfinite(loss) & (np.asarray(sizes) == 0)[None, :])
    return m


def ensemble_weight(budget, target, st: Settings) -> np.ndarray:
    r = target / np.asarray(budget, np.float64)
    return np.clip(np.log(r / st.ens_r0) / np.log(st.ens_r1 / st.ens_r0), 0.0, 1.0)


# ------------------------------------------------------------------------------------------ AtS
def _ols(x, y, w):
    """Row-wise weighted least-squares line (w is a 0/1 mask): slope, intercept."""
    cnt = w.sum(axis=1)
    xm = (w * x).sum(axis=1) / cnt
    ym = (w * y).sum(axis=1) / cnt
    dx = np.where(w > 0, x - xm[:, None], 0.0)
    dy = np.where(w > 0, y - ym[:, None], 0.0)
    slope = (dx * dy).sum(axis=1) / (dx * dx).sum(axis=1)
    return slope, ym - slope * xm


def _right_aligned(sizes, loss):
    """log D and log L with each row's measured points moved to the right end (smallest first), so
    that "the last p points" is a slice; and the count of measured points per row."""
    valid = np.isfinite(loss)
    order = np.argsort(valid, axis=1, kind="stable")
    x = np.take_along_axis(np.broadcast_to(np.log(sizes), loss.shape), order, axis=1)
    y = np.take_along_axis(np.log(np.where(valid, loss, 1.0)), order, axis=1)
    return x, y, valid.sum(axis=1)


def local_predict(sizes, loss, target, k: int):
    """Power law through the last ``k`` measured points of every row (all if ``k <= 0``)."""
    sizes = np.asarray(sizes, np.float64)
    loss = np.asarray(loss, np.float64)
    x, y, n = _right_aligned(sizes, loss)
    used = n if k <= 0 else np.minimum(n, k)
    m = loss.shape[1]
    w = (np.arange(m)[None, :] >= (m - used)[:, None]).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope, icpt = _ols(x, y, w)
    return np.exp(icpt + slope * np.log(target)), used


def ats_predict(sizes, loss, target_size, *, k: int = 3, delta: float = 5.0,
                include_smallest: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Accept-then-Stop for every curve at once.

    ``sizes`` [M] (all > 0, increasing), ``loss`` [N, M] with NaN for missing. Returns the
    prediction at ``target_size`` [N] and the number of points used [N]. Vectorised over curves;
    the only loop is over window lengths (at most M).
    """
    sizes = np.asarray(sizes, np.float64)
    loss = np.asarray(loss, np.float64)
    n_rows, m = loss.shape
    x, y, n = _right_aligned(sizes, loss)
    chosen = np.where(n <= k, n, n - 1 + int(include_smallest))
    stopped = n <= k
    with np.errstate(divide="ignore", invalid="ignore"):
        for p in range(k, m):
            active = (~stopped) & (p < n)
            if not active.any():
                break
            w = np.zeros((n_rows, m))
            w[:, m - p:] = 1.0
            slope, icpt = _ols(x, y, w)
            resid = np.where(w > 0, y - (icpt[:, None] + slope[:, None] * x), 0.0)
            mean_r = resid.sum(axis=1) / p
            std = np.sqrt((np.where(w > 0, resid - mean_r[:, None], 0.0) ** 2).sum(axis=1) / p)
            t = m - p - 1
            z = np.abs(y[:, t] - (icpt + slope * x[:, t])) / std
            hit = active & (z > delta)
            chosen = np.where(hit, p, chosen)
            stopped |= hit
        w = (np.arange(m)[None, :] >= (m - chosen)[:, None]).astype(np.float64)
        slope, icpt = _ols(x, y, w)
    return np.exp(icpt + slope * np.log(target_size)), chosen


def _law_rows(method, sizes, loss, budget, group, base, st, extra, extra_target, target, theta0, mesh=None):
    law, joint = LAW_METHODS[method]
    mask = fit_mask(law, sizes, loss, budget, base)
    d = np.broadcast_to(np.asarray(sizes, np.float64), loss.shape)
    kw = dict(n_starts=st.n_starts, seed=st.seed, solver=st.solver, max_steps=st.max_steps, theta0=theta0, mesh=mesh)
    if joint:
        fit = fit_curves_joint(law, d, loss, mask, extra, group, tied=st.tied, tau_scale=st.tau_scale,
                               tau_floor=st.tau_floor, **kw)
    else:
        fit = fit_curves(law, d, loss, mask, extra, **kw)
    et = None if extra_target is None else np.asarray(extra_target, np.float64).reshape(-1, 1)
    pred = fit.predict(np.full((loss.shape[0], 1), float(target)), et)[:, 0]
    return RowPrediction(pred=pred, converged=fit.converged, n_points=mask.sum(axis=1), fit=fit)


def predict_rows(method: str, sizes, loss, budget, target: float, *, base: float, st: Settings, group=None,
                 extra=None, extra_target=None, theta0=None, mesh=None) -> RowPrediction:
    """Predict the loss at ``target`` for every row ``loss[k]`` under its own ``budget[k]``.

    ``group`` [K]: which rows a joint law ties together (default: rows with the same budget).
    ``extra`` [K, M] / ``extra_target`` [K]: the LensLLM F term. ``theta0`` [K, P]: start the law
    fit there instead of the seeded multi-start (bootstrap refits start at the original fit).
    ``mesh``: shard the law fits' row axis over ``mesh['candidate']``.
    """
    loss = np.asarray(loss, np.float64)
    budget = np.asarray(budget, np.float64)
    sizes = np.asarray(sizes, np.float64)
    if group is None:
        group = np.unique(budget, return_inverse=True)[1]
    if method in LAW_METHODS:
        return _law_rows(method, sizes, loss, budget, group, base, st, extra, extra_target, target, theta0, mesh)
    if method in LOCAL_METHODS or method == "ensemble":
        short = st.ens_short if method == "ensemble" else method
        pos = sizes > 0
        lad = np.where(ladder_mask(sizes, loss, budget, base), loss, np.nan)[:, pos]
        if short == "ats":
            k, delta = (st.ens_k, st.ens_delta) if method == "ensemble" else (st.ats_k, st.ats_delta)
            p, cnt = ats_predict(sizes[pos], lad, target, k=k, delta=delta,
                                 include_smallest=st.ats_include_smallest and method != "ensemble")
        else:
            p, cnt = local_predict(sizes[pos], lad, target, st.local_k)
        if method != "ensemble":
            return RowPrediction(pred=p, converged=np.ones(len(p), bool), n_points=np.asarray(cnt))
        long = _law_rows(st.ens_long, sizes, loss, budget, group, base, st, None, None, target, theta0, mesh)
        w = ensemble_weight(budget, target, st)
        pred = np.exp((1.0 - w) * np.log(p) + w * np.log(long.pred))
        return RowPrediction(pred=pred, converged=long.converged, n_points=long.n_points, fit=long.fit, weight=w,
                             disagreement=np.log(p) - np.log(long.pred))
    raise ValueError(f"unknown predictor {method!r}; choose one of {', '.join(PREDICTORS)}")
