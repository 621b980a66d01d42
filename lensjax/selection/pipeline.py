"""LensLLM end to end: measure loss curves by progressive fine-tuning, compute each candidate's
NTK and F(Θ, t), fit the law, rank, and account for the cost.

For candidate i with the NTK of the *mean* loss estimated from n probe samples, ``Θ = (K − diag K)/(n − 1)``
(:func:`lensjax.kernels.ntk.normalize`; K = J Jᵀ, or
``J diag(1/(√v̂+ε)) Jᵀ`` with Adam's second-moment estimate v̂ after a short warm-up:
``NTKConfig(kernel="adam")``), its eigenpairs (λ_k, u_k), the per-sample initial residual
r₀ = (f₀(X) − y)/√n with y = 0 (f = mean target log-likelihood), learning rate η and t optimiser
steps:

    F_i(t) = Σ_k exp(−2 η λ_k t) (u_kᵀ r₀)²,   F_i(0) = mean r₀²,

so F does not grow with n. It is kept as log F (a log-sum-exp in float64), which is finite for any
t. t at size D is the step the run at D stopped at (early stopping) or ran to; at the target, the
planned t(target) scaled by the fraction of its schedule the candidate ran at the budget. Which
law uses F how is the method (:mod:`.predictors`): ``lensllm`` fits ``B/(s·F_i(t_i(D)) + D^β) + E``
with s tied across the candidates.
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

from lensjax import programs
from lensjax.io import atomic_write
from lensjax.kernels import ntk as ntk_kernel
from lensjax.selection import cost as cost_mod
from lensjax.selection.data import DataError, load_pairs, make_batch, tokenize
from lensjax.selection.finetune import FinetuneConfig, evaluate, finetune
from lensjax.selection.store import CurvesStore
from lensjax.models import lm_ntk
from lensjax.models.lm import sample_loglik, scalar_fn, with_logit_positions
from lensjax.selection import predictors
from lensjax.selection.selectors import SelectionError, select_many


@dataclasses.dataclass(frozen=True)
class NTKConfig:
    n_probe: int = 32
    chunk_size: int = 8
    mode: str = "exact"  # or "sketch"
    sketch_k: int = 64
    reduce: str = "mean"
    kernel: str = "plain"  # or "adam": J diag(1/(sqrt(v)+eps)) J^T after adam_steps warm-up steps
    adam_steps: int = 10
    normalize: str = "offdiag"  # or "mean" (K/n); see lensjax.kernels.ntk.normalize
    seed: int = 0


@dataclasses.dataclass
class CandidateNTK:
    """The normalised spectrum (of K/n) and residual (r₀/√n) of one candidate, float64."""

    model: str
    eigvals: np.ndarray
    eigvecs: np.ndarray
    r0: np.ndarray
    stats: dict
    lr: float
    flops: float = 0.0
    config: dict | None = None  # the NTKConfig fields and lr it was computed with

    def log_F(self, steps) -> np.ndarray:
        """log F(t) (float64, finite for any t)."""
        with jax.enable_x64(True):
            return np.asarray(ntk_kernel.log_f_term(jnp.asarray(self.eigvals, jnp.float64),
                                                    jnp.asarray(self.eigvecs, jnp.float64),
                                                    jnp.asarray(self.r0, jnp.float64), self.lr,
                                                    jnp.asarray(steps, jnp.float64)))

    def F(self, steps) -> np.ndarray:
        return np.exp(self.log_F(steps))


def ladder(budget: int, base: int = 200) -> list[int]:
    if budget < base:
        raise SelectionError(f"budget {budget} is below the smallest ladder size {base}")
    out, d = [], base
    while d <= budget:
        out.append(int(d))
        d *= 2
    return out


def adam_preconditioner(config, params, data, pad_id: int, lr: float, steps: int, batch_size: int = 8, seed: int = 0):
    """Adam's diagonal ``1/(√v̂ + ε)`` after ``steps`` AdamW steps from ``params`` on ``data``."""
    import optax

    opt = optax.adam(lr)
    state = opt.init(params)
    from lensjax.models.lm import mean_target_loss

    grad = jax.jit(jax.grad(lambda p, b: mean_target_loss(config, p, b)))
    rng = np.random.default_rng(seed)
    p = params
    for i in range(steps):
        idx = rng.choice(len(data), size=min(batch_size, len(data)), replace=len(data) < batch_size)
        g = grad(p, make_batch(data, idx, pad_id))
        upd, state = opt.update(g, state, p)
        p = optax.apply_updates(p, upd)
    adam_state = state[0]
    corr = 1.0 - 0.999 ** steps
    return jax.tree.map(lambda v: 1.0 / (jnp.sqrt(v / corr) + 1e-8), adam_state.nu)


def compute_ntk(config, params, data, cfg: NTKConfig, pad_id: int, lr: float) -> CandidateNTK:
    n = min(cfg.n_probe, len(data))
    n -= n % cfg.chunk_size
    if n < cfg.chunk_size:
        raise DataError(f"need at least {cfg.chunk_size} training examples for the NTK probe set")
    # the head's logits only at the scored positions (lensjax.models.lm.logit_positions)
    probe = {k: jnp.asarray(v) for k, v in with_logit_positions(make_batch(data, np.arange(n), pad_id)).items()}
    f = scalar_fn(config, cfg.reduce)
    p_ntk, mask = params, None
    n_params = _param_count(params)
    mean_tok = float(np.mean(np.asarray(probe["attn"]).sum(axis=1)))
    if "dec_attn" in probe:  # encoder-decoder: encoder and decoder tokens both cost
        mean_tok += float(np.mean(np.asarray(probe["dec_attn"]).sum(axis=1)))
    flops = 6.0 * n_params * mean_tok * n + 2.0 * n * n * n_params  # per-sample gradients + Gram
    if cfg.kernel == "adam":
        pre = adam_preconditioner(config, params, data, pad_id, lr, cfg.adam_steps, seed=cfg.seed)
        p_ntk, mask = ntk_kernel.precondition(params, pre)
        f = ntk_kernel.preconditioned_fn(f)
        flops += 6.0 * n_params * mean_tok * 8 * cfg.adam_steps
    elif cfg.kernel != "plain":
        raise ValueError(f"unknown NTK kernel {cfg.kernel!r}; choose plain or adam")
    if cfg.mode == "exact" and cfg.kernel == "plain":  # Gram taps: no [n, P] Jacobian (lensjax.models.lm_ntk)
        K = lm_ntk.ntk_exact(config, params, probe, reduce=cfg.reduce, chunk_size=cfg.chunk_size)
    elif cfg.mode == "exact":
        K = ntk_kernel.ntk_exact(f, p_ntk, probe, chunk_size=cfg.chunk_size, mask=mask)
    elif cfg.mode == "sketch":
        K = ntk_kernel.ntk_sketch(f, p_ntk, probe, jax.random.key(cfg.seed), k=cfg.sketch_k,
                                  chunk_size=cfg.chunk_size, mask=mask)
    else:
        raise ValueError(f"unknown NTK mode {cfg.mode!r}")
    r0 = sample_loglik(config, params, probe, cfg.reduce)  # y = 0
    with jax.enable_x64(True):
        K64, r64 = jnp.asarray(np.asarray(K, np.float64)), jnp.asarray(np.asarray(r0, np.float64))
        theta, rn = ntk_kernel.normalize(K64, r64, cfg.normalize)
        w, u = ntk_kernel.spectrum(theta)
        stats = {k: np.asarray(v).tolist() for k, v in ntk_kernel.ntk_stats(K64 / n).items()}
        out = CandidateNTK("", np.asarray(w), np.asarray(u), np.asarray(rn), stats, lr, flops)
    return out


def _param_count(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))


def run(models: list[str], dataset: str, *, budget: int, target_size: int, method: str = "lensllm",
        base: int = 200, ft: FinetuneConfig = FinetuneConfig(), ntk_cfg: NTKConfig = NTKConfig(),
        prompt_column: str = "input", target_column: str = "target", curves_out: str | os.PathLike = "curves.csv",
        ntk_out: str | os.PathLike | None = None, progress=None, n_eval: int | None = None,
        eval_split: str | None = None, log=None, shard: tuple[int, int] | None = None) -> dict:
    """Fine-tune every candidate on the ladder, compute NTKs, fit and rank. Returns a result dict
    (also the ``--json`` payload). Partial measurements are in ``curves_out`` as they are made;
    NTKs already in ``ntk_out`` (from an earlier or a sharded run, with the same NTK settings)
    are reused.

    ``shard=(i, n)`` (1 ≤ i ≤ n): measure only candidates ``models[i-1::n]`` (curves and NTKs)
    and return ``{"measured": [...], ...}`` without ranking: one job of a scheduler array. Jobs
    may share ``curves_out`` (the store locks it) or write their own files, which
    :func:`lensjax.selection.jobs.merge` combines; a final run over all models then only ranks.

    With ``ft.patience > 0``, ``min(ft.n_dev, len(train) // 4)`` examples at the end of the fixed
    shuffled training order are the development split for early stopping (never trained on). ``log(msg)`` gets one line
    per measurement."""
    import lensjax

    entry = predictors.METHODS.get(method)
    if entry is None or entry.kind == "baseline" and method != "subtuning":
        ok = [m for m, e in predictors.METHODS.items() if e.kind != "baseline"] + ["subtuning"]
        raise SelectionError(f"unknown method {method!r} for measured curves; choose one of {', '.join(ok)}")
    sizes = ladder(budget, base)
    if len(set(models)) != len(models):
        raise SelectionError("duplicate model ids in --models")
    ranking = models
    if shard is not None:
        i, n = shard
        if not (isinstance(i, int) and isinstance(n, int) and 1 <= i <= n):
            raise SelectionError(f"shard must be (i, n) with 1 <= i <= n; got {shard!r}")
        models = models[i - 1::n]
    train, held = load_pairs(dataset, prompt_column=prompt_column, target_column=target_column, seed=ft.seed,
                             n_eval=n_eval, eval_split=eval_split)
    order = np.random.default_rng(ft.seed).permutation(len(train))  # one fixed order: nested subsets
    # At most a quarter of the pool, a rule of the dataset alone, so that every budget of a resumed
    # run measures on the same training order and development set.
    n_dev = min(ft.n_dev, len(order) // 4) if ft.patience > 0 else 0
    dev_idx = order[len(order) - n_dev:] if n_dev > 0 else order[:0]
    order = order[: len(order) - len(dev_idx)]
    if sizes[-1] > len(order):
        raise DataError(f"the ladder needs {sizes[-1]} training examples; {dataset!r} has {len(order)}"
                        + (f" after the {len(dev_idx)} held out for early stopping" if len(dev_idx) else ""))
    store = CurvesStore(curves_out)
    need_ntk = entry.f_term is not None or ntk_out is not None
    known = read_ntk(ntk_out) if ntk_out is not None and Path(ntk_out).exists() else {}
    for m, c in known.items():
        if m in models and c.config is not None and c.config != dataclasses.asdict(ntk_cfg) | {"lr": ft.lr}:
            raise SelectionError(f"{ntk_out}: the NTK of {m!r} was computed with {c.config}, this run asks for "
                                 f"{dataclasses.asdict(ntk_cfg) | {'lr': ft.lr}}; use another --ntk-out or delete it")
    ntks: dict[str, CandidateNTK] = {m: known[m] for m in models if m in known and need_ntk}
    params_count, tokens, eval_tokens = {}, {}, {}
    prog = progress if progress is not None else contextlib.nullcontext()
    with prog as bar:
        for name in models:
            try:
                model = lensjax.load(name)
            except Exception as exc:
                raise SelectionError(f"model {name!r} cannot be loaded: {exc}") from exc
            tok = model.tokenizer
            pad_id = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
            start = model.config.decoder_start_token_id if model.config.is_encoder_decoder else None
            tr, he = tokenize(tok, train, ft.max_len, decoder_start=start), tokenize(tok, held, ft.max_len, decoder_start=start)
            dev = tokenize(tok, train.take(dev_idx), ft.max_len, decoder_start=start) if len(dev_idx) else None
            params_count[name], tokens[name], eval_tokens[name] = _param_count(model.params), tr.mean_tokens, he.mean_tokens
            meta = dict(params=params_count[name], family=model.config.family, tokens_per_sample=tokens[name])
            task = bar.add_task(f"{Path(name).name}", total=len(sizes) + 2) if bar is not None else None
            if not store.has(name, 0):
                store.record(name, 0, evaluate(model.config, model.params, he, ft.eval_batch_size, pad_id),
                             steps=0, lr=ft.lr, n_eval=len(he), **meta)
            bar is not None and bar.advance(task)
            for d in sizes:
                if not store.has(name, d):
                    hist: list = []
                    p, t = finetune(model.config, model.params, tr, order, d, ft, pad_id, dev=dev, history=hist)
                    loss = evaluate(model.config, p, he, ft.eval_batch_size, pad_id)
                    store.record(name, d, loss, steps=t, lr=ft.lr, planned_steps=ft.steps(d),
                                 steps_run=hist[-1][0] if hist else t, dev_evals=len(hist),
                                 n_dev=0 if dev is None else len(dev), n_eval=len(he), protocol=ft.record(), **meta)
                    if log is not None:
                        log(f"{name} D={d}: loss {loss:.4f}, t={t} of {ft.steps(d)}")
                    del p
                bar is not None and bar.advance(task)
            if need_ntk and name not in ntks:
                ntk_data = tokenize(tok, train.take(order[: ntk_cfg.n_probe]), ft.max_len, decoder_start=start)
                c = compute_ntk(model.config, model.params, ntk_data, ntk_cfg, pad_id, ft.lr)
                c.model, c.config = name, dataclasses.asdict(ntk_cfg) | {"lr": ft.lr}
                ntks[name] = c
                if ntk_out is not None:  # written as each is made, keeping what the file holds
                    update_ntk(ntk_out, {name: c})
            bar is not None and bar.advance(task)
            del model
            # the next candidate compiles programs of its own: release these before the process
            # reaches its memory-mapping limit (lensjax.programs), which XLA does not survive
            programs.release_if_crowded(log=log)
    if shard is not None:
        return {"measured": list(models), "shard": list(shard), "curves_csv": str(store.path),
                "ntk_file": None if ntk_out is None else str(ntk_out)}
    models = ranking

    measured = store.curves()
    missing = [m for m in models if m not in measured.models]
    if missing:
        raise SelectionError(f"{store.path}: no measurements for {', '.join(missing)}")
    curves = measured.subset([measured.models.index(m) for m in models])
    kw = {}
    steps = np.full(curves.loss.shape, np.nan)
    for i, m in enumerate(models):
        for j, sz in enumerate(curves.sizes):
            if np.isfinite(curves.loss[i, j]):
                try:
                    steps[i, j] = store.steps(m, int(sz))
                except KeyError as exc:
                    raise SelectionError(str(exc.args[0])) from None
    t_target = np.array([ft.steps(target_size) * store.steps(m, sizes[-1]) / max(ft.steps(sizes[-1]), 1)
                         for m in models], np.float64)
    if entry.f_term is not None:
        kw["log_F"] = np.stack([np.where(np.isfinite(steps[i]), ntks[m].log_F(np.nan_to_num(steps[i])), np.nan)
                                for i, m in enumerate(models)])
        kw["log_F_target"] = np.array([ntks[m].log_F(t_target[i]) for i, m in enumerate(models)])
    try:
        sel = select_many(curves, method, None, budgets=[budget], target_size=target_size, base=base, **kw)[0]
    except SelectionError:
        raise  # a SelectionError is a ValueError: pass it on as it is
    except ValueError as exc:
        raise SelectionError(str(exc)) from None
    cost = _cost(store, models, sizes, ft, target_size, params_count, tokens, eval_tokens, len(held), ntks)
    result = sel.to_json() | cost | {"curves_csv": str(store.path), "ladder": sizes,
                                     "steps": {m: {str(int(s)): int(steps[i, j]) for j, s in enumerate(curves.sizes)
                                                   if np.isfinite(steps[i, j])} for i, m in enumerate(models)},
                                     "target_steps": {m: float(t) for m, t in zip(models, t_target)},
                                     "protocol": ft.record(), "n_heldout": len(held), "n_dev": int(len(dev_idx))}
    if ntks:
        result["ntk"] = {m: c.stats | {"F0": float(c.F(0.0)), "log_F_target": float(c.log_F(t_target[i])),
                                       "kernel": ntk_cfg.kernel}
                         for i, (m, c) in enumerate(ntks.items())}
    if ntk_out is not None and ntks:
        update_ntk(ntk_out, ntks)
        result["ntk_file"] = str(ntk_out)
    return result


def _cost(store, models, sizes, ft, target_size, params_count, tokens, eval_tokens, n_held, ntks) -> dict:
    """FLOPs spent (training, evaluation, NTK) against fine-tuning every candidate at the target
    (its planned steps, plus one evaluation of the held-out set): 6·P·T per trained token, 2·P·T per
    evaluated token, the NTK's per-sample gradients and Gram matrix."""
    train = evals = ntk = full = 0.0
    for m in models:
        P, T, Te = params_count[m], tokens[m], eval_tokens[m]
        for d in sizes:
            c = store.cell(m, d)
            run_steps = c.get("steps_run", c.get("steps", 0))
            train += cost_mod.finetune_flops(P, [ft.batch_size * run_steps], tokens_per_sample=T)
            evals += 2.0 * P * (Te * c.get("n_eval", n_held) + T * c.get("dev_evals", 0) * c.get("n_dev", 0))
        evals += 2.0 * P * Te * n_held  # the zero-shot point
        ntk += ntks[m].flops if m in ntks else 0.0
        full += cost_mod.finetune_flops(P, [ft.batch_size * ft.steps(target_size)], tokens_per_sample=T)
        full += 2.0 * P * Te * n_held
    spent = train + evals + ntk
    return {"flops": spent, "full_flops": full, "cost_fraction": spent / full,
            "cost": {"train_flops": train, "eval_flops": evals, "ntk_flops": ntk, "full_flops": full,
                     "train_fraction": train / full, "eval_fraction": evals / full, "ntk_fraction": ntk / full,
                     "relative_to": "fine-tuning every candidate once at the target size (planned steps) "
                                    "and evaluating it once on the held-out set"}}


def write_ntk(path: str | os.PathLike, ntks: dict[str, CandidateNTK]) -> None:
    """Eigenpairs and r₀ per candidate (float64) with its stats, η, FLOPs and NTK settings, as
    safetensors (``.safetensors``) or JSON; written atomically."""
    path = Path(path)
    info = {m: {"stats": c.stats, "lr": c.lr, "flops": c.flops, "config": c.config} for m, c in ntks.items()}
    if path.suffix == ".safetensors":
        from safetensors.numpy import save

        tensors, names = {}, {}
        for i, (m, c) in enumerate(ntks.items()):
            tensors[f"{i}.eigvals"] = np.ascontiguousarray(c.eigvals, np.float64)
            tensors[f"{i}.eigvecs"] = np.ascontiguousarray(c.eigvecs, np.float64)
            tensors[f"{i}.r0"] = np.ascontiguousarray(c.r0, np.float64)
            names[str(i)] = m
        atomic_write(path, save(tensors, metadata={"models": json.dumps(names), "info": json.dumps(info),
                                                   "stats": json.dumps({m: c.stats for m, c in ntks.items()})}))
    else:
        atomic_write(path, json.dumps({m: {"eigvals": c.eigvals.tolist(), "eigvecs": c.eigvecs.tolist(),
                                           "r0": c.r0.tolist()} | info[m] for m, c in ntks.items()}))


def update_ntk(path: str | os.PathLike, new: dict[str, CandidateNTK]) -> None:
    """Add ``new`` to the NTK file at ``path`` (created if absent) under an exclusive ``flock`` on
    ``<path>.lock``, so concurrent jobs writing one file keep each other's candidates."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            old = read_ntk(path) if path.exists() else {}
            write_ntk(path, old | new)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_ntk(path: str | os.PathLike) -> dict[str, CandidateNTK]:
    """What :func:`write_ntk` wrote (either format)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "numpy") as f:
                meta = f.metadata() or {}
                names, info = json.loads(meta["models"]), json.loads(meta["info"])
                return {m: CandidateNTK(m, f.get_tensor(f"{i}.eigvals"), f.get_tensor(f"{i}.eigvecs"),
                                        f.get_tensor(f"{i}.r0"), info[m]["stats"], float(info[m]["lr"]),
                                        float(info[m]["flops"]), info[m]["config"]) for i, m in names.items()}
        raw = json.loads(path.read_text())
        return {m: CandidateNTK(m, np.asarray(v["eigvals"], np.float64), np.asarray(v["eigvecs"], np.float64),
                                np.asarray(v["r0"], np.float64), v["stats"], float(v["lr"]), float(v["flops"]),
                                v["config"]) for m, v in raw.items()}
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise SelectionError(f"{path}: not an NTK file written by this version of lensjax ({exc!r}); "
                             "delete it to recompute") from None
