"""The batched SVD behind SVF: the float64 Gram route, its conditioning guard and gesdd, against NumPy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lensjax.kernels import svd


def _with_spectrum(rng, m, n, kappa):
    """An m×n float32 matrix whose singular values fall log-evenly from 1 to 1/kappa."""
    q1, _ = np.linalg.qr(rng.standard_normal((m, n)))
    q2, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return ((q1 * np.logspace(0, -np.log10(kappa), n)) @ q2.T).astype(np.float32)


def _errors(w, u, s, vt):
    """(max relative error of σ vs NumPy float64, relative reconstruction error, orthogonality of U and Vᵀ)."""
    w64 = w.astype(np.float64)
    u, s, vt = (np.asarray(x, np.float64) for x in (u, s, vt))
    ref = np.linalg.svd(w64, compute_uv=False)
    sig = np.max(np.abs(s - ref)) / ref.max()
    rec = np.linalg.norm(np.einsum("...ir,...r,...ro->...io", u, s, vt) - w64) / np.linalg.norm(w64)
    r = s.shape[-1]
    orth = max(np.abs(np.swapaxes(u, -1, -2) @ u - np.eye(r)).max(), np.abs(vt @ np.swapaxes(vt, -1, -2) - np.eye(r)).max())
    return sig, rec, orth


@pytest.mark.parametrize("shape", [(3, 96, 40), (3, 40, 96), (2, 64, 64)])
@pytest.mark.parametrize("method", ["gram", "gesdd", "auto"])
def test_matches_numpy_float64(shape, method):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape).astype(np.float32) * 0.02
    u, s, vt = svd.decompose(jnp.asarray(w), method)
    r = min(shape[1:])
    assert u.shape == (shape[0], shape[1], r) and s.shape == (shape[0], r) and vt.shape == (shape[0], r, shape[2])
    assert u.dtype == s.dtype == vt.dtype == jnp.float32
    assert np.all(np.diff(np.asarray(s), axis=-1) <= 0), "singular values must be descending"
    sig, rec, orth = _errors(w, u, s, vt)
    assert sig < 1e-6 and rec < 1e-5 and orth < 1e-5, (sig, rec, orth)


def test_bf16_leaf_is_decomposed_in_float32():
    w = jnp.asarray(np.random.default_rng(1).standard_normal((2, 48, 32)), jnp.bfloat16)
    u, s, vt = svd.decompose(w)
    assert u.dtype == jnp.float32
    assert _errors(np.asarray(w.astype(jnp.float32)), u, s, vt)[1] < 1e-5


def test_ill_conditioned_slices_fall_back_to_gesdd():
    """κ = 1e6: the Gram route alone loses orthogonality (≈ ε₆₄·κ²); the guard re-does that slice only."""
    rng = np.random.default_rng(2)
    good = _with_spectrum(rng, 160, 48, 10.0)
    bad = _with_spectrum(rng, 160, 48, 1e6)
    w = np.stack([good, bad, good])
    unguarded = svd.decompose(jnp.asarray(w), "gram", max_condition=np.inf)
    assert _errors(bad, *(x[1] for x in unguarded))[2] > 1e-5  # the failure the guard exists for
    u, s, vt = svd.decompose(jnp.asarray(w), "gram")
    for i, wi in enumerate(w):
        sig, rec, orth = _errors(wi, u[i], s[i], vt[i])
        assert rec < 1e-5 and orth < 1e-5, (i, sig, rec, orth)
    ref = svd.decompose(jnp.asarray(w[1:2]), "gesdd")
    np.testing.assert_array_equal(np.asarray(s[1]), np.asarray(ref[1][0]))  # slice 1 came from gesdd
    np.testing.assert_array_equal(np.asarray(s[0]), np.asarray(unguarded[1][0]))  # slice 0 kept the Gram result


def test_rank_deficient_slice_is_exact():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((1, 64, 4)) @ rng.standard_normal((1, 4, 32))).astype(np.float32)
    u, s, vt = svd.decompose(jnp.asarray(w))
    assert np.all(np.isfinite(np.asarray(u))) and _errors(w[0], u[0], s[0], vt[0])[1] < 1e-5


def test_large_leaf_in_slices_equals_one_batch(monkeypatch):
    w = jnp.asarray(np.random.default_rng(4).standard_normal((5, 40, 24)), jnp.float32)
    whole = svd.decompose(w, "gram")
    monkeypatch.setattr(svd, "GRAM_WORKSET_BYTES", 2 * 8 * (40 * 24 * 2 + 2 * 24 * 24))  # two slices at a time
    sliced = svd.decompose(w, "gram")
    for a, b in zip(whole, sliced):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_inside_a_trace_uses_gesdd():
    w = jnp.asarray(np.random.default_rng(5).standard_normal((2, 24, 16)), jnp.float32)
    s = jax.jit(lambda x: svd.decompose(x)[1])(w)
    np.testing.assert_allclose(np.asarray(s), np.linalg.svd(np.asarray(w, np.float64), compute_uv=False), rtol=1e-5)


def test_bad_arguments():
    w = jnp.zeros((2, 4, 3))
    with pytest.raises(ValueError, match="unknown SVD method 'qr'"):
        svd.decompose(w, "qr")
    with pytest.raises(ValueError, match=r"\[L, in, out\]"):
        svd.decompose(jnp.zeros((4, 3)))
