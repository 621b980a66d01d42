"""The exact empirical NTK of a language model's per-sample log-likelihood, by Gram taps.

``ntk_exact(cfg, params, batch)`` equals ``lensjax.kernels.ntk.ntk_exact(scalar_fn(cfg), params,
batch)`` (the kernel ``K = J Jᵀ`` over all parameters, or those where ``mask`` is True) but runs
one batched forward and backward pass over the probe samples instead of per-sample gradients of
the whole model (:mod:`lensjax.kernels.taps`): every parameter used at a single site (the
dense weights and biases of attention and MLP, untied heads, norms, untied token and learned
position embeddings) gets its block of K from its site's backward; the rest (tied embeddings,
Switch experts and router, T5 relative-position tables, projections, anything else) goes through
the generic per-sample-gradient route, restricted to those leaves. Samples never interact in
these models (attention, norms and expert capacity are per row), which the taps require.

Memory: the activations of the whole probe batch, plus n × |W| floats for the largest tapped
parameter W (no [n, P] Jacobian), plus the generic route's rows for the untapped leaves.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lensjax.config import ModelConfig
from lensjax.kernels import ntk as ntk_kernel
from lensjax.kernels import xla
from lensjax.models.layers import TAP
from lensjax.models.lm import sample_loglik, scalar_fn, with_logit_positions

_DENSE_PARENTS = ("attn", "cross_attn", "mlp")  # not "moe": experts are einsums, not dense()
_DENSE = ("q", "k", "v", "o", "up", "gate", "down")
_NORMS = ("attn_norm", "mlp_norm", "cross_norm", "final_norm", "embed_norm")
_BASE_NDIM = {"w": 2, "b": 1, "scale": 1, "bias": 1, "tokens": 2, "positions": 2}


def _tapped_leaves(cfg: ModelConfig, path: tuple[str, ...], node: dict) -> tuple[str, ...]:
    """Names of the leaves of dict ``node`` (at ``path``) that a tap covers."""
    name = path[-1] if path else ""
    parent = path[-2] if len(path) > 1 else ""
    if name in _DENSE and parent in _DENSE_PARENTS:
        return tuple(k for k in ("w", "b") if k in node)
    if name == "lm_head" and len(path) == 1 and not cfg.tie_word_embeddings:
        return tuple(k for k in ("w", "b") if k in node)
    if name in _NORMS:
        return tuple(k for k in ("scale", "bias") if k in node)
    if name == "embed" and len(path) == 1:
        # the token table is used twice when tied (input and head) and by both stacks of an
        # encoder-decoder: a tap needs a single site
        ok = not cfg.tie_word_embeddings and not cfg.is_encoder_decoder
        return (("tokens",) if ok and "tokens" in node else ()) + (("positions",) if "positions" in node else ())
    if name in ("encoder", "decoder") and len(path) == 1:
        return ("positions",) if "positions" in node else ()
    return ()


def tap_params(cfg: ModelConfig, params: dict, n: int, mask=None):
    """(params with zero ``ntk_*`` accumulators [*lead, n, n] next to every tapped leaf, bool tree
    like ``params``: True where a leaf is tapped). ``mask`` (bool tree or None): leaves to include."""
    flags = None if mask is None else jax.tree.map(bool, mask)

    def walk(node, fl, path):
        out, tapped = {}, {}
        names = _tapped_leaves(cfg, path, node)
        for k, v in node.items():
            f = None if fl is None else fl[k]
            if isinstance(v, dict):
                out[k], tapped[k] = walk(v, f, path + (k,))
                continue
            out[k] = v
            on = k in names and (f is None or f) and v.ndim >= _BASE_NDIM[k]
            tapped[k] = bool(on)
            if on:
                lead = v.shape[: v.ndim - _BASE_NDIM[k]]
                out[TAP + k] = jnp.zeros((*lead, n, n), jnp.float32)
        return out, tapped

    return walk(params, flags, ())


def ntk_exact(cfg: ModelConfig, params: dict, batch: dict, *, reduce: str = "mean", chunk_size: int = 8,
              mask=None) -> jax.Array:
    """The exact NTK [n, n] of ``scalar_fn(cfg, reduce)`` over ``params`` (where ``mask``), by taps.
    ``chunk_size`` is the generic route's chunk for untapped leaves (see module notes)."""
    flags = None if mask is None else tuple(bool(m) for m in jax.tree.leaves(mask))
    batch = with_logit_positions(batch)  # the head's logits only at the scored positions
    return _ntk(cfg, reduce, params, batch, chunk_size, flags)


@functools.partial(xla.jit, static_argnums=(0, 1, 4, 5))
def _ntk(cfg, reduce, params, batch, chunk_size, flags):
    n = jax.tree.leaves(batch)[0].shape[0]
    mask = None if flags is None else jax.tree.unflatten(jax.tree.structure(params), list(flags))
    tp, tapped = tap_params(cfg, params, n, mask)
    is_acc = jax.tree_util.tree_map_with_path(
        lambda p, _: jax.tree_util.keystr(p[-1:]).startswith(f"['{TAP}"), tp)
    acc = [a for a, m in zip(jax.tree.leaves(tp), jax.tree.leaves(is_acc)) if m]
    rest = [a for a, m in zip(jax.tree.leaves(tp), jax.tree.leaves(is_acc)) if not m]
    treedef, accflags = jax.tree.structure(tp), jax.tree.leaves(is_acc)

    def total(accs):
        ia, ir = iter(accs), iter(rest)
        full = jax.tree.unflatten(treedef, [next(ia) if m else next(ir) for m in accflags])
        return jnp.sum(sample_loglik(cfg, full, batch, reduce))

    blocks = jax.grad(total)(acc)
    K = sum(jnp.sum(b.reshape(-1, n, n), axis=0) for b in blocks) if blocks else jnp.zeros((n, n), jnp.float32)
    # every leaf that is wanted and not tapped: the generic per-sample-gradient route
    left = [(not t) and (flags is None or flags[i]) for i, t in enumerate(jax.tree.leaves(tapped))]
    if any(left):
        rest_mask = jax.tree.unflatten(jax.tree.structure(params), left)
        K = K + ntk_kernel.ntk_exact(scalar_fn(cfg, reduce), params, batch, chunk_size=chunk_size, mask=rest_mask)
    return K
