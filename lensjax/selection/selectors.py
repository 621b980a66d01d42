"""Model selectors on loss curves, with the protocol of Lin et al. (ICML 2024).

Protocol (every part configurable): the target size is ``target_size`` (default 1,638,400); the
data budget is ``budget = target_size / ratio`` for ratio in {8, 16, ..., 512}; the ladder is every
measured size D of the table with ``base <= D <= budget`` (on the shipped tables: 200·2^k ≤ budget).
Each method turns the in-budget measurements of each candidate into a loss-like score (lower is
better), the candidates are ranked by it, and the metrics of :mod:`.metrics` compare the score with
the true loss at the target when the table has it.

Methods:

* ``rectified`` — the rectified law ``B/(D_l + D^β) + E`` fitted on {0} ∪ ladder (their "OurFit"),
  predicted at the target.
* ``vanilla`` — ``(1/(B·D^β) + E)^α`` fitted on the ladder (no zero-shot point).
* ``ats`` — Accept-then-Stop: walk from the largest ladder point down, fitting a line in log–log to
  the last p points (p = k, k+1, ...) and stop at the first earlier point whose standardised
  residual exceeds δ; extrapolate the line through the accepted points. As published it never uses
  the smallest ladder point (``ats_include_smallest=True`` lets it).
* ``zeroshot`` — the zero-shot loss (column 0).
* ``subtuning`` — the loss at the largest in-budget size.
* ``modelsize`` — ``−log(parameters)``. The published tables use ``+log(size)`` as the "feature",
  which makes a good predictor show a *negative* Pearson correlation (−20.9 on FLAN); with the
  minus sign every method here is "higher correlation with the true loss is better".
* ``lensllm`` — ``B/(s·F + D^β) + E`` with F given per candidate and size (the NTK pipeline
  computes it) and s tied across the candidates; ``lensllm_reference``, ``lensllm_tfit`` and
  ``lensllm_fixed`` are the released code's two modes and an ablation (:mod:`.predictors`).
  Without F they raise.
* ``rectified_nofloor``, ``lensllm_nofloor``, ``rectified_joint``, ``rectified_nofloor_joint``,
  ``local`` and ``ensemble`` (the default) — see :mod:`.predictors`.

With ``n_boot > 0`` every method that predicts the loss at the target also gets a bootstrap
(:mod:`.uncertainty`): an interval per candidate, P(best) and P(within ε of the best).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from lensjax.selection import cost as cost_mod
from lensjax.selection.curves import Curves
from lensjax.selection import predictors
from lensjax.selection.fit import CurveFit
from lensjax.selection.laws import LAWS
from lensjax.selection.metrics import selection_metrics
from lensjax.selection.predictors import PREDICTORS, Settings, ats_predict  # noqa: F401  (re-exported)
from lensjax.selection.uncertainty import Bootstrap, bootstrap_rows

TARGET_SIZE = 1_638_400
RATIOS = (8, 16, 32, 64, 128, 256, 512)
BASE_SIZE = 200

LAW_METHODS = tuple(predictors.LAW_METHODS)
METHODS = tuple(predictors.METHODS)
# Minimum measured points per candidate that each method needs (laws: counting the zero-shot point).
MIN_POINTS = {name: m.min_points for name, m in predictors.METHODS.items()}
# The CLI's default: chosen by leave-one-dataset-out validation on the shipped curves
# (scripts/choose_default_method.py; the result table is in the README).
DEFAULT_METHOD = "ensemble"
# Model-error coefficients of the intervals, calibrated on the shipped curves by the same script:
# ensemble: s.d. = coefficient × RMS short/long disagreement; other methods: × ln(target/budget).
DEFAULT_SPREAD_ERROR = 1.0
DEFAULT_MODEL_ERROR = 0.0275
# Fraction of the model-error variance common to all candidates of a budget (same script).
DEFAULT_MODEL_ERROR_CORR = 0.3
DEFAULT_EPS = 0.05


class SelectionError(ValueError):
    """The selection cannot be made as asked (method, data, or budget)."""


@dataclasses.dataclass(frozen=True)
class Protocol:
    target_size: float = TARGET_SIZE
    ratio: float | None = 8
    budget: float | None = None  # overrides ratio
    base: float = BASE_SIZE

    @property
    def budget_size(self) -> float:
        if self.budget is not None:
            return float(self.budget)
        if self.ratio is None or self.ratio <= 0:
            raise SelectionError("give a positive ratio or a budget")
        return self.target_size / self.ratio

    @property
    def ratio_value(self) -> float:
        return self.target_size / self.budget_size

    def ladder(self, sizes) -> np.ndarray:
        sizes = np.asarray(sizes, np.float64)
        return sizes[(sizes > 0) & (sizes >= self.base) & (sizes <= self.budget_size)]


@dataclasses.dataclass
class Selection:
    method: str
    protocol: Protocol
    models: tuple[str, ...]
    predicted: np.ndarray  # [N] loss-like score, lower is better
    converged: np.ndarray  # [N] bool (True for methods with nothing to converge)
    sizes_used: np.ndarray  # data sizes fine-tuned on (excluding 0)
    cost: dict
    true: np.ndarray | None = None  # [N] true loss at the target, NaN where unknown
    metrics: dict | None = None
    fit: CurveFit | None = None
    n_points: np.ndarray | None = None  # [N] points each prediction used
    bootstrap: Bootstrap | None = None  # replicate predictions at the target (n_boot > 0)
    eps: float = DEFAULT_EPS
    model_error: float | None = None
    model_error_corr: float | None = None
    ensemble_weight: float | None = None  # weight of the long-range law (method "ensemble")
    settings: dict | None = None

    @property
    def interval(self) -> np.ndarray | None:
        """[N, 2] prediction interval at ``bootstrap.level``, or None without a bootstrap."""
        return None if self.bootstrap is None else self.bootstrap.interval()

    @property
    def p_best(self) -> np.ndarray | None:
        return None if self.bootstrap is None else self.bootstrap.p_best()

    @property
    def p_within(self) -> np.ndarray | None:
        return None if self.bootstrap is None else self.bootstrap.p_within(self.eps)

    @property
    def ranking(self) -> list[str]:
        order = np.argsort(self.predicted, kind="stable")
        return [self.models[i] for i in order]

    @property
    def predicts_loss(self) -> bool:
        return self.method not in ("modelsize",)

    def rmse(self) -> float | None:
        if self.true is None or not self.predicts_loss or self.method == "zeroshot":
            return None
        ok = np.isfinite(self.true)
        return float(np.sqrt(np.mean((self.predicted[ok] - self.true[ok]) ** 2))) if ok.any() else None

    def to_json(self) -> dict:
        out = {
            "method": self.method,
            "ratio": _num(self.protocol.ratio_value),
            "budget": _num(self.protocol.budget_size),
            "target_size": _num(self.protocol.target_size),
            "ranking": self.ranking,
            "predicted": {m: float(p) for m, p in zip(self.models, self.predicted)},
            "converged": {m: bool(c) for m, c in zip(self.models, self.converged)},
            "metrics": self.metrics,
            "cost_fraction": self.cost["cost_fraction"],
            "flops": self.cost["flops"],
            "full_flops": self.cost["full_flops"],
        }
        if self.true is not None:
            out["true"] = {m: (float(t) if np.isfinite(t) else None) for m, t in zip(self.models, self.true)}
            out["rmse"] = self.rmse()
        if self.settings is not None:
            out["settings"] = self.settings
        if self.ensemble_weight is not None:
            out["ensemble_weight"] = self.ensemble_weight
        if self.bootstrap is not None:
            iv, pb, pw = self.interval, self.p_best, self.p_within
            out["level"] = self.bootstrap.level
            out["n_boot"] = int(self.bootstrap.draws.shape[1])
            out["model_error"] = self.model_error
            out["model_error_scale"] = "spread" if self.method == "ensemble" else "log_ratio"
            out["model_error_corr"] = self.model_error_corr
            out["interval"] = {m: [float(iv[i, 0]), float(iv[i, 1])] for i, m in enumerate(self.models)}
            out["p_best"] = {m: float(pb[i]) for i, m in enumerate(self.models)}
            out["eps"] = self.eps
            out["p_within"] = {m: float(pw[i]) for i, m in enumerate(self.models)}
            best = int(np.argmin(self.predicted))
            out["p_selected_within_eps"] = float(pw[best])
        if self.fit is not None:
            out["params"] = {
                m: {k: float(v[i]) for k, v in self.fit.params.items()} | {"log_mse": float(self.fit.objective[i])}
                for i, m in enumerate(self.models)
            }
        return out


def default_model_error(method: str) -> float:
    """The calibrated model-error coefficient for ``method`` (see :mod:`.uncertainty`)."""
    return DEFAULT_SPREAD_ERROR if method == "ensemble" else DEFAULT_MODEL_ERROR


def _method_settings(method: str, st: Settings) -> dict | None:
    return predictors.method_settings(method, st)


def _num(x: float):
    return int(x) if float(x).is_integer() else float(x)


# ------------------------------------------------------------------------------------ selection
def _slice_fit(fit, sl):
    return CurveFit(law=fit.law, theta=fit.theta[sl], params={k: v[sl] for k, v in fit.params.items()},
                    objective=fit.objective[sl], converged=fit.converged[sl], steps=fit.steps[sl],
                    start_objective=fit.start_objective[sl])


def _require_points(curves: Curves, mask: np.ndarray, method: str, protocol: Protocol, need: int | None = None):
    need = MIN_POINTS[method] if need is None else max(need, MIN_POINTS.get(method, 0))
    have = mask.sum(axis=1)
    bad = [f"{curves.models[i]} ({have[i]})" for i in np.flatnonzero(have < need)]
    if bad:
        raise SelectionError(
            f"method {method!r} needs at least {need} measured points within the budget "
            f"{_num(protocol.budget_size)} (ratio {protocol.ratio_value:g}); too few for: " + ", ".join(bad)
        )


def _log_f_matrix(curves: Curves, F, F_target, log_F, log_F_target, target_size):
    """The NTK term as (log F [N, M], log F at the target [N]) from either the linear ``F`` ([N]:
    constant per candidate, or [N, M]) or ``log_F`` (the pipeline's, which never underflows)."""
    n, m = curves.loss.shape
    if log_F is None and F is None:
        return None, None
    if log_F is None:
        with np.errstate(divide="ignore"):
            log_F = np.log(np.asarray(F, np.float64))
            log_F_target = None if F_target is None else np.log(np.asarray(F_target, np.float64))
    log_F = np.asarray(log_F, np.float64)
    if log_F.shape == (n,):
        cols, tgt = np.broadcast_to(log_F[:, None], (n, m)).copy(), log_F
    elif log_F.shape == (n, m):
        cols = log_F
        col = np.flatnonzero(curves.sizes == target_size)
        tgt = log_F[:, col[0]] if col.size else None
    else:
        raise SelectionError(f"F must have shape ({n},) or ({n}, {m}); got {log_F.shape}")
    if log_F_target is not None:
        tgt = np.asarray(log_F_target, np.float64).reshape(n)
    return cols, tgt


def select_many(
    curves: Curves,
    method: str = DEFAULT_METHOD,
    ratios: Sequence[float] | None = RATIOS,
    *,
    budgets: Sequence[float] | None = None,
    target_size: float = TARGET_SIZE,
    base: float = BASE_SIZE,
    settings: Settings | None = None,
    ats_k: int | None = None,
    ats_delta: float | None = None,
    ats_include_smallest: bool | None = None,
    n_starts: int | None = None,
    seed: int | None = None,
    solver: str | None = None,
    max_steps: int | None = None,
    F=None,
    F_target=None,
    log_F=None,
    log_F_target=None,
    n_boot: int = 0,
    level: float = 0.95,
    eps: float = DEFAULT_EPS,
    model_error: float | None = None,
    model_error_corr: float = DEFAULT_MODEL_ERROR_CORR,
    mesh=None,
    tokens_per_sample: int = cost_mod.DEFAULT_TOKENS_PER_SAMPLE,
    epochs: float = 1.0,
) -> list[Selection]:
    """One :class:`Selection` per ratio (or budget). All budgets run as one batch of rows.

    ``settings`` holds every method's settings (:class:`~lensjax.selection.predictors.Settings`);
    the keyword shortcuts (``ats_k``, ``n_starts``, ...) override it. ``n_boot`` > 0 adds a
    bootstrap (:mod:`.uncertainty`) to methods that predict the loss at the target: intervals at
    ``level``, P(best) and P(within ``eps`` of the best), with the model-error coefficient
    ``model_error`` (0: measurement noise only; default :func:`default_model_error`) and the
    fraction ``model_error_corr`` of its variance shared by all candidates of a budget.

    The LensLLM methods need the NTK term: ``F`` [N] (constant per candidate) or [N, M] (per
    size), with ``F_target`` [N] at the target, or the same in log space (``log_F``,
    ``log_F_target``; what :func:`lensjax.selection.pipeline.run` passes, since F underflows
    float64 once t is large). What each method takes from it is :func:`predictors.method_extra`.
    """
    if method not in METHODS:
        raise SelectionError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    st = settings or Settings()
    over = dict(ats_k=ats_k, ats_delta=ats_delta, ats_include_smallest=ats_include_smallest, n_starts=n_starts,
                seed=seed, solver=solver, max_steps=max_steps)
    st = dataclasses.replace(st, **{k: v for k, v in over.items() if v is not None})
    try:
        st.validate()
    except ValueError as exc:
        raise SelectionError(str(exc)) from None
    model_error = default_model_error(method) if model_error is None else float(model_error)
    if not model_error >= 0:
        raise SelectionError(f"model_error must be >= 0; got {model_error}")
    if not 0 < level < 1:
        raise SelectionError(f"level must be in (0, 1); got {level}")
    if budgets is not None:
        protocols = [Protocol(target_size=target_size, ratio=None, budget=b, base=base) for b in budgets]
    else:
        if not ratios:
            raise SelectionError("give at least one ratio or budget")
        protocols = [Protocol(target_size=target_size, ratio=r, base=base) for r in ratios]
    n, m = curves.loss.shape
    n_pr = len(protocols)
    sizes = curves.sizes
    true = curves.column(target_size)
    measured = np.isfinite(curves.loss)

    preds, convs, used_sizes, fits, npts = [], [], [], [None] * n_pr, []
    boots, weights = [None] * n_pr, [None] * n_pr
    if method in PREDICTORS:
        entry = predictors.METHODS[method]
        law = predictors.law_of(method, st)
        lf_cols, lf_target = _log_f_matrix(curves, F, F_target, log_F, log_F_target, target_size)
        for pr in protocols:
            in_ladder = np.isin(sizes, pr.ladder(sizes))
            lad = measured & in_ladder[None, :]
            if entry.kind in ("local", "ensemble"):
                _require_points(curves, lad, "ats" if method == "ensemble" else method, pr)
            if law is not None:
                fm = lad | (measured & ((sizes == 0) & LAWS[law].allows_zero)[None, :])
                _require_points(curves, fm, method, pr, need=LAWS[law].n_params)
            used_sizes.append(pr.ladder(sizes))
        budget = np.repeat([pr.budget_size for pr in protocols], n)
        loss = np.tile(curves.loss, (n_pr, 1))
        group = np.repeat(np.arange(n_pr), n)
        extra = extra_t = None
        if entry.f_term is not None:
            try:
                extra, extra_t = predictors.method_extra(
                    method, sizes, loss, budget, base, None if lf_cols is None else np.tile(lf_cols, (n_pr, 1)),
                    None if lf_target is None else np.tile(lf_target, n_pr))
            except ValueError as exc:
                raise SelectionError(str(exc)) from None
        try:
            rp = predictors.predict_rows(method, sizes, loss, budget, target_size, base=base, st=st, group=group,
                                         extra=extra, extra_target=extra_t, mesh=mesh)
        except ValueError as exc:
            raise SelectionError(str(exc)) from None
        rb = None
        if n_boot:
            try:
                rb = bootstrap_rows(method, sizes, loss, budget, target_size, base=base, st=st, point=rp,
                                    group=group, extra=extra, extra_target=extra_t, n_boot=n_boot, seed=st.seed,
                                    mesh=mesh)
            except ValueError as exc:
                raise SelectionError(str(exc)) from None
            try:
                draws = rb.draws(model_error, model_error_corr)
            except ValueError as exc:
                raise SelectionError(str(exc)) from None
        for i in range(n_pr):
            sl = slice(i * n, (i + 1) * n)
            preds.append(rp.pred[sl])
            convs.append(rp.converged[sl])
            npts.append(rp.n_points[sl])
            if rp.fit is not None:
                fits[i] = _slice_fit(rp.fit, sl)
            if rp.weight is not None:
                weights[i] = float(rp.weight[sl][0])
            if rb is not None:
                boots[i] = Bootstrap(draws=draws[sl], level=level, parts=rb.rows(sl))
    else:
        for pr in protocols:
            ladder = pr.ladder(sizes)
            in_ladder = np.isin(sizes, ladder)
            if method == "subtuning":
                mask = measured & in_ladder[None, :]
                _require_points(curves, mask, method, pr)
                last = m - 1 - np.argmax(mask[:, ::-1], axis=1)  # largest measured in-budget size
                pred, cnt = curves.loss[np.arange(n), last], np.ones(n, int)
                used = ladder[-1:]
            elif method == "zeroshot":
                zs = curves.column(0)
                if zs is None:
                    raise SelectionError("method 'zeroshot' needs a '0' (zero-shot loss) column")
                missing = [curves.models[i] for i in np.flatnonzero(~np.isfinite(zs))]
                if missing:
                    raise SelectionError(f"method 'zeroshot': no zero-shot loss for {', '.join(missing)}")
                pred, cnt, used = zs.copy(), np.ones(n, int), np.zeros(0)
            else:  # modelsize
                if curves.params is None:
                    raise SelectionError("method 'modelsize' needs a 'size' (parameter count) column")
                missing = [curves.models[i] for i in np.flatnonzero(~np.isfinite(curves.params))]
                if missing:
                    raise SelectionError(f"method 'modelsize': no parameter count for {', '.join(missing)}")
                pred, cnt, used = -np.log(curves.params), np.zeros(n, int), np.zeros(0)
            preds.append(pred)
            convs.append(np.ones(n, bool))
            used_sizes.append(used)
            npts.append(cnt)

    params = curves.params if curves.params is not None else np.full(n, np.nan)
    out = []
    for i, pr in enumerate(protocols):
        pred = np.asarray(preds[i], np.float64)
        if not np.all(np.isfinite(pred)):
            bad = [curves.models[j] for j in np.flatnonzero(~np.isfinite(pred))]
            raise SelectionError(f"method {method!r} produced a non-finite prediction for {', '.join(bad)}")
        metrics = None
        if true is not None:
            ok = np.isfinite(true)
            if ok.sum() >= 2:
                metrics = selection_metrics(pred[ok], true[ok])
                metrics["n_models"] = int(ok.sum())
        out.append(Selection(
            method=method, protocol=pr, models=curves.models, predicted=pred,
            converged=np.asarray(convs[i], bool), sizes_used=np.asarray(used_sizes[i]),
            cost=cost_mod.selection_cost(params, used_sizes[i], target_size,
                                         tokens_per_sample=tokens_per_sample, epochs=epochs),
            true=None if true is None else true.copy(), metrics=metrics, fit=fits[i],
            n_points=np.asarray(npts[i]), bootstrap=boots[i], eps=eps,
            model_error=model_error if boots[i] is not None else None,
            model_error_corr=model_error_corr if boots[i] is not None else None, ensemble_weight=weights[i],
            settings=_method_settings(method, st),
        ))
    return out


def select(curves: Curves, method: str = DEFAULT_METHOD, ratio: float | None = 8, **kw) -> Selection:
    """One selection at one ratio (or ``budget=``); see :func:`select_many` for the options."""
    budget = kw.pop("budget", None)
    if budget is not None:
        return select_many(curves, method, None, budgets=[budget], **kw)[0]
    return select_many(curves, method, [ratio], **kw)[0]

