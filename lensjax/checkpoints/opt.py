"""OPT: PyTorch Linear layout; learned positions with offset 2; optional project in/out (opt-350m)."""

from lensjax.config import ModelConfig

PREFIXES = ("model.decoder.", "decoder.")
IGNORE = ()


def entries(cfg: ModelConfig):
    e = [("embed/tokens", "embed_tokens.weight", "id"), ("embed/positions", "embed_positions.weight", "id")]
    if cfg.has_projection:
        e += [("project_in/w", "project_in.weight", "T"), ("project_out/w", "project_out.weight", "T")]
    if cfg.final_norm:
        e += [("final_norm/scale", "final_layer_norm.weight", "id"), ("final_norm/bias", "final_layer_norm.bias", "id")]
    for norm, hf in (("attn_norm", "self_attn_layer_norm"), ("mlp_norm", "final_layer_norm")):
        e += [(f"layers/{norm}/scale", f"layers.{{i}}.{hf}.weight", "id"),
              (f"layers/{norm}/bias", f"layers.{{i}}.{hf}.bias", "id")]
    for name, hf, bias in (("q", "self_attn.q_proj", cfg.qkv_bias), ("k", "self_attn.k_proj", cfg.qkv_bias),
                           ("v", "self_attn.v_proj", cfg.qkv_bias), ("o", "self_attn.out_proj", cfg.o_bias)):
        e.append((f"layers/attn/{name}/w", f"layers.{{i}}.{hf}.weight", "T"))
        if bias:
            e.append((f"layers/attn/{name}/b", f"layers.{{i}}.{hf}.bias", "id"))
    for name, hf in (("up", "fc1"), ("down", "fc2")):
        e.append((f"layers/mlp/{name}/w", f"layers.{{i}}.{hf}.weight", "T"))
        if cfg.mlp_bias:
            e.append((f"layers/mlp/{name}/b", f"layers.{{i}}.{hf}.bias", "id"))
    if not cfg.tie_word_embeddings:
        e.append(("lm_head/w", "/lm_head.weight", "T"))
    return e
