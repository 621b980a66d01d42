"""Empirical neural tangent kernels of a scalar-per-sample function, and LensLLM's F(Θ, t).

``f(params, example) -> scalar`` is any pure function (for a language model: the mean
log-likelihood of one sample's target tokens). With ``J[i] = ∂f(θ, x_i)/∂θ`` (one row per probe
sample, over the chosen parameters):

* :func:`ntk_exact` — ``K = J Jᵀ`` [n, n]. Per-sample gradients come from ``vmap(grad(f))`` over
  chunks of ``chunk_size`` samples (``lax.map`` over chunks), so activation memory is bounded by
  the chunk. By default the rows of J are kept ([n, P] floats) and K is one matmul; with
  ``store_jacobian=False`` only two chunks of rows live at a time and off-diagonal blocks are
  recomputed (≈ (n/c + 1)/2 × the gradient work, O(c·P) memory).
* :func:`ntk_sketch` — random-tangent sketch ``K ≈ (1/k) Σ_j (J v_j)(J v_j)ᵀ`` with Gaussian
  tangents ``v_j`` (one JVP of the whole probe batch each). It is unbiased (E[v vᵀ] = I) and its
  entries' standard error is ``sqrt((K_ii K_jj + K_ij²)/k)``: the relative error falls as 1/√k.
  For models too large for per-sample gradients.
* :func:`spectrum`, :func:`ntk_stats` — eigenpairs (``eigh``), trace, top eigenvalues, effective
  rank ``(Σλ)²/Σλ²``, condition number.
* :func:`f_term` — ``F(t) = Σ_k exp(−2ηλ_k t) (u_kᵀ r₀)²`` = ``r₀ᵀ expm(−2ηtK) r₀``: the squared
  norm of the linearised residual after t gradient-flow steps of size η from r₀ = f₀(X) − y;
  :func:`log_f_term` is its logarithm by a log-sum-exp, finite for any t (F itself underflows
  float64 once 2ηλ_min·t passes ~745).
* :func:`normalize` — the kernel operator of the *mean* loss, estimated from n probe samples, and
  the residual per sample (``r₀/√n``, so ``F(0) = mean r₀²``). Gradient descent on the mean loss
  over the data moves a held-out residual by ``−η E_x'[K(x, x') r(x')]``; ``K/n`` estimates that
  operator with a self-interaction term ``K(x, x)/n`` that vanishes as n grows (F(t) then depends
  on n: measured on a tiny Llama, F(100) = 0.67 at n = 16 and 3.8 at n = 64). The default
  ``"offdiag"`` estimate ``(K − diag K)/(n − 1)`` drops it (a U-statistic; F(100) = 7.3 ± 1.6 at
  n = 16, 8.4 at n = 64); its negative eigenvalues are clipped to 0 by :func:`spectrum`, so the
  part of r₀ along them does not decay.
* :func:`precondition` — ``J diag(p) Jᵀ`` for a diagonal preconditioner p (Adam's
  ``1/(√v̂ + ε)``): the NTK of preconditioned gradient descent, which is what Adam runs.

For a language model, ``lensjax.models.lm_ntk.ntk_exact`` computes the same exact K by Gram taps
(:mod:`lensjax.kernels.taps`: one batched backward, per-parameter Grams, no [n, P] J) and uses
:func:`ntk_exact` here only for the leaves the taps do not cover.

All functions are pure and jit-able; vmap them over a leading candidate axis of stacked
parameters to treat candidates of one shape in one call.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from . import xla

Array = jax.Array
ScalarFn = Callable[[Any, Any], Array]


def _flags(mask):
    """A bool mask pytree (or None) as a hashable tuple, so it can be a static jit argument."""
    return None if mask is None else tuple(bool(m) for m in jax.tree.leaves(mask))


def _split(params, flags):
    """(trainable leaves, rebuild(trainable) -> full params) for static ``flags`` (None: all)."""
    if flags is None:
        return params, lambda sub: sub
    leaves, treedef = jax.tree.flatten(params)
    if len(flags) != len(leaves):
        raise ValueError("the parameter mask must have the structure of the parameters")
    sub = [x for x, m in zip(leaves, flags) if m]

    def rebuild(s):
        it = iter(s)
        return jax.tree.unflatten(treedef, [next(it) if m else x for x, m in zip(leaves, flags)])

    return sub, rebuild


def _n(batch) -> int:
    return jax.tree.leaves(batch)[0].shape[0]


def _chunks(batch, chunk_size):
    n = _n(batch)
    if n % chunk_size:
        raise ValueError(f"the number of probe samples ({n}) must be a multiple of chunk_size ({chunk_size})")
    return jax.tree.map(lambda a: a.reshape((n // chunk_size, chunk_size) + a.shape[1:]), batch)


def jacobian_rows(f: ScalarFn, params, batch, *, chunk_size: int = 8, mask=None) -> Array:
    """J [n, P]: per-sample gradients of ``f`` (over the masked parameters), flattened."""
    return _jacobian_rows(f, params, batch, chunk_size, _flags(mask))


@functools.partial(xla.jit, static_argnums=(0, 3, 4))
def _jacobian_rows(f, params, batch, chunk_size, flags):
    sub, rebuild = _split(params, flags)

    def row(s, example):
        g = jax.grad(lambda ss: f(rebuild(ss), example))(s)
        return ravel_pytree(g)[0]

    per_chunk = jax.vmap(row, in_axes=(None, 0))
    rows = jax.lax.map(lambda c: per_chunk(sub, c), _chunks(batch, chunk_size))
    return rows.reshape(-1, rows.shape[-1])


def ntk_exact(f: ScalarFn, params, batch, *, chunk_size: int = 8, mask=None, store_jacobian: bool = True) -> Array:
    """The exact empirical NTK ``K = J Jᵀ`` [n, n], over the parameters where ``mask`` is True."""
    return _ntk_exact(f, params, batch, chunk_size, _flags(mask), store_jacobian)


@functools.partial(xla.jit, static_argnums=(0, 3, 4, 5))
def _ntk_exact(f, params, batch, chunk_size, flags, store_jacobian):
    if store_jacobian:
        j = _jacobian_rows(f, params, batch, chunk_size, flags)
        return j @ j.T
    sub, rebuild = _split(params, flags)

    def row(s, example):
        return ravel_pytree(jax.grad(lambda ss: f(rebuild(ss), example))(s))[0]

    per_chunk = jax.vmap(row, in_axes=(None, 0))
    chunks = _chunks(batch, chunk_size)
    m = _n(batch) // chunk_size

    def block_row(a):
        ja = per_chunk(sub, jax.tree.map(lambda x: x[a], chunks))

        def block(b):
            jb = per_chunk(sub, jax.tree.map(lambda x: x[b], chunks))
            return ja @ jb.T

        return jax.lax.map(block, jnp.arange(m))  # [m, c, c]

    blocks = jax.lax.map(block_row, jnp.arange(m))  # [m, m, c, c]
    return blocks.transpose(0, 2, 1, 3).reshape(m * chunk_size, m * chunk_size)


def ntk_sketch(f: ScalarFn, params, batch, key, *, k: int = 64, chunk_size: int = 8, mask=None) -> Array:
    """Random-tangent sketch of K from ``k`` JVPs of the whole probe batch (see module notes)."""
    return _ntk_sketch(f, params, batch, key, k, chunk_size, _flags(mask))


@functools.partial(xla.jit, static_argnums=(0, 4, 5, 6))
def _ntk_sketch(f, params, batch, key, k, chunk_size, flags):
    sub, rebuild = _split(params, flags)
    flat, unravel = ravel_pytree(sub)

    def outputs(s):
        return jax.vmap(lambda ex: f(rebuild(s), ex))(batch)

    def one(kk):
        v = jax.random.normal(kk, flat.shape, flat.dtype)
        return jax.jvp(outputs, (sub,), (unravel(v),))[1]  # J v, [n]

    if k % chunk_size:
        raise ValueError(f"k ({k}) must be a multiple of chunk_size ({chunk_size})")
    keys = jax.random.split(key, k).reshape(k // chunk_size, chunk_size)
    u = jax.lax.map(jax.vmap(one), keys).reshape(k, -1)  # [k, n]
    return u.T @ u / k


def spectrum(K: Array) -> tuple[Array, Array]:
    """Eigenvalues (descending, clipped at 0) and eigenvectors (columns) of a symmetric K."""
    K = 0.5 * (K + K.T)
    w, u = jnp.linalg.eigh(K)
    return jnp.maximum(w[::-1], 0.0), u[:, ::-1]


def ntk_stats(K: Array, top: int = 8) -> dict[str, Array]:
    w, _ = spectrum(K)
    tot = jnp.sum(w)
    return {
        "trace": jnp.trace(K),
        "top_eigenvalues": w[:top],
        "effective_rank": tot**2 / jnp.maximum(jnp.sum(w * w), jnp.finfo(w.dtype).tiny),
        "condition_number": w[0] / jnp.maximum(w[-1], jnp.finfo(w.dtype).tiny),
        "n": jnp.asarray(K.shape[0]),
    }


def normalize(K: Array, r0: Array, mode: str = "offdiag") -> tuple[Array, Array]:
    """``(Θ, r₀/√n)`` with ``Θ = (K − diag K)/(n − 1)`` (``mode="offdiag"``) or ``K/n``
    (``"mean"``) for n probe samples (see the module notes)."""
    n = K.shape[-1]
    r = r0 / jnp.sqrt(jnp.asarray(n, K.dtype))
    if mode == "mean":
        return K / n, r
    if mode != "offdiag":
        raise ValueError(f"unknown normalisation {mode!r}; choose offdiag or mean")
    if n < 2:
        raise ValueError("the off-diagonal kernel estimate needs at least 2 probe samples")
    return (K - jnp.diag(jnp.diag(K))) / (n - 1), r


def preconditioned_fn(f: ScalarFn) -> ScalarFn:
    """``g({"base": θ, "scale": √p, "delta": δ}, x) = f(θ + √p ⊙ δ, x)``: its gradient in δ at δ = 0 is
    ``J diag(√p)``, so :func:`ntk_exact` of ``g`` over ``delta`` (``mask=precondition_mask(θ)``) is
    ``J diag(p) Jᵀ``. Pass the parameters built by :func:`precondition`."""
    return _Preconditioned(f)


class _Preconditioned:
    def __init__(self, f):
        self.f = f

    def __call__(self, params, example):
        theta = jax.tree.map(lambda b, s, d: b + s * d, params["base"], params["scale"], params["delta"])
        return self.f(theta, example)

    def __hash__(self):
        return hash((_Preconditioned, self.f))

    def __eq__(self, other):
        return isinstance(other, _Preconditioned) and other.f == self.f


def precondition(params, p):
    """(parameters, mask) for :func:`preconditioned_fn`: ``p`` is a pytree like ``params`` of
    positive per-parameter scales (the diagonal of the preconditioner)."""
    full = {"base": params, "scale": jax.tree.map(jnp.sqrt, p), "delta": jax.tree.map(jnp.zeros_like, params)}
    mask = {"base": jax.tree.map(lambda _: False, params), "scale": jax.tree.map(lambda _: False, params),
            "delta": jax.tree.map(lambda _: True, params)}
    return full, mask


def log_f_term(eigvals: Array, eigvecs: Array, r0: Array, eta, t) -> Array:
    """log F(t) = logsumexp_k(−2 η λ_k t + log (u_kᵀ r₀)²), for scalar or array ``t`` (broadcast).
    Finite for every t as long as r₀ has a component along some eigenvector; −inf only if r₀ = 0.
    Use float64 inputs (``jax.enable_x64``) for eigenvalues resolved below float32's precision."""
    proj2 = (eigvecs.T @ r0) ** 2  # [n]
    t = jnp.asarray(t, eigvals.dtype)
    logp = jnp.where(proj2 > 0, jnp.log(jnp.where(proj2 > 0, proj2, 1.0)), -jnp.inf)
    return jax.nn.logsumexp(-2.0 * eta * eigvals * t[..., None] + logp, axis=-1)


def f_term(eigvals: Array, eigvecs: Array, r0: Array, eta, t) -> Array:
    """F(t) = Σ_k exp(−2 η λ_k t) (u_kᵀ r₀)² for scalar or array ``t`` (broadcast)."""
    proj2 = (eigvecs.T @ r0) ** 2  # [n]
    t = jnp.asarray(t, eigvals.dtype)
    return jnp.sum(jnp.exp(-2.0 * eta * eigvals * t[..., None]) * proj2, axis=-1)
