"""kernels/ntk.py against jax.jacrev, scipy.linalg.expm and the sketch's 1/sqrt(k) error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy.linalg import expm

import lensjax
from lensjax.kernels import ntk
from lensjax.models import lm_ntk
from lensjax.models.lm import scalar_fn
from tiny_hf import make


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("m")
    make("llama", d, gqa=True)
    model = lensjax.load(d)
    rng = np.random.default_rng(0)
    n, T = 8, 10
    ids = rng.integers(3, 128, size=(n, T)).astype(np.int32)
    attn = np.ones((n, T), bool)
    attn[1, 8:] = False
    target = np.zeros((n, T), bool)
    target[:, 5:] = True
    batch = {"ids": jnp.asarray(ids), "attn": jnp.asarray(attn), "target": jnp.asarray(target)}
    return model, batch


def test_exact_ntk_equals_jacrev(tiny):
    model, batch = tiny
    f = scalar_fn(model.config)
    flat, unravel = ravel_pytree(model.params)
    outs = lambda v: jax.vmap(lambda ex: f(unravel(v), ex))(batch)  # noqa: E731
    J = jax.jacrev(outs)(flat)
    ref = np.asarray(J @ J.T, np.float64)
    for store in (True, False):
        K = np.asarray(ntk.ntk_exact(f, model.params, batch, chunk_size=4, store_jacobian=store))
        assert np.abs(K - ref).max() / np.abs(ref).max() <= 1e-5


def test_tapped_lm_ntk_equals_jacrev(tiny):
    """lensjax.models.lm_ntk (one batched backward with Gram taps) against float64 J Jᵀ from
    jax.jacrev, all parameters and an MLP-only mask; every Llama leaf is tapped (none falls back
    to the per-sample-gradient route)."""
    model, batch = tiny
    f = scalar_fn(model.config)
    flat, unravel = ravel_pytree(model.params)
    J = np.asarray(jax.jacrev(lambda v: jax.vmap(lambda ex: f(unravel(v), ex))(batch))(flat), np.float64)
    K = np.asarray(lm_ntk.ntk_exact(model.config, model.params, batch))
    ref = J @ J.T
    assert np.abs(K - ref).max() / np.abs(ref).max() <= 1e-5
    _, tapped = lm_ntk.tap_params(model.config, model.params, 8)
    assert all(jax.tree.leaves(tapped))
    mask = jax.tree_util.tree_map_with_path(lambda p, _: "['mlp']" in jax.tree_util.keystr(p), model.params)
    cols = np.concatenate([np.ravel(m) for m in jax.tree.leaves(
        jax.tree.map(lambda a, m: np.full(a.shape, m), model.params, mask))])
    Km = np.asarray(lm_ntk.ntk_exact(model.config, model.params, batch, mask=mask))
    refm = J[:, cols] @ J[:, cols].T
    assert np.abs(Km - refm).max() / np.abs(refm).max() <= 1e-5


@pytest.mark.parametrize("family", ["gpt2"])
def test_tapped_lm_ntk_with_biases_and_learned_positions(tmp_path, family):
    """GPT-2: biases, LayerNorm biases and learned positions tapped, the tied token table left to the
    per-sample-gradient route; K against float64 jacrev, left padding included."""
    make(family, tmp_path)
    model = lensjax.load(tmp_path)
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 100, size=(4, 9)).astype(np.int32)
    attn = np.ones((4, 9), bool)
    attn[2, :3] = False
    target = np.zeros((4, 9), bool)
    target[:, 5:] = True
    batch = {"ids": jnp.asarray(ids), "attn": jnp.asarray(attn), "target": jnp.asarray(target)}
    f = scalar_fn(model.config)
    flat, unravel = ravel_pytree(model.params)
    J = np.asarray(jax.jacrev(lambda v: jax.vmap(lambda ex: f(unravel(v), ex))(batch))(flat), np.float64)
    K = np.asarray(lm_ntk.ntk_exact(model.config, model.params, batch, chunk_size=2))
    ref = J @ J.T
    assert np.abs(K - ref).max() / np.abs(ref).max() <= 1e-5
    _, tapped = lm_ntk.tap_params(model.config, model.params, 4)
    flags = jax.tree_util.tree_map_with_path(lambda p, t: (jax.tree_util.keystr(p), t), tapped)
    named = dict(jax.tree.leaves(flags, is_leaf=lambda x: isinstance(x, tuple)))
    assert named["['embed']['positions']"] and not named["['embed']['tokens']"]  # tied head


def test_masked_ntk_and_candidates_vmapped(tiny):
    model, batch = tiny
    f = scalar_fn(model.config)
    mask = jax.tree_util.tree_map_with_path(lambda p, _: "['mlp']" in jax.tree_util.keystr(p), model.params)
    K = np.asarray(ntk.ntk_exact(f, model.params, batch, chunk_size=4, mask=mask))
    sub = model.params["layers"]["mlp"]
    full = lambda s: {**model.params, "layers": {**model.params["layers"], "mlp": s}}  # noqa: E731
    flat, unravel = ravel_pytree(sub)
    J = jax.jacrev(lambda v: jax.vmap(lambda ex: f(full(unravel(v)), ex))(batch))(flat)
    np.testing.assert_allclose(K, np.asarray(J @ J.T), rtol=1e-4, atol=1e-5 * np.abs(K).max())
    # two candidates of one shape in one vmapped call
    two = jax.tree.map(lambda a: jnp.stack([a, 1.1 * a]), model.params)
    Ks = jax.vmap(lambda p: ntk.ntk_exact(f, p, batch, chunk_size=4))(two)
    # (the vmapped call is one program and the plain call another, compiled with other dot routing
    # on CPU, kernels/xla.py: equal up to float32 summation order)
    K1 = np.asarray(ntk.ntk_exact(f, model.params, batch, chunk_size=4))
    np.testing.assert_allclose(np.asarray(Ks[0]), K1, rtol=1e-5, atol=1e-5 * np.abs(K1).max())


def test_f_term_equals_expm():
    rng = np.random.default_rng(0)
    for n in (4, 16):
        a = rng.normal(size=(n, n))
        K = a @ a.T / n
        r0 = rng.normal(size=n)
        w, u = ntk.spectrum(jnp.asarray(K, jnp.float32))
        for eta, t in ((1e-2, 5.0), (3e-3, 200.0)):
            ref = r0 @ expm(-2 * eta * t * K) @ r0
            got = float(ntk.f_term(w, u, jnp.asarray(r0, jnp.float32), eta, t))
            assert got == pytest.approx(ref, rel=1e-4)
        ts = np.array([0.0, 10.0, 100.0])
        many = np.asarray(ntk.f_term(w, u, jnp.asarray(r0, jnp.float32), 1e-2, ts))
        assert many[0] == pytest.approx(r0 @ r0, rel=1e-5) and np.all(np.diff(many) < 0)
    st = ntk.ntk_stats(jnp.asarray(K, jnp.float32))
    ev = np.linalg.eigvalsh(K)[::-1]
    np.testing.assert_allclose(np.asarray(st["top_eigenvalues"])[:4], ev[:4], rtol=1e-4)
    assert float(st["effective_rank"]) == pytest.approx(ev.sum() ** 2 / (ev**2).sum(), rel=1e-4)


def test_sketch_error_falls_as_inverse_sqrt_k(tiny):
    model, batch = tiny
    f = scalar_fn(model.config)
    K = np.asarray(ntk.ntk_exact(f, model.params, batch, chunk_size=4), np.float64)
    errs = {}
    for k in (16, 256):
        e = []
        for seed in range(6):
            S = np.asarray(ntk.ntk_sketch(f, model.params, batch, jax.random.key(seed), k=k, chunk_size=16 if k >= 16 else k))
            e.append(np.linalg.norm(S - K) / np.linalg.norm(K))
        errs[k] = float(np.mean(e))
    ratio = errs[16] / errs[256]  # 1/sqrt(k) predicts 4
    assert 2.5 <= ratio <= 6.5, errs


@pytest.mark.parametrize("din,dout", [(8, 24), (24, 8), (8, 64), (12, 45)])
def test_tap_slices_equal_float64_per_sample_gram(monkeypatch, din, dout):
    """The dense tap's per-sample-gradient Gram in slices (of d_in or of d_out, whichever
    ``_slicing`` picks; an odd axis falls back to the other) against float64 NumPy. T = 32 makes
    the per-sample route the cheaper one, and the token-Gram route is made to fail if taken."""
    import functools

    from lensjax.kernels import taps

    monkeypatch.setattr(taps, "_slicing", functools.partial(taps._slicing, big=64))
    monkeypatch.setattr(taps, "_token_gram", lambda *a: pytest.fail("token-Gram route taken"))
    n, T = 5, 32
    rng = np.random.default_rng(din * dout)
    x, w = rng.normal(size=(n, T, din)).astype(np.float32), rng.normal(size=(din, dout)).astype(np.float32)
    c = rng.normal(size=(n, T, dout)).astype(np.float32)  # the cotangent of x @ w
    axis, nb = taps._slicing(n, din, dout)
    assert nb > 1 and (axis == "d") == (dout % 4 != 0 or din < dout <= 4 * din)
    f = lambda acc: jnp.sum(taps.matmul(jnp.asarray(x), jnp.asarray(w), acc) * c)  # noqa: E731
    K = np.asarray(jax.grad(f)(jnp.zeros((n, n), jnp.float32)), np.float64)
    G = np.einsum("ntd,nte->nde", x.astype(np.float64), c.astype(np.float64)).reshape(n, -1)
    np.testing.assert_allclose(K, G @ G.T, rtol=1e-5, atol=1e-5 * np.abs(G @ G.T).max())


@pytest.mark.parametrize("limit", [1, 300, 1 << 22])
def test_embedding_tap_rows_equal_float64_per_sample_gram(monkeypatch, limit):
    """The token-table tap's id-masked token Grams, R samples' rows at a time (R = 1, 2 and all 6
    here), against float64 NumPy Grams of dense per-sample table gradients; ids repeat within and
    across samples."""
    import functools

    from lensjax.kernels import taps

    monkeypatch.setattr(taps, "_rows", functools.partial(taps._rows, limit=limit))
    n, T, V, d = 6, 5, 13, 4
    rng = np.random.default_rng(limit)
    ids = rng.integers(0, V, size=(n, T)).astype(np.int32)
    ids[2, :3] = ids[0, 1]  # an id three times in one sample and once in another
    table = rng.normal(size=(V, d)).astype(np.float32)
    c = rng.normal(size=(n, T, d)).astype(np.float32)  # the cotangent of table[ids]
    assert (n * T) ** 2 * d <= n * V * d * (1 + 2 * n)  # the token-Gram route
    f = lambda acc: jnp.sum(taps.take(jnp.asarray(table), jnp.asarray(ids), acc) * c)  # noqa: E731
    K = np.asarray(jax.grad(f)(jnp.zeros((n, n), jnp.float32)), np.float64)
    G = np.zeros((n, V, d))
    for i in range(n):
        np.add.at(G[i], ids[i], c[i].astype(np.float64))
    ref = G.reshape(n, -1) @ G.reshape(n, -1).T
    np.testing.assert_allclose(K, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
    assert taps._rows(n, T * n * T) == {1: 1, 300: 2, 1 << 22: 6}[limit]
