"""LensLLM's NTK term and laws: F in units (independent of the probe count, never underflowing),
the tied-scale law's invariance to a common rescaling of F, and the reference's two modes against
a SciPy float64 implementation of the same objectives."""

import numpy as np
import pytest
from scipy.optimize import least_squares

import lensjax
from lensjax.selection import pipeline
from lensjax.selection.curves import Curves
from lensjax.selection.data import load_pairs, tokenize
from lensjax.selection.selectors import select_many
from tiny_hf import make_with_tokenizer, write_addition_jsonl

SIZES = np.array([0, 200, 400, 800, 1600, 3200, 6400, 12800], np.float64)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("lens")
    make_with_tokenizer("llama", root / "llama")
    data = write_addition_jsonl(root / "add.jsonl", n=300)
    return lensjax.load(str(root / "llama")), str(data)


@pytest.mark.slow
def test_f_does_not_depend_on_the_probe_count_and_never_underflows(llama):
    m, data = llama
    train, _ = load_pairs(data)
    out = {}
    for n in (16, 64):
        tok = tokenize(m.tokenizer, train.take(range(n)), 128)
        out[n] = pipeline.compute_ntk(m.config, m.params, tok, pipeline.NTKConfig(n_probe=n), 0, 1e-3)
    t = np.array([0.0, 10.0, 100.0])
    f16, f64 = out[16].F(t), out[64].F(t)
    # Sampling noise of F(0) = mean r0^2 at n = 16: its standard error.
    r2 = (out[16].r0 * 4.0) ** 2
    se = r2.std(ddof=1) / 4.0
    assert abs(f16[0] - f64[0]) < 3 * se, (f16, f64, se)
    # Unnormalised (K = J J^T, r0 unscaled) F(0) would grow 4x from n = 16 to 64, and K/n's F(100) 5.7x.
    np.testing.assert_allclose(f16, f64, rtol=0.25)
    # log-space F: finite and decreasing for any t (the float32 F of before was exactly 0 from ~800 steps).
    steps = np.array([0, 1e2, 1e4, 1e6, 1e7])
    for c in out.values():
        lf = c.log_F(steps)
        assert np.all(np.isfinite(lf)) and np.all(np.diff(lf) <= 1e-12), lf
        assert np.all(c.F(steps) > 0)


@pytest.mark.slow
def test_adam_preconditioned_kernel_differs_and_keeps_f0(llama):
    m, data = llama
    train, _ = load_pairs(data)
    tok = tokenize(m.tokenizer, train.take(range(16)), 128)
    plain = pipeline.compute_ntk(m.config, m.params, tok, pipeline.NTKConfig(n_probe=16), 0, 1e-3)
    adam = pipeline.compute_ntk(m.config, m.params, tok, pipeline.NTKConfig(n_probe=16, kernel="adam"), 0, 1e-3)
    assert adam.F(0.0) == pytest.approx(plain.F(0.0), rel=1e-9)  # same residual
    assert adam.eigvals[0] > 2 * plain.eigvals[0]  # Adam's 1/sqrt(v) scales the small gradients up


def _curves(rng, n=10, f_per_size=True):
    """Noisy curves drawn from B/(s F + D^β) + E with a per-candidate, per-size F."""
    t = np.ceil(2 * SIZES / 16)
    rate = np.exp(rng.uniform(-9, -6, n))
    log_f = np.log(np.exp(rng.uniform(0.5, 3, n)))[:, None] - (rate[:, None] * t[None] if f_per_size else 0.0)
    log_f = np.broadcast_to(log_f, (n, SIZES.size)).copy()
    B, beta, E = np.exp(rng.uniform(1, 3, n)), rng.uniform(0.3, 0.6, n), rng.uniform(0.3, 0.8, n)
    loss = B[:, None] / (3.0 * np.exp(log_f) + SIZES[None] ** beta[:, None]) + E[:, None]
    loss *= np.exp(rng.normal(0, 0.01, loss.shape))
    lf_target = np.log(np.exp(log_f[:, 0])) - (rate * np.ceil(2 * 102400 / 16) if f_per_size else 0.0)
    cur = Curves(models=tuple(f"m{i}" for i in range(n)), sizes=SIZES, loss=loss)
    return cur, log_f, lf_target


def test_lensllm_is_invariant_to_a_common_rescaling_of_f_and_uses_f():
    rng = np.random.default_rng(0)
    cur, log_f, lf_t = _curves(rng)
    kw = dict(budgets=[3200, 6400], target_size=102400, base=200)
    ref = select_many(cur, "lensllm", None, log_F=log_f, log_F_target=lf_t, **kw)
    for c in (1e-6, 1e3):
        got = select_many(cur, "lensllm", None, log_F=log_f + np.log(c), log_F_target=lf_t + np.log(c), **kw)
        for a, b in zip(ref, got):
            np.testing.assert_allclose(b.predicted, a.predicted, rtol=1e-6)
    # Linear F gives the same as log F.
    lin = select_many(cur, "lensllm", None, F=np.exp(log_f), F_target=np.exp(lf_t), **kw)
    np.testing.assert_allclose(lin[0].predicted, ref[0].predicted, rtol=1e-6)
    # F carries information: permuting it across candidates changes the predictions.
    perm = np.roll(np.arange(len(cur.models)), 3)
    other = select_many(cur, "lensllm", None, log_F=log_f[perm], log_F_target=lf_t[perm], **kw)
    assert np.max(np.abs(other[0].predicted / ref[0].predicted - 1)) > 1e-3


def _scipy_fit(resid, starts):
    best = None
    for x0 in starts:
        r = least_squares(resid, x0, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=20000)
        if best is None or r.cost < best.cost:
            best = r
    return best


def _starts(rng, k=12):
    return [np.array([rng.uniform(0, 4), rng.uniform(-3, 3), np.log(rng.uniform(0.1, 1.0)),
                      np.log(rng.uniform(0.05, 0.9))]) for _ in range(k)]


def test_lensllm_reference_matches_scipy_float64():
    """Phase fitting: F constant per candidate at its budget run's step, B, β, E fitted."""
    rng = np.random.default_rng(1)
    cur, log_f, _ = _curves(rng, n=6)
    budget = 3200
    sel = select_many(cur, "lensllm_reference", None, budgets=[budget], target_size=102400, base=200,
                      log_F=log_f, log_F_target=log_f[:, -1], n_starts=16)[0]
    j = int(np.flatnonzero(SIZES == budget)[0])
    use = SIZES <= budget
    for i in range(len(cur.models)):
        f = np.exp(log_f[i, j])  # the F at the budget's step, for every size
        d, y = SIZES[use], np.log(cur.loss[i, use])

        def pred(p, dd):
            B, beta, E = np.exp(p)
            return np.log(B / (f + dd ** beta) + E)

        r = _scipy_fit(lambda p: pred(p, d) - y, [s[[0, 2, 3]] for s in _starts(rng)])
        ours = np.mean((np.log(sel.fit.predict(np.broadcast_to(d, (len(cur.models), d.size)),
                                                np.full((len(cur.models), d.size), log_f[:, [j]]))[i]) - y) ** 2)
        assert ours <= 2 * r.cost / d.size + 1e-12, (i, ours, 2 * r.cost / d.size)
        np.testing.assert_allclose(sel.predicted[i], np.exp(pred(r.x, 102400.0)), rtol=1e-4)


def test_lensllm_tfit_matches_scipy_float64_fit_of_t():
    """Prediction mode: t fitted per curve, D_l = F(t) = Σ_k exp(−2ηλ_k t)(u_kᵀr₀)², bounded by F(0)."""
    rng = np.random.default_rng(2)
    n, eta = 6, 1e-3
    lam = np.exp(rng.uniform(-3, 1, (n, 8)))
    proj2 = np.exp(rng.uniform(-1, 2, (n, 8)))
    f0 = proj2.sum(axis=1)
    t_true = np.exp(rng.uniform(3, 7, n))
    dl = (proj2 * np.exp(-2 * eta * lam * t_true[:, None])).sum(axis=1)
    B, beta, E = np.exp(rng.uniform(1, 3, n)), rng.uniform(0.3, 0.6, n), rng.uniform(0.3, 0.8, n)
    loss = (B[:, None] / (dl[:, None] + SIZES[None] ** beta[:, None]) + E[:, None]) * np.exp(
        rng.normal(0, 0.01, (n, SIZES.size)))
    cur = Curves(models=tuple(f"m{i}" for i in range(n)), sizes=SIZES, loss=loss)
    log_f = np.broadcast_to(np.log(f0)[:, None], loss.shape)  # only F(0) is read
    sel = select_many(cur, "lensllm_tfit", None, budgets=[6400], target_size=102400, base=200, log_F=log_f,
                      log_F_target=np.log(f0), n_starts=16)[0]
    use = SIZES <= 6400
    d = SIZES[use]
    for i in range(n):
        y = np.log(loss[i, use])

        def pred(p, dd):
            b, t, bt, e = np.exp(p)
            return np.log(b / ((proj2[i] * np.exp(-2 * eta * lam[i] * t)).sum() + dd ** bt) + e)

        starts = [np.array([s[0], np.log(rng.uniform(1, 3000)), s[2], s[3]]) for s in _starts(rng)]
        r = _scipy_fit(lambda p: pred(p, d) - y, starts)
        ours = 2 * r.cost / d.size
        np.testing.assert_allclose(sel.fit.objective[i], ours, rtol=1e-3, atol=1e-10)
        np.testing.assert_allclose(sel.predicted[i], np.exp(pred(r.x, 102400.0)), rtol=1e-3)
        assert sel.fit.params["q"][i] > 0  # D_l = F(0) e^{-q} < F(0)


def _readme_experiment_rows():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    sec = text[text.index("### Experiment: `python scripts/lensllm_experiment.py`"):]
    return sec[: sec.index("\n## ")]


def test_readme_experiment_table_is_the_committed_json():
    import json
    from pathlib import Path

    payload = json.loads((Path(__file__).resolve().parents[1] / "docs" / "lensllm_experiment.json").read_text())
    sec = _readme_experiment_rows()
    n = 0
    for tk in payload["tasks"]:
        part = sec[sec.index(f"**{tk['task']}**"):]
        for r in tk["results"]:
            row = f"| {r['method']} | {r['budget']} | {r['rmse_target']:.4f} | {r['rmse_curve']:.4f} |"
            assert row in part, row
            n += 1
    assert n >= 2 * 3 * 13 and len(payload["spec"]["zoo"]) >= 12
    assert len({z[1] for z in payload["spec"]["zoo"]}) >= 5 and len(payload["tasks"]) == 2


@pytest.mark.slow
def test_experiment_smoke(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "q.json"
    r = subprocess.run([sys.executable, str(repo / "scripts" / "lensllm_experiment.py"), "--quick", "--task", "mul",
                        "--root", str(tmp_path / "zoo"), "--out", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    payload = json.loads(out.read_text())
    (tk,) = payload["tasks"]
    methods = {x["method"] for x in tk["results"]}
    assert {"lensllm", "lensllm_reference", "lensllm_tfit", "rectified", "rectified_joint", "ats", "ensemble",
            "lensllm[F=1]"} <= methods
    assert all(np.isfinite(x["rmse_target"]) and np.isfinite(x["rmse_curve"]) for x in tk["results"])
    c = tk["cost"]["200"]
    assert c["eval_flops"] > 0 and c["ntk_flops"] > 0
    assert max(v["abs_diff"] for v in tk["parity"].values()) < 1e-3
    rep = subprocess.run([sys.executable, str(repo / "scripts" / "lensllm_experiment.py"), "--report", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0 and "| lensllm | 200 |" in rep.stdout


def test_log_f_term_is_finite_where_float64_f_underflows():
    import jax
    import jax.numpy as jnp

    from lensjax.kernels import ntk

    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 12))
    K = a @ a.T + np.eye(12)
    r0 = rng.normal(size=12)
    with jax.enable_x64(True):
        theta, r = ntk.normalize(jnp.asarray(K), jnp.asarray(r0), "mean")
        w, u = ntk.spectrum(theta)
        t = jnp.asarray([0.0, 1e3, 1e5, 1e7])
        lf = np.asarray(ntk.log_f_term(w, u, r, 1e-2, t))
        f = np.asarray(ntk.f_term(w, u, r, 1e-2, t))
    assert np.all(np.isfinite(lf)) and np.all(np.diff(lf) < 0)
    assert f[-1] == 0.0  # the linear F underflows float64 ...
    np.testing.assert_allclose(lf[0], np.log(np.mean(r0**2)), rtol=1e-12)  # F(0) = mean r0^2
    # ... and log F agrees with the float64 reference where F is representable.
    wn, un = np.linalg.eigh(K / 12)
    ref = np.log(np.sum(np.exp(-2e-2 * np.maximum(wn, 0) * 1e3) * (un.T @ (r0 / np.sqrt(12))) ** 2))
    np.testing.assert_allclose(lf[1], ref, rtol=1e-9)
