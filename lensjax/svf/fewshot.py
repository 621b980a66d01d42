"""Few-shot adaptation (Transformer²'s third strategy): a CEM search over the mixing weights α of
the experts on a few shots with known answers, the whole population answered in one batched
call per generation (per-row experts, :mod:`lensjax.svf.mixing`).

Defaults are the reference code's (``cfgs/optimization/cem.yaml``, ``cfgs/policy/wcomb.yaml``):
population 32, 6 elites (its ``elite_ratio`` 0.2), initial mean 1/K per weight, initial std 0.5
(half the range), α clamped to [0, 1] and normalised to sum 1 per matrix, the previous best
re-evaluated as member 0, 50 generations. Fitness is the greedy accuracy on the shots; ties are
broken by the mean log-likelihood of the shots' reference answers under the member (teacher
forced, :func:`answer_text`), or — for code, whose references are tests — by the mean
log-probability of the member's own correct completions (the reference code's rule).

Split discipline: the shots and the validation set come from the target task's train and
validation splits (:func:`fewshot_sets`; validation carved from train when there is none, disjoint
from the shots); the generation-best α every ``val_every`` generations (and the last) are scored on
the validation set in one batched call and the best there is the choice (ties: the later one). The
test split is not touched here (the released code picks its shots and its reported checkpoint on
test).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lensjax.kernels import cem
from lensjax.parallel import params_on, replicate
from lensjax.svf import core, mixing
from lensjax.svf.tasks import Task, encode_prompts, train_val


def answer_text(task: Task, reference) -> str | None:
    """A textual reference answer for the tie-break log-likelihood (None for code tasks)."""
    kind = task.kind
    if kind == "arithmetic":
        return str(reference)
    if kind == "gsm8k":
        return f" The answer is {reference}."
    if kind in ("math", "category"):
        return f" \\boxed{{{reference}}}"
    if kind == "arc":
        return f" The answer is {getattr(reference, 'key', reference)}."
    return None


def draw_shots(train: Task, n_shots: int, seed: int = 0) -> Task:
    if n_shots < 1:
        raise core.SVFError(f"the shot set is empty (shots={n_shots}); give at least one shot")
    if n_shots > len(train):
        raise core.SVFError(f"{n_shots} shots asked, but the training split of {train.name!r} holds {len(train)}")
    idx = np.random.default_rng(seed).choice(len(train), n_shots, replace=False)
    return train.subset(sorted(idx.tolist()))


def fewshot_sets(source: str, n_shots: int, n_val: int, seed: int = 0, kind: str | None = None,
                 limit: int | None = None) -> tuple[Task, Task]:
    """(shots, validation) from ``source``'s train / validation splits; the test split is not read."""
    if n_shots < 1:
        raise core.SVFError(f"the shot set is empty (shots={n_shots}); give at least one shot")
    train, val = train_val(source, n_val, seed, limit, kind)
    return draw_shots(train, n_shots, seed), val


def loglik_batch(model, task: Task, answers) -> dict | None:
    """Right-padded prompt + answer tokens (answers scored) for the tie-break, or None."""
    texts = [answer_text(task, r) for r in answers]
    if any(t is None for t in texts):
        return None
    tok = model.tokenizer
    prompts = encode_prompts(tok, task, task.prompts)
    ans = [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    T = max(len(p) + len(a) for p, a in zip(prompts, ans))
    T = -(-T // 16) * 16
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids = np.full((len(texts), T), pad, np.int32)
    attn = np.zeros((len(texts), T), bool)
    target = np.zeros((len(texts), T), bool)
    for i, (p, a) in enumerate(zip(prompts, ans)):
        ids[i, :len(p) + len(a)] = p + a
        attn[i, :len(p) + len(a)] = True
        target[i, len(p):len(p) + len(a)] = True
    return {"ids": ids, "attn": attn, "target": target}


def _shape(alpha, K: int, M: int, per_matrix: bool):
    return alpha.reshape(alpha.shape[:-1] + ((K, M) if per_matrix else (K,)))


def search(model, dec: core.Decomposition, experts: mixing.ExpertSet, shots: Task, val: Task, *, pop_size: int = 32,
           n_elites: int = 6, generations: int = 50, init_mean: float | None = None, init_std: float = 0.5,
           lo: float = 0.0, hi: float = 1.0, bounds: str = "clamp", per_matrix: bool = False,
           space: str = "multipliers", normalise: bool = True, std_floor: float = 0.0, smoothing: float = 0.0,
           keep_best: bool = True, val_every: int = 10, max_new_tokens: int = 256, max_rows: int | None = None,
           seed: int = 0, on_generation: Callable | None = None, mesh: jax.sharding.Mesh | None = None,
           loglik_route: str = "auto") -> dict:
    """Run the search; returns the chosen ``alpha`` (list, [K] or [K, M]) with its validation and
    shot accuracy, the per-generation history, the validated candidates and the token count.

    With ``mesh``: the population's rows (every member × every shot, and the validated candidates
    × the validation set) are split over its ``data`` axis, chunks padded to a multiple of it; the
    parameters follow the logical-axis rules (left as they are when loaded on ``mesh``), and the
    decomposition, the experts and the CEM state are replicated.

    ``loglik_route``: how the tie-break log-likelihoods are scored (the ``route`` of
    :func:`lensjax.svf.mixing.loglik_rows`: ``"auto"`` recomposes each member's W′ once where that
    has fewer FLOPs, on one device; ``"factored"`` always runs the per-row factored apply)."""
    if len(shots) == 0:
        raise core.SVFError("the shot set is empty")
    if len(val) == 0:
        raise core.SVFError("the validation set is empty")
    if generations < 1 or pop_size < 2:
        raise core.SVFError("CEM needs generations >= 1 and a population of at least 2")
    if mesh is not None:
        model = dataclasses.replace(model, params=params_on(model.params, model.config, mesh))
        dec, experts = replicate(dec, mesh), mixing.expert_set_on(experts, mesh)
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        return _search(model, dec, experts, shots, val, pop_size, n_elites, generations, init_mean, init_std, lo, hi,
                       bounds, per_matrix, space, normalise, std_floor, smoothing, keep_best, val_every,
                       max_new_tokens, max_rows, seed, on_generation, mesh, loglik_route)


def _search(model, dec, experts, shots, val, pop_size, n_elites, generations, init_mean, init_std, lo, hi, bounds,
            per_matrix, space, normalise, std_floor, smoothing, keep_best, val_every, max_new_tokens, max_rows, seed,
            on_generation, mesh, loglik_route):
    K, M = len(experts), len(experts.paths)
    D = K * M if per_matrix else K
    mean0 = jnp.full((D,), 1.0 / K if init_mean is None else init_mean, jnp.float32)
    state = cem.init(mean0, init_std, jax.random.key(seed), lo=lo, hi=hi, bounds=bounds)
    n = len(shots)
    rows = np.repeat(np.arange(pop_size), n)
    prompts = list(shots.prompts) * pop_size
    refs = list(shots.references) * pop_size
    lb = loglik_batch(model, shots, shots.references)
    lb_pop = None if lb is None else {k: np.tile(v, (pop_size, 1)) for k, v in lb.items()}
    history, candidates, tokens = [], [], 0
    t0 = time.perf_counter()
    for gen in range(generations):
        pop, state = cem.sample(state, pop_size, lo=lo, hi=hi, bounds=bounds, keep_best=keep_best)
        alphas = _shape(cem.decode(pop, lo=lo, hi=hi, bounds=bounds), K, M, per_matrix)
        sets = mixing.mix_many(experts, dec, alphas, space=space, normalise=normalise)
        rolls = mixing.generate_rows(model, dec, sets, rows, shots, prompts, max_new_tokens=max_new_tokens,
                                     max_rows=max_rows, mesh=mesh)
        texts = [t for r in rolls for t in r.texts]
        correct = np.asarray(shots.score_many(texts, refs), np.float32).reshape(pop_size, n)
        tokens += sum(int(r.attn.sum()) for r in rolls)
        if lb_pop is not None:
            ll = mixing.loglik_rows(model, dec, sets, rows, lb_pop, max_rows=max_rows, mesh=mesh,
                                    route=loglik_route).reshape(pop_size, n)
            tie = ll.mean(1)
            tokens += int(lb_pop["attn"].sum())
        else:  # code: mean log-prob of the member's own correct completions (0 when none is correct)
            lp = np.concatenate([r.logprobs.sum(1) / np.maximum(r.target.sum(1), 1) for r in rolls]).reshape(pop_size, n)
            tie = np.where(correct.sum(1) > 0, (lp * correct).sum(1) / np.maximum(correct.sum(1), 1), 0.0)
        fit = correct.mean(1)
        state = cem.update(state, pop, jnp.asarray(fit), jnp.asarray(tie, jnp.float32), n_elites=n_elites,
                           std_floor=std_floor, smoothing=smoothing)
        rec = {"generation": gen + 1, "best_fitness": float(state.best_fitness),
               "best_tiebreak": float(state.best_tiebreak), "population_mean_fitness": float(fit.mean()),
               "std_mean": float(jnp.mean(state.std))}
        history.append(rec)
        if (gen + 1) % val_every == 0 or gen + 1 == generations:
            candidates.append({"generation": gen + 1, "shot_accuracy": float(state.best_fitness),
                               "alpha": np.asarray(cem.decode(state.best, lo=lo, hi=hi, bounds=bounds))})
        if on_generation is not None:
            on_generation(1)
    # the choice: the validated candidates, all in one batched call
    C = len(candidates)
    cand = _shape(jnp.stack([jnp.asarray(c["alpha"]) for c in candidates]), K, M, per_matrix)
    sets = mixing.mix_many(experts, dec, cand, space=space, normalise=normalise)
    vrows = np.repeat(np.arange(C), len(val))
    rolls = mixing.generate_rows(model, dec, sets, vrows, val, list(val.prompts) * C, max_new_tokens=max_new_tokens,
                                 max_rows=max_rows, mesh=mesh)
    tokens += sum(int(r.attn.sum()) for r in rolls)
    vcorrect = np.asarray(val.score_many([t for r in rolls for t in r.texts], list(val.references) * C)).reshape(C, len(val))
    vacc = vcorrect.mean(1)
    pick = int(np.flatnonzero(vacc == vacc.max())[-1])
    for c, a in zip(candidates, vacc):
        c["val_accuracy"] = float(a)
        c["alpha"] = np.asarray(_shape(jnp.asarray(c["alpha"]), K, M, per_matrix)).tolist()
    return {"alpha": candidates[pick]["alpha"], "val_accuracy": float(vacc[pick]),
            "shot_accuracy": candidates[pick]["shot_accuracy"], "chosen_generation": candidates[pick]["generation"],
            "candidates": candidates, "history": history, "tokens": tokens, "seconds": time.perf_counter() - t0,
            "space": space, "normalise": normalise, "n_shots": n, "n_val": len(val),
            "settings": {"pop_size": pop_size, "n_elites": n_elites, "generations": generations,
                         "init_mean": float(mean0[0]), "init_std": init_std, "lo": lo, "hi": hi, "bounds": bounds,
                         "per_matrix": per_matrix, "std_floor": std_floor, "smoothing": smoothing, "seed": seed}}
