"""Rollouts of an SVF policy: bucketed prompts, sampled or greedy completions with stop strings,
their token masks and log-probabilities, and accuracy on a task.

Shapes are bucketed so the jitted sampler and the training step compile once per bucket, not once
per batch: prompts are left-padded to a multiple of ``PROMPT_BUCKET`` tokens and completions are
cut to a multiple of ``COMPLETION_BUCKET`` (capped at ``max_new_tokens``) after the batch stopped.
(The sampler pads prompts to at least ``PROMPT_BUCKET`` inside, whatever ``prompt_bucket`` is.)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from lensjax.models.sampler import bucket_length, generate
from lensjax.parallel import to_host
from lensjax.svf.tasks import Task, encode_prompts, is_templated

PROMPT_BUCKET = 16
COMPLETION_BUCKET = 16


@dataclasses.dataclass
class Rollout:
    texts: list[str]  # completions, cut after the first stop string
    ids: np.ndarray  # [B, Tp + Nc] int32: left-padded prompt bucket, then the completion bucket
    attn: np.ndarray  # [B, Tp + Nc] real tokens
    target: np.ndarray  # [B, Tp + Nc] completion tokens that the policy produced (up to EOS / stop)
    logprobs: np.ndarray  # [B, Nc] the sampler's log-probabilities of those tokens (0 elsewhere)

    @property
    def prompt_len(self) -> int:
        return self.ids.shape[1] - self.logprobs.shape[1]


def left_pad(enc: Sequence[Sequence[int]], pad_id: int, bucket: int = PROMPT_BUCKET):
    """Left-padded ids and mask [B, bucket_length(max len)]."""
    T = bucket_length(max(len(e) for e in enc), bucket) if bucket else max(len(e) for e in enc)
    ids = np.full((len(enc), T), pad_id, np.int32)
    mask = np.zeros((len(enc), T), bool)
    for i, e in enumerate(enc):
        ids[i, T - len(e):] = e
        mask[i, T - len(e):] = True
    return ids, mask


def stop_token_sequences(tokenizer, stops: Sequence[str]) -> list[list[int]]:
    return [list(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in stops if s]


def _cut_at_stop(tokenizer, row: np.ndarray, n: int, text: str, stops: Sequence[str]) -> tuple[str, int]:
    """(text up to and including the first stop string, tokens needed to produce it)."""
    hits = [(text.find(s), s) for s in stops if s and s in text]
    if not hits:
        return text, n
    at, s = min(hits)
    end = at + len(s)
    lo, hi = 1, n  # smallest k whose decoded prefix reaches past the stop string
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(row[:mid], skip_special_tokens=True)) >= end:
            hi = mid
        else:
            lo = mid + 1
    return text[:end], lo


def complete(model, params, task: Task, prompts: Sequence[str], *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, key=None, stop: Sequence[str] | None = None, prompt_bucket: int = PROMPT_BUCKET,
             completion_bucket: int = COMPLETION_BUCKET, mesh=None) -> Rollout:
    """Completions of ``prompts`` (the user turns of ``task``) from ``params``; greedy at
    temperature 0. ``stop`` defaults to the task kind's stop strings. ``mesh``: the prompts are
    split over its ``data`` axis (see :func:`lensjax.models.sampler.generate`)."""
    tok = model.tokenizer
    stops = task.stop_strings(is_templated(tok)) if stop is None else tuple(stop)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos or 0)
    ids, mask = left_pad(encode_prompts(tok, task, prompts), pad, prompt_bucket)
    out, logp = generate(model.config, params, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, key=key, eos_token_id=[eos] if eos is not None else [], pad_token_id=pad,
                         bucket=max(prompt_bucket, PROMPT_BUCKET), stop_sequences=stop_token_sequences(tok, stops), return_logprobs=True,
                         mesh=mesh)
    new, logp = to_host(out)[:, ids.shape[1]:], to_host(logp)
    B, N = new.shape
    lengths = np.full(B, N)
    if eos is not None:  # the first EOS ends a row (and counts as its last token)
        hit = new == eos
        lengths = np.where(hit.any(1), hit.argmax(1) + 1, N)
    texts = []
    for b in range(B):
        text = tok.decode(new[b, :lengths[b]], skip_special_tokens=True)
        text, lengths[b] = _cut_at_stop(tok, new[b], int(lengths[b]), text, stops)
        texts.append(text)
    Nc = min(N, bucket_length(int(lengths.max()), completion_bucket)) if completion_bucket else N
    gen = np.arange(Nc)[None, :] < lengths[:, None]
    return Rollout(texts=texts, ids=np.concatenate([ids, new[:, :Nc]], 1),
                   attn=np.concatenate([mask, gen], 1), target=np.concatenate([np.zeros_like(mask), gen], 1),
                   logprobs=np.where(gen, logp[:, :Nc], 0.0).astype(np.float32))


def evaluate(model, params, task: Task, *, max_new_tokens: int = 256, batch: int = 64,
             stop: Sequence[str] | None = None, mesh=None) -> dict:
    """Greedy accuracy on ``task`` and the completions, batch by batch (the last batch padded with
    copies so every batch has one shape; with ``mesh``, each batch split over its ``data`` axis)."""
    hits, texts = [], []
    for s in range(0, len(task), batch):
        prompts = list(task.prompts[s: s + batch])
        n = len(prompts)
        prompts += [prompts[-1]] * (batch - n)
        r = complete(model, params, task, prompts, max_new_tokens=max_new_tokens, stop=stop, mesh=mesh)
        texts += r.texts[:n]
        hits += list(task.score_many(r.texts[:n], task.references[s: s + n]))
    return {"accuracy": float(np.mean(hits)) if hits else 0.0, "completions": texts, "correct": hits}


def accuracy(model, params, task: Task, *, max_new_tokens: int = 256, batch: int = 64) -> float:
    return evaluate(model, params, task, max_new_tokens=max_new_tokens, batch=batch)["accuracy"]

