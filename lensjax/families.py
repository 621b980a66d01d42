"""``config.json`` → :class:`~lensjax.config.ModelConfig` for Phi and the encoder-decoders
(T5, mT5, Switch Transformers, BART). The decoder-only builders of the first families live in
:mod:`lensjax.config`; these follow the same rules: every option that changes the computation
is read, and one lensjax cannot compute exactly is refused with its name.
"""

from __future__ import annotations

import math

from lensjax.config import ModelConfig, UnsupportedModelError, _common_ids, _req, _rope

ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu")


def phi(c, source):
    if c.get("qk_layernorm"):
        raise UnsupportedModelError(f"{source}: Phi with qk_layernorm is not supported")
    act = c.get("hidden_act", "gelu_new")
    if act not in ACTIVATIONS:
        raise UnsupportedModelError(f"{source}: activation {act!r} is not supported")
    d, h = _req(c, "hidden_size", source), _req(c, "num_attention_heads", source)
    n = _req(c, "num_hidden_layers", source)
    head_dim = d // h
    rope = _rope(c, source, partial=True)
    factor = (c.get("rope_parameters") or {}).get("partial_rotary_factor", c.get("partial_rotary_factor", 0.5))
    rotary = int(head_dim * factor)
    if rotary % 2 or not 0 < rotary <= head_dim:
        raise UnsupportedModelError(f"{source}: partial_rotary_factor {factor} gives {rotary} rotary dims of "
                                    f"{head_dim}; needs an even number > 0")
    return ModelConfig(
        family="phi", vocab_size=_req(c, "vocab_size", source), hidden_size=d, num_layers=n, num_heads=h,
        num_kv_heads=c.get("num_key_value_heads") or h, head_dim=head_dim,
        intermediate_size=_req(c, "intermediate_size", source),
        max_positions=_req(c, "max_position_embeddings", source), norm="layernorm",
        norm_eps=c.get("layer_norm_eps", 1e-5), activation=act, gated_mlp=False, positions="rope",
        qkv_bias=True, o_bias=True, mlp_bias=True, norm_bias=True, parallel_block=True,
        rotary_dim=0 if rotary == head_dim else rotary, head_bias=True,
        tie_word_embeddings=c.get("tie_word_embeddings", False), layer_windows=(0,) * n,
        hf_config=dict(c), **rope, **_common_ids(c),
    )


def _feed_forward(c, source):
    proj = c.get("feed_forward_proj", "relu")
    info = proj.split("-")
    if (len(info) > 1 and info[0] != "gated") or len(info) > 2:
        raise UnsupportedModelError(f"{source}: feed_forward_proj {proj!r} is not a known projection "
                                    "(expected 'ACT' or 'gated-ACT')")
    act = "gelu_new" if proj == "gated-gelu" else info[-1]
    if act not in ACTIVATIONS:
        raise UnsupportedModelError(f"{source}: feed_forward_proj {proj!r}: activation {act!r} is not supported")
    return act, info[0] == "gated"


def t5(c, source, family):
    """t5 (v1.0 and v1.1), mt5 and switch_transformers: relative-position bias, RMS norm without
    bias, no score scaling, optional gated FFN, experts in Switch's sparse layers."""
    act, gated = _feed_forward(c, source)
    d, h, dkv = _req(c, "d_model", source), _req(c, "num_heads", source), _req(c, "d_kv", source)
    n_enc = _req(c, "num_layers", source)
    n_dec = c.get("num_decoder_layers") or n_enc
    extra = {}
    if family == "switch_transformers":
        if gated:
            raise UnsupportedModelError(f"{source}: Switch Transformers with a gated feed-forward "
                                        f"({c.get('feed_forward_proj')!r}) is not supported (HF ignores the gate)")
        for key, ok in (("router_type", ("tokens_masked", None)), ("router_dtype", ("float32", None))):
            if c.get(key) not in ok:
                raise UnsupportedModelError(f"{source}: Switch router option {key}={c.get(key)!r} is not supported; "
                                            f"supported: {ok[0]!r}")
        if c.get("num_selected_experts", 1) not in (1, None):
            raise UnsupportedModelError(f"{source}: Switch with top-{c['num_selected_experts']} routing is not "
                                        "supported (top-1 only)")
        experts = _req(c, "num_experts", source)
        # HF derives the steps from the sparse-layer counts (overriding any stored step)
        ne, nd = c.get("num_sparse_encoder_layers", 3), c.get("num_sparse_decoder_layers", 3)
        extra = dict(num_experts=int(experts), expert_capacity=int(_req(c, "expert_capacity", source)),
                     router_bias=bool(c.get("router_bias", False)),
                     encoder_sparse_step=n_enc // ne if ne > 0 else n_enc,
                     decoder_sparse_step=n_dec // nd if nd > 0 else n_dec)
        scale = bool(c.get("tie_word_embeddings", True))
        tied = bool(c.get("tie_word_embeddings", True))
    elif family == "mt5":
        scale, tied = False, False  # HF's mT5 never rescales; the head is lm_head.weight
    else:  # t5: v1.0 ties and rescales; v1.1 (tie_word_embeddings false on disk) does neither
        scale = c.get("scale_decoder_outputs", c.get("tie_word_embeddings", True) is not False)
        tied = bool(scale)
    return ModelConfig(
        family=family, vocab_size=_req(c, "vocab_size", source), hidden_size=d, num_layers=n_dec,
        encoder_layers=n_enc, num_heads=h, num_kv_heads=h, head_dim=dkv, intermediate_size=_req(c, "d_ff", source),
        max_positions=c.get("n_positions") or 512, norm="rmsnorm", norm_eps=c.get("layer_norm_epsilon", 1e-6),
        activation=act, gated_mlp=gated, positions="relative", attn_scale=1.0,
        rel_buckets=c.get("relative_attention_num_buckets", 32),
        rel_max_distance=c.get("relative_attention_max_distance", 128),
        head_scale=d ** -0.5 if scale else 1.0, tie_word_embeddings=tied, layer_windows=(0,) * n_dec,
        decoder_start_token_id=c.get("decoder_start_token_id", c.get("pad_token_id", 0)),
        hf_config=dict(c), **extra, **_common_ids(c),
    )


def bart(c, source):
    same = [("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim")]
    for a, b in same:
        if c.get(a) != c.get(b):
            raise UnsupportedModelError(f"{source}: {a}={c.get(a)} differs from {b}={c.get(b)}; lensjax needs "
                                        "the same layer shape in the encoder and the decoder")
    if c.get("add_final_layer_norm") or c.get("normalize_before"):
        raise UnsupportedModelError(f"{source}: pre-norm BART variants (mBART's normalize_before / "
                                    "add_final_layer_norm) are not supported")
    act = c.get("activation_function", "gelu")
    if act not in ACTIVATIONS:
        raise UnsupportedModelError(f"{source}: activation {act!r} is not supported")
    d, h = _req(c, "d_model", source), _req(c, "encoder_attention_heads", source)
    n_dec = _req(c, "decoder_layers", source)
    return ModelConfig(
        family="bart", vocab_size=_req(c, "vocab_size", source), hidden_size=d, num_layers=n_dec,
        encoder_layers=_req(c, "encoder_layers", source), num_heads=h, num_kv_heads=h, head_dim=d // h,
        intermediate_size=_req(c, "encoder_ffn_dim", source),
        max_positions=_req(c, "max_position_embeddings", source), norm="layernorm", norm_eps=1e-5,
        pre_norm=False, final_norm=False, activation=act, gated_mlp=False, positions="learned", position_offset=2,
        qkv_bias=True, o_bias=True, mlp_bias=True, norm_bias=True, embed_norm=True,
        embed_scale=math.sqrt(d) if c.get("scale_embedding") else 1.0, head_bias=True,
        tie_word_embeddings=c.get("tie_word_embeddings", True), layer_windows=(0,) * n_dec,
        decoder_start_token_id=c.get("decoder_start_token_id", 2), hf_config=dict(c), **_common_ids(c),
    )


BUILDERS = {
    "phi": phi,
    "t5": lambda c, s: t5(c, s, "t5"),
    "mt5": lambda c, s: t5(c, s, "mt5"),
    "switch_transformers": lambda c, s: t5(c, s, "switch_transformers"),
    "bart": bart,
}
