"""T5 (v1.0, v1.1), mT5 and Switch Transformers: PyTorch Linear layout, ``block.{i}.layer.{j}``
sub-layers (0: self-attention, 1: cross-attention in the decoder, last: feed-forward), the
relative-position bias in block 0 only, and Switch's experts ``mlp.experts.expert_{x}`` in the
sparse blocks."""

from lensjax.config import ModelConfig

PREFIXES = ("",)
# tied copies of the shared embedding; the decoder's block-0 cross-attention bias is never used by HF
IGNORE = (r"^encoder\.embed_tokens\.weight$", r"^decoder\.embed_tokens\.weight$",
          r"EncDecAttention\.relative_attention_bias\.weight$")
UNTIE_IF_PRESENT = "lm_head.weight"  # as HF: a head present in the file is used, else the shared embedding


def entries(cfg: ModelConfig):
    e = [("embed/tokens", "shared.weight", "id")]
    for stack, n in (("encoder", cfg.encoder_layers), ("decoder", cfg.num_layers)):
        s = f"{stack}/"
        b = f"{stack}.block.{{i}}.layer"
        sparse = cfg.sparse_layers(stack)
        dense_at = tuple(i for i in range(n) if not sparse[i])
        sparse_at = tuple(i for i in range(n) if sparse[i])
        e += [(s + "rel_bias", f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "id"),
              (s + "final_norm/scale", f"{stack}.final_layer_norm.weight", "id"),
              (s + "layers/attn_norm/scale", f"{b}.0.layer_norm.weight", "id")]
        e += [(s + f"layers/attn/{m}/w", f"{b}.0.SelfAttention.{m}.weight", "T") for m in "qkvo"]
        ff = 1
        if stack == "decoder":
            e.append((s + "layers/cross_norm/scale", f"{b}.1.layer_norm.weight", "id"))
            e += [(s + f"layers/cross_attn/{m}/w", f"{b}.1.EncDecAttention.{m}.weight", "T") for m in "qkvo"]
            ff = 2
        e.append((s + "layers/mlp_norm/scale", f"{b}.{ff}.layer_norm.weight", "id"))
        if cfg.family == "switch_transformers":
            mlp = {"up": "mlp.wi", "down": "mlp.wo"}
        elif cfg.gated_mlp:
            mlp = {"gate": "DenseReluDense.wi_0", "up": "DenseReluDense.wi_1", "down": "DenseReluDense.wo"}
        else:
            mlp = {"up": "DenseReluDense.wi", "down": "DenseReluDense.wo"}
        if dense_at:
            e += [(s + f"layers/mlp/{k}/w", f"{b}.{ff}.{v}.weight", "T", dense_at) for k, v in mlp.items()]
        if sparse_at:
            e.append((s + "layers/moe/router/w", f"{b}.{ff}.mlp.router.classifier.weight", "T", sparse_at))
            if cfg.router_bias:
                e.append((s + "layers/moe/router/b", f"{b}.{ff}.mlp.router.classifier.bias", "id", sparse_at))
            e += [(s + "layers/moe/up/w", f"{b}.{ff}.mlp.experts.expert_{{x}}.wi.weight", "T", sparse_at),
                  (s + "layers/moe/down/w", f"{b}.{ff}.mlp.experts.expert_{{x}}.wo.weight", "T", sparse_at)]
    if not cfg.tie_word_embeddings:
        e.append(("lm_head/w", "lm_head.weight", "T"))
    return e
