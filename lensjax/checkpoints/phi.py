"""Phi (phi-1.5, phi-2): PyTorch Linear layout; one ``input_layernorm`` per layer feeding the
parallel attention and MLP; ``dense`` output projection; ``lm_head`` with a bias."""

from lensjax.config import ModelConfig

PREFIXES = ("model.", "")
IGNORE = (r"rotary_emb\.inv_freq$",)


def entries(cfg: ModelConfig):
    e = [("embed/tokens", "embed_tokens.weight", "id"),
         ("final_norm/scale", "final_layernorm.weight", "id"), ("final_norm/bias", "final_layernorm.bias", "id"),
         ("layers/attn_norm/scale", "layers.{i}.input_layernorm.weight", "id"),
         ("layers/attn_norm/bias", "layers.{i}.input_layernorm.bias", "id")]
    for m, proj in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "dense")):
        e += [(f"layers/attn/{m}/w", f"layers.{{i}}.self_attn.{proj}.weight", "T"),
              (f"layers/attn/{m}/b", f"layers.{{i}}.self_attn.{proj}.bias", "id")]
    for m, fc in (("up", "fc1"), ("down", "fc2")):
        e += [(f"layers/mlp/{m}/w", f"layers.{{i}}.mlp.{fc}.weight", "T"),
              (f"layers/mlp/{m}/b", f"layers.{{i}}.mlp.{fc}.bias", "id")]
    e.append(("lm_head/b", "/lm_head.bias", "id"))
    if not cfg.tie_word_embeddings:
        e.append(("lm_head/w", "/lm_head.weight", "T"))
    return e
