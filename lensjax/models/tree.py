"""The common parameter tree: leaf shapes and logical axis names, from a ModelConfig.

Paths are '/'-joined; matrices are ``[in, out]``; per-layer leaves are stacked on a leading ``L``.

A decoder-only model::

    embed/tokens [V, E]            embed/positions [P, D] (learned positions)
    layers/attn_norm, layers/mlp_norm {scale, bias}  [L, D]
    layers/attn/{q,k,v,o}/{w,b}    layers/mlp/{gate,up,down}/{w,b}
    final_norm/{scale,bias}        lm_head/w [E, V], lm_head/b [V] (Phi; BART's final_logits_bias)

An encoder-decoder (T5, mT5, BART, Switch) keeps ``embed/tokens`` (the shared embedding) and
``lm_head`` at the top and holds two stacks, ``encoder/`` and ``decoder/``, each with the leaves
above under ``layers/`` and its own ``final_norm`` (T5), ``positions`` [P + 2, D] and
``embed_norm`` (BART) and ``rel_bias`` [buckets, H] (T5's relative-position bias, read from the
first layer and shared by all). Decoder layers add ``cross_norm`` and ``cross_attn/{q,k,v,o}``.

Switch Transformers' sparse layers keep their experts under ``layers/moe/``: ``router/w``
[L_s, D, X] (and ``router/b``), ``up/w`` [L_s, X, D, F], ``down/w`` [L_s, X, F, D], stacked over
the L_s sparse layers of the stack (``expert`` logical axis on X); the dense layers'
``layers/mlp/*`` are stacked over the L − L_s dense ones (:meth:`ModelConfig.sparse_layers`).
"""

from __future__ import annotations

from typing import Any

from lensjax.config import ModelConfig


def _stack_specs(cfg: ModelConfig, prefix: str, n_layers: int, sparse: tuple[bool, ...], cross: bool) -> dict:
    D, F, Q, KV = cfg.hidden_size, cfg.intermediate_size, cfg.q_dim, cfg.kv_dim
    L = n_layers
    s: dict[str, Any] = {}
    norms = ("attn_norm",) if cfg.parallel_block else ("attn_norm", "cross_norm", "mlp_norm") if cross else ("attn_norm", "mlp_norm")
    for norm in norms:
        s[f"{prefix}layers/{norm}/scale"] = ((L, D), ("layers", None))
        if cfg.norm_bias:
            s[f"{prefix}layers/{norm}/bias"] = ((L, D), ("layers", None))
    for attn in ("attn", "cross_attn") if cross else ("attn",):
        for name, out in (("q", Q), ("k", KV), ("v", KV)):
            s[f"{prefix}layers/{attn}/{name}/w"] = ((L, D, out), ("layers", "embed", "heads"))
            if cfg.qkv_bias:
                s[f"{prefix}layers/{attn}/{name}/b"] = ((L, out), ("layers", "heads"))
        s[f"{prefix}layers/{attn}/o/w"] = ((L, Q, D), ("layers", "heads", "embed"))
        if cfg.o_bias:
            s[f"{prefix}layers/{attn}/o/b"] = ((L, D), ("layers", None))
    n_dense = L - sum(sparse)
    if n_dense:
        for name in ("gate", "up") if cfg.gated_mlp else ("up",):
            s[f"{prefix}layers/mlp/{name}/w"] = ((n_dense, D, F), ("layers", "embed", "mlp"))
            if cfg.mlp_bias:
                s[f"{prefix}layers/mlp/{name}/b"] = ((n_dense, F), ("layers", "mlp"))
        s[f"{prefix}layers/mlp/down/w"] = ((n_dense, F, D), ("layers", "mlp", "embed"))
        if cfg.mlp_bias:
            s[f"{prefix}layers/mlp/down/b"] = ((n_dense, D), ("layers", None))
    n_sparse, X = sum(sparse), cfg.num_experts
    if n_sparse:
        s[f"{prefix}layers/moe/router/w"] = ((n_sparse, D, X), ("layers", "embed", None))
        if cfg.router_bias:
            s[f"{prefix}layers/moe/router/b"] = ((n_sparse, X), ("layers", None))
        s[f"{prefix}layers/moe/up/w"] = ((n_sparse, X, D, F), ("layers", "expert", "embed", "mlp"))
        s[f"{prefix}layers/moe/down/w"] = ((n_sparse, X, F, D), ("layers", "expert", "mlp", "embed"))
    return s


def _stack_extras(cfg: ModelConfig, prefix: str) -> dict:
    D = cfg.hidden_size
    s: dict[str, Any] = {}
    if cfg.positions == "learned":
        s[f"{prefix}positions"] = ((cfg.max_positions + cfg.position_offset, D), (None, "embed"))
    if cfg.rel_buckets:
        s[f"{prefix}rel_bias"] = ((cfg.rel_buckets, cfg.num_heads), (None, None))
    if cfg.embed_norm:
        s[f"{prefix}embed_norm/scale"] = ((D,), (None,))
        if cfg.norm_bias:
            s[f"{prefix}embed_norm/bias"] = ((D,), (None,))
    if cfg.final_norm:
        s[f"{prefix}final_norm/scale"] = ((D,), (None,))
        if cfg.norm_bias:
            s[f"{prefix}final_norm/bias"] = ((D,), (None,))
    return s


def leaf_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
    """path -> (shape, logical axes) for every leaf this config has."""
    D, V, E = cfg.hidden_size, cfg.vocab_size, cfg.embed_dim
    s: dict[str, Any] = {"embed/tokens": ((V, E), ("vocab", "embed"))}
    if cfg.is_encoder_decoder:
        for stack, n, cross in (("encoder", cfg.encoder_layers, False), ("decoder", cfg.num_layers, True)):
            s.update(_stack_extras(cfg, f"{stack}/"))
            s.update(_stack_specs(cfg, f"{stack}/", n, cfg.sparse_layers(stack), cross))
    else:
        if cfg.positions == "learned":
            s["embed/positions"] = ((cfg.max_positions + cfg.position_offset, D), (None, "embed"))
        if cfg.has_projection:
            s["project_in/w"] = ((E, D), (None, "embed"))
            s["project_out/w"] = ((D, E), ("embed", None))
        s.update(_stack_specs(cfg, "", cfg.num_layers, cfg.sparse_layers("decoder"), False))
        if cfg.final_norm:
            s["final_norm/scale"] = ((D,), (None,))
            if cfg.norm_bias:
                s["final_norm/bias"] = ((D,), (None,))
    if not cfg.tie_word_embeddings:
        s["lm_head/w"] = ((E, V), ("embed", "vocab"))
    if cfg.head_bias:
        s["lm_head/b"] = ((V,), ("vocab",))
    return s


def nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out
