"""The common parameter tree: leaf shapes and logical axis names, from a ModelConfig.

Paths are '/'-joined; matrices are ``[in, out]``; per-layer leaves are stacked on a leading ``L``.
"""

from __future__ import annotations

from typing import Any

from lensjax.config import ModelConfig


def leaf_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
    """path -> (shape, logical axes) for every leaf this config has."""
    L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    E, Q, KV = cfg.embed_dim, cfg.q_dim, cfg.kv_dim
    s: dict[str, Any] = {"embed/tokens": ((V, E), ("vocab", "embed"))}
    if cfg.positions == "learned":
        s["embed/positions"] = ((cfg.max_positions + cfg.position_offset, D), (None, "embed"))
    if cfg.has_projection:
        s["project_in/w"] = ((E, D), (None, "embed"))
        s["project_out/w"] = ((D, E), ("embed", None))
    for norm in ("attn_norm", "mlp_norm"):
        s[f"layers/{norm}/scale"] = ((L, D), ("layers", None))
        if cfg.norm_bias:
            s[f"layers/{norm}/bias"] = ((L, D), ("layers", None))
    for name, out in (("q", Q), ("k", KV), ("v", KV)):
        s[f"layers/attn/{name}/w"] = ((L, D, out), ("layers", "embed", "heads"))
        if cfg.qkv_bias:
            s[f"layers/attn/{name}/b"] = ((L, out), ("layers", "heads"))
    s["layers/attn/o/w"] = ((L, Q, D), ("layers", "heads", "embed"))
    if cfg.o_bias:
        s["layers/attn/o/b"] = ((L, D), ("layers", None))
    mlp = ("gate", "up") if cfg.gated_mlp else ("up",)
    for name in mlp:
        s[f"layers/mlp/{name}/w"] = ((L, D, F), ("layers", "embed", "mlp"))
        if cfg.mlp_bias:
            s[f"layers/mlp/{name}/b"] = ((L, F), ("layers", "mlp"))
    s["layers/mlp/down/w"] = ((L, F, D), ("layers", "mlp", "embed"))
    if cfg.mlp_bias:
        s["layers/mlp/down/b"] = ((L, D), ("layers", None))
    if cfg.final_norm:
        s["final_norm/scale"] = ((D,), (None,))
        if cfg.norm_bias:
            s["final_norm/bias"] = ((D,), (None,))
    if not cfg.tie_word_embeddings:
        s["lm_head/w"] = ((E, V), ("embed", "vocab"))
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
