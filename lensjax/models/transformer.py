"""The functional forward pass over the common tree, for every supported family.

One stack function serves decoder-only models and both stacks of an encoder-decoder; the family
differences are static fields of :class:`~lensjax.config.ModelConfig` (pre/post norm, parallel
block, cross-attention, RoPE / learned / T5 relative positions, dense or expert FFN). Layers run
under ``jax.lax.scan`` over the stacked ``layers`` subtree. Shapes use the suffix convention of the
design notes (``x_BTD``: batch, time, model width; ``S``: cache slots; ``K``: kv heads; ``G``:
query heads per kv head; ``H``: head dim).

Padding: ``attention_mask`` [B, T] marks real tokens. For decoder-only models, positions count
only real tokens (``cumsum(mask) - 1``) unless given, as Hugging Face ``generate`` does, so left
padding gives the same logits for the real tokens as the unpadded sequence. Encoder-decoders use
slot positions (``arange``), as Hugging Face's T5 and BART do.

KV cache (:func:`init_cache`): ``k``/``v`` [L, B, K, S, H] (slots next to head dim, so the
attention dots read the cache without transposing it), ``mask`` [B, S] (slot holds a real
token), ``index`` (next slot to write), ``next_pos`` [B] (position of the next real token). A call
with a cache writes its T tokens at slots ``index .. index+T-1`` and attends over all slots. An
encoder-decoder's cache also holds ``cross_k``/``cross_v`` [L, B, K, S_enc, H] and ``enc_mask``
[B, S_enc]: the encoder output projected once by every decoder layer (:func:`cross_cache`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lensjax.config import ModelConfig
from lensjax.models.layers import (  # noqa: F401  (NEG_INF, rope_inv_freq: re-exported)
    NEG_INF, TAP, attention, dense, mlp, mm, moe, norm, relative_bias, rope, rope_inv_freq,
)
from lensjax.kernels import mixed, taps, xla

_dense = dense  # the name lensjax.svf's notes refer to

# What a layer keeps for its backward pass: the outputs of its dot products only. The element-wise
# work between them (norms, RoPE, softmax, SiLU gates, masks, residual adds) is recomputed from
# those in the backward pass instead of being stacked per layer by the scan: the stacks cost a
# zero-fill, a write and a read of every intermediate ([L, B, T, F] each), more than recomputing.
# Measured on a 2-core CPU, 10M Llama (issue 14): AdamW step 8 x 128 0.567-0.578 -> 0.497-0.540 s,
# batched gradient over 64 x 64 tokens 2.23 -> 1.97 s; the losses are bit-identical. Without
# differentiation (forward, sampling) jax.checkpoint changes nothing. None: save everything.
LAYER_SAVE_POLICY = jax.checkpoint_policies.dots_saveable
# Mixed precision (ModelConfig.matmul_dtype) also keeps each dense layer's low-precision input,
# which its weight gradient transposes (lensjax.kernels.mixed: recomputing it there fused the
# transpose with the SiLU gate, 10x slower than the copy alone).
MIXED_SAVE_POLICY = jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_saveable, jax.checkpoint_policies.save_only_these_names(mixed.SAVE_NAME))


def init_cache(config: ModelConfig, batch: int, slots: int, dtype=jnp.float32) -> dict:
    shape = (config.num_layers, batch, config.num_kv_heads, slots, config.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "mask": jnp.zeros((batch, slots), bool),
        "index": jnp.zeros((), jnp.int32),
        "next_pos": jnp.zeros((batch,), jnp.int32),
    }


def _stack_params(cfg: ModelConfig, params: dict, stack: str) -> dict:
    if cfg.is_encoder_decoder:
        return params[stack]
    sp = {"layers": params["layers"]}
    if "final_norm" in params:
        sp["final_norm"] = params["final_norm"]
    if "positions" in params["embed"]:
        sp["positions"] = params["embed"]["positions"]
        if TAP + "positions" in params["embed"]:
            sp[TAP + "positions"] = params["embed"][TAP + "positions"]
    return sp


def _embed(cfg: ModelConfig, params, sp, ids_BT, positions_BT):
    emb = params["embed"]
    x = taps.take(emb["tokens"], ids_BT, emb[TAP + "tokens"]) if TAP + "tokens" in emb else jnp.take(emb["tokens"], ids_BT, axis=0)
    if cfg.embed_scale != 1.0:
        x = x * jnp.asarray(cfg.embed_scale, x.dtype)
    if cfg.has_projection:
        x = mm(x, params["project_in"]["w"])
    if cfg.positions == "learned":
        pos = positions_BT + cfg.position_offset
        x = x + (taps.take(sp["positions"], pos, sp[TAP + "positions"]) if TAP + "positions" in sp
                 else jnp.take(sp["positions"], pos, axis=0))
    if cfg.embed_norm:
        x = norm(cfg, sp["embed_norm"], x)
    return x


def _heads(cfg, x, n):
    return x.reshape(*x.shape[:-1], n, cfg.head_dim)


def _ffn_runner(cfg: ModelConfig, layers: dict, sparse: tuple[bool, ...]):
    """(per-layer xs for the scan, fn(xs_i, h) -> FFN output). Dense-only and all-sparse stacks
    scan their FFN leaves directly; a mixed Switch stack indexes its dense / expert stacks with the
    layer's position among them and picks the branch with ``lax.cond`` (no Python loop)."""
    n_sparse = sum(sparse)
    if n_sparse == 0:
        return layers["mlp"], lambda p, h: mlp(cfg, p, h)
    if n_sparse == len(sparse):
        return layers["moe"], lambda p, h: moe(cfg, p, h)
    flags = jnp.asarray(sparse)
    dense_i = jnp.asarray([sum(1 for s in sparse[:i] if not s) for i in range(len(sparse))], jnp.int32)
    moe_i = jnp.asarray([sum(sparse[:i]) for i in range(len(sparse))], jnp.int32)
    dense_p, moe_p = layers["mlp"], layers["moe"]
    take = lambda tree, i: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), tree)  # noqa: E731

    def run(xs, h):
        flag, di, mi = xs
        return jax.lax.cond(flag, lambda h: moe(cfg, take(moe_p, mi), h), lambda h: mlp(cfg, take(dense_p, di), h), h)

    return (flags, dense_i, moe_i), run


def _run_stack(cfg: ModelConfig, sp: dict, x, *, mask_BT, rope_positions, q_slot, causal: bool, sparse, cache=None,
               cache_empty=False, cross=None, reach: int = 0):
    """Run the layers of one stack over x [B, T, D]. ``q_slot`` [T]: slot positions of the new
    tokens (T5 bias, causal masks against the cache); ``rope_positions`` [B, T] or None;
    ``cross``: (k, v [L, B, K, S, H], enc_mask [B, S]) for decoder layers. Returns
    (x, (k_new, v_new)) with the new tokens' keys and values of every layer."""
    B, T, _ = x.shape
    dtype = x.dtype
    L = len(sparse)
    cos = sin = None
    if rope_positions is not None:
        inv = rope_inv_freq(cfg, jnp.max(rope_positions) + 1)
        ang = rope_positions.astype(jnp.float32)[..., None] * inv
        ang = jnp.concatenate([ang, ang], axis=-1)
        cos, sin = jnp.cos(ang).astype(dtype), jnp.sin(ang).astype(dtype)

    # Which keys each query may see: the T new tokens (causal or not, padding-masked) and, with a
    # cache, its filled slots (all earlier in time). Slots are time order (left padding keeps it).
    new_ok_BTT = jnp.broadcast_to(mask_BT[:, None, :], (B, T, T))
    if causal:
        new_ok_BTT = new_ok_BTT & (jnp.arange(T)[None, :] <= jnp.arange(T)[:, None])[None]
    new_dist_TT = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]
    use_cache = cache is not None and not cache_empty
    if use_cache:
        S = cache["mask"].shape[1]
        old_ok_BTS = jnp.broadcast_to(cache["mask"][:, None, :], (B, T, S))
        old_dist_TS = q_slot[:, None] - jnp.arange(S)[None, :]
    bias_new = bias_old = None
    if cfg.rel_buckets:
        bias_new = relative_bias(cfg, sp["rel_bias"], q_slot, q_slot, not causal, reach)
        if use_cache:
            bias_old = relative_bias(cfg, sp["rel_bias"], q_slot, jnp.arange(S), not causal, reach)
    windows = jnp.asarray(cfg.layer_windows if causal and len(cfg.layer_windows) == L else (0,) * L, jnp.int32)
    base = cfg.attn_scale or 1.0 / math.sqrt(cfg.head_dim)
    scales = jnp.asarray([base / (i + 1) if cfg.inverse_layer_scale else base for i in range(L)], jnp.float32)
    layers = sp["layers"]
    ffn_xs, ffn = _ffn_runner(cfg, layers, sparse)
    attn_layers = {k: v for k, v in layers.items() if k not in ("mlp", "moe")}

    dense = functools.partial(_dense, matmul_dtype=cfg.matmul_dtype)

    def self_attention(p, h, window, scale, kc, vc):
        q = _heads(cfg, dense(p["q"], h), cfg.num_heads)
        k = _heads(cfg, dense(p["k"], h), cfg.num_kv_heads)
        v = _heads(cfg, dense(p["v"], h), cfg.num_kv_heads)
        if cos is not None:
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
        in_window = lambda d: (window == 0) | (d < window)  # noqa: E731
        blocks = [(k, v, new_ok_BTT & in_window(new_dist_TT)[None], bias_new)]
        if use_cache:
            # The cache is read in place (no copy of the updated layer): scores over the old slots
            # and over the new tokens share one softmax.
            blocks.insert(0, (kc.astype(dtype), vc.astype(dtype), old_ok_BTS & in_window(old_dist_TS)[None], bias_old))
        return dense(p["o"], attention(cfg, q, blocks, scale)), k, v

    def cross_attention(p, h, ck, cv):
        q = _heads(cfg, dense(p["q"], h), cfg.num_heads)
        allowed = jnp.broadcast_to(cross[2][:, None, :], (B, T, cross[2].shape[1]))
        return dense(p["o"], attention(cfg, q, [(ck.astype(dtype), cv.astype(dtype), allowed, None)], cfg.attn_scale or 1.0 / math.sqrt(cfg.head_dim)))

    def sub(name, p, x, fn):
        """One residual sub-block, pre- or post-norm."""
        h = norm(cfg, p[name], x) if cfg.pre_norm else x
        x = x + fn(h)
        return x if cfg.pre_norm else norm(cfg, p[name], x)

    def layer(x, xs):
        p, fx, window, scale, kc, vc, ck, cv = xs
        if cfg.parallel_block:  # Phi: attention and MLP read one norm of x
            h = norm(cfg, p["attn_norm"], x)
            a, k, v = self_attention(p["attn"], h, window, scale, kc, vc)
            return x + a + ffn(fx, h), (k, v)
        out = {}

        def attn_fn(h):
            a, out["k"], out["v"] = self_attention(p["attn"], h, window, scale, kc, vc)
            return a

        x = sub("attn_norm", p, x, attn_fn)
        if cross is not None:
            x = sub("cross_norm", p, x, lambda h: cross_attention(p["cross_attn"], h, ck, cv))
        x = sub("mlp_norm", p, x, lambda h: ffn(fx, h))
        return x, (out["k"], out["v"])

    kc = vc = ck = cv = None
    if use_cache:
        kc, vc = cache["k"], cache["v"]
    if cross is not None:
        ck, cv = cross[0], cross[1]
    policy = LAYER_SAVE_POLICY
    if policy is jax.checkpoint_policies.dots_saveable and cfg.matmul_dtype:
        policy = MIXED_SAVE_POLICY
    if policy is not None:
        layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)
    return jax.lax.scan(layer, x, (attn_layers, ffn_xs, windows, scales, kc, vc, ck, cv))


def _finish(cfg: ModelConfig, params, sp, x):
    if cfg.final_norm:
        x = norm(cfg, sp["final_norm"], x)
    if cfg.has_projection:
        x = mm(x, params["project_out"]["w"])
    if cfg.head_scale != 1.0:
        x = x * jnp.asarray(cfg.head_scale, x.dtype)
    head = params["embed"]["tokens"].T if cfg.tie_word_embeddings else params["lm_head"]["w"]
    hp = {} if cfg.tie_word_embeddings else params["lm_head"]
    if TAP + "w" in hp:
        logits = taps.matmul(x, head, hp[TAP + "w"], True)
    elif cfg.matmul_dtype:  # a tied table goes in as stored, [V, D] (lensjax.kernels.mixed._bwd)
        tied = cfg.tie_word_embeddings
        w = params["embed"]["tokens"] if tied else head
        logits = mixed.matmul(x, w, cfg.matmul_dtype, tied).astype(jnp.float32)
    else:
        logits = jnp.matmul(x, head, preferred_element_type=jnp.float32)
    if cfg.head_bias:
        b = params["lm_head"]["b"].astype(jnp.float32)
        logits = taps.add(logits, b, hp[TAP + "b"]) if TAP + "b" in hp else logits + b
    return logits


# ----------------------------------------------------------------------------------- encoder
def encode(cfg: ModelConfig, params: dict, input_ids, attention_mask=None):
    """An encoder-decoder's encoder output [B, S, D] (after its final norm)."""
    B, S = input_ids.shape
    mask = jnp.ones((B, S), bool) if attention_mask is None else attention_mask.astype(bool)
    sp = params["encoder"]
    pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    x = _embed(cfg, params, sp, input_ids, pos)
    x, _ = _run_stack(cfg, sp, x, mask_BT=mask, rope_positions=None, q_slot=jnp.arange(S), causal=False,
                      sparse=cfg.sparse_layers("encoder"), reach=S)
    return norm(cfg, sp["final_norm"], x) if cfg.final_norm else x


def cross_cache(cfg: ModelConfig, params: dict, enc_BSD, enc_mask_BS):
    """Every decoder layer's cross-attention keys and values of the encoder output, computed once
    (vmapped over the stacked layers): ``{"cross_k", "cross_v"}`` [L, B, K, S, H] and the mask."""
    B, S, _ = enc_BSD.shape

    def kv(p):
        k = _heads(cfg, dense(p["k"], enc_BSD), cfg.num_kv_heads).transpose(0, 2, 1, 3)
        v = _heads(cfg, dense(p["v"], enc_BSD), cfg.num_kv_heads).transpose(0, 2, 1, 3)
        return k, v

    k, v = jax.vmap(kv)(params["decoder"]["layers"]["cross_attn"])
    mask = jnp.ones((B, S), bool) if enc_mask_BS is None else enc_mask_BS.astype(bool)
    return {"cross_k": k, "cross_v": v, "enc_mask": mask}


# ----------------------------------------------------------------------------------- forward
def _forward(cfg: ModelConfig, params: dict, input_ids, attention_mask, cache, positions, cache_empty=False,
             last_only=False, encoded=None, keep=None):
    """Decoder logits (float32) and the updated cache. For an encoder-decoder, ``input_ids`` are
    decoder tokens and the encoder comes from ``encoded`` (:func:`cross_cache`'s dict) or from the
    cache's cross entries. ``cache_empty``: static promise that the cache holds nothing yet
    (prefill), so its slots are not attended over; ``last_only``: logits of the last position only;
    ``keep`` (int [B, K]): logits [B, K, V] of those positions only (the final norm and the head
    run on K rows instead of T: :func:`lensjax.models.lm.logit_positions`)."""
    B, T = input_ids.shape
    mask_BT = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
    index = cache["index"] if cache is not None else jnp.int32(0)
    q_slot = index + jnp.arange(T)
    sp = _stack_params(cfg, params, "decoder")
    cross = None
    if cfg.is_encoder_decoder:
        enc = encoded if encoded is not None else cache
        if enc is None or "cross_k" not in enc:
            raise ValueError("an encoder-decoder's decoder needs the encoder output (cross_cache)")
        cross = (enc["cross_k"], enc["cross_v"], enc["enc_mask"])
        positions = jnp.broadcast_to(q_slot[None], (B, T)).astype(jnp.int32)
        rope_positions = None
    else:
        start = cache["next_pos"][:, None] if cache is not None else jnp.zeros((B, 1), jnp.int32)
        if positions is None:
            positions = start + jnp.maximum(jnp.cumsum(mask_BT, axis=1, dtype=jnp.int32) - 1, 0)
        positions = positions.astype(jnp.int32)
        rope_positions = positions if cfg.positions == "rope" else None
    reach = T + (cache["mask"].shape[1] if cache is not None else 0)
    x = _embed(cfg, params, sp, input_ids, positions)
    x, (k_new, v_new) = _run_stack(cfg, sp, x, mask_BT=mask_BT, rope_positions=rope_positions, q_slot=q_slot,
                                   causal=True, sparse=cfg.sparse_layers("decoder"), cache=cache,
                                   cache_empty=cache_empty, cross=cross, reach=reach)
    if last_only:
        x = x[:, -1:]
    elif keep is not None:
        x = jnp.take_along_axis(x, keep[..., None].astype(jnp.int32), axis=1)
    logits = _finish(cfg, params, sp, x)
    if cache is None:
        return logits, None
    new_cache = dict(cache)
    new_cache.update({  # one in-place write of the new tokens' keys and values for all layers
        "k": jax.lax.dynamic_update_slice(cache["k"], k_new.astype(cache["k"].dtype), (0, 0, 0, index, 0)),
        "v": jax.lax.dynamic_update_slice(cache["v"], v_new.astype(cache["v"].dtype), (0, 0, 0, index, 0)),
        "mask": jax.lax.dynamic_update_slice(cache["mask"], mask_BT, (0, index)),
        "index": index + T,
        "next_pos": cache["next_pos"] + jnp.sum(mask_BT, axis=1, dtype=jnp.int32),
    })
    return logits, new_cache


def forward_encdec(cfg: ModelConfig, params: dict, input_ids, attention_mask, decoder_input_ids,
                   decoder_attention_mask=None, keep=None):
    """Teacher-forced decoder logits [B, T_dec, V] of an encoder-decoder (traceable); ``keep``: as
    in :func:`_forward` (decoder positions)."""
    enc = encode(cfg, params, input_ids, attention_mask)
    encoded = cross_cache(cfg, params, enc, attention_mask)
    logits, _ = _forward(cfg, params, decoder_input_ids, decoder_attention_mask, None, None, encoded=encoded,
                         keep=keep)
    return logits


# mixed="auto": bfloat16 parameters compile without XLA CPU's bf16 float normalization, which
# would widen every layer's weights to float32 (lensjax.kernels.xla; the dots are layers.mm)
@functools.partial(xla.jit, static_argnums=0, mixed="auto")
def _forward_jit(cfg, params, input_ids, attention_mask, cache, positions):
    return _forward(cfg, params, input_ids, attention_mask, cache, positions)


_forward_encdec_jit = xla.jit(forward_encdec, static_argnums=0, mixed="auto")


def forward(config: ModelConfig, params: dict, input_ids, attention_mask=None, *, decoder_input_ids=None,
            decoder_attention_mask=None, cache=None, positions=None):
    """Logits [B, T, V] (float32) for ``input_ids`` [B, T]; with ``cache``, ``(logits, new_cache)``.

    Encoder-decoders (T5, BART, ...): ``input_ids``/``attention_mask`` feed the encoder and the
    logits are the decoder's for ``decoder_input_ids`` [B, T_dec] (start token first, as
    :func:`shift_right` makes them), as Hugging Face's ``model(input_ids, decoder_input_ids=...)``.
    Jitted (one compile per config and input shapes).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask)
    if config.is_encoder_decoder:
        if decoder_input_ids is None:
            raise ValueError(f"{config.family} is an encoder-decoder: pass decoder_input_ids (e.g. "
                             "lensjax.models.shift_right(labels, config))")
        if cache is not None or positions is not None:
            raise ValueError("forward(cache=, positions=) is for decoder-only models; use generate")
        dec = jnp.asarray(decoder_input_ids, jnp.int32)
        dmask = None if decoder_attention_mask is None else jnp.asarray(decoder_attention_mask)
        return _forward_encdec_jit(config, params, input_ids, attention_mask, dec, dmask)
    if decoder_input_ids is not None:
        raise ValueError(f"{config.family} is decoder-only; decoder_input_ids is for encoder-decoders")
    if positions is not None:
        positions = jnp.asarray(positions, jnp.int32)
    logits, new_cache = _forward_jit(config, params, input_ids, attention_mask, cache, positions)
    return logits if cache is None else (logits, new_cache)


def shift_right(labels, config: ModelConfig, pad_id: int | None = None):
    """Decoder inputs from target ids [B, T]: ``decoder_start_token_id`` then the targets without
    their last token, with -100 (ignored labels) replaced by the pad id (as HF's ``_shift_right``)."""
    import numpy as np

    labels = np.asarray(labels)
    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else 0
    pad = pad_id if pad_id is not None else (config.pad_token_id or 0)
    out = np.concatenate([np.full((labels.shape[0], 1), start, labels.dtype), labels[:, :-1]], axis=1)
    return np.where(out == -100, pad, out)
