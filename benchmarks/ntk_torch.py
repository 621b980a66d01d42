"""The PyTorch sides of ``bench_ntk.py``: the exact NTK by a per-sample loop and by ``torch.func``
(``vmap(grad)`` in chunks), each followed by ``J @ J.T``, and the AdamW step in eager float32 or
under ``torch.autocast``. Every side scores the same tokens as lensjax: the per-row mean
log-likelihood of the target tokens (``torch_target_loglik``), or the mean negative log-likelihood
over the batch (``torch_mean_nll``), with all logits or, with ``keep``, only those at the scored
positions (Hugging Face's ``logits_to_keep``)."""

from __future__ import annotations

import time

import numpy as np


def median_time(fn, repeats, sync=lambda r: r):
    ts, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = sync(fn())
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), [float(t) for t in ts], out


def keep_positions(batch_np):
    """The positions whose logits score a target token in some row (token t is scored at t − 1),
    as the 1-D index tensor that Hugging Face's ``logits_to_keep`` takes (one set for the batch)."""
    import torch

    t = np.asarray(batch_np["target"])
    return torch.from_numpy(np.flatnonzero(t[:, 1:].any(axis=0))).long()


def keep_args(batch_np, keep: bool):
    """(extra forward keyword arguments, positions for the scoring): ``logits_to_keep`` and its
    positions when ``keep``, else nothing and None (all logits)."""
    if not keep:
        return {}, None
    kp = keep_positions(batch_np)
    return {"logits_to_keep": kp}, kp


def _torch_lp(logits, ids, target, keep=None):
    """(log p of the scored tokens, weights): logits [B, T, V], or [B, K, V] at ``keep``."""
    import torch

    if keep is None:
        lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        return lp, target[:, 1:].float()
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, keep + 1, None])[..., 0]
    return lp, target[:, keep + 1].float()


def torch_target_loglik(logits, ids, target, keep=None):
    """Per-row mean log p(ids[t] | ids[<t]) over target tokens t ≥ 1, [B] (logits [B, T, V], or
    [B, K, V] of the positions ``keep``)."""
    lp, w = _torch_lp(logits, ids, target, keep)
    return (lp * w).sum(-1) / w.sum(-1).clamp_min(1.0)


def torch_mean_nll(logits, ids, target, keep=None):
    lp, w = _torch_lp(logits, ids, target, keep)
    return -(lp * w).sum() / w.sum().clamp_min(1.0)


def ntk_torch_loop(hf, batch_np, args) -> dict:
    import torch

    params = [p for p in hf.parameters()]
    P = sum(p.numel() for p in params)
    ids = torch.from_numpy(batch_np["ids"]).long()
    tgt = torch.from_numpy(batch_np["target"])
    n = ids.shape[0]

    def row(i, out):
        logits = hf(input_ids=ids[i:i + 1], use_cache=False).logits
        s = torch_target_loglik(logits, ids[i:i + 1], tgt[i:i + 1])[0]
        grads = torch.autograd.grad(s, params)
        off = 0
        for g in grads:
            out[off:off + g.numel()] = g.reshape(-1)
            off += g.numel()

    jjt, last = [], {}

    def run():
        J = torch.empty(n, P)
        for i in range(n):
            row(i, J[i])
        t0 = time.perf_counter()
        K = J @ J.T
        jjt.append(time.perf_counter() - t0)
        last["J"] = J
        return K

    row(0, torch.empty(P))  # warm-up: one sample
    med, ts, K = median_time(run, args.repeats)
    # The float64 product of the same J (untimed, in column blocks): the reference every K is compared
    # with, so that the float32 accumulation error of each side's J Jᵀ shows up separately.
    J, K64 = last.pop("J"), torch.zeros(n, n, dtype=torch.float64)
    for a in range(0, P, 1 << 20):
        b = J[:, a:a + (1 << 20)].double()
        K64 += b @ b.T
    return {"K": K.double().numpy(), "K64": K64.numpy(), "time_s": med, "times_s": ts, "jjt_s": float(np.median(jjt))}


def ntk_torch_func(hf_eager, batch_np, args, keep: bool = False) -> dict:
    """``keep``: the head on the scored positions only (``logits_to_keep``), as lensjax does."""
    import torch
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in hf_eager.named_parameters()}
    sizes = {k: v.numel() for k, v in params.items()}
    P = sum(sizes.values())
    ids = torch.from_numpy(batch_np["ids"]).long()
    tgt = torch.from_numpy(batch_np["target"])
    n, c = ids.shape[0], args.chunk
    kw, kp = keep_args(batch_np, keep)

    def f(p, ids1, tgt1):
        logits = functional_call(hf_eager, p, (ids1[None],), {"use_cache": False, **kw}).logits
        return torch_target_loglik(logits, ids1[None], tgt1[None], kp)[0]

    per_chunk = vmap(grad(f), in_dims=(None, 0, 0))

    def fill(a, J):
        g = per_chunk(params, ids[a:a + c], tgt[a:a + c])
        off = 0
        for k, m in sizes.items():
            J[a:a + c, off:off + m] = g[k].reshape(c, m)
            off += m

    jjt = []

    def run():
        J = torch.empty(n, P)
        for a in range(0, n, c):
            fill(a, J)
        t0 = time.perf_counter()
        K = J @ J.T
        jjt.append(time.perf_counter() - t0)
        return K

    fill(0, torch.empty(c, P))  # warm-up: one chunk
    med, ts, K = median_time(run, args.repeats)
    return {"K": K.double().numpy(), "time_s": med, "times_s": ts, "jjt_s": float(np.median(jjt))}


def train_torch(path, batch_np, args, autocast: bool = False, keep: bool = False) -> dict:
    """``autocast``: the forward pass under ``torch.autocast("cpu", torch.bfloat16)`` (PyTorch's
    mixed precision: bf16 matmuls with bf16 outputs; float32 weights and AdamW). ``keep``: the
    head on the scored positions only (``logits_to_keep``), as lensjax's ladder does."""
    import torch
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(str(path)).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    ids = torch.from_numpy(batch_np["ids"]).long()
    tgt = torch.from_numpy(batch_np["target"])

    kw, kp = keep_args(batch_np, keep)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = torch_mean_nll(hf(input_ids=ids, use_cache=False, **kw).logits, ids, tgt, kp)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    losses, ts = [step()], []  # same step count as the lensjax side (its first call compiles)
    for i in range(args.train_warmup + args.train_repeats):
        t0 = time.perf_counter()
        losses.append(step())
        dt = time.perf_counter() - t0
        if i >= args.train_warmup:
            ts.append(dt)
    return {"time_s": float(np.median(ts)), "times_s": ts, "losses": losses}
