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
* ``lensllm`` — ``B/(F + D^β) + E`` with F given (per curve or per curve and size; the NTK
  pipeline computes it), fitted on {0} ∪ ladder. Without F it raises.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from lensjax.selection import cost as cost_mod
from lensjax.selection.curves import Curves
from lensjax.selection.fit import CurveFit, fit_curves
from lensjax.selection.laws import LAWS
from lensjax.selection.metrics import selection_metrics

TARGET_SIZE = 1_638_400
RATIOS = (8, 16, 32, 64, 128, 256, 512)
BASE_SIZE = 200

LAW_METHODS = ("rectified", "vanilla", "lensllm")
METHODS = ("rectified", "vanilla", "ats", "zeroshot", "subtuning", "modelsize", "lensllm")
# Minimum measured points per candidate that each method needs.
MIN_POINTS = {"rectified": 4, "vanilla": 4, "lensllm": 3, "ats": 2, "subtuning": 1, "zeroshot": 0, "modelsize": 0}


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
        if self.fit is not None:
            out["params"] = {
                m: {k: float(v[i]) for k, v in self.fit.params.items()} | {"log_mse": float(self.fit.objective[i])}
                for i, m in enumerate(self.models)
            }
        return out


def _num(x: float):
    return int(x) if float(x).is_integer() else float(x)


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
    valid = np.isfinite(loss)
    n = valid.sum(axis=1)
    # Right-align each curve's measured points (smallest first), so "the last p points" is a slice.
    order = np.argsort(valid, axis=1, kind="stable")
    x = np.take_along_axis(np.broadcast_to(np.log(sizes), loss.shape), order, axis=1)
    y = np.take_along_axis(np.log(np.where(valid, loss, 1.0)), order, axis=1)
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


# ------------------------------------------------------------------------------------ selection
def _require_points(curves: Curves, mask: np.ndarray, method: str, protocol: Protocol):
    need = MIN_POINTS[method]
    have = mask.sum(axis=1)
    bad = [f"{curves.models[i]} ({have[i]})" for i in np.flatnonzero(have < need)]
    if bad:
        raise SelectionError(
            f"method {method!r} needs at least {need} measured points within the budget "
            f"{_num(protocol.budget_size)} (ratio {protocol.ratio_value:g}); too few for: " + ", ".join(bad)
        )


def _f_matrix(curves: Curves, F, F_target, target_size):
    n, m = curves.loss.shape
    if F is None:
        raise SelectionError(
            "method 'lensllm' needs the NTK term F (per candidate, or per candidate and size); "
            "compute it with the NTK pipeline or use --method rectified"
        )
    F = np.asarray(F, np.float64)
    if F.shape == (n,):
        f_cols, f_target = np.broadcast_to(F[:, None], (n, m)), F
    elif F.shape == (n, m):
        f_cols = F
        col = np.flatnonzero(curves.sizes == target_size)
        f_target = F[:, col[0]] if col.size else None
    else:
        raise SelectionError(f"F must have shape ({n},) or ({n}, {m}); got {F.shape}")
    if F_target is not None:
        f_target = np.asarray(F_target, np.float64).reshape(n)
    if f_target is None:
        raise SelectionError("F is per size but has no value at the target size; pass F_target")
    return f_cols, f_target


def select_many(
    curves: Curves,
    method: str = "rectified",
    ratios: Sequence[float] | None = RATIOS,
    *,
    budgets: Sequence[float] | None = None,
    target_size: float = TARGET_SIZE,
    base: float = BASE_SIZE,
    ats_k: int = 3,
    ats_delta: float = 5.0,
    ats_include_smallest: bool = False,
    F=None,
    F_target=None,
    n_starts: int = 8,
    seed: int = 0,
    solver: str = "lm",
    max_steps: int = 400,
    mesh=None,
    tokens_per_sample: int = cost_mod.DEFAULT_TOKENS_PER_SAMPLE,
    epochs: float = 1.0,
) -> list[Selection]:
    """One :class:`Selection` per ratio (or budget). Law fits for all budgets run as one batch."""
    if method not in METHODS:
        raise SelectionError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if budgets is not None:
        protocols = [Protocol(target_size=target_size, ratio=None, budget=b, base=base) for b in budgets]
    else:
        if not ratios:
            raise SelectionError("give at least one ratio or budget")
        protocols = [Protocol(target_size=target_size, ratio=r, base=base) for r in ratios]
    n, m = curves.loss.shape
    sizes = curves.sizes
    true = curves.column(target_size)
    measured = np.isfinite(curves.loss)

    preds, convs, used_sizes, fits, npts = [], [], [], [None] * len(protocols), []
    if method in LAW_METHODS:
        law = LAWS[method]
        f_cols = f_target = None
        if method == "lensllm":
            f_cols, f_target = _f_matrix(curves, F, F_target, target_size)
        masks = []
        for pr in protocols:
            in_ladder = np.isin(sizes, pr.ladder(sizes))
            cols = in_ladder | ((sizes == 0) & law.allows_zero)
            mask = measured & cols[None, :]
            _require_points(curves, mask, method, pr)
            masks.append(mask)
            used_sizes.append(pr.ladder(sizes))
        big_mask = np.concatenate(masks, axis=0)
        d = np.broadcast_to(sizes, big_mask.shape)
        loss = np.tile(curves.loss, (len(protocols), 1))
        extra = None if f_cols is None else np.tile(f_cols, (len(protocols), 1))
        fit = fit_curves(law, d, loss, big_mask, extra, n_starts=n_starts, seed=seed, solver=solver,
                         max_steps=max_steps, mesh=mesh)
        extra_t = None if f_target is None else np.tile(f_target, len(protocols))[:, None]
        pred_all = fit.predict(np.full((fit.theta.shape[0], 1), target_size), extra_t)[:, 0]
        for i in range(len(protocols)):
            sl = slice(i * n, (i + 1) * n)
            fits[i] = CurveFit(
                law=fit.law, theta=fit.theta[sl], params={k: v[sl] for k, v in fit.params.items()},
                objective=fit.objective[sl], converged=fit.converged[sl], steps=fit.steps[sl],
                start_objective=fit.start_objective[sl],
            )
            preds.append(pred_all[sl])
            convs.append(fit.converged[sl])
            npts.append(masks[i].sum(axis=1))
    else:
        for pr in protocols:
            ladder = pr.ladder(sizes)
            in_ladder = np.isin(sizes, ladder)
            if method == "ats":
                mask = measured & in_ladder[None, :]
                _require_points(curves, mask, method, pr)
                pred, cnt = ats_predict(sizes[in_ladder], curves.loss[:, in_ladder], target_size,
                                        k=ats_k, delta=ats_delta, include_smallest=ats_include_smallest)
                used = ladder
            elif method == "subtuning":
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
            n_points=np.asarray(npts[i]),
        ))
    return out


def select(curves: Curves, method: str = "rectified", ratio: float | None = 8, **kw) -> Selection:
    """One selection at one ratio (or ``budget=``); see :func:`select_many` for the options."""
    budget = kw.pop("budget", None)
    if budget is not None:
        return select_many(curves, method, None, budgets=[budget], **kw)[0]
    return select_many(curves, method, [ratio], **kw)[0]

