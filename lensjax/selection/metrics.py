"""Selection metrics. Every score is "higher is better" given a prediction that is loss-like.

* ``pearson``: as the reference (``scipy.stats.pearsonr`` on float32 arrays of the predicted
  score and the true loss at the target).
* ``relacc``: (worst − selected) / (worst − best) of the true target losses, where "selected" is
  the model with the lowest predicted score; ties in the prediction go to the first model in table
  order (as the reference's ``argmin``). If every model has the same true loss, RelAcc is 1.
* ``spearman`` and ``kendall`` (tau-b): rank correlations of prediction and truth.
* ``top{k}``: 1.0 if the truly best model is among the k lowest predictions, else 0.0.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats


def selected_index(pred) -> int:
    return int(np.argmin(np.asarray(pred)))


def relacc(pred, true) -> float:
    true = np.asarray(true, np.float64)
    best, worst = true.min(), true.max()
    if worst == best:
        return 1.0
    return float((worst - true[selected_index(pred)]) / (worst - best))


def topk_hit(pred, true, k: int) -> float:
    order = np.argsort(np.asarray(pred), kind="stable")[:k]
    return float(int(np.argmin(np.asarray(true))) in order)


def _corr(fn, a, b) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: the coefficient is NaN, reported as such
        return float(fn(a, b)[0])


def selection_metrics(pred, true, ks=(1, 3, 5)) -> dict[str, float]:
    """All metrics for one selection; ``pred`` and ``true`` are [N] over the same models."""
    pred = np.asarray(pred, np.float64)
    true = np.asarray(true, np.float64)
    if pred.shape != true.shape or pred.ndim != 1:
        raise ValueError(f"pred and true must be [N] arrays of one length; got {pred.shape}, {true.shape}")
    if not (np.all(np.isfinite(pred)) and np.all(np.isfinite(true))):
        raise ValueError("metrics need finite predictions and true losses")
    out = {
        "pearson": _corr(stats.pearsonr, pred.astype(np.float32), true.astype(np.float32)),
        "relacc": relacc(pred, true),
        "spearman": _corr(stats.spearmanr, pred, true),
        "kendall": _corr(stats.kendalltau, pred, true),
    }
    for k in ks:
        out[f"top{k}"] = topk_hit(pred, true, k)
    return out
