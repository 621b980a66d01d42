"""REINFORCE training of SVF experts with a KL penalty, resumable; two presets.

Each step draws ``batch_prompts`` training prompts, takes ``samples_per_prompt`` completions from
the adapted policy π_{W′} (:mod:`lensjax.svf.rollout`), scores them with the task's scorer
(reward ``hi`` when correct, ``lo`` otherwise: 1/0 or ±1) and minimises over z only

    −(1/N) Σ_i A_i Σ_t log π_{W′}(y_it | y_i,<t, x_i)  +  λ · KL

with A_i = R_i − mean(R) (``baseline="mean"``, optionally divided by the rewards' std) or R_i
(``"none"``). The KL is exact over the vocabulary at every completion token: ``kl="forward"`` is
KL(π_{W′} ‖ π_W) (the paper's D_KL(π_θW′ ‖ π_θW)), ``"reverse"`` KL(π_W ‖ π_{W′}) (the reference
code's ``F.kl_div(log π_W′, log π_W, log_target=True)``); ``kl_reduce="mean"`` averages it over the
batch's completion tokens, ``"sum"`` sums it over each completion's tokens and averages over
completions (the reference). One forward pass gives both the log-probabilities and the KL.

Presets (:data:`PRESETS`, ``--preset``; any field can be overridden):

* ``paper`` (the default: sampling with a baseline gives a learning signal from every prompt whose
  samples disagree, and is what the paper describes): sampled rollouts (T = 1), 4 samples per
  prompt, reward 1/0, mean baseline, KL(π_{W′} ‖ π_W) per-token mean with λ = 0.1 (our choice of λ:
  the paper leaves it as a hyperparameter), AdamW with cosine decay, clip 1.0, the paper's
  parameterisation g(z) = z from 1.
* ``reference`` (the released code, SakanaAI/self-adaptive-llms ``optim_modules.Reinforce`` with
  its ``cfgs/``): greedy rollouts, one completion per prompt, reward ±1, no baseline, KL(π_W ‖
  π_{W′}) summed over tokens (λ = 0: its default ``kl_ref_coeff``), Adam at a constant lr 2e-3,
  gradient clip 1e-3, its sigmoid mask with Σσ kept, z from 0.1.

The loss uses the same parameters as the rollouts: in float32 the dense W′ (rollouts pick dense
or factored per leaf; the two agree to rounding), in a low-precision dtype the factored apply for
both, so that a small change of z is not lost in W′'s rounding and the scored policy is the sampled
one. ``compute_dtype="bfloat16"`` runs the update in mixed precision: bf16 matmul operands with
float32 accumulation, each layer forming its own W′ and giving z's gradient from ``x U`` and ``g V``
(:func:`lensjax.kernels.mixed.svf_matmul`), U and Vᵀ cast once per run; the rollouts, which pick
the parameters as above, stay float32. Prompt and completion lengths are bucketed, so the jitted
update compiles once per bucket.
Every ``val_every`` steps greedy accuracy on the validation split is measured and the best z kept;
state (z, optimiser, step, best) is written atomically after every step, so a killed run continues
where it stopped.
"""

from __future__ import annotations

import contextlib
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

from lensjax.config import check_compute_dtype, compute_config
from lensjax.io import atomic_write
from lensjax.kernels import scores, xla
from lensjax.models.lm import logprobs_from_logits
from lensjax.models.transformer import _forward
from lensjax.parallel import data_size, params_on, replicate, shard_batch
from lensjax.svf import core
from lensjax.svf.rollout import COMPLETION_BUCKET, PROMPT_BUCKET, Rollout, complete, evaluate
from lensjax.svf.tasks import Task

REWARDS = {"binary": (1.0, 0.0), "pm1": (1.0, -1.0)}
CHOICES = {"kl": ("forward", "reverse"), "kl_reduce": ("mean", "sum"), "baseline": ("mean", "none"),
           "optimizer": ("adamw", "adam"), "schedule": ("cosine", "constant"), "reward": tuple(REWARDS)}


@dataclasses.dataclass(frozen=True)
class SVFConfig:
    preset: str = "paper"
    targets: str = "mlp"
    parameterisation: str = "paper"
    max_mult: float = 1.0
    lr: float = 2e-3
    optimizer: str = "adamw"
    schedule: str = "cosine"
    weight_decay: float = 0.0
    clip: float = 1.0
    steps: int = 100
    batch_prompts: int = 8
    samples_per_prompt: int = 4
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    greedy_rollouts: bool = False
    reward: str = "binary"
    baseline: str = "mean"
    normalise_rewards: bool = False
    kl_coef: float = 0.1  # λ
    kl: str = "forward"
    kl_reduce: str = "mean"
    prompt_bucket: int = PROMPT_BUCKET
    completion_bucket: int = COMPLETION_BUCKET
    val_every: int = 10
    eval_batch: int = 64
    seed: int = 0
    # "float32", or "bfloat16"/"float16": the update's mixed precision (matmul operands and the
    # per-layer W′ delta product in that type, float32 accumulation; z, its gradient, Adam
    # state, softmax, KL and the loss in float32); rollouts and validation stay float32
    compute_dtype: str = "float32"

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise core.SVFError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.preset not in PRESETS:
            raise core.SVFError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        try:
            check_compute_dtype(self.compute_dtype)
        except ValueError as e:
            raise core.SVFError(str(e)) from None
        if self.parameterisation not in core.PARAMETERISATIONS:
            raise core.SVFError(f"unknown parameterisation {self.parameterisation!r}; "
                                f"choose one of {', '.join(core.PARAMETERISATIONS)}")


PRESETS = {
    "paper": {},  # the field defaults above
    "reference": dict(greedy_rollouts=True, samples_per_prompt=1, reward="pm1", baseline="none",
                      normalise_rewards=False, kl="reverse", kl_reduce="sum", kl_coef=0.0, optimizer="adam",
                      schedule="constant", lr=2e-3, clip=1e-3, weight_decay=0.0, parameterisation="reference"),
}
DEFAULT_PRESET = "paper"


def make_config(preset: str = DEFAULT_PRESET, **overrides) -> SVFConfig:
    """The preset's configuration with ``overrides`` (fields given as None keep the preset's)."""
    if preset not in PRESETS:
        raise core.SVFError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(SVFConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise core.SVFError(f"unknown SVF settings {sorted(unknown)}")
    return SVFConfig(preset=preset, **{**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}})


def make_optimizer(cfg: SVFConfig) -> optax.GradientTransformation:
    return _optimizer(cfg.optimizer, cfg.schedule, cfg.lr, cfg.weight_decay, cfg.clip, cfg.steps)


@functools.lru_cache(maxsize=16)
def _optimizer(kind, schedule, lr, wd, clip, steps):
    sched = optax.cosine_decay_schedule(lr, max(steps, 1)) if schedule == "cosine" else lr
    opt = optax.adamw(sched, weight_decay=wd) if kind == "adamw" else optax.adam(sched)
    return optax.chain(optax.clip_by_global_norm(clip), opt)


def kl_tokens(logits_p, logits_q):
    """KL(p ‖ q) at every position from logits [B, T, V] → [B, T]."""
    lp = jax.nn.log_softmax(logits_p.astype(jnp.float32), -1)
    lq = jax.nn.log_softmax(logits_q.astype(jnp.float32), -1)
    return jnp.sum(jnp.exp(lp) * (lp - lq), -1)


def low_precision(params) -> bool:
    return params["embed"]["tokens"].dtype != jnp.float32


def policy_params(params, dec, z, cfg: SVFConfig, n_tokens: int | None = None, matmul_dtype: str = "") -> dict:
    """The policy's parameters: factored in a low-precision dtype (rollouts and loss alike), else
    chosen per leaf by ``n_tokens`` (None: dense); ``matmul_dtype``: a mixed-precision forward's
    (``ModelConfig.matmul_dtype``): each layer forms its own W′ (see ``core.adapted_params``)."""
    factored = True if low_precision(params) else None
    return core.adapted_params(params, dec, z, cfg.parameterisation, n_tokens=n_tokens, factored=factored,
                               max_mult=cfg.max_mult, matmul_dtype=matmul_dtype)


def policy_logprobs(model_cfg, cfg: SVFConfig, z, params, dec, batch):
    """(per-token log-probs [B, T−1], target weights, logits) of the batch under the policy."""
    # mixed precision: each layer forms W′ and gives z's gradient without a weight gradient
    pp = policy_params(params, dec, z, cfg, matmul_dtype=model_cfg.matmul_dtype)
    logits, _ = _forward(model_cfg, pp, batch["ids"], batch["attn"], None, None)
    lp, w = logprobs_from_logits(logits, batch)
    return lp, w, logits


def policy_loss(model_cfg, cfg: SVFConfig, z, params, dec, batch, adv):
    """The REINFORCE + KL objective (see module notes); returns (loss, (pg, kl))."""
    lp, w, logits = policy_logprobs(model_cfg, cfg, z, params, dec, batch)
    pg = -jnp.mean(adv * jnp.sum(lp * w, -1))
    kl = jnp.float32(0.0)
    if cfg.kl_coef:
        base, _ = _forward(model_cfg, params, batch["ids"], batch["attn"], None, None)
        pa, pb = logits, jax.lax.stop_gradient(base)  # every position, then the last dropped (no [B, T−1, V] copy)
        k = (kl_tokens(pa, pb) if cfg.kl == "forward" else kl_tokens(pb, pa))[:, :-1]
        tot = jnp.sum(k * w, -1)
        kl = jnp.mean(tot) if cfg.kl_reduce == "sum" else jnp.sum(tot) / jnp.maximum(jnp.sum(w), 1.0)
    return pg + cfg.kl_coef * kl, (pg, kl)


@functools.lru_cache(maxsize=8)
def _update_fn(model_cfg, cfg: SVFConfig):
    opt = make_optimizer(cfg)
    model_cfg = compute_config(model_cfg, cfg.compute_dtype)

    # with the backend's compiler options (kernels/xla.py), a mixed-precision program's if so
    @functools.partial(xla.jit, mixed=bool(model_cfg.matmul_dtype))
    def update(z, opt_state, params, dec, batch, adv):
        with scores.reverse_only():  # reverse-mode gradients only (lensjax.kernels.scores)
            (loss, (pg, kl)), g = jax.value_and_grad(
                lambda zz: policy_loss(model_cfg, cfg, zz, params, dec, batch, adv), has_aux=True)(z)
        updates, opt_state = opt.update(g, opt_state, z)
        return optax.apply_updates(z, updates), opt_state, {"loss": loss, "pg": pg, "kl": kl,
                                                             "grad_norm": optax.tree.norm(g)}

    return update


def advantages(correct: np.ndarray, cfg: SVFConfig) -> tuple[np.ndarray, np.ndarray]:
    """(rewards, advantages) from 0/1 correctness."""
    hi, lo = REWARDS[cfg.reward]
    r = np.where(correct > 0.5, hi, lo).astype(np.float32)
    adv = r - r.mean() if cfg.baseline == "mean" else r.copy()
    if cfg.normalise_rewards:
        adv = adv / (r.std() + 1e-6)
    return r, adv


def batch_of(r: Rollout) -> dict:
    return {"ids": jnp.asarray(r.ids), "attn": jnp.asarray(r.attn), "target": jnp.asarray(r.target)}


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
def _on_mesh(mesh, model, dec, z, opt_state):
    """Parameters by the logical-axis rules (left as they are when already on ``mesh``), the
    decomposition, z and the optimiser state replicated."""
    params = params_on(model.params, model.config, mesh)
    z, opt_state, dec = replicate((z, opt_state, dec), mesh)
    return params, dec, z, opt_state


def train(model, dec: core.Decomposition, task: Task, val: Task, cfg: SVFConfig, out: str | os.PathLike,
          on_step: Callable | None = None, mesh: jax.sharding.Mesh | None = None) -> dict:
    """Train an expert; resumes from ``out`` if it holds a state. Returns the summary dict, and
    writes ``out/best.safetensors`` (the best z by validation accuracy).

    With ``mesh``: the rollouts, the validation batches and the policy-gradient batch are split
    over its ``data`` axis (``batch_prompts × samples_per_prompt`` and ``eval_batch`` must be
    divisible by it), the parameters follow the
    logical-axis rules (load the model with the same mesh to avoid a copy), and z, its optimiser
    state and the decomposition are replicated."""
    core.check_model(model.config)
    out = Path(out)
    z = core.init_z(dec, cfg.parameterisation, jax.random.key(cfg.seed))
    opt = make_optimizer(cfg)
    opt_state = opt.init(z)
    info = {"best_acc": None, "best_step": None, "history": []}
    start = 0
    if (out / "state.json").exists():
        z, opt_state, info = load_state(out, z, opt_state)
        start = info["step"]
    params = model.params
    n_roll = cfg.batch_prompts * cfg.samples_per_prompt
    if mesh is not None:
        if n_roll % data_size(mesh):
            raise ValueError(f"batch_prompts × samples_per_prompt = {n_roll} rollouts per step is not divisible by "
                             f"the mesh's data axis ({data_size(mesh)})")
        if cfg.eval_batch % data_size(mesh):
            raise ValueError(f"eval_batch {cfg.eval_batch} is not divisible by the mesh's data axis ({data_size(mesh)})")
        params, dec, z, opt_state = _on_mesh(mesh, model, dec, z, opt_state)
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        return _train_loop(model, params, dec, task, val, cfg, out, on_step, mesh, z, opt_state, info, start)


def _train_loop(model, params, dec, task, val, cfg, out, on_step, mesh, z, opt_state, info, start):
    from lensjax.svf.experts import save_expert

    update = _update_fn(model.config, cfg)
    n_roll = cfg.batch_prompts * cfg.samples_per_prompt
    udec = dec if cfg.compute_dtype == "float32" else core.cast_factors(dec, cfg.compute_dtype)

    def validate(zz):
        return evaluate(model, policy_params(params, dec, zz, cfg, n_tokens=cfg.eval_batch), val,
                        max_new_tokens=cfg.max_new_tokens, batch=cfg.eval_batch, mesh=mesh)["accuracy"]

    whash = core.content_hash(params, dec.paths)
    if info["best_acc"] is None:
        info["best_acc"] = info["base_acc"] = validate(z)
        info["best_step"] = 0
        save_expert(out / "best.safetensors", z, model, cfg, task.name, {"val_accuracy": info["best_acc"], "step": 0},
                    whash)
    for step in range(start, cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        pick = rng.choice(len(task), cfg.batch_prompts, replace=len(task) < cfg.batch_prompts)
        prompts = [task.prompts[i] for i in pick for _ in range(cfg.samples_per_prompt)]
        refs = [task.references[i] for i in pick for _ in range(cfg.samples_per_prompt)]
        roll = complete(model, policy_params(params, dec, z, cfg, n_tokens=n_roll), task, prompts,
                        max_new_tokens=cfg.max_new_tokens, temperature=0.0 if cfg.greedy_rollouts else cfg.temperature,
                        top_p=cfg.top_p, key=jax.random.fold_in(jax.random.key(cfg.seed), step),
                        prompt_bucket=cfg.prompt_bucket, completion_bucket=cfg.completion_bucket, mesh=mesh)
        r, adv = advantages(task.score_many(roll.texts, refs), cfg)
        batch, adv = batch_of(roll), jnp.asarray(adv)
        if mesh is not None:
            sharded = shard_batch(dict(batch, adv=np.asarray(adv)), mesh)
            adv = sharded.pop("adv")
            batch = sharded
        z, opt_state, stats = update(z, opt_state, params, udec, batch, adv)
        rec = {"step": step + 1, "reward": float(r.mean()), "shape": list(roll.ids.shape),
               **{k: float(v) for k, v in stats.items()}}
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
