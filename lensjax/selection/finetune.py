"""Progressive fine-tuning: measure each candidate's loss curve on nested subsets.

For a candidate and a ladder size D, fine-tune from the pretrained weights on the first D examples
of one fixed shuffled order (so subsets are nested), with Optax AdamW, then evaluate the mean
target-token loss on the held-out split. Steps rule (documented, configurable):

    t(D) = max(min_steps, ceil(epochs · D / batch_size))

i.e. ``epochs`` passes over the D examples in batches of ``batch_size``. The learning rate warms
up linearly over ``warmup`` × t steps and then decays to ``final_lr`` × η (``schedule`` cosine,
linear or constant); it is fed to the jitted steps as an argument (``optax.inject_hyperparams``),
so sizes of different t share the compiled programs. With ``patience > 0`` and a development split, the
run evaluates it every ``eval_every`` steps (0: t/10), stops after ``patience`` evaluations without
improvement and returns the best weights; their step is the t that is recorded. Batches are right padded
to a length bucket (multiples of 16), so the jitted train programs compile once per bucket, not
per size. The steps run ``steps_per_call`` (8) at a time in one jitted call (a ``lax.scan`` over
stacked batches, :func:`make_train_steps`) wherever that many fit before the next evaluation,
one at a time otherwise: XLA's CPU runtime maps and faults in fresh memory for each call's
temporaries, which a call of 8 steps pays once. Results go to a
:class:`~lensjax.selection.store.CurvesStore`, rewritten atomically after every (candidate,
size), so a killed run resumes where it stopped and loses nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lensjax.kernels import scores, xla
from lensjax.config import ModelConfig, check_compute_dtype, compute_config
from lensjax.selection.data import Tokenized, bucket, make_batch, scored_count
from lensjax.models.lm import mean_target_loss, with_logit_positions
from lensjax.parallel import shard_batch, shard_params
from lensjax.selection.store import CurvesStore  # noqa: F401 - re-exported (its home until it had a module)


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
    # AdamW steps per jitted call (lax.scan over stacked batches; the numbers of one step per call
    # to float32 rounding). Not part of the protocol: record() leaves it out. Measured on a 2-core
    # Xeon, 10M Llama, 8 x 128 tokens: 8 per call took a step from 0.245 to 0.203 s in bf16 mixed
    # precision and from 0.485 to 0.443 s in float32 (make_train_steps: XLA's per-call buffers).
    # The scanned program is a second compile (≈ 2.5 s there, once per model and length bucket,
    # shared by every size of the ladder), so it pays off after ≈ 60-80 steps; 1 turns it off.
    steps_per_call: int = 8

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant; got {self.schedule!r}")
        if not 0 <= self.warmup < 1 or not 0 <= self.final_lr <= 1:
            raise ValueError("need 0 <= warmup < 1 and 0 <= final_lr <= 1")
        if self.patience < 0 or self.eval_every < 0 or self.n_dev < 0:
            raise ValueError("patience, eval_every and n_dev must be >= 0")
        if self.steps_per_call < 1:
            raise ValueError(f"steps_per_call must be >= 1; got {self.steps_per_call}")
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
        """The protocol, for the curves' ``.meta.json`` (without ``steps_per_call``: how the steps
        are dispatched does not change them)."""
        out = dataclasses.asdict(self)
        out.pop("steps_per_call")
        return out


def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation, compute_dtype: str = "float32"):
    """Jitted ``(params, opt_state, batch) -> (params, opt_state, loss)``; params and optimiser
    state are donated (updated in place). ``compute_dtype="bfloat16"``: mixed precision (the
    matmuls' operands in bfloat16 with float32 accumulation; weights, gradients, AdamW state and
    the loss in float32)."""
    return _train_step(compute_config(config, compute_dtype), optimizer)


def make_train_steps(config: ModelConfig, optimizer: optax.GradientTransformation, compute_dtype: str = "float32"):
    """Jitted ``(params, opt_state, batches) -> (params, opt_state, losses)``: k steps of
    :func:`make_train_step` in one call (``lax.scan``), one per entry of ``batches`` (the batch
    dict with a leading axis of k; ``losses`` [k]). The results are those of k single steps to
    float32 rounding (XLA may fuse the scanned step differently); one program per k. What it
    saves is per call: XLA's CPU runtime maps fresh memory for every execution's temporaries (the
    scanned layers' activations) and faults it in 4 KiB at a time, so k steps per call pay for
    that once (see ``FinetuneConfig.steps_per_call``)."""
    return _train_steps(compute_config(config, compute_dtype), optimizer)


@functools.lru_cache(maxsize=32)
def adamw(lr: float, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """One optimiser object per setting, so the jitted step (keyed on it) compiles once."""
    return optax.adamw(lr, weight_decay=weight_decay)


@functools.lru_cache(maxsize=32)
def scheduled_adamw(weight_decay: float = 0.0) -> optax.GradientTransformation:
    """AdamW whose learning rate is a state entry set per step (one compile for every schedule)."""
    return optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=weight_decay)


def _update(config, optimizer, params, opt_state, batch, lr=None):
    """One AdamW step on ``batch``; ``lr``: the learning rate of this step (an
    ``optax.inject_hyperparams`` state), None: the optimiser's own."""
    if lr is not None:
        opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": lr})
    with scores.reverse_only():  # reverse-mode gradients only: the faster key gradient (kernels.scores)
        loss, grads = jax.value_and_grad(lambda p: mean_target_loss(config, p, batch))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _program(config, optimizer, scanned: bool):
    """The jitted train program, params and optimiser state donated: one step ``(params,
    opt_state, batch[, lr])``, or (``scanned``) one step per leading entry of ``batch[, lr]``."""
    def step(params, opt_state, *xs):
        return _update(config, optimizer, params, opt_state, *xs)

    def steps(params, opt_state, *xs):
        def one(carry, x):
            p, s, loss = step(*carry, *x)
            return (p, s), loss

        (params, opt_state), losses = jax.lax.scan(one, (params, opt_state), xs)
        return params, opt_state, losses

    return xla.jit(steps if scanned else step, donate_argnums=(0, 1), mixed=bool(config.matmul_dtype))


@functools.lru_cache(maxsize=32)
def _train_step(config, optimizer):
    return _program(config, optimizer, scanned=False)


@functools.lru_cache(maxsize=32)
def _train_steps(config, optimizer):
    return _program(config, optimizer, scanned=True)


_scheduled_step, _scheduled_steps = _train_step, _train_steps  # the same programs, given an lr per step


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
    """Mean negative log-likelihood per target token over ``data`` (token-weighted; the head runs
    on the scored positions only, ``lensjax.models.lm.logit_positions``). With ``mesh``, each
    batch is split over its ``data`` axis (``params`` as placed by the caller)."""
    if len(data) == 0:
        raise ValueError("no held-out examples to evaluate on")
    fn = _eval_sums(config)
    tot, cnt = 0.0, 0.0
    order = np.argsort([len(x) for x in data.ids], kind="stable")  # similar lengths share a bucket
    # logits only at the scored positions: one K for the whole set, so one program per length bucket
    n_keep = bucket(max(scored_count(data, i) for i in range(len(data))))
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        b = make_batch(data, idx, pad_id)
        if len(idx) < batch_size:  # keep one batch shape per bucket: pad with empty rows
            extra = batch_size - len(idx)
            b = {k: np.concatenate([v, np.zeros((extra,) + v.shape[1:], v.dtype)]) for k, v in b.items()}
        if n_keep < b.get("dec_ids", b["ids"]).shape[1]:
            b = with_logit_positions(b, length=n_keep)
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
    cfg = compute_config(config, ft.compute_dtype)
    step, steps = _scheduled_step(cfg, opt), _scheduled_steps(cfg, opt)
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
    # logits only where targets are scored, K rows per sample for the whole run (one program)
    n_keep = bucket(max(scored_count(data, i) for i in pool))
    perm, pos = rng.permutation(pool), 0

    def draw():
        """The next batch, its examples drawn in epochs over ``pool`` (a fresh random order each)."""
        nonlocal perm, pos
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
        return with_logit_positions(b, length=n_keep) if n_keep < max_len else b

    i = 0
    while i < t:
        # k steps per call where they fit before the next evaluation (and the end), else one:
        # two programs in all, whatever t and eval_every are
        stop = min(t, (i // every + 1) * every) if early else t
        k = ft.steps_per_call if ft.steps_per_call > 1 and i + ft.steps_per_call <= stop else 1
        bs = [draw() for _ in range(k)]
        lrs = np.asarray([ft.lr_at(j, t) for j in range(i, i + k)], np.float32)
        with _mesh_context(mesh):
            if k == 1:
                b = bs[0] if mesh is None else shard_batch(bs[0], mesh)
                p, state, losses = step(p, state, b, lrs[0])
            else:
                b = {key: np.stack([x[key] for x in bs]) for key in bs[0]}
                if mesh is not None:
                    b = shard_batch(b, mesh, axis=1)
                p, state, losses = steps(p, state, b, lrs)
        if on_step is not None:  # after the call: k at a time
            for j, loss in enumerate(np.atleast_1d(np.asarray(losses))):
                on_step(i + j, loss)
        i += k
        if early and (i % every == 0 or i == t):
            dl = evaluate(config, p, dev, ft.eval_batch_size, pad_id, mesh=mesh)
            if history is not None:
                history.append((i, dl))
            if dl < best:
                best, best_t, bad = dl, i, 0
                best_p = jax.tree.map(jnp.copy, p)
            else:
                bad += 1
                if bad >= ft.patience:
                    break
    if early and best_p is not None:
        return best_p, best_t
    return p, t

