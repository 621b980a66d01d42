"""The functional forward pass over the common tree, for every supported family.

One function; the family differences are static fields of :class:`~lensjax.config.ModelConfig`.
Layers run under ``jax.lax.scan`` over the stacked ``layers`` subtree. Shapes use the suffix
convention of the design notes (``x_BTD``: batch, time, model width; ``S``: cache slots; ``K``:
kv heads; ``G``: query heads per kv head; ``H``: head dim).

Padding: ``attention_mask`` [B, T] marks real tokens. Without explicit ``positions``, positions
count only real tokens (``cumsum(mask) - 1``), as Hugging Face ``generate`` does, so left padding
gives the same logits for the real tokens as the unpadded sequence.

KV cache (:func:`init_cache`): ``k``/``v`` [L, B, K, S, H] (slots next to head dim, so the
attention dots read the cache without transposing it), ``mask`` [B, S] (slot holds a real
token), ``index`` (next slot to write), ``next_pos`` [B] (position of the next real token). A call
with a cache writes its T tokens at slots ``index .. index+T-1`` and attends over all slots.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lensjax.config import ModelConfig

NEG_INF = -1e30  # finite, so that fully masked (padding) rows stay finite


def init_cache(config: ModelConfig, batch: int, slots: int, dtype=jnp.float32) -> dict:
    shape = (config.num_layers, batch, config.num_kv_heads, slots, config.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "mask": jnp.zeros((batch, slots), bool),
        "index": jnp.zeros((), jnp.int32),
        "next_pos": jnp.zeros((batch,), jnp.int32),
    }


# ----------------------------------------------------------------------------------- pieces
def _norm(cfg: ModelConfig, p: dict, x):
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    if cfg.norm == "rmsnorm":
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
        return p["scale"] * y.astype(dtype)  # as HF: scale times the result cast back
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps) * p["scale"].astype(jnp.float32)
    if "bias" in p:
        y = y + p["bias"].astype(jnp.float32)
    return y.astype(dtype)


def _act(name: str, x):
    if name == "silu":
        return jax.nn.silu(x)
    if name == "relu":
        return jax.nn.relu(x)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    raise ValueError(f"unknown activation {name!r}")


def _dense(p: dict, x):
    # As a 2-D matmul: XLA's CPU backward of a 3-D x @ W transposes [B, T, F] badly (measured:
    # 10M Llama gradient, 8 x 128 tokens, 717 -> 520 ms).
    lead = x.shape[:-1]
    y = (x.reshape(-1, x.shape[-1]) @ p["w"]).reshape(*lead, p["w"].shape[-1])
    if "svf_vt" in p:  # factored SVF delta: x @ W + ((x @ U) ⊙ σ(g − 1)) @ Vᵀ (lensjax.svf)
        d = p["svf_d"]
        if "svf_rows" in p:  # per-row expert sets: d [E, r], row b uses set svf_rows[b]
            d = jnp.take(d, p["svf_rows"], axis=0).reshape(x.shape[0], *(1,) * (x.ndim - 2), d.shape[-1])
        y = y + (((x @ p["svf_u"].astype(x.dtype)) * d.astype(x.dtype)) @ p["svf_vt"].astype(x.dtype))
    return y + p["b"] if "b" in p else y


def rope_inv_freq(cfg: ModelConfig, seq_len):
    """Inverse frequencies [H/2] (float32) for the config's RoPE type; ``seq_len`` (traced scalar)
    only matters for "dynamic", which rescales the base once the sequence outgrows
    ``max_positions`` (as Hugging Face's dynamic NTK RoPE)."""
    dim = cfg.head_dim
    expo = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    base = jnp.float32(cfg.rope_theta)
    if cfg.rope_type == "dynamic":
        s = jnp.maximum(seq_len, cfg.max_positions).astype(jnp.float32)
        f = cfg.rope_factor
        base = base * ((f * s / cfg.max_positions) - (f - 1)) ** (dim / (dim - 2))
    inv = 1.0 / (base**expo)
    if cfg.rope_type == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        f, lo, hi, old = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_positions
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old / lo, inv / f, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / f + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = jnp.where(medium, smoothed, scaled)
    return inv


def _rope(x_BTNH, cos_BTH, sin_BTH):
    half = x_BTNH.shape[-1] // 2
    rot = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    return x_BTNH * cos_BTH[:, :, None, :] + rot * sin_BTH[:, :, None, :]


def _attention(cfg: ModelConfig, q_BTNH, blocks):
    """Softmax attention of q over the concatenation of key/value ``blocks``:
    ``[(k_BKSH, v_BKSH, allowed_BTS), ...]``; grouped-query heads without repeating k/v."""
    B, T, _, H = q_BTNH.shape
    K = cfg.num_kv_heads
    G = cfg.num_heads // K
    q = q_BTNH.reshape(B, T, K, G, H)
    scores = []
    for k, _, allowed in blocks:
        s = jnp.einsum("btkgh,bksh->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(H)
        scores.append(jnp.where(allowed[:, None, None], s, NEG_INF))
    p = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    out, start = 0.0, 0
    for k, v, _ in blocks:
        n = k.shape[2]
        out = out + jnp.einsum("bkgts,bksh->btkgh", p[..., start:start + n].astype(v.dtype), v)
        start += n
    return out.reshape(B, T, K * G * H)


# ----------------------------------------------------------------------------------- forward
def _forward(cfg: ModelConfig, params: dict, input_ids, attention_mask, cache, positions, cache_empty=False,
             last_only=False):
    """``cache_empty``: static promise that the cache holds nothing yet (prefill), so its slots are
    not attended over; ``last_only``: logits of the last position only ([B, 1, V])."""
    B, T = input_ids.shape
    mask_BT = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
    dtype = params["embed"]["tokens"].dtype
    start = cache["next_pos"][:, None] if cache is not None else jnp.zeros((B, 1), jnp.int32)
    if positions is None:
        positions = start + jnp.maximum(jnp.cumsum(mask_BT, axis=1, dtype=jnp.int32) - 1, 0)
    positions = positions.astype(jnp.int32)

    x = jnp.take(params["embed"]["tokens"], input_ids, axis=0)
    if cfg.has_projection:
        x = x @ params["project_in"]["w"]
    if cfg.positions == "learned":
        x = x + jnp.take(params["embed"]["positions"], positions + cfg.position_offset, axis=0)
        cos = sin = None
    else:
        inv = rope_inv_freq(cfg, jnp.max(positions) + 1)
        ang = positions.astype(jnp.float32)[..., None] * inv
        ang = jnp.concatenate([ang, ang], axis=-1)
        cos, sin = jnp.cos(ang).astype(dtype), jnp.sin(ang).astype(dtype)

    # Which keys each query may see: the T new tokens (causal, padding-masked) and, with a cache,
    # its filled slots (all earlier in time). Slots are time order (left padding keeps it).
    index = cache["index"] if cache is not None else jnp.int32(0)
    q_slot = index + jnp.arange(T)
    new_ok_BTT = (jnp.arange(T)[None, :] <= jnp.arange(T)[:, None])[None] & mask_BT[:, None, :]
    new_dist_TT = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]
    if cache is not None:
        S = cache["mask"].shape[1]
        old_ok_BTS = jnp.broadcast_to(cache["mask"][:, None, :], (B, T, S))
        old_dist_TS = q_slot[:, None] - jnp.arange(S)[None, :]
    windows = jnp.asarray(cfg.layer_windows or (0,) * cfg.num_layers, jnp.int32)

    def layer(x, xs):
        p, window, kc, vc = xs
        h = _norm(cfg, p["attn_norm"], x) if cfg.pre_norm else x
        q = _dense(p["attn"]["q"], h).reshape(B, T, cfg.num_heads, cfg.head_dim)
        k = _dense(p["attn"]["k"], h).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        v = _dense(p["attn"]["v"], h).reshape(B, T, cfg.num_kv_heads, cfg.head_dim)
        if cos is not None:
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
        in_window = lambda d: (window == 0) | (d < window)  # noqa: E731
        if kc is None or cache_empty:
            att = _attention(cfg, q, [(k, v, new_ok_BTT & in_window(new_dist_TT)[None])])
        else:
            # The cache is read in place (no copy of the updated layer): scores over the old slots
            # and over the new tokens share one softmax.
            att = _attention(cfg, q, [(kc.astype(dtype), vc.astype(dtype), old_ok_BTS & in_window(old_dist_TS)[None]),
                                      (k, v, new_ok_BTT & in_window(new_dist_TT)[None])])
        x = x + _dense(p["attn"]["o"], att)
        if not cfg.pre_norm:
            x = _norm(cfg, p["attn_norm"], x)
        h = _norm(cfg, p["mlp_norm"], x) if cfg.pre_norm else x
        if cfg.gated_mlp:
            m = _act(cfg.activation, _dense(p["mlp"]["gate"], h)) * _dense(p["mlp"]["up"], h)
        else:
            m = _act(cfg.activation, _dense(p["mlp"]["up"], h))
        x = x + _dense(p["mlp"]["down"], m)
        if not cfg.pre_norm:
            x = _norm(cfg, p["mlp_norm"], x)
        return x, (k, v)

    kc = vc = None
    if cache is not None:
        kc, vc = cache["k"], cache["v"]
    x, (k_new, v_new) = jax.lax.scan(layer, x, (params["layers"], windows, kc, vc))
    if last_only:
        x = x[:, -1:]
    if cfg.final_norm:
        x = _norm(cfg, params["final_norm"], x)
    if cfg.has_projection:
        x = x @ params["project_out"]["w"]
    head = params["embed"]["tokens"].T if cfg.tie_word_embeddings else params["lm_head"]["w"]
    logits = jnp.matmul(x, head, preferred_element_type=jnp.float32)
    if cache is None:
        return logits, None
    new_cache = {  # one in-place write of the new tokens' keys and values for all layers
        "k": jax.lax.dynamic_update_slice(cache["k"], k_new.astype(cache["k"].dtype), (0, 0, 0, index, 0)),
        "v": jax.lax.dynamic_update_slice(cache["v"], v_new.astype(cache["v"].dtype), (0, 0, 0, index, 0)),
        "mask": jax.lax.dynamic_update_slice(cache["mask"], mask_BT, (0, index)),
        "index": index + T,
        "next_pos": cache["next_pos"] + jnp.sum(mask_BT, axis=1, dtype=jnp.int32),
    }
    return logits, new_cache


@functools.partial(jax.jit, static_argnums=0)
def _forward_jit(cfg, params, input_ids, attention_mask, cache, positions):
    return _forward(cfg, params, input_ids, attention_mask, cache, positions)


def forward(config: ModelConfig, params: dict, input_ids, attention_mask=None, *, cache=None, positions=None):
    """Logits [B, T, V] (float32) for ``input_ids`` [B, T]; with ``cache``, ``(logits, new_cache)``.

    Jitted (one compile per config and input shapes).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask)
    if positions is not None:
        positions = jnp.asarray(positions, jnp.int32)
    logits, new_cache = _forward_jit(config, params, input_ids, attention_mask, cache, positions)
    return logits if cache is None else (logits, new_cache)
