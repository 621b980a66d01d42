"""BART: PyTorch Linear layout under ``model.``; learned positions (offset 2) and
``layernorm_embedding`` per stack, post-norm layers, ``final_logits_bias`` [1, V] at the root."""

from lensjax.config import ModelConfig

PREFIXES = ("model.", "")
IGNORE = (r"^(model\.)?encoder\.embed_tokens\.weight$", r"^(model\.)?decoder\.embed_tokens\.weight$")


def entries(cfg: ModelConfig):
    e = [("embed/tokens", "shared.weight", "id")]
    for stack in ("encoder", "decoder"):
        s, b = f"{stack}/", f"{stack}.layers.{{i}}"
        e += [(s + "positions", f"{stack}.embed_positions.weight", "id"),
              (s + "embed_norm/scale", f"{stack}.layernorm_embedding.weight", "id"),
              (s + "embed_norm/bias", f"{stack}.layernorm_embedding.bias", "id")]
        attns = [("attn", "self_attn", "self_attn_layer_norm")]
        if stack == "decoder":
            attns.append(("cross_attn", "encoder_attn", "encoder_attn_layer_norm"))
        for ours, hf, hf_norm in attns:
            norm = "attn_norm" if ours == "attn" else "cross_norm"
            e += [(s + f"layers/{norm}/scale", f"{b}.{hf_norm}.weight", "id"),
                  (s + f"layers/{norm}/bias", f"{b}.{hf_norm}.bias", "id")]
            for m, proj in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
                e += [(s + f"layers/{ours}/{m}/w", f"{b}.{hf}.{proj}.weight", "T"),
                      (s + f"layers/{ours}/{m}/b", f"{b}.{hf}.{proj}.bias", "id")]
        e += [(s + "layers/mlp_norm/scale", f"{b}.final_layer_norm.weight", "id"),
              (s + "layers/mlp_norm/bias", f"{b}.final_layer_norm.bias", "id"),
              (s + "layers/mlp/up/w", f"{b}.fc1.weight", "T"), (s + "layers/mlp/up/b", f"{b}.fc1.bias", "id"),
              (s + "layers/mlp/down/w", f"{b}.fc2.weight", "T"), (s + "layers/mlp/down/b", f"{b}.fc2.bias", "id")]
    e.append(("lm_head/b", "/final_logits_bias", "row"))
    if not cfg.tie_word_embeddings:
        e.append(("lm_head/w", "/lm_head.weight", "T"))
    return e
