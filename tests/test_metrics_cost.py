import numpy as np
import pytest
from scipy import stats

from lensjax.selection.cost import finetune_flops, selection_cost
from lensjax.selection.curves import load_embedded
from lensjax.selection.metrics import relacc, selection_metrics, topk_hit
from lensjax.selection.selectors import select


def test_metrics_against_scipy():
    rng = np.random.default_rng(0)
    pred, true = rng.normal(size=30), rng.normal(size=30)
    m = selection_metrics(pred, true)
    assert m["pearson"] == pytest.approx(np.corrcoef(pred, true)[0, 1], abs=1e-6)
    assert m["spearman"] == pytest.approx(stats.spearmanr(pred, true)[0])
    assert m["kendall"] == pytest.approx(stats.kendalltau(pred, true)[0])


def test_relacc_definition_and_ties():
    true = np.array([3.0, 1.0, 2.0])
    assert relacc(np.array([0.5, 0.1, 0.2]), true) == 1.0
    assert relacc(np.array([0.0, 0.5, 0.5]), true) == 0.0
    assert relacc(np.array([1.0, 0.2, 0.2]), true) == 1.0  # tie: first in table order
    assert relacc(np.array([1.0, 0.2, 0.2])[[0, 2, 1]], true[[0, 2, 1]]) == 0.5
    assert relacc(np.array([1.0, 2.0]), np.array([1.0, 1.0])) == 1.0  # all equal
    assert topk_hit(np.array([3.0, 2.0, 1.0]), true, 1) == 0.0
    assert topk_hit(np.array([3.0, 2.0, 1.0]), true, 2) == 1.0


def test_flops_formula_and_cost_fraction():
    assert finetune_flops(1e9, 1000, tokens_per_sample=100, epochs=2, runs=3) == 6 * 100 * 1000 * 1e9 * 2 * 3
    c = selection_cost([1e8, 3e8], [200, 400], 1600)
    assert c["cost_fraction"] == pytest.approx(600 / 1600)
    curves = load_embedded("flan")
    sel = select(curves, "rectified", 8)
    ladder = 200 * 2 ** np.arange(11)
    assert sel.cost["cost_fraction"] == pytest.approx(ladder.sum() / 1_638_400)
    assert select(curves, "zeroshot", 8).cost["cost_fraction"] == 0.0
    assert select(curves, "subtuning", 8).cost["cost_fraction"] == pytest.approx(1 / 8)
