"""GPT-2: Conv1D weights are already [in, out]; c_attn fuses q, k, v column-wise."""

from lensjax.config import ModelConfig

PREFIXES = ("transformer.", "")
IGNORE = (r"\.attn\.bias$", r"\.attn\.masked_bias$")


def entries(cfg: ModelConfig):
    e = [
        ("embed/tokens", "wte.weight", "id"),
        ("embed/positions", "wpe.weight", "id"),
        ("final_norm/scale", "ln_f.weight", "id"),
        ("final_norm/bias", "ln_f.bias", "id"),
    ]
    for norm, hf in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        e += [(f"layers/{norm}/scale", f"h.{{i}}.{hf}.weight", "id"), (f"layers/{norm}/bias", f"h.{{i}}.{hf}.bias", "id")]
    for k, name in enumerate("qkv"):
        e += [(f"layers/attn/{name}/w", "h.{i}.attn.c_attn.weight", ("cols", k, 3)),
              (f"layers/attn/{name}/b", "h.{i}.attn.c_attn.bias", ("part", k, 3))]
    e += [
        ("layers/attn/o/w", "h.{i}.attn.c_proj.weight", "id"),
        ("layers/attn/o/b", "h.{i}.attn.c_proj.bias", "id"),
        ("layers/mlp/up/w", "h.{i}.mlp.c_fc.weight", "id"),
        ("layers/mlp/up/b", "h.{i}.mlp.c_fc.bias", "id"),
        ("layers/mlp/down/w", "h.{i}.mlp.c_proj.weight", "id"),
        ("layers/mlp/down/b", "h.{i}.mlp.c_proj.bias", "id"),
    ]
    if not cfg.tie_word_embeddings:
        e.append(("lm_head/w", "/lm_head.weight", "T"))
    return e
