"""REINFORCE training of SVF experts with a KL penalty, resumable.

Each step: sample ``batch_prompts`` prompts, draw ``samples_per_prompt`` completions from the
adapted policy π_{W′} with :func:`lensjax.generate` (temperature sampling; greedy as an option),
score them with the task's reward, and minimise

    −(1/N) Σ_i A_i Σ_t log π_{W′}(y_it | y_i,<t, x_i)  +  λ · mean_t KL(π_{W′}(·|·) ‖ π_W(·|·))

over z only, with A_i = R_i − mean(R) (optionally divided by the rewards' std). The KL is exact
over the vocabulary at every completion token, in the paper's direction (``kl="forward"``:
KL(π_{W′} ‖ π_W)); ``kl="reverse"`` gives KL(π_W ‖ π_{W′}). Optax AdamW with cosine decay and
global-norm clipping; z and the optimiser state are float32; the update is one jitted function
(one compile per sequence-length bucket). Every ``val_every`` steps greedy accuracy on the
validation split is measured and the best z kept. State (z, optimiser, step, best) is written
atomically after every step, so a killed run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lensjax.io import atomic_write
from lensjax.models.sampler import generate
from lensjax.models.lm import token_logprobs
from lensjax.svf import core
from lensjax.svf.tasks import Task, format_prompt


@dataclasses.dataclass(frozen=True)
class SVFConfig:
    targets: str = "mlp"
    parameterisation: str = "paper"
    max_mult: float = 1.0
    lr: float = 2e-3
    weight_decay: float = 0.0
    clip: float = 1.0
    steps: int = 100
    batch_prompts: int = 8
    samples_per_prompt: int = 4
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    greedy_rollouts: bool = False
    kl_coef: float = 0.0  # λ
    kl: str = "forward"
    normalise_rewards: bool = False
    val_every: int = 10
    eval_batch: int = 64
    seed: int = 0


def make_optimizer(cfg: SVFConfig) -> optax.GradientTransformation:
    return _optimizer(cfg.lr, cfg.weight_decay, cfg.clip, cfg.steps)


@functools.lru_cache(maxsize=16)
def _optimizer(lr, wd, clip, steps):
    sched = optax.cosine_decay_schedule(lr, max(steps, 1))
    return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(sched, weight_decay=wd))


def kl_per_token(logits_p, logits_q, mask):
    """Mean over masked positions of KL(p ‖ q) from logits [B, T, V]."""
    lp = jax.nn.log_softmax(logits_p.astype(jnp.float32), -1)
    lq = jax.nn.log_softmax(logits_q.astype(jnp.float32), -1)
    kl = jnp.sum(jnp.exp(lp) * (lp - lq), -1)
    return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def policy_loss(model_cfg, cfg: SVFConfig, z, params, dec, batch, adv):
    """The REINFORCE + KL objective (see module notes); returns (loss, (pg, kl))."""
    from lensjax.models.transformer import _forward

    adapted = core.adapted_params(params, dec, z, cfg.parameterisation, max_mult=cfg.max_mult)
    lp, w = token_logprobs(model_cfg, adapted, batch)
    pg = -jnp.mean(adv * jnp.sum(lp * w, -1))
    kl = jnp.float32(0.0)
    if cfg.kl_coef:
        logits_a, _ = _forward(model_cfg, adapted, batch["ids"], batch["attn"], None, None)
        logits_b, _ = _forward(model_cfg, params, batch["ids"], batch["attn"], None, None)
        logits_b = jax.lax.stop_gradient(logits_b)
        m = (batch["target"][:, 1:] & batch["attn"][:, 1:]).astype(jnp.float32)
        pa, pb = logits_a[:, :-1], logits_b[:, :-1]
        kl = kl_per_token(pa, pb, m) if cfg.kl == "forward" else kl_per_token(pb, pa, m)
    return pg + cfg.kl_coef * kl, (pg, kl)


@functools.lru_cache(maxsize=8)
def _update_fn(model_cfg, cfg: SVFConfig):
    opt = make_optimizer(cfg)

    @jax.jit
    def update(z, opt_state, params, dec, batch, adv):
        (loss, (pg, kl)), g = jax.value_and_grad(
            lambda zz: policy_loss(model_cfg, cfg, zz, params, dec, batch, adv), has_aux=True)(z)
        updates, opt_state = opt.update(g, opt_state, z)
        return optax.apply_updates(z, updates), opt_state, {"loss": loss, "pg": pg, "kl": kl,
                                                             "grad_norm": optax.tree.norm(g)}

    return update


# ---------------------------------------------------------------------------------- rollouts
def _encode(tokenizer, prompts: list[str]):
    texts = [format_prompt(tokenizer, p) for p in prompts]
    enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    T = max(len(e) for e in enc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(enc), T), pad, np.int32)
    mask = np.zeros((len(enc), T), bool)
    for i, e in enumerate(enc):
        ids[i, T - len(e):] = e
        mask[i, T - len(e):] = True
    return ids, mask


def complete(model, params, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             key=None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(completions as text, token ids [B, T + N], attention/target masks) with left-padded prompts."""
    tok = model.tokenizer
    ids, mask = _encode(tok, prompts)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos or 0)
    out = np.asarray(generate(model.config, params, ids, mask, max_new_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, key=key,
                              eos_token_id=[eos] if eos is not None else [], pad_token_id=pad))
    new = out[:, ids.shape[1]:]
    gen_mask = np.ones_like(new, bool)
    if eos is not None:  # tokens after the first EOS are padding
        hit = np.cumsum(new == eos, axis=1)
        gen_mask = (hit == 0) | ((hit == 1) & (new == eos))
    texts = [tok.decode(row[m], skip_special_tokens=True) for row, m in zip(new, gen_mask)]
    attn = np.concatenate([mask, gen_mask], axis=1)
    target = np.concatenate([np.zeros_like(mask), gen_mask], axis=1)
    return texts, out, np.stack([attn, target])


def accuracy(model, params, task: Task, *, max_new_tokens: int = 8, batch: int = 64) -> float:
    """Greedy accuracy on ``task``."""
    hits = 0.0
    for s in range(0, len(task), batch):
        prompts = list(task.prompts[s: s + batch])
        n = len(prompts)
        prompts += [prompts[-1]] * (batch - n)  # one shape per bucket
        texts, _, _ = complete(model, params, prompts, max_new_tokens=max_new_tokens)
        hits += sum(task.reward(t, a) for t, a in zip(texts[:n], task.answers[s: s + n]))
    return hits / len(task)


# ---------------------------------------------------------------------------------- state
def save_state(out: Path, step: int, z, opt_state, info: dict):
    from safetensors.numpy import save

    out.mkdir(parents=True, exist_ok=True)
    leaves = jax.tree.leaves((z, opt_state))
    tensors = {f"{i}": np.asarray(jax.device_get(x)) for i, x in enumerate(leaves)}
    atomic_write(out / "state.safetensors", save(tensors, metadata={"step": str(step)}))
    atomic_write(out / "state.json", json.dumps(info | {"step": step}, indent=1).encode())


def load_state(out: Path, z_template, opt_template):
    from safetensors import safe_open

    info = json.loads((out / "state.json").read_text())
    with safe_open(str(out / "state.safetensors"), "numpy") as f:
        if int(f.metadata()["step"]) != info["step"]:
            raise core.SVFError(f"{out}: state.json and state.safetensors disagree on the step")
        leaves = [jnp.asarray(f.get_tensor(str(i))) for i in range(len(jax.tree.leaves((z_template, opt_template))))]
    z, opt_state = jax.tree.unflatten(jax.tree.structure((z_template, opt_template)), leaves)
    return z, opt_state, info


# ---------------------------------------------------------------------------------- train
def train(model, dec: core.Decomposition, task: Task, val: Task, cfg: SVFConfig, out: str | os.PathLike,
          on_step: Callable | None = None) -> dict:
    """Train an expert; resumes from ``out`` if it holds a state. Returns the summary dict, and
    writes ``out/best.safetensors`` (the best z by validation accuracy)."""
    from lensjax.svf.experts import save_expert

    out = Path(out)
    z = core.init_z(dec, cfg.parameterisation, jax.random.key(cfg.seed))
    opt = make_optimizer(cfg)
    opt_state = opt.init(z)
    info = {"best_acc": None, "best_step": None, "history": []}
    start = 0
    if (out / "state.json").exists():
        z, opt_state, info = load_state(out, z, opt_state)
        start = info["step"]
    update = _update_fn(model.config, cfg)
    params = model.params

    def validate(zz):
        return accuracy(model, core.adapted_params(params, dec, zz, cfg.parameterisation, n_tokens=val_tokens,
                                                   max_mult=cfg.max_mult), val,
                        max_new_tokens=cfg.max_new_tokens, batch=cfg.eval_batch)

    val_tokens = cfg.eval_batch
    whash = core.content_hash(params, dec.paths)
    if info["best_acc"] is None:
        info["best_acc"] = info["base_acc"] = validate(z)
        info["best_step"] = 0
        save_expert(out / "best.safetensors", z, model, cfg, task.name, {"val_accuracy": info["best_acc"], "step": 0},
                    whash)
    n_roll = cfg.batch_prompts * cfg.samples_per_prompt
    for step in range(start, cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        pick = rng.choice(len(task), cfg.batch_prompts, replace=len(task) < cfg.batch_prompts)
        prompts = [task.prompts[i] for i in pick for _ in range(cfg.samples_per_prompt)]
        answers = [task.answers[i] for i in pick for _ in range(cfg.samples_per_prompt)]
        roll_params = core.adapted_params(params, dec, z, cfg.parameterisation, n_tokens=n_roll, max_mult=cfg.max_mult)
        key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        texts, ids, masks = complete(model, roll_params, prompts, max_new_tokens=cfg.max_new_tokens,
                                     temperature=0.0 if cfg.greedy_rollouts else cfg.temperature,
                                     top_p=cfg.top_p, key=key)
        r = np.array([task.reward(t, a) for t, a in zip(texts, answers)], np.float32)
        adv = r - r.mean()
        if cfg.normalise_rewards:
            adv = adv / (r.std() + 1e-6)
        batch = {"ids": jnp.asarray(ids), "attn": jnp.asarray(masks[0]), "target": jnp.asarray(masks[1])}
        z, opt_state, stats = update(z, opt_state, params, dec, batch, jnp.asarray(adv))
        rec = {"step": step + 1, "reward": float(r.mean()), **{k: float(v) for k, v in stats.items()}}
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            acc = validate(z)
            rec["val_accuracy"] = acc
            if acc > info["best_acc"]:
                info["best_acc"], info["best_step"] = acc, step + 1
                save_expert(out / "best.safetensors", z, model, cfg, task.name, {"val_accuracy": acc, "step": step + 1},
                            whash)
        info["history"].append(rec)
        save_state(out, step + 1, z, opt_state, info)
        if on_step is not None:
            on_step(rec)
    return info
