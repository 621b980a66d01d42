"""Pieces of the forward pass shared by every family: norms, activations, dense layers (with the
factored SVF delta), rotary and T5 relative-position embeddings, softmax attention over key/value
blocks, and Switch Transformers' top-1 mixture of experts. Pure functions of arrays; the static
switches come from :class:`~lensjax.config.ModelConfig`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lensjax.config import ModelConfig
from lensjax.kernels import mixed, scores as qk_scores, taps, xla

# Keys of the NTK Gram taps (lensjax.models.lm_ntk): a dict holding "ntk_w" next to "w" (and so on)
# runs that parameter's op through lensjax.kernels.taps, whose backward yields its block of K.
TAP = "ntk_"

NEG_INF = -1e30  # finite, so that fully masked (padding) rows stay finite


def norm(cfg: ModelConfig, p: dict, x):
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    if cfg.norm == "rmsnorm":  # Llama RMSNorm and T5's LayerNorm (no mean, no bias) alike
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
        if TAP + "scale" in p:
            return taps.scale(y.astype(dtype), p["scale"], p[TAP + "scale"])
        return p["scale"] * y.astype(dtype)  # as HF: scale times the result cast back
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
    if TAP + "scale" in p:
        y = taps.scale(y, p["scale"].astype(jnp.float32), p[TAP + "scale"])
    else:
        y = y * p["scale"].astype(jnp.float32)
    if "bias" in p:
        b = p["bias"].astype(jnp.float32)
        y = taps.add(y, b, p[TAP + "bias"]) if TAP + "bias" in p else y + b
    return y.astype(dtype)


def act(name: str, x):
    if name == "silu":
        return jax.nn.silu(x)
    if name == "relu":
        return jax.nn.relu(x)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    raise ValueError(f"unknown activation {name!r}")


def mm(a, b):
    """``a @ b`` in ``a``'s dtype. Inside a program that :func:`lensjax.kernels.xla.jit` compiles
    for bfloat16 inputs (``mixed="auto"``), a bfloat16 product is a bf16 × bf16 → f32 dot rounded
    to bfloat16 once: the numbers XLA computes for a bf16 dot anyway (float32 inside, one rounding),
    but a dot that XLA CPU runs on the CPU's bfloat16 units without widening the program's bfloat16
    arrays to float32. Elsewhere the plain product."""
    if a.dtype == jnp.bfloat16 and xla.f32_dots():
        return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(a.dtype)
    return a @ b


def dense(p: dict, x, matmul_dtype: str = ""):
    """``x @ w (+ b)``, with the factored SVF delta when ``p`` holds one. ``matmul_dtype``
    (``ModelConfig.matmul_dtype``): "" in the parameters' dtype, else mixed precision
    (:mod:`lensjax.kernels.mixed`: operands in that type, float32 accumulation)."""
    # As a 2-D matmul: XLA's CPU backward of a 3-D x @ W transposes [B, T, F] badly (measured:
    # 10M Llama gradient, 8 x 128 tokens, 717 -> 520 ms).
    lead = x.shape[:-1]
    if TAP + "w" in p:
        y = taps.matmul(x, p["w"], p[TAP + "w"])
    elif "svf_zd" in p:  # SVF training in mixed precision: W′ formed here, only d trained (kernels.mixed)
        y = mixed.svf_matmul(x, p["w"], p["svf_u"], p["svf_zd"], p["svf_vt"], matmul_dtype or "bfloat16")
    elif matmul_dtype:  # keeps x [B, T, K] whole: its weight gradient transposes it as 3-D
        y = mixed.matmul(x, p["w"], matmul_dtype)
    else:
        y = mm(x.reshape(-1, x.shape[-1]), p["w"]).reshape(*lead, p["w"].shape[-1])
    if "svf_vt" in p and "svf_zd" not in p:  # factored SVF delta: x @ W + ((x @ U) ⊙ σ(g − 1)) @ Vᵀ (lensjax.svf)
        d = p["svf_d"]
        if "svf_rows" in p:  # per-row expert sets: d [E, r], row b uses set svf_rows[b]
            d = jnp.take(d, p["svf_rows"], axis=0).reshape(x.shape[0], *(1,) * (x.ndim - 2), d.shape[-1])
        y = y + mm(mm(x, p["svf_u"].astype(x.dtype)) * d.astype(x.dtype), p["svf_vt"].astype(x.dtype))
    if "b" in p:
        return taps.add(y, p["b"], p[TAP + "b"]) if TAP + "b" in p else y + p["b"]
    return y


def mlp(cfg: ModelConfig, p: dict, h):
    mm = cfg.matmul_dtype
    if cfg.gated_mlp:
        return dense(p["down"], act(cfg.activation, dense(p["gate"], h, mm)) * dense(p["up"], h, mm), mm)
    return dense(p["down"], act(cfg.activation, dense(p["up"], h, mm)), mm)


# ----------------------------------------------------------------------------------- positions
def rope_inv_freq(cfg: ModelConfig, seq_len):
    """Inverse frequencies [R/2] (float32, R = the rotary dims) for the config's RoPE type;
    ``seq_len`` (traced scalar) only matters for "dynamic", which rescales the base once the
    sequence outgrows ``max_positions`` (as Hugging Face's dynamic NTK RoPE)."""
    dim = cfg.rope_dim
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


def rope(x_BTNH, cos_BTR, sin_BTR):
    """Rotary embedding on the first R dims of every head (R = head dim, or Phi's partial R)."""
    r = cos_BTR.shape[-1]
    xr, rest = (x_BTNH, None) if r == x_BTNH.shape[-1] else (x_BTNH[..., :r], x_BTNH[..., r:])
    half = r // 2
    rot = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    out = xr * cos_BTR[:, :, None, :] + rot * sin_BTR[:, :, None, :]
    return out if rest is None else jnp.concatenate([out, rest], axis=-1)


@functools.lru_cache(maxsize=None)
def _bucket_table(num_buckets: int, max_distance: int, bidirectional: bool, reach: int) -> np.ndarray:
    """T5's bucket of every relative position ``key − query`` in [−reach, reach] (index + reach),
    in float32 as Hugging Face computes it; a host constant, so the bucket boundaries never depend
    on a device's log implementation."""
    rel = np.arange(-reach, reach + 1, dtype=np.int64)
    n = num_buckets
    out = np.zeros_like(rel)
    if bidirectional:
        n //= 2
        out += (rel > 0).astype(np.int64) * n
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    exact = n // 2
    with np.errstate(divide="ignore", invalid="ignore"):
        large = exact + (np.log(rel.astype(np.float32) / np.float32(exact)) / np.float32(math.log(max_distance / exact))
                         * np.float32(n - exact))
    large = np.minimum(np.where(rel < exact, 0, large).astype(np.int64), n - 1)
    return (out + np.where(rel < exact, rel, large)).astype(np.int32)


def relative_bias(cfg: ModelConfig, table_NH, q_pos_T, k_pos_S, bidirectional: bool, reach: int):
    """T5 position bias [H, T, S] for queries at ``q_pos_T`` and keys at ``k_pos_S`` (slot
    positions); ``reach`` (static) bounds |key − query|."""
    buckets = jnp.asarray(_bucket_table(cfg.rel_buckets, cfg.rel_max_distance, bidirectional, reach))
    rel = jnp.clip(k_pos_S[None, :] - q_pos_T[:, None], -reach, reach) + reach
    return jnp.take(table_NH, jnp.take(buckets, rel), axis=0).transpose(2, 0, 1).astype(jnp.float32)


# ----------------------------------------------------------------------------------- attention
def attention(cfg: ModelConfig, q_BTNH, blocks, scale):
    """Softmax attention of q over the concatenation of key/value ``blocks``:
    ``[(k_BKSH, v_BKSH, allowed_BTS, bias_NTS or None), ...]``; grouped-query heads without
    repeating k/v. ``scale`` multiplies q·k (a traced scalar: GPT-2's inverse-layer scaling).

    The products run as batched matmuls over (batch, kv head) with the query positions and the
    heads of a group as the rows, [B, K, T·G, H] · [B, K, H, S]: XLA CPU runs a batched dot one
    batch element at a time, and this layout gave it fewer and cheaper transposes than the einsum
    over [B, T, K, G, H] that it replaced (the same numbers up to summation order). Measured on a
    2-core Xeon, float32, a 10M Llama's attention core (4 kv heads, 2 queries each, head dim 32)
    on 64 × 64 tokens, forward and backward: 35.9 → 21.0 ms per layer (medians of 30 interleaved
    runs); the whole model's gradient: 1278 → 1254 ms on 64 × 64 tokens, 356 → 336 ms on 8 × 128."""
    B, T, _, H = q_BTNH.shape
    K = cfg.num_kv_heads
    G = cfg.num_heads // K
    q = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)
    scores = []
    for k, _, allowed, bias in blocks:
        if cfg.matmul_dtype or qk_scores.active():  # reverse-mode programs: the key gradient in the
            s = qk_scores.qk(q, k)  # faster operand order (lensjax.kernels.scores)
        else:
            s = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32)
        s = s.reshape(B, K, T, G, k.shape[2]) * scale
        if bias is not None:  # [N, T, S] -> [K, T, G, S]
            s = s + bias.reshape(K, G, *bias.shape[1:]).transpose(0, 2, 1, 3)[None]
        scores.append(jnp.where(allowed[:, None, :, None, :], s, NEG_INF))
    p = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    out, start = 0.0, 0
    for k, v, _, _ in blocks:
        n = k.shape[2]
        pv = p[..., start:start + n].reshape(B, K, T * G, n)
        if v.dtype == jnp.bfloat16 and xla.f32_dots():  # float32 operands: XLA may order a bf16 dot's
            # operands so that neither YNN nor its own emitters run it (T5's cross-attention)
            out = out + jnp.matmul(pv, v.astype(jnp.float32)).astype(v.dtype)
        else:
            out = out + jnp.matmul(pv.astype(v.dtype), v)
        start += n
    return out.reshape(B, K, T, G, H).transpose(0, 2, 1, 3, 4).reshape(B, T, K * G * H)


# ----------------------------------------------------------------------------------- experts
def moe(cfg: ModelConfig, p: dict, h_BTD):
    """Switch Transformers' top-1 experts, as Hugging Face in eval mode.

    The router (float32) picks one expert per token; an expert takes the tokens of a row in order
    until ``expert_capacity`` are taken (padding counts, as in HF), and a token it drops gets 0
    from this layer, so only the residual carries it. Kept tokens get ``expert(h) · p_max``.
    Tokens are dispatched into a [B, X, C] buffer (C = min(capacity, T)), so the experts' FLOPs
    are those of X·C tokens per row, not of every token through every expert.
    """
    B, T, D = h_BTD.shape
    X = cfg.num_experts
    C = min(cfg.expert_capacity, T)
    logits = h_BTD.astype(jnp.float32) @ p["router"]["w"].astype(jnp.float32)
    if "b" in p["router"]:
        logits = logits + p["router"]["b"].astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(h_BTD.dtype)
    choice = jax.nn.one_hot(jnp.argmax(probs, axis=-1), X, dtype=jnp.int32)  # [B, T, X]
    priority = jnp.cumsum(choice, axis=1)
    keep = choice * (priority <= cfg.expert_capacity)
    slot = jnp.sum(keep * (priority - 1), axis=-1)  # [B, T]
    dispatch = keep[..., None].astype(h_BTD.dtype) * jax.nn.one_hot(slot, C, dtype=h_BTD.dtype)[:, :, None, :]
    x_BXCD = jnp.einsum("btxc,btd->bxcd", dispatch, h_BTD)
    hid = act(cfg.activation, jnp.einsum("bxcd,xdf->bxcf", x_BXCD, p["up"]["w"]))
    out = jnp.einsum("bxcf,xfd->bxcd", hid, p["down"]["w"])
    y = jnp.einsum("btxc,bxcd->btd", dispatch, out)
    return y * jnp.max(probs, axis=-1, keepdims=True)
