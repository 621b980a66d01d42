"""LensLLM end to end: measure loss curves by progressive fine-tuning, compute each candidate's
NTK and F(Θ, t), fit the law, rank, and account for the cost.

For candidate i with NTK eigenpairs (λ_k, u_k) over n probe samples, initial residual
r₀ = f₀(X) − y with y = 0 (f = mean target log-likelihood, so r₀ measures how far the pretrained
model is from a perfect fit), learning rate η and t(D) optimiser steps at size D:

    F_i(D) = Σ_k exp(−2 η λ_k t(D)) (u_kᵀ r₀)²,        L_i(D) = B_i / (F_i(D) + D^β_i) + E_i

with B, β, E fitted by the batched kernel (``--method lensllm``). The reference code's "t fitted"
mode treats F as one free constant per curve; that is exactly the rectified law
``B/(D_l + D^β) + E`` (``--method rectified``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lensjax.io import atomic_write
from lensjax.kernels import ntk as ntk_kernel
from lensjax.selection import cost as cost_mod
from lensjax.selection.data import DataError, load_pairs, make_batch, tokenize
from lensjax.selection.finetune import CurvesStore, FinetuneConfig, evaluate, finetune
from lensjax.models.lm import sample_loglik, scalar_fn
from lensjax.selection.selectors import SelectionError, select_many


@dataclasses.dataclass(frozen=True)
class NTKConfig:
    n_probe: int = 32
    chunk_size: int = 8
    mode: str = "exact"  # or "sketch"
    sketch_k: int = 64
    reduce: str = "mean"
    seed: int = 0


@dataclasses.dataclass
class CandidateNTK:
    model: str
    eigvals: np.ndarray
    eigvecs: np.ndarray
    r0: np.ndarray
    stats: dict
    lr: float

    def F(self, steps) -> np.ndarray:
        return np.asarray(ntk_kernel.f_term(jnp.asarray(self.eigvals), jnp.asarray(self.eigvecs),
                                            jnp.asarray(self.r0), self.lr, jnp.asarray(steps, jnp.float32)))


def ladder(budget: int, base: int = 200) -> list[int]:
    if budget < base:
        raise SelectionError(f"budget {budget} is below the smallest ladder size {base}")
    out, d = [], base
    while d <= budget:
        out.append(int(d))
        d *= 2
    return out


def compute_ntk(config, params, data, cfg: NTKConfig, pad_id: int, lr: float) -> CandidateNTK:
    n = min(cfg.n_probe, len(data))
    n -= n % cfg.chunk_size
    if n < cfg.chunk_size:
        raise DataError(f"need at least {cfg.chunk_size} training examples for the NTK probe set")
    probe = {k: jnp.asarray(v) for k, v in make_batch(data, np.arange(n), pad_id).items()}
    f = scalar_fn(config, cfg.reduce)
    if cfg.mode == "exact":
        K = ntk_kernel.ntk_exact(f, params, probe, chunk_size=cfg.chunk_size)
    elif cfg.mode == "sketch":
        K = ntk_kernel.ntk_sketch(f, params, probe, jax.random.key(cfg.seed), k=cfg.sketch_k, chunk_size=cfg.chunk_size)
    else:
        raise ValueError(f"unknown NTK mode {cfg.mode!r}")
    w, u = ntk_kernel.spectrum(K)
    r0 = sample_loglik(config, params, probe, cfg.reduce)  # y = 0
    stats = {k: np.asarray(v).tolist() for k, v in ntk_kernel.ntk_stats(K).items()}
    return CandidateNTK("", np.asarray(w), np.asarray(u), np.asarray(r0), stats, lr)


def _param_count(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


def run(models: list[str], dataset: str, *, budget: int, target_size: int, method: str = "lensllm",
        base: int = 200, ft: FinetuneConfig = FinetuneConfig(), ntk_cfg: NTKConfig = NTKConfig(),
        prompt_column: str = "input", target_column: str = "target", curves_out: str | os.PathLike = "curves.csv",
        ntk_out: str | os.PathLike | None = None, progress=None, n_eval: int | None = None,
        eval_split: str | None = None) -> dict:
    """Fine-tune every candidate on the ladder, compute NTKs, fit and rank. Returns a result dict
    (also the ``--json`` payload). Partial measurements are in ``curves_out`` as they are made."""
    import lensjax

    if method not in ("lensllm", "rectified", "ats"):
        raise SelectionError(f"unknown method {method!r} for measured curves; choose lensllm, rectified or ats")
    sizes = ladder(budget, base)
    if len(set(models)) != len(models):
        raise SelectionError("duplicate model ids in --models")
    train, held = load_pairs(dataset, prompt_column=prompt_column, target_column=target_column, seed=ft.seed,
                             n_eval=n_eval, eval_split=eval_split)
    if sizes[-1] > len(train):
        raise DataError(f"the ladder needs {sizes[-1]} training examples; {dataset!r} has {len(train)}")
    order = np.random.default_rng(ft.seed).permutation(len(train))  # one fixed order: nested subsets
    store = CurvesStore(curves_out)
    ntks: dict[str, CandidateNTK] = {}
    params_count, tokens = {}, {}
    prog = progress if progress is not None else contextlib.nullcontext()
    with prog as bar:
        for name in models:
            try:
                model = lensjax.load(name)
            except Exception as exc:
                raise SelectionError(f"model {name!r} cannot be loaded: {exc}") from exc
            tok = model.tokenizer
            pad_id = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
            tr, he = tokenize(tok, train, ft.max_len), tokenize(tok, held, ft.max_len)
            params_count[name], tokens[name] = _param_count(model.params), tr.mean_tokens
            meta = dict(params=params_count[name], family=model.config.family, tokens_per_sample=tokens[name])
            task = bar.add_task(f"{Path(name).name}", total=len(sizes) + 2) if bar is not None else None
            if not store.has(name, 0):
                store.record(name, 0, evaluate(model.config, model.params, he, ft.eval_batch_size, pad_id),
                             steps=0, lr=ft.lr, **meta)
            bar is not None and bar.advance(task)
            for d in sizes:
                if not store.has(name, d):
                    p, t = finetune(model.config, model.params, tr, order, d, ft, pad_id)
                    store.record(name, d, evaluate(model.config, p, he, ft.eval_batch_size, pad_id), steps=t,
                                 lr=ft.lr, **meta)
                    del p
                bar is not None and bar.advance(task)
            if method == "lensllm" or ntk_out is not None:
                ntk_data = tokenize(tok, train.take(order[: ntk_cfg.n_probe]), ft.max_len)
                c = compute_ntk(model.config, model.params, ntk_data, ntk_cfg, pad_id, ft.lr)
                c.model = name
                ntks[name] = c
            bar is not None and bar.advance(task)

    measured = store.curves()
    curves = measured.subset([measured.models.index(m) for m in models])
    kw = {}
    if method == "lensllm":
        steps = np.array([[store.steps(m, int(s)) for s in curves.sizes] for m in models], np.float64)
        kw["F"] = np.stack([ntks[m].F(steps[i]) for i, m in enumerate(models)])
        kw["F_target"] = np.array([ntks[m].F(ft.steps(target_size)) for m in models])
    sel = select_many(curves, method, None, budgets=[budget], target_size=target_size, base=base, **kw)[0]
    # Compute actually spent: the samples each fine-tuning run processed (steps × batch).
    spent = sum(cost_mod.finetune_flops(params_count[m], [ft.batch_size * store.steps(m, d) for d in sizes],
                                        tokens_per_sample=tokens[m]) for m in models)
    full = sum(cost_mod.finetune_flops(params_count[m], [ft.batch_size * ft.steps(target_size)],
                                       tokens_per_sample=tokens[m]) for m in models)
    result = sel.to_json() | {"flops": spent, "full_flops": full, "cost_fraction": spent / full,
                              "curves_csv": str(store.path), "ladder": sizes}
    if ntks:
        result["ntk"] = {m: c.stats | {"r0_norm2": float(np.sum(c.r0**2))} for m, c in ntks.items()}
    if ntk_out is not None and ntks:
        write_ntk(ntk_out, ntks)
        result["ntk_file"] = str(ntk_out)
    return result


def write_ntk(path: str | os.PathLike, ntks: dict[str, CandidateNTK]) -> None:
    """Eigenpairs and r₀ per candidate as safetensors (``.safetensors``) or JSON; written atomically."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save

        tensors, names = {}, {}
        for i, (m, c) in enumerate(ntks.items()):
            tensors[f"{i}.eigvals"] = np.ascontiguousarray(c.eigvals, np.float32)
            tensors[f"{i}.eigvecs"] = np.ascontiguousarray(c.eigvecs, np.float32)
            tensors[f"{i}.r0"] = np.ascontiguousarray(c.r0, np.float32)
            names[str(i)] = m
        atomic_write(path, save(tensors, metadata={"models": json.dumps(names),
                                                   "stats": json.dumps({m: c.stats for m, c in ntks.items()})}))
    else:
        atomic_write(path, json.dumps({m: {"eigvals": c.eigvals.tolist(), "eigvecs": c.eigvecs.tolist(),
                                           "r0": c.r0.tolist(), "stats": c.stats, "lr": c.lr}
                                       for m, c in ntks.items()}))
