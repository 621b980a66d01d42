"""Jitted KV-cache sampler: greedy, or temperature with nucleus (top-p) filtering.

The prompt is left-padded to a length bucket (multiples of ``PROMPT_BUCKET``) so that prompts of
different lengths share one compiled function; the cache is preallocated for bucket +
``max_new_tokens`` slots; the decode loop is a ``lax.while_loop`` that stops as soon as every row
has emitted an EOS token or completed a stop sequence (rows that finished get the pad id after
their last token). Stop sequences are token-id sequences (a stop string tokenised); matching them
in the loop lets a batch of long completions (``max_new_tokens`` 512) end as soon as every row has
stopped. With ``return_logprobs`` the log-probability of every generated token under the model's
untempered distribution (log-softmax of the logits that chose it) comes back too: what a policy
gradient needs to check that it scores the policy it sampled.

Encoder-decoders: the (right-padded) input is encoded once, every decoder layer's cross-attention
keys and values are computed once into the cache, and the decoder starts from
``decoder_start_token_id``; the result is the decoder sequence (start token, then the generated
tokens), as Hugging Face's ``generate`` returns for these models.
"""

from __future__ import annotations

import contextlib

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lensjax.config import ModelConfig
from lensjax.kernels import xla
from lensjax.models.transformer import _forward, cross_cache, encode, init_cache

PROMPT_BUCKET = 32


def bucket_length(t: int, multiple: int = PROMPT_BUCKET) -> int:
    return max(multiple, -(-t // multiple) * multiple)


def _filter_top_p(logits_BV, top_p):
    """Keep the smallest set of tokens whose probability reaches ``top_p`` (at least one)."""
    order = jnp.argsort(-logits_BV, axis=-1)
    sorted_logits = jnp.take_along_axis(logits_BV, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
    keep_sorted = before < top_p
    keep_sorted = keep_sorted.at[:, 0].set(True)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits_BV.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits_BV, -jnp.inf)


def stop_array(stop_sequences) -> tuple[np.ndarray, np.ndarray]:
    """Stop sequences right-aligned in ``[S, W]`` int32 with their validity mask (S >= 1)."""
    seqs = [tuple(int(t) for t in s) for s in (stop_sequences or ()) if len(s)]
    W = max([len(s) for s in seqs], default=1)
    arr = np.zeros((max(len(seqs), 1), W), np.int32)
    valid = np.zeros(arr.shape, bool)
    for i, s in enumerate(seqs):
        arr[i, W - len(s):] = s
        valid[i, W - len(s):] = True
    return arr, valid


@functools.partial(xla.jit, static_argnames=("cfg", "max_new_tokens", "greedy", "eos_ids", "cache_dtype", "start_id"),
                   mixed="auto")  # bfloat16 parameters: see lensjax.kernels.xla
def _generate(cfg: ModelConfig, params, ids_BT, mask_BT, key, temperature, top_p, pad_id, stop_SW, stop_valid_SW,
              *, max_new_tokens: int, greedy: bool, eos_ids: tuple, cache_dtype, start_id: int = 0):
    B, T = ids_BT.shape
    if cfg.is_encoder_decoder:
        cross = cross_cache(cfg, params, encode(cfg, params, ids_BT, mask_BT), mask_BT)
        cache = init_cache(cfg, B, 1 + max_new_tokens, cache_dtype)
        cache.update(cross_k=cross["cross_k"].astype(cache_dtype), cross_v=cross["cross_v"].astype(cache_dtype),
                     enc_mask=cross["enc_mask"])
        start = jnp.full((B, 1), start_id, jnp.int32)
        logits, cache = _forward(cfg, params, start, jnp.ones((B, 1), bool), cache, None, cache_empty=True,
                                 last_only=True)
    else:
        cache = init_cache(cfg, B, T + max_new_tokens, cache_dtype)
        logits, cache = _forward(cfg, params, ids_BT, mask_BT, cache, None, cache_empty=True, last_only=True)
    last = logits[:, -1]
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    out = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
    logp = jnp.zeros((B, max_new_tokens), jnp.float32)
    W = stop_SW.shape[1]
    has_stop = jnp.any(stop_valid_SW, axis=1)  # [S]: rows of the padded array that are real sequences

    def pick(last, key):
        if greedy:
            return jnp.argmax(last, axis=-1).astype(jnp.int32)
        scaled = _filter_top_p(last / temperature, top_p)
        return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

    def cond(state):
        i, _, _, done, _, _, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, last, cache, done, out, logp, recent, key = state
        key, sub = jax.random.split(key)
        tok = jnp.where(done, pad_id, pick(last, sub))
        lp = jnp.take_along_axis(jax.nn.log_softmax(last.astype(jnp.float32), -1), tok[:, None], -1)[:, 0]
        out = out.at[:, i].set(tok)
        logp = logp.at[:, i].set(jnp.where(done, 0.0, lp))
        recent = jnp.concatenate([recent[:, 1:], tok[:, None]], axis=1)  # the last W tokens
        # a stop sequence matches when the last len(seq) tokens equal it (-1 fills the window's start)
        match = jnp.all((recent[:, None, :] == stop_SW[None]) | ~stop_valid_SW[None], axis=-1)
        stopped = jnp.any(match & has_stop[None], axis=-1)
        done = done | jnp.any(tok[:, None] == eos[None, :], axis=-1) | stopped
        logits, cache = _forward(cfg, params, tok[:, None], jnp.ones((B, 1), bool), cache, None)
        return i + 1, logits[:, -1], cache, done, out, logp, recent, key

    recent = jnp.full((B, W), -1, jnp.int32)
    state = (jnp.int32(0), last, cache, jnp.zeros((B,), bool), out, logp, recent, key)
    _, _, _, _, out, logp, _, _ = jax.lax.while_loop(cond, body, state)
    return out, logp


def generate(config: ModelConfig, params: dict, input_ids, attention_mask=None, *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, key=None, eos_token_id=None, pad_token_id=None,
             bucket: int = PROMPT_BUCKET, stop_sequences=None, return_logprobs: bool = False,
             mesh: jax.sharding.Mesh | None = None):
    """Token ids [B, T + max_new_tokens]: the prompt followed by the generated tokens (for an
    encoder-decoder [B, 1 + max_new_tokens]: the decoder start token and the generated tokens; with
    ``return_logprobs``, also the generated tokens' log-probabilities [B, max_new_tokens], 0 after
    a row has finished).

    ``temperature`` 0 is greedy; otherwise tokens are sampled from softmax(logits / temperature)
    restricted to the top-``top_p`` nucleus, with ``key`` (a ``jax.random`` key). Rows that emit an
    EOS id (``eos_token_id``, default the config's) are padded with ``pad_token_id`` (default the
    config's pad id, else the first EOS id, else 0) afterwards; generation stops early when every
    row has finished. Prompts are left-padded with a mask, e.g. from a tokenizer with
    ``padding_side="left"``. ``stop_sequences``: token-id sequences that end a row like an EOS
    (the sequence itself is kept in the output).

    ``mesh``: the prompt rows are split over its ``data`` axis (B must be divisible by it; every
    process passes the same global prompts), so each device decodes its own rows; the parameters
    are used as placed (e.g. ``lensjax.load(..., mesh=mesh)``). On several processes the outputs
    are global arrays: read them with :func:`lensjax.parallel.to_host`.
    """
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T]; got shape {ids.shape}")
    B, T = ids.shape
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask, bool)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids {ids.shape}")
    if not mask.any(axis=1).all():
        raise ValueError("every row needs at least one real (unmasked) token")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a jax.random key")
    eos = eos_token_id if eos_token_id is not None else config.eos_token_id
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])))
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    if bucket and T > 0:
        tb = bucket_length(T, bucket)
        if tb > T:  # pad to the bucket: the mask hides the extra slots. Decoder-only models pad on
            # the left (positions count real tokens); encoders on the right, after every real token,
            # so slot positions and Switch's expert capacity (taken in order) are unchanged.
            fill, off = np.full((B, tb - T), pad_token_id, np.int32), np.zeros((B, tb - T), bool)
            enc = config.is_encoder_decoder
            ids = np.concatenate([ids, fill] if enc else [fill, ids], axis=1)
            mask = np.concatenate([mask, off] if enc else [off, mask], axis=1)
    dtype = params["embed"]["tokens"].dtype
    stop, stop_valid = stop_array(stop_sequences)
    first = (np.full((B, 1), _start_id(config), np.int32) if config.is_encoder_decoder
             else np.asarray(input_ids, np.int32))
    if mesh is None:
        ids_j, mask_j, first_j = jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(first)
        ctx = contextlib.nullcontext()
    else:
        from lensjax.parallel import shard_batch

        b = shard_batch({"ids": ids, "mask": mask, "first": first}, mesh)  # refuses a B that data does not divide
        ids_j, mask_j, first_j = b["ids"], b["mask"], b["first"]
        ctx = jax.set_mesh(mesh)
    with ctx:
        new, logp = _generate(config, params, ids_j, mask_j,
                              key if key is not None else jax.random.key(0), jnp.float32(max(temperature, 1e-6)),
                              jnp.float32(top_p), jnp.int32(pad_token_id), jnp.asarray(stop), jnp.asarray(stop_valid),
                              max_new_tokens=int(max_new_tokens), greedy=temperature == 0, eos_ids=eos_ids,
                              cache_dtype=dtype, start_id=int(_start_id(config)))
        out = _join(first_j, new)
    return (out, logp) if return_logprobs else out


@jax.jit
def _join(first, new):
    return jnp.concatenate([first, new], axis=1)


def _start_id(config: ModelConfig) -> int:
    if config.decoder_start_token_id is not None:
        return config.decoder_start_token_id
    return config.pad_token_id if config.pad_token_id is not None else 0
