"""Progressive fine-tuning: measure each candidate's loss curve on nested subsets.

For a candidate and a ladder size D, fine-tune from the pretrained weights on the first D examples
of one fixed shuffled order (so subsets are nested), with Optax AdamW, then evaluate the mean
target-token loss on the held-out split. Steps rule (documented, configurable):

    t(D) = max(min_steps, ceil(epochs · D / batch_size))

i.e. ``epochs`` passes over the D examples in batches of ``batch_size``. The learning rate warms
up linearly over ``warmup`` × t steps and then decays to ``final_lr`` × η (``schedule`` cosine,
linear or constant); it is fed to the jitted step as an argument (``optax.inject_hyperparams``), so
sizes of different t share one compiled step. With ``patience > 0`` and a development split, the
run evaluates it every ``eval_every`` steps (0: t/10), stops after ``patience`` evaluations without
improvement and returns the best weights; their step is the t that is recorded. Batches are right padded
to a length bucket (multiples of 16), so the jitted train step compiles once per bucket, not per
size. Results go to a :class:`CurvesStore`, rewritten atomically after every (candidate, size), so a
killed run resumes where it stopped and loses nothing.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lensjax.kernels import xla
from lensjax.config import ModelConfig, check_compute_dtype, compute_config
from lensjax.io import atomic_write
from lensjax.selection.curves import Curves, read_curves
from lensjax.selection.data import Tokenized, bucket, make_batch
from lensjax.models.lm import mean_target_loss
from lensjax.parallel import shard_batch, shard_params


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    lr: float = 1e-4  # η
    weight_decay: float = 0.0
    batch_size: int = 8
    epochs: float = 1.0
    min_steps: int = 10
    max_len: int = 128
    eval_batch_size: int = 32
    seed: int = 0
    schedule: str = "cosine"  # cosine | linear | constant (after the warm-up)
    warmup: float = 0.1  # fraction of t(D)
    final_lr: float = 0.0  # fraction of lr at the end of the decay
    patience: int = 0  # early stopping: evaluations without improvement (0: off)
    eval_every: int = 0  # steps between development evaluations (0: max(1, t // 10))
    n_dev: int = 200  # development examples held out of the training pool (with patience > 0)
    # "float32", or "bfloat16": mixed precision (bf16 matmul operands, float32 accumulation,
    # float32 weights, AdamW state and loss; lensjax.kernels.mixed)
    compute_dtype: str = "float32"

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant; got {self.schedule!r}")
        if not 0 <= self.warmup < 1 or not 0 <= self.final_lr <= 1:
            raise ValueError("need 0 <= warmup < 1 and 0 <= final_lr <= 1")
        if self.patience < 0 or self.eval_every < 0 or self.n_dev < 0:
            raise ValueError("patience, eval_every and n_dev must be >= 0")
        check_compute_dtype(self.compute_dtype)

    def steps(self, d: int) -> int:
        return max(self.min_steps, math.ceil(self.epochs * d / self.batch_size))

    def lr_at(self, i: int, t: int) -> float:
        """Learning rate of step i (0-based) of a t-step run."""
        w = int(round(self.warmup * t))
        if i < w:
            return self.lr * (i + 1) / w
        if self.schedule == "constant" or t - w <= 1:
            return self.lr
        u = (i - w) / (t - w - 1)
        frac = 0.5 * (1 + math.cos(math.pi * u)) if self.schedule == "cosine" else 1.0 - u
        return self.lr * (self.final_lr + (1.0 - self.final_lr) * frac)

    def record(self) -> dict:
        """The protocol, for the curves' ``.meta.json``."""
        return dataclasses.asdict(self)


def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation, compute_dtype: str = "float32"):
    """Jitted ``(params, opt_state, batch) -> (params, opt_state, loss)``; params and optimiser
    state are donated (updated in place). ``compute_dtype="bfloat16"``: mixed precision (the
    matmuls' operands in bfloat16 with float32 accumulation; weights, gradients, AdamW state and
    the loss in float32)."""
    return _train_step(compute_config(config, compute_dtype), optimizer)


@functools.lru_cache(maxsize=32)
def adamw(lr: float, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """One optimiser object per setting, so the jitted step (keyed on it) compiles once."""
    return optax.adamw(lr, weight_decay=weight_decay)


@functools.lru_cache(maxsize=32)
def scheduled_adamw(weight_decay: float = 0.0) -> optax.GradientTransformation:
    """AdamW whose learning rate is a state entry set per step (one compile for every schedule)."""
    return optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=weight_decay)


@functools.lru_cache(maxsize=32)
def _scheduled_step(config, optimizer):
    @functools.partial(xla.jit, donate_argnums=(0, 1), mixed=bool(config.matmul_dtype))
    def step(params, opt_state, batch, lr):
        opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": lr})
        loss, grads = jax.value_and_grad(lambda p: mean_target_loss(config, p, batch))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


@functools.lru_cache(maxsize=32)
def _train_step(config, optimizer):
    @functools.partial(xla.jit, donate_argnums=(0, 1), mixed=bool(config.matmul_dtype))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: mean_target_loss(config, p, batch))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


@functools.lru_cache(maxsize=32)
def _eval_sums(config):
    @xla.jit
    def sums(params, batch):
        from lensjax.models.lm import token_logprobs

        lp, w = token_logprobs(config, params, batch)
        return -jnp.sum(lp * w), jnp.sum(w)

    return sums


def evaluate(config: ModelConfig, params, data: Tokenized, batch_size: int = 32, pad_id: int = 0,
             mesh: jax.sharding.Mesh | None = None) -> float:
    """Mean negative log-likelihood per target token over ``data`` (token-weighted). With
    ``mesh``, each batch is split over its ``data`` axis (``params`` as placed by the caller)."""
    if len(data) == 0:
        raise ValueError("no held-out examples to evaluate on")
    fn = _eval_sums(config)
    tot, cnt = 0.0, 0.0
    order = np.argsort([len(x) for x in data.ids], kind="stable")  # similar lengths share a bucket
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        b = make_batch(data, idx, pad_id)
        if len(idx) < batch_size:  # keep one batch shape per bucket: pad with empty rows
            extra = batch_size - len(idx)
            b = {k: np.concatenate([v, np.zeros((extra,) + v.shape[1:], v.dtype)]) for k, v in b.items()}
        if mesh is not None:
            b = shard_batch(b, mesh)
        with _mesh_context(mesh):
            l, c = fn(params, b)
        tot += float(l)
        cnt += float(c)
    return tot / max(cnt, 1.0)


def _mesh_context(mesh):
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def finetune(config: ModelConfig, params, data: Tokenized, order: np.ndarray, d: int, ft: FinetuneConfig,
             pad_id: int = 0, on_step=None, dev: Tokenized | None = None, history: list | None = None,
             mesh: jax.sharding.Mesh | None = None):
    """Fine-tune a copy of ``params`` on examples ``order[:d]``; returns (params, steps).

    With ``ft.patience > 0`` and ``dev`` given, stops early on the development loss and returns
    the best weights and their step. ``history`` (a list) receives ``(step, dev loss)`` pairs.
    With ``mesh``, the copy is placed by the logical-axis rules (parameters on ``fsdp`` /
    ``model``; AdamW's moments follow them) and every batch is split over ``data``; the global
    batch is the same as on one device, so are the numbers (to float32 summation order). In a
    multi-process run every process calls this with the same arguments.
    """
    if d > len(order):
        raise ValueError(f"size {d} exceeds the {len(order)} training examples")
    if mesh is not None and ft.batch_size % mesh.shape.get("data", 1):
        raise ValueError(f"batch_size {ft.batch_size} is not divisible by the mesh's data axis ({mesh.shape['data']})")
    opt = scheduled_adamw(ft.weight_decay)
    step = _scheduled_step(compute_config(config, ft.compute_dtype), opt)
    if mesh is None:
        p = jax.tree.map(jnp.copy, params)  # the pretrained weights stay untouched (donation)
    else:
        p = shard_params(params, config, mesh)  # fresh buffers: donation leaves ``params`` alone
    with _mesh_context(mesh):
        state = opt.init(p)
    t = ft.steps(d)
    early = ft.patience > 0 and dev is not None and len(dev) > 0
    every = ft.eval_every or max(1, t // 10)
    best, best_t, best_p, bad = math.inf, 0, None, 0
    rng = np.random.default_rng(ft.seed + d)
    pool = np.asarray(order[:d])
    max_len = bucket(max(len(data.ids[i]) for i in pool))
    perm, pos = rng.permutation(pool), 0
    for i in range(t):
        if pos + ft.batch_size > len(perm):
            take = perm[pos:]
            perm, pos = rng.permutation(pool), 0
            need = ft.batch_size - len(take)
            take = np.concatenate([take, perm[:need]])
            pos = need
        else:
            take = perm[pos: pos + ft.batch_size]
            pos += ft.batch_size
        if len(take) < ft.batch_size:  # d < batch size: repeat examples
            take = np.resize(take, ft.batch_size)
        b = make_batch(data, take, pad_id, length=max_len)
        if mesh is not None:
            b = shard_batch(b, mesh)
        with _mesh_context(mesh):
            p, state, loss = step(p, state, b, np.float32(ft.lr_at(i, t)))
        if on_step is not None:
            on_step(i, loss)
        if early and ((i + 1) % every == 0 or i + 1 == t):
            dl = evaluate(config, p, dev, ft.eval_batch_size, pad_id, mesh=mesh)
            if history is not None:
                history.append((i + 1, dl))
            if dl < best:
                best, best_t, bad = dl, i + 1, 0
                best_p = jax.tree.map(jnp.copy, p)
            else:
                bad += 1
                if bad >= ft.patience:
                    break
    if early and best_p is not None:
        return best_p, best_t
    return p, t


class CurvesStore:
    """Measured losses, written atomically as a curves CSV (the shipped format) plus a JSON
    sidecar with the steps t and learning rate η of each measurement.

    Several processes may record into the same files (candidates run as concurrent jobs): each
    :meth:`record` holds an exclusive ``flock`` on ``<csv>.lock``, re-reads what the others
    wrote, adds its cell and rewrites both files, so no measurement is lost."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta_path = self.path.with_name(self.path.name + ".meta.json")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._read()

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read(self):
        self.loss: dict[str, dict[int, float]] = {}
        self.meta: dict[str, dict] = {}
        if self.path.exists():
            c = read_curves(self.path)
            for i, m in enumerate(c.models):
                self.loss[m] = {int(s): float(v) for s, v in zip(c.sizes, c.loss[i]) if np.isfinite(v)}
            if self.meta_path.exists():
                self.meta = json.loads(self.meta_path.read_text())

    def has(self, model: str, size: int) -> bool:
        return size in self.loss.get(model, {})

    def record(self, model: str, size: int, loss: float, *, steps: int, lr: float, params: int | None = None,
               family: str | None = None, tokens_per_sample: float | None = None, **extra):
        """One measurement; ``extra`` (steps planned, development evaluations, samples seen, the
        protocol) goes into the ``.meta.json`` cell as it is."""
        with self._locked():
            self._read()  # what other processes recorded meanwhile
            self.loss.setdefault(model, {})[int(size)] = float(loss)
            m = self.meta.setdefault(model, {"sizes": {}})
            m["sizes"][str(int(size))] = {"steps": int(steps), "lr": float(lr)} | extra
            if params is not None:
                m["params"] = int(params)
            if family is not None:
                m["family"] = family
            if tokens_per_sample is not None:
                m["tokens_per_sample"] = float(tokens_per_sample)
            self.write()

    def write(self):
        sizes = sorted({s for v in self.loss.values() for s in v})
        rows = [["config name", *map(str, sizes), "size", "family"]]
        for m, v in self.loss.items():
            meta = self.meta.get(m, {})
            rows.append([m, *[repr(v[s]) if s in v else "" for s in sizes], str(meta.get("params", "")),
                         meta.get("family", "")])
        buf = io.StringIO()
        csv.writer(buf).writerows(rows)
        atomic_write(self.path, buf.getvalue(), newline="")
        atomic_write(self.meta_path, json.dumps(self.meta, indent=1))

    def curves(self) -> Curves:
        return read_curves(self.path)

    def steps(self, model: str, size: int) -> int:
        """Optimiser steps t of the measurement (the early-stopping step when it stopped early)."""
        try:
            return int(self.meta[model]["sizes"][str(int(size))]["steps"])
        except KeyError:
            raise KeyError(f"{self.meta_path}: no steps recorded for {model!r} at size {int(size)}; the curves "
                           "CSV and its .meta.json disagree (delete both to re-measure)") from None

    def cell(self, model: str, size: int) -> dict:
        return dict(self.meta.get(model, {}).get("sizes", {}).get(str(int(size)), {}))
