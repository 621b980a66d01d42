"""lensjax.kernels.scores: q·kᵀ with the key gradient computed as (qᵀ g)ᵀ.

The product and both gradients against NumPy float64; the model's gradient with the kernel in use
(the training programs' ``reverse_only``) against JAX's own autodiff of the plain product; and
forward mode still working on the model outside that context.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_hf import make

import lensjax
from lensjax.kernels import scores
from lensjax.models.lm import mean_target_loss

from test_grad_parity import _batch


@pytest.mark.parametrize("shape", [((2, 3, 10, 8), (2, 3, 7, 8)), ((5, 4), (6, 4)), ((1, 2, 2, 9, 16), (1, 2, 2, 9, 16))])
def test_qk_and_its_gradients_equal_float64(shape):
    rng = np.random.default_rng(0)
    q = rng.standard_normal(shape[0]).astype(np.float32)
    k = rng.standard_normal(shape[1]).astype(np.float32)
    g = rng.standard_normal(shape[0][:-1] + (shape[1][-2],)).astype(np.float32)
    s, vjp = jax.vjp(scores.qk, jnp.asarray(q), jnp.asarray(k))
    dq, dk = vjp(jnp.asarray(g))
    chex.assert_shape(s, g.shape)
    chex.assert_shape([dq, dk], [q.shape, k.shape])
    assert s.dtype == dq.dtype == dk.dtype == jnp.float32
    q64, k64, g64 = (a.astype(np.float64) for a in (q, k, g))
    ref = {"s": q64 @ k64.swapaxes(-1, -2), "dq": g64 @ k64, "dk": g64.swapaxes(-1, -2) @ q64}
    for name, got in {"s": s, "dq": dq, "dk": dk}.items():
        err = float(np.abs(np.asarray(got, np.float64) - ref[name]).max() / np.abs(ref[name]).max())
        assert err < 1e-6, (name, err)


def test_bf16_operands_give_float32_scores_and_gradients_in_their_dtypes():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 6, 8)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.bfloat16)
    s, vjp = jax.vjp(scores.qk, q, k)
    dq, dk = vjp(jnp.ones_like(s))
    assert s.dtype == jnp.float32 and dq.dtype == dk.dtype == jnp.bfloat16
    ref = np.asarray(q, np.float64) @ np.asarray(k, np.float64).swapaxes(-1, -2)
    np.testing.assert_allclose(np.asarray(s, np.float64), ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_model_gradient_with_the_kernel_equals_plain_autodiff(tmp_path, family):
    """llama: grouped-query heads; gpt2: the per-layer score scale and a tied head."""
    make(family, tmp_path)
    m = lensjax.load(tmp_path)
    batch = {k: jnp.asarray(v) for k, v in _batch(np.random.default_rng(0)).items()}
    loss = lambda p: mean_target_loss(m.config, p, batch)  # noqa: E731
    plain = jax.jit(jax.value_and_grad(loss))(m.params)

    def with_kernel(p):
        with scores.reverse_only():
            return jax.value_and_grad(loss)(p)

    def traced(p):
        with scores.reverse_only():
            return loss(p)

    # the kernel is in the program under the context, and only there
    assert "custom_vjp_call" in str(jax.make_jaxpr(traced)(m.params))
    assert "custom_vjp_call" not in str(jax.make_jaxpr(loss)(m.params))
    got = jax.jit(with_kernel)(m.params)
    assert abs(float(got[0]) - float(plain[0])) < 1e-6 * abs(float(plain[0]))
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(plain[1])):
        scale = float(jnp.abs(b).max()) or 1.0
        assert float(jnp.abs(a - b).max()) <= 1e-5 * scale


def test_forward_mode_still_works_outside_the_training_context(tmp_path):
    make("llama", tmp_path)
    m = lensjax.load(tmp_path)
    batch = {k: jnp.asarray(v) for k, v in _batch(np.random.default_rng(0)).items()}
    tangent = jax.tree.map(jnp.ones_like, m.params)
    _, jv = jax.jvp(lambda p: mean_target_loss(m.config, p, batch), (m.params,), (tangent,))
    _, g = jax.value_and_grad(lambda p: mean_target_loss(m.config, p, batch))(m.params)
    dot = sum(float(jnp.sum(a)) for a in jax.tree.leaves(g))  # ⟨∇L, 1⟩ = the JVP along ones
    assert abs(float(jv) - dot) <= 1e-4 * max(1.0, abs(dot))
    assert not scores.active()
