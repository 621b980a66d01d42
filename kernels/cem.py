"""Batched cross-entropy-method (CEM) search: pure, jitted, seeded, vmappable over searches.

A search keeps a diagonal Gaussian over a ``D``-vector (Transformer²'s few-shot adaptation
searches the mixing weights α of K experts, D = K or K × targets). One generation:

1. :func:`sample` draws ``pop_size`` members ``mean + std · ε``; with ``keep_best`` member 0 is
   the best member found so far (re-evaluated, as the reference code's ``re_eval_best``);
2. the caller evaluates the members (:func:`decode` maps them into the bounds) — in lensjax one
   batched forward for the whole population;
3. :func:`update` ranks them by fitness, ties broken by a second score (lexicographic, higher is
   better, NaN ranks last), and moves mean/std to the elites' mean and standard deviation
   (unbiased, as ``torch.std``), optionally smoothed (``new = (1 − s)·elite + s·old``, the
   reference's ``optim_ema``) and with a floor on std; the generation's best member becomes
   ``best``.

Bounds ``[lo, hi]``:

* ``"clamp"`` (the reference's): members are clipped into the bounds and the distribution is
  fitted to the clipped values;
* ``"sigmoid"`` (reparameterisation): the Gaussian lives in an unconstrained space and members
  are ``lo + (hi − lo)·sigmoid(u)``; :func:`init` takes the mean in the bounded space and maps it
  through the logit, ``std`` is in the unconstrained space.

:func:`search` runs whole generations under ``lax.scan`` for a jittable fitness function; every
function here is a pure function of arrays (``pop_size`` / ``n_elites`` static), so
``jax.vmap`` runs independent searches side by side.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
BOUNDS = ("clamp", "sigmoid")


class CEMState(NamedTuple):
    mean: Array  # [D] in the search space
    std: Array  # [D]
    best: Array  # [D] best member so far, search space
    best_fitness: Array  # [] (−inf before the first update)
    best_tiebreak: Array  # []
    key: Array
    generation: Array  # [] int32


def _check_bounds(bounds: str):
    if bounds not in BOUNDS:
        raise ValueError(f"unknown bounds {bounds!r}; choose one of {', '.join(BOUNDS)}")


def init(mean, std, key, *, lo: float = 0.0, hi: float = 1.0, bounds: str = "clamp") -> CEMState:
    """A search state around ``mean`` [D] (in the bounded space) with ``std`` (scalar or [D])."""
    _check_bounds(bounds)
    mean = jnp.asarray(mean, jnp.float32)
    if bounds == "sigmoid":
        f = jnp.clip((mean - lo) / (hi - lo), 1e-6, 1 - 1e-6)
        mean = jnp.log(f) - jnp.log1p(-f)
    else:
        mean = jnp.clip(mean, lo, hi)
    std = jnp.broadcast_to(jnp.asarray(std, jnp.float32), mean.shape)
    return CEMState(mean, std, mean, jnp.float32(-jnp.inf), jnp.float32(-jnp.inf), key, jnp.int32(0))


def decode(members, *, lo: float = 0.0, hi: float = 1.0, bounds: str = "clamp") -> Array:
    """Members [..., D] of the search space as values inside the bounds."""
    _check_bounds(bounds)
    if bounds == "sigmoid":
        return lo + (hi - lo) * jax.nn.sigmoid(members)
    return jnp.clip(members, lo, hi)


@functools.partial(jax.jit, static_argnames=("pop_size", "bounds", "keep_best"))
def sample(state: CEMState, pop_size: int, *, lo: float = 0.0, hi: float = 1.0, bounds: str = "clamp",
           keep_best: bool = True) -> tuple[Array, CEMState]:
    """(members [pop_size, D] in the search space, state with its key advanced)."""
    key, sub = jax.random.split(state.key)
    eps = jax.random.normal(sub, (pop_size,) + state.mean.shape, jnp.float32)
    pop = state.mean + state.std * eps
    if bounds == "clamp":
        pop = jnp.clip(pop, lo, hi)
    if keep_best:
        pop = pop.at[0].set(state.best)
    return pop, state._replace(key=key)


def rank(fitness, tiebreak=None) -> Array:
    """Member indices from best to worst: by fitness, ties by ``tiebreak`` (both higher-better;
    NaN ranks last); remaining ties by index."""
    f = jnp.where(jnp.isnan(fitness), -jnp.inf, fitness)
    t = jnp.zeros_like(f) if tiebreak is None else jnp.where(jnp.isnan(tiebreak), -jnp.inf, tiebreak)
    idx = jnp.arange(f.shape[0])
    return jnp.lexsort((idx, -t, -f))  # last key is primary


@functools.partial(jax.jit, static_argnames=("n_elites",))
def update(state: CEMState, members, fitness, tiebreak=None, *, n_elites: int, std_floor: float = 0.0,
           smoothing: float = 0.0) -> CEMState:
    """Refit mean/std to the ``n_elites`` best members; the generation's best becomes ``best``."""
    if n_elites < 2 or n_elites > members.shape[0]:
        raise ValueError(f"n_elites must be in [2, pop_size={members.shape[0]}]; got {n_elites}")
    order = rank(fitness, tiebreak)
    elites = members[order[:n_elites]]
    mean = jnp.mean(elites, axis=0)
    std = jnp.std(elites, axis=0, ddof=1)
    mean = (1.0 - smoothing) * mean + smoothing * state.mean
    std = jnp.maximum((1.0 - smoothing) * std + smoothing * state.std, std_floor)
    top = order[0]
    t = jnp.zeros_like(fitness) if tiebreak is None else tiebreak
    return state._replace(mean=mean, std=std, best=members[top], best_fitness=fitness[top].astype(jnp.float32),
                          best_tiebreak=t[top].astype(jnp.float32), generation=state.generation + 1)


def search(fitness_fn: Callable[[Array], tuple[Array, Array]], state: CEMState, *, generations: int,
           pop_size: int, n_elites: int, lo: float = 0.0, hi: float = 1.0, bounds: str = "clamp",
           keep_best: bool = True, std_floor: float = 0.0, smoothing: float = 0.0) -> tuple[CEMState, dict]:
    """``generations`` rounds under ``lax.scan`` for a jittable ``fitness_fn(values [P, D]) ->
    (fitness [P], tiebreak [P])``; returns the final state and per-generation best fitness and mean."""

    def step(st, _):
        pop, st = sample(st, pop_size, lo=lo, hi=hi, bounds=bounds, keep_best=keep_best)
        fit, tie = fitness_fn(decode(pop, lo=lo, hi=hi, bounds=bounds))
        st = update(st, pop, fit, tie, n_elites=n_elites, std_floor=std_floor, smoothing=smoothing)
        return st, {"best_fitness": st.best_fitness, "mean": decode(st.mean, lo=lo, hi=hi, bounds=bounds)}

    return jax.lax.scan(step, state, None, length=generations)
