"""Language-model objectives on the common tree: per-sample target log-likelihoods (shared by
LensLLM's fine-tuning and NTK and by the SVF trainer).

A batch is a dict of int/bool arrays [B, T]: ``ids`` (prompt then target tokens, right padded),
``attn`` (real tokens) and ``target`` (tokens whose log-probability counts: the target part).
Token t is scored by the logits at position t − 1. An encoder-decoder's batch (from
:func:`lensjax.selection.data.make_batch`) has the encoder input in ``ids``/``attn`` and the
decoder's in ``dec_ids``/``dec_attn``/``dec_target`` (start token first); the scores are then
those of the decoder's tokens.

Optional ``logit_pos`` (int [B, K], from :func:`with_logit_positions`): the positions whose logits
score a target token, so the final norm, the head and the log-softmax run on K rows per sample
instead of T (Hugging Face's ``logits_to_keep`` for training-style scoring). Prompts are not
scored, so K is the longest target (rounded up), not the longest sequence: with a vocabulary of
tens of thousands the head is a large share of a small model's FLOPs. The results are the same
sums over the same tokens (``lp``/``w`` come back [B, K] instead of [B, T − 1]).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lensjax.config import ModelConfig
from lensjax.models.transformer import _forward, forward_encdec


LOGIT_POS = "logit_pos"


def logit_positions(batch, multiple: int = 8, length: int | None = None) -> np.ndarray | None:
    """int32 [B, K]: each row's positions whose logits score a target token (position t scores
    token t + 1 where ``target & attn``; the decoder's for an encoder-decoder batch), in order, then
    T − 1 (a position that scores nothing) as padding. K = ``length``, else the most such positions
    in a row rounded up to ``multiple``. None when K would reach T (nothing to save). Host-side
    (NumPy): K must be static for the compiled programs, so callers that run many batches through
    one program (the fine-tuning ladder) pass one ``length`` for all of them."""
    pre = "dec_" if "dec_ids" in batch else ""
    tgt = np.asarray(batch[pre + "target"], bool)
    w = np.zeros(tgt.shape, bool)
    w[:, :-1] = tgt[:, 1:] & np.asarray(batch[pre + "attn"], bool)[:, 1:]
    B, T = w.shape
    count = int(w.sum(axis=1).max(initial=0))
    K = length if length is not None else max(multiple, -(-count // multiple) * multiple)
    if K < count:
        raise ValueError(f"logit_positions: length {K} is less than a row's {count} scored positions")
    if K >= T:
        return None
    order = np.argsort(~w, axis=1, kind="stable")[:, :K]  # scored positions first, in order
    return np.where(np.take_along_axis(w, order, 1), order, T - 1).astype(np.int32)


def with_logit_positions(batch: dict, multiple: int = 8, length: int | None = None) -> dict:
    """``batch`` plus :data:`LOGIT_POS` from :func:`logit_positions`. Unchanged when that is None,
    when the batch already has them, or when its arrays cannot be read on this host (tracers,
    arrays spread over other processes). For a ``jax.Array`` batch the positions are placed like
    its ``ids``, rows split as the batch's (a split of the sequence axis is not carried over)."""
    leaves = jax.tree.leaves(batch)
    if LOGIT_POS in batch or any(isinstance(a, jax.core.Tracer) for a in leaves):
        return batch
    if any(isinstance(a, jax.Array) and not a.is_fully_addressable for a in leaves):
        return batch
    pos = logit_positions(batch, multiple, length)
    if pos is None:
        return batch
    ref = batch.get("dec_ids", batch["ids"])
    if isinstance(ref, jax.Array):
        sh = ref.sharding
        if isinstance(sh, jax.sharding.NamedSharding):  # rows as the batch's; K is not split
            sh = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*sh.spec[:1]))
        pos = jax.device_put(pos, sh)
    return {**batch, LOGIT_POS: pos}


def token_logprobs(cfg: ModelConfig, params, batch) -> tuple[jax.Array, jax.Array]:
    """(log p(ids[t] | ids[<t]) [B, T−1], weight [B, T−1]) for the target tokens; [B, K] each
    when the batch has ``logit_pos`` (module notes)."""
    keep = batch.get(LOGIT_POS)
    if cfg.is_encoder_decoder:
        if "dec_ids" not in batch:
            raise ValueError(f"{cfg.family} is an encoder-decoder: the batch needs dec_ids/dec_attn/dec_target "
                             "(tokenize with decoder_start=config.decoder_start_token_id)")
        logits = forward_encdec(cfg, params, batch["ids"], batch["attn"], batch["dec_ids"], batch["dec_attn"], keep)
        return logprobs_from_logits(logits, {"ids": batch["dec_ids"], "attn": batch["dec_attn"],
                                             "target": batch["dec_target"]}, keep)
    logits, _ = _forward(cfg, params, batch["ids"], batch["attn"], None, None, keep=keep)
    return logprobs_from_logits(logits, batch, keep)


def logprobs_from_logits(logits, batch, keep=None) -> tuple[jax.Array, jax.Array]:
    """:func:`token_logprobs` from the forward pass's logits [B, T, V] (to reuse them), or from
    those of the positions ``keep`` [B, K] only (logits [B, K, V])."""
    logits = logits.astype(jnp.float32)
    if keep is not None:
        keep = keep.astype(jnp.int32)
        pad = ((0, 0), (0, 1))
        nxt = jnp.take_along_axis(jnp.pad(batch["ids"][:, 1:], pad), keep, axis=1)
        w = jnp.pad(batch["target"][:, 1:] & batch["attn"][:, 1:], pad)
        w = jnp.take_along_axis(w, keep, axis=1).astype(jnp.float32)
        picked = jnp.sum(logits * jax.nn.one_hot(nxt, logits.shape[-1], dtype=logits.dtype), axis=-1)
        return picked - jax.nn.logsumexp(logits, axis=-1), w
    # Every position is scored against the next id (the last one against a placeholder 0) and the
    # last column of the [B, T] result is dropped: slicing the [B, T, V] logits to T − 1 instead
    # copies them and pads their gradient back (exact NTK, 10M Llama, 64 x 64: ≈ 45 ms of 2.2 s).
    nxt = jnp.pad(batch["ids"][:, 1:], ((0, 0), (0, 1)))
    # A one-hot product rather than a gather: the gather's gradient is a scatter, which XLA's CPU
    # backend runs far slower (train step 2.25 s -> 1.42 s on a 10M Llama, 8 x 128 tokens).
    picked = jnp.sum(logits * jax.nn.one_hot(nxt, logits.shape[-1], dtype=logits.dtype), axis=-1)
    lp = (picked - jax.nn.logsumexp(logits, axis=-1))[:, :-1]
    w = (batch["target"][:, 1:] & batch["attn"][:, 1:]).astype(jnp.float32)
    return lp, w


def sample_loglik(cfg: ModelConfig, params, batch, reduce: str = "mean") -> jax.Array:
    """Per-sample mean (or sum) log-likelihood of the target tokens, [B]."""
    lp, w = token_logprobs(cfg, params, batch)
    total = jnp.sum(lp * w, axis=-1)
    return total / jnp.maximum(jnp.sum(w, axis=-1), 1.0) if reduce == "mean" else total


def mean_target_loss(cfg: ModelConfig, params, batch) -> jax.Array:
    """Mean negative log-likelihood over all target tokens of the batch (the training loss)."""
    lp, w = token_logprobs(cfg, params, batch)
    return -jnp.sum(lp * w) / jnp.maximum(jnp.sum(w), 1.0)


def scalar_fn(cfg: ModelConfig, reduce: str = "mean"):
    """``f(params, example) -> scalar``: the per-sample output whose NTK LensLLM uses (one
    example: arrays [T]). Cached per (config, reduce) so jit caches keyed on it are reused."""
    return _scalar_fn(cfg, reduce)


@functools.lru_cache(maxsize=None)
def _scalar_fn(cfg, reduce):
    def f(params, example):
        one = jax.tree.map(lambda a: a[None], example)
        return sample_loglik(cfg, params, one, reduce)[0]

    return f
