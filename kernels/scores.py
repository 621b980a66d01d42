"""Attention scores ``q · kᵀ`` whose key gradient runs in the faster operand order on XLA CPU.

``qk(q, k)`` is ``q [..., R, H] @ k[..., S, H]ᵀ`` with a float32 result, the batched product of
softmax attention (R query rows, S keys, H the head width). Its value is JAX's own; only the
backward differs. JAX's transpose rule computes the key gradient ``dk = gᵀ q`` as
``dot_general(g, q)``, contracting the query rows of both operands with the wide cotangent ``g``
[..., R, S] on the left. XLA CPU runs that batched dot through Eigen one batch element at a time,
and in that order at a third of the rate of the same product with the narrow operand on the left
(measured in the traces of the 10M Llama's AdamW step, 8 × 128 tokens, on a 2-core Xeon:
[8, 4, 128, 32] = gᵀ q 11.0 ms per step for 6 layers, against 3.7 ms for the value gradient of the
same size, which XLA already orders narrow-first). Here the backward computes ``dkᵀ = qᵀ g``
[..., H, S] and transposes that small result.

A custom VJP has no forward-mode rule (``jax.jvp`` of a function that calls it fails), so the
model calls :func:`qk` only inside :func:`reverse_only` (the training programs, which take
reverse-mode gradients only) or in a mixed-precision program, whose matmuls already have custom
VJPs (:mod:`lensjax.kernels.mixed`); elsewhere it computes the plain product.

Measured (interleaved rounds on a 2-core Xeon with AMX, 10M Llama, AdamW step 8 × 128, 8 steps
per call): bf16 mixed 156.2 → 147.7 ms per step (0.939×, range 0.926–0.947), float32 300.1 →
285.6 ms (0.939×, 0.906–0.979). Under the layer scan's remat policy (which saves dot outputs)
the scores are no longer stacked for the backward pass but recomputed from q and k there; the
step's temporaries fell from 196 to 172 MiB.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

_REVERSE_ONLY = contextvars.ContextVar("lensjax_scores_reverse_only", default=False)


@contextlib.contextmanager
def reverse_only():
    """While tracing inside this context, :func:`active` is True: the function being traced is
    differentiated in reverse mode only, so the model may use :func:`qk`."""
    token = _REVERSE_ONLY.set(True)
    try:
        yield
    finally:
        _REVERSE_ONLY.reset(token)


def active() -> bool:
    """Whether the current trace runs inside :func:`reverse_only`."""
    return _REVERSE_ONLY.get()


@jax.custom_vjp
def qk(q, k):
    """``q @ kᵀ`` over the last two axes (leading axes batched), float32 result."""
    return jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32)


def _fwd(q, k):
    return qk(q, k), (q, k)


def _bwd(res, g):
    q, k = res
    n = q.ndim - 2
    batch = tuple(range(n))
    dq = jnp.matmul(g, k.astype(g.dtype))  # [..., R, S] @ [..., S, H]
    # dkᵀ = qᵀ g [..., H, S]: the narrow q on the left (see the module notes), then transposed
    dkt = jax.lax.dot_general(q.astype(g.dtype), g, (((n,), (n,)), (batch, batch)))
    return dq.astype(q.dtype), dkt.swapaxes(-1, -2).astype(k.dtype)


qk.defvjp(_fwd, _bwd)
