"""Row-wise predictors of the loss at the target: every method on a stack of curves at once.

A *row* is one curve seen under one budget: ``loss[k]`` over the shared ``sizes``, of which only
the ladder ``base <= D <= budget[k]`` (and, for laws that use it, the zero-shot point D = 0) is
used. Stacking rows lets one call serve every budget of a selection and every bootstrap replicate
of :mod:`.uncertainty`: law fits run as one batched kernel call, AtS and the local power law are
vectorised over rows, and joint (empirical-Bayes) fits tie only rows with the same ``group`` id.

Every method is one entry of :data:`METHODS` (a :class:`Method`: its kind, its law, whether the
law is fitted jointly and which parameters are tied, which form of the NTK term it reads, the
points it needs, the settings it records). Adding a method is adding an entry. The kinds:

* ``law`` — a law of :mod:`.laws` fitted per curve (``rectified``, ``vanilla``, the no-floor
  variants) or jointly (``*_joint``, and ``lensllm``: the parameters named by its ``tied`` setting
  drawn from one prior per group of candidates, mean and spread estimated from the candidates' own
  in-budget data, :func:`fit_curves_joint`);
* ``local`` — ``ats``: Accept-then-Stop (k, δ); ``local``: a power law (a line in log–log) through
  the last ``local_k`` ladder points (``local_k <= 0``: all of them);
* ``ensemble`` — ``exp((1 − w) log short + w log long)`` with ``short`` = AtS(ens_k, ens_delta)
  (or ``local``), ``long`` = a law method (default ``rectified_nofloor_joint``), and the weight of
  the long-range law growing with the extrapolation distance r = target/budget:
  ``w = clip(log(r/r0) / log(r1/r0), 0, 1)``;
* ``baseline`` — ``zeroshot``, ``subtuning``, ``modelsize`` (scores, in :mod:`.selectors`).

The LensLLM methods read the NTK term as ``log F`` [K, M] per (row, size) plus ``log F`` at the
target [K] (see :func:`method_extra` for what each one takes from it):

* ``lensllm`` (``f_term="per_size"``): ``D_l = s·F_i(t_i(D))``, s tied across the candidates;
* ``lensllm_nofloor``: the same without the floor E;
* ``lensllm_reference`` (``"budget"``): one F per candidate, constant in D, at the step t of its
  run at the budget (the early-stopping step), ``D_l = F`` (the released code's phase fitting);
* ``lensllm_tfit`` (``"initial"``): ``D_l = F_i(t)`` with t fitted per curve, so D_l < F_i(0)
  (the released code's prediction mode);
* ``lensllm_fixed`` (``"per_size"``): ``D_l = F_i(t_i(D))`` as it is, no scale (an ablation).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lensjax.selection.fit import CurveFit, fit_curves, fit_curves_joint
from lensjax.selection.laws import LAWS

_FIT = ("n_starts", "seed", "solver", "max_steps")
_JOINT = ("tau_scale", "tau_floor")


@dataclasses.dataclass(frozen=True)
class Method:
    """One selection method: everything the dispatch needs to know about it."""

    name: str
    kind: str  # "law" | "local" | "ensemble" | "baseline"
    min_points: int  # measured points per candidate it needs (laws: counting the zero-shot point)
    law: str | None = None
    joint: bool = False
    tied: str | None = None  # the Settings field naming the tied parameters (joint laws)
    f_term: str | None = None  # None | "per_size" | "budget" | "initial": what it reads of log F
    settings: tuple[str, ...] = ()  # Settings fields recorded with a result
    doc: str = ""


def _law(name, law, min_points, joint=False, tied=None, f_term=None, doc=""):
    st = _FIT + ((tied,) + _JOINT if joint else ())
    return Method(name, "law", min_points, law=law, joint=joint, tied=tied, f_term=f_term, settings=st, doc=doc)


METHODS: dict[str, Method] = {m.name: m for m in (
    _law("rectified", "rectified", 4, doc="B/(D_l + D^β) + E per curve"),
    _law("vanilla", "vanilla", 4, doc="(1/(B·D^β) + E)^α per curve"),
    _law("rectified_nofloor", "rectified_nofloor", 3, doc="B/(D_l + D^β) per curve"),
    _law("rectified_joint", "rectified", 4, joint=True, tied="tied", doc="rectified, tied parameters pooled"),
    _law("rectified_nofloor_joint", "rectified_nofloor", 3, joint=True, tied="tied",
         doc="rectified_nofloor, tied parameters pooled"),
    _law("lensllm", "lensllm", 4, joint=True, tied="lensllm_tied", f_term="per_size",
         doc="B/(s·F(t(D)) + D^β) + E, s tied across candidates"),
    _law("lensllm_nofloor", "lensllm_nofloor", 3, joint=True, tied="lensllm_tied", f_term="per_size",
         doc="B/(s·F(t(D)) + D^β), s tied across candidates"),
    _law("lensllm_reference", "lensllm_fixed", 3, f_term="budget",
         doc="B/(F(t_stop) + D^β) + E, one F per candidate at the budget run's step"),
    _law("lensllm_tfit", "lensllm_tfit", 4, f_term="initial", doc="B/(F(t) + D^β) + E, t fitted: D_l < F(0)"),
    _law("lensllm_fixed", "lensllm_fixed", 3, f_term="per_size", doc="B/(F(t(D)) + D^β) + E, F as it is"),
    Method("ats", "local", 2, settings=("ats_k", "ats_delta", "ats_include_smallest"), doc="Accept-then-Stop"),
    Method("local", "local", 2, settings=("local_k",), doc="log-log line through the last k points"),
    Method("ensemble", "ensemble", 2, settings=("ens_short", "ens_long", "ens_r0", "ens_r1", "ens_k", "ens_delta")
           + _FIT, doc="short-range AtS blended with a long-range law"),
    Method("zeroshot", "baseline", 0, doc="the zero-shot loss"),
    Method("subtuning", "baseline", 1, doc="the loss at the largest in-budget size"),
    Method("modelsize", "baseline", 0, doc="−log(parameters)"),
)}
# Derived views (kept for callers): law methods -> (law, joint?), local methods, predictors.
LAW_METHODS = {m.name: (m.law, m.joint) for m in METHODS.values() if m.kind == "law"}
LOCAL_METHODS = tuple(m.name for m in METHODS.values() if m.kind == "local")
PREDICTORS = tuple(m.name for m in METHODS.values() if m.kind != "baseline")


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every method's settings; each method reads only its own."""

    ats_k: int = 3
    ats_delta: float = 5.0
    ats_include_smallest: bool = False
    local_k: int = 3
    tied: tuple[str, ...] = ("beta",)
    lensllm_tied: tuple[str, ...] = ("s",)
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
    return METHODS[method].law if method in METHODS else None


def method_settings(name: str, st: Settings) -> dict | None:
    """The settings ``name`` reads, for the JSON record."""
    m = METHODS[name]
    if not m.settings:
        return None
    out = {}
    for f in m.settings:
        if name == "ensemble" and f in ("ens_k", "ens_delta") and st.ens_short != "ats":
            continue
        v = getattr(st, f)
        out[f] = list(v) if isinstance(v, tuple) else v
    if m.tied:
        out["tied"] = list(getattr(st, m.tied))
    if name == "ensemble" and st.ens_short != "ats":
        out["local_k"] = st.local_k
    return out


def method_extra(name: str, sizes, loss, budget, base, log_f, log_f_target):
    """(extra [K, M], extra at the target [K]) that method ``name`` fits with, from the NTK term
    ``log_f`` [K, M] (log F at the step t of each measured (row, size); at D = 0, log F(0)) and
    ``log_f_target`` [K] (log F at the target's steps):

    * ``per_size``: both as given;
    * ``budget``: one value per row, log F of the row's largest measured in-budget size (the step
      its budget run stopped at), for every size and the target;
    * ``initial``: log F(0) (the D = 0 column) for every size and the target.
    """
    m = METHODS[name]
    if m.f_term is None:
        return None, None
    k_rows, n_sizes = np.shape(loss)
    if log_f is None:
        raise ValueError(f"method {name!r} needs the NTK term F (per candidate and size); compute it with the NTK "
                         "pipeline (`lensjax select --models ...`) or use --method rectified")
    log_f = np.asarray(log_f, np.float64)
    if log_f.shape != (k_rows, n_sizes):
        raise ValueError(f"log F must have shape {(k_rows, n_sizes)}; got {log_f.shape}")
    sizes = np.asarray(sizes, np.float64)
    if m.f_term == "per_size":
        if log_f_target is None:
            raise ValueError(f"method {name!r} needs F at the target size (F_target)")
        return log_f, np.asarray(log_f_target, np.float64).reshape(k_rows)
    if m.f_term == "budget":
        lad = ladder_mask(sizes, loss, budget, base)
        if not lad.any(axis=1).all():
            raise ValueError(f"method {name!r}: a row has no measured size within its budget")
        last = n_sizes - 1 - np.argmax(lad[:, ::-1], axis=1)
        v = log_f[np.arange(k_rows), last]
    else:  # initial
        col = np.flatnonzero(sizes == 0)
        if not col.size:
            raise ValueError(f"method {name!r} needs F(0): a '0' (zero-shot) column with its F")
        v = log_f[:, col[0]]
    if not np.all(np.isfinite(v)):
        raise ValueError(f"method {name!r}: log F is not finite for rows {np.flatnonzero(~np.isfinite(v)).tolist()}")
    return np.broadcast_to(v[:, None], (k_rows, n_sizes)).copy(), v.copy()


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
    m = METHODS[method]
    law = m.law
    mask = fit_mask(law, sizes, loss, budget, base)
    d = np.broadcast_to(np.asarray(sizes, np.float64), loss.shape)
    kw = dict(n_starts=st.n_starts, seed=st.seed, solver=st.solver, max_steps=st.max_steps, theta0=theta0, mesh=mesh)
    if m.joint:
        fit = fit_curves_joint(law, d, loss, mask, extra, group, tied=getattr(st, m.tied), tau_scale=st.tau_scale,
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
    ``extra`` [K, M] / ``extra_target`` [K]: the method's log F (from :func:`method_extra`). ``theta0`` [K, P]: start the law
    fit there instead of the seeded multi-start (bootstrap refits start at the original fit).
    ``mesh``: shard the law fits' row axis over ``mesh['candidate']``.
    """
    loss = np.asarray(loss, np.float64)
    budget = np.asarray(budget, np.float64)
    sizes = np.asarray(sizes, np.float64)
    if group is None:
        group = np.unique(budget, return_inverse=True)[1]
    kind = METHODS[method].kind if method in METHODS else None
    if kind == "law":
        return _law_rows(method, sizes, loss, budget, group, base, st, extra, extra_target, target, theta0, mesh)
    if kind in ("local", "ensemble"):
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
