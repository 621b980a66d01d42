"""Singular-value re-parameterisation of stacked weight matrices (Transformer² SVF).

A target leaf ``W [L, in, out]`` is decomposed once, ``W = U diag(σ) Vᵀ`` per layer (economy SVD,
``r = min(in, out)``, batched over L; :func:`decompose` for the method). An expert is a vector ``s′ = σ ⊙ g(z)``
per layer, and the adapted matrix is written in *delta form*

    W′ = W + U diag(σ ⊙ (g(z) − 1)) Vᵀ

so that W′ = W exactly (bit for bit) at the identity g(z) = 1, whatever the rounding of U, σ, V.

Two ways to apply it to activations ``x [N, in]``:

* dense: ``x @ W′`` after :func:`recompose` — 2·in·r·out flops per matrix, once per call;
* factored: ``x @ W + ((x @ U) ⊙ δ) @ Vᵀ`` (:func:`apply_factored`) — 2·N·r·(in + out) extra flops
  and no W′ materialised.

:func:`prefer_factored` picks by token count: factored when N·(in + out) < in·out.
The gradient with respect to the scales is the closed form ``∂L/∂δ = diag(Uᵀ G V)`` for
``G = ∂L/∂W′``; autodiff of :func:`recompose` already computes it as one ``in·r·out`` contraction
(Uᵀ G, then a row-wise product with Vᵀ), the same order of work as the closed form, so no custom
VJP is used.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from . import xla

Array = jax.Array


GRAM_MAX_CONDITION = 1e4
"""Largest σ_max/σ_min of a slice that the Gram route decomposes (above it: ``gesdd``)."""
GRAM_WORKSET_BYTES = 1 << 30
"""Float64 working set of one Gram-route program; a larger leaf is decomposed in equal slices."""
METHODS = ("auto", "gram", "gesdd")


def decompose(w_Lio: Array, method: str = "auto", max_condition: float = GRAM_MAX_CONDITION
              ) -> tuple[Array, Array, Array]:
    """Economy SVD of each ``[in, out]`` slice, in float32: U [L, in, r], σ [L, r] (descending), Vᵀ [L, r, out].

    ``method``:

    * ``"gram"`` (the default on CPU, ``"auto"``): in float64, ``G = AᵀA`` (or ``AAᵀ`` for a wide
      slice, always the smaller side n), ``eigh(G) = V diag(λ) Vᵀ``, ``σ = √λ``, ``U = AV/σ``. Two
      n·n·m products and an n×n symmetric eigensolve instead of a bidiagonalisation, so it runs
      at matmul speed. Its singular vectors lose ≈ ε₆₄·κ² of orthogonality (measured on a
      1536×384 slice: 5e-9 at κ = 1e4, 4e-7 at 1e5, 3e-5 at 1e6; float32 gesdd 1.3e-8); so every
      slice with κ = σ_max/σ_min above ``max_condition`` (or rank-deficient) is decomposed again by
      ``gesdd`` (checked on the host after the Gram pass; the result is the same either way to
      float32 rounding). LAPACK's eigensolver runs with one BLAS thread per call while XLA spreads
      the batch over its threads (unlimited, the two pools oversubscribe the cores: [12, 768, 768]
      eigh 1.85 s -> 0.72 s on 2 cores).
    * ``"gesdd"``: one batched ``jnp.linalg.svd`` (LAPACK gesdd on CPU, the backend's batched
      solver on GPU/TPU). ``"auto"`` picks it on every backend but CPU, and inside a trace (the
      guard needs concrete values).
    """
    if method not in METHODS:
        raise ValueError(f"unknown SVD method {method!r}; choose one of {', '.join(METHODS)}")
    if w_Lio.ndim != 3:
        raise ValueError(f"decompose expects stacked matrices [L, in, out], got shape {tuple(w_Lio.shape)}")
    if isinstance(w_Lio, jax.core.Tracer):
        return _gesdd(w_Lio)
    if method == "auto":
        method = "gram" if _platform(w_Lio) == "cpu" else "gesdd"
    with _one_blas_thread():
        if method == "gesdd":
            return jax.block_until_ready(_gesdd(w_Lio))
        L, m, n = w_Lio.shape
        per_slice = 8 * (m * n + 2 * min(m, n) ** 2 + m * n)  # A, G, V and U in float64
        batch = int(max(1, min(L, GRAM_WORKSET_BYTES // per_slice)))
        # A leaf too large for one program goes in equal slices from the host: decomposing is a
        # one-off (its result is cached), and on XLA CPU a lax.map over batches of this program
        # deadlocked (eigh inside the loop, [24, 768, 3072] in batches of 22).
        k = -(-L // batch)
        size = -(-L // k)
        with jax.enable_x64(True):
            parts = [jax.block_until_ready(_gram(w_Lio[a:a + size])) for a in range(0, L, size)]
        u, s, vt, ratio = parts[0] if k == 1 else [jnp.concatenate(x) for x in zip(*parts)]
        ratio = np.asarray(ratio)
        bad = np.flatnonzero(~(ratio >= 1.0 / float(max_condition) ** 2))  # NaN counts as bad
        if bad.size:
            ub, sb, vtb = jax.block_until_ready(_gesdd(w_Lio[bad]))
            u, s, vt = u.at[bad].set(ub), s.at[bad].set(sb), vt.at[bad].set(vtb)
    return u, s, vt


def _platform(x) -> str:
    try:
        return next(iter(x.devices())).platform
    except (AttributeError, StopIteration):
        return jax.default_backend()


def _one_blas_thread():
    """One thread in the BLAS libraries LAPACK calls, restored afterwards."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


@jax.jit
def _gesdd(w):
    return jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)


@xla.jit
def _gram(w):
    """The Gram route on every slice (float64 inside; float32 out) and λ_min/λ_max per slice."""
    wide = w.shape[-2] < w.shape[-1]

    def one(a):  # a [in, out]
        a = a.astype(jnp.float64)
        g = a @ a.T if wide else a.T @ a  # [n, n]
        lam, q = jnp.linalg.eigh(g)  # ascending
        lam, q = lam[::-1], q[:, ::-1]
        sig = jnp.sqrt(jnp.maximum(lam, 0.0))
        inv = jnp.where(sig > 0, 1.0 / jnp.where(sig > 0, sig, 1.0), 0.0)
        if wide:  # A = U Σ Vᵀ with U = q: Vᵀ = Σ⁻¹ Uᵀ A
            u, vt = q, (q.T @ a) * inv[:, None]
        else:  # V = q: U = A V Σ⁻¹
            u, vt = (a @ q) * inv[None, :], q.T
        ratio = lam[-1] / jnp.where(lam[0] > 0, lam[0], 1.0)
        return u.astype(jnp.float32), sig.astype(jnp.float32), vt.astype(jnp.float32), ratio

    return jax.vmap(one)(w)


def delta_matrix(u: Array, s: Array, vt: Array, g: Array) -> Array:
    """U diag(σ ⊙ (g − 1)) Vᵀ, batched over any leading axes."""
    return jnp.einsum("...ir,...r,...ro->...io", u, s * (g - 1.0), vt)


def recompose(w: Array, u: Array, s: Array, vt: Array, g: Array) -> Array:
    """W′ = W + U diag(σ ⊙ (g − 1)) Vᵀ in W's dtype (exactly W where g = 1)."""
    return (w.astype(jnp.float32) + delta_matrix(u, s, vt, g)).astype(w.dtype)


def apply_factored(x: Array, w: Array, u: Array, s: Array, vt: Array, g: Array) -> Array:
    """x @ W′ without forming W′: ``x @ W + ((x @ U) ⊙ σ(g − 1)) @ Vᵀ`` (one layer's [in, out])."""
    delta = ((x.astype(jnp.float32) @ u) * (s * (g - 1.0))) @ vt
    return (x @ w).astype(jnp.float32) + delta


def prefer_factored(n_tokens: int, d_in: int, d_out: int) -> bool:
    """Factored apply costs 2·N·r·(in+out) extra flops; recomposition 2·in·r·out: compare."""
    return n_tokens * (d_in + d_out) < d_in * d_out
