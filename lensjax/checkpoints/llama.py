"""Llama, Mistral and Qwen2: RMSNorm, gated SiLU MLP, RoPE; PyTorch Linear layout."""

from lensjax.config import ModelConfig

PREFIXES = ("model.", "")
IGNORE = (r"rotary_emb\.inv_freq$",)


def entries(cfg: ModelConfig):
    e = [
        ("embed/tokens", "embed_tokens.weight", "id"),
        ("final_norm/scale", "norm.weight", "id"),
        ("layers/attn_norm/scale", "layers.{i}.input_layernorm.weight", "id"),
        ("layers/mlp_norm/scale", "layers.{i}.post_attention_layernorm.weight", "id"),
    ]
    for name, bias in (("q", cfg.qkv_bias), ("k", cfg.qkv_bias), ("v", cfg.qkv_bias), ("o", cfg.o_bias)):
        e.append((f"layers/attn/{name}/w", f"layers.{{i}}.self_attn.{name}_proj.weight", "T"))
        if bias:
            e.append((f"layers/attn/{name}/b", f"layers.{{i}}.self_attn.{name}_proj.bias", "id"))
    for name in ("gate", "up", "down"):
        e.append((f"layers/mlp/{name}/w", f"layers.{{i}}.mlp.{name}_proj.weight", "T"))
        if cfg.mlp_bias:
            e.append((f"layers/mlp/{name}/b", f"layers.{{i}}.mlp.{name}_proj.bias", "id"))
    if not cfg.tie_word_embeddings:
        e.append(("lm_head/w", "/lm_head.weight", "T"))
    return e
