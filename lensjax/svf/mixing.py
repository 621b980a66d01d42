"""Mixtures of SVF experts and per-row experts in one batched forward pass.

**Mixing.** K experts, each a z per target matrix, are stacked once into an :class:`ExpertSet`
holding their multipliers g_k = g(z_k) (the quantity each expert was trained through: z itself for
the ``paper`` parameterisation, the Σσ-preserving sigmoid mask for ``reference``). A mixture with
weights α — one per expert ([K]) or one per expert per target matrix ([K, M], M = len(paths)) —
is formed on the multipliers,

    g_α = Σ_k α̂_k g_k,   α̂ = α / Σ_k α_k  (``normalise``, the reference's ``norm_coeffs``),

so a one-hot α gives exactly that expert. ``space="raw_z"`` reproduces the released code instead:
it mixes the raw z and uses the result as the multiplier without the transform the experts were
trained with (its ``WeightedCombination.get_mask`` is the identity), keeping only the Σσ rescale
of the ``reference`` parameterisation — so a one-hot α of a ``reference`` expert does *not* give
the expert. (With ``paper`` experts, g(z) = z and the two spaces agree.) A zero or negative sum
with ``normalise`` falls back to equal weights.

**Per-row experts.** :func:`row_params` builds a parameter tree in which batch row b runs its own
multiplier set: every target leaf keeps W and the shared factors U, Vᵀ of the base decomposition,
plus ``svf_d`` [L, E, r] (σ ⊙ (g_e − 1) for E distinct sets) and ``svf_rows`` [L, B] (the set of
each row); the forward pass (``lensjax.models.transformer._dense``) gathers each row's scale, so a
whole CEM population or a batch of requests routed to different experts is one jitted call —
never E dense copies of W′. Memory is W + U + Vᵀ once, E × L × r per target for the sets, and the
activations of the rows; :func:`generate_rows` and :func:`loglik_rows` cut the rows into chunks of
``max_rows`` (the last one padded, so every chunk has one shape).

**Many tokens per set.** The factored apply costs 2·N·r·(in + out) extra FLOPs per target for N
tokens, recomposing W′ = W + U diag(σ(g − 1)) Vᵀ once costs 2·in·r·out. When :func:`loglik_rows`
scores each set on many tokens (a CEM population's shots: every set's rows contiguous and equally
many, as ``np.repeat(np.arange(P), n)`` gives) and recomposition is the cheaper of the two by that
count, it recomposes instead, one set at a time under ``lax.map`` (memory: one W′, not E), and runs
the set's rows through the dense forward pass (``benchmarks/bench_cem.py``, a 4 × 256 Llama,
population 32 × 8 shots of 48 tokens: 1.36 s → 0.85 s per generation on 2 CPU cores).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec

from lensjax.kernels import svd as svd_kernel
from lensjax.kernels import xla
from lensjax.models.lm import sample_loglik
from lensjax.models.tree import flatten, nest
from lensjax.parallel import data_size, place, replicate, shard_batch, to_host
from lensjax.svf import core
from lensjax.svf.experts import check_expert, load_expert

SPACES = ("multipliers", "raw_z")


@dataclasses.dataclass(frozen=True)
class ExpertSet:
    """K experts of one base model: names (categories), raw z and multipliers [K, L, r] per path."""

    names: tuple[str, ...]
    z: dict  # path -> [K, L, r]
    g: dict  # path -> [K, L, r]
    parameterisations: tuple[str, ...]
    max_mults: tuple[float, ...]
    files: tuple[str, ...] = ()

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(self.g)

    def __len__(self):
        return len(self.names)

    def index(self, name: str) -> int:
        if name not in self.names:
            raise core.SVFError(f"no expert for category {name!r} (experts: {', '.join(self.names)})")
        return self.names.index(name)


def expert_set(dec: core.Decomposition, experts: Sequence[tuple[str, dict, dict]], files: Sequence[str] = ()) -> ExpertSet:
    """An :class:`ExpertSet` from ``(name, z, meta)`` triples; each z must match ``dec``."""
    if not experts:
        raise core.SVFError("no experts given")
    names = [n for n, _, _ in experts]
    if len(set(names)) != len(names):
        raise core.SVFError(f"duplicate expert names: {names}")
    zs, gs, params, mults = {p: [] for p in dec.paths}, {p: [] for p in dec.paths}, [], []
    for name, z, meta in experts:
        try:
            check_expert(z, dec)
        except core.SVFError as exc:
            raise core.SVFError(f"expert {name!r}: {exc}") from None
        par, mm = meta.get("parameterisation", "paper"), float(meta.get("max_mult", 1.0))
        g = core.scales(dec, z, par, mm)
        for p in dec.paths:
            zs[p].append(jnp.asarray(z[p], jnp.float32))
            gs[p].append(jnp.asarray(g[p], jnp.float32))
        params.append(par)
        mults.append(mm)
    return ExpertSet(tuple(names), {p: jnp.stack(v) for p, v in zs.items()}, {p: jnp.stack(v) for p, v in gs.items()},
                     tuple(params), tuple(mults), tuple(str(f) for f in files))


def expert_set_on(es: ExpertSet, mesh) -> ExpertSet:
    """``es`` with its z and multipliers replicated over ``mesh`` (every row may pick any set)."""
    return dataclasses.replace(es, z=replicate(es.z, mesh), g=replicate(es.g, mesh))


def load_experts(files: Mapping[str, str | os.PathLike], dec: core.Decomposition, params: dict) -> ExpertSet:
    """Load ``{category: expert file}``; every expert must target ``dec``'s matrices of these
    base weights (checked by the content hash stored with it)."""
    triples = []
    for name, f in files.items():
        z, meta = load_expert(f)
        try:
            check_expert(z, dec, meta, params)
        except core.SVFError as exc:
            raise core.SVFError(f"expert {name!r} ({f}): {exc}") from None
        triples.append((name, z, meta))
    return expert_set(dec, triples, [str(f) for f in files.values()])


def _weights(es: ExpertSet, alpha, normalise: bool) -> jax.Array:
    """α as [K, M] float32 (M = number of target paths), normalised over K when asked."""
    a = jnp.asarray(alpha, jnp.float32)
    K, M = len(es), len(es.paths)
    if a.ndim == 1:
        if a.shape[0] != K:
            raise core.SVFError(f"alpha has {a.shape[0]} weights for {K} experts")
        a = jnp.broadcast_to(a[:, None], (K, M))
    elif a.shape != (K, M):
        raise core.SVFError(f"alpha must be [K={K}] or [K={K}, matrices={M}]; got {tuple(a.shape)}")
    if normalise:
        tot = jnp.sum(a, axis=0, keepdims=True)
        a = jnp.where(tot > 0, a / jnp.where(tot > 0, tot, 1.0), 1.0 / K)
    return a


def mix(es: ExpertSet, dec: core.Decomposition, alpha, *, space: str = "multipliers", normalise: bool = True) -> dict:
    """Multipliers {path: [L, r]} of the mixture α ([K] or [K, M]); see the module notes."""
    if space not in SPACES:
        raise core.SVFError(f"unknown mixing space {space!r}; choose one of {', '.join(SPACES)}")
    a = _weights(es, alpha, normalise)
    out = {}
    for j, p in enumerate(es.paths):
        if space == "multipliers":
            out[p] = jnp.tensordot(a[:, j], es.g[p], axes=1)
        else:
            if len(set(es.parameterisations)) != 1:
                raise core.SVFError("raw-z mixing needs experts of one parameterisation; got "
                                    f"{sorted(set(es.parameterisations))}")
            m = jnp.tensordot(a[:, j], es.z[p], axes=1)
            if es.parameterisations[0] == "reference":  # the released code's rescale, no sigmoid
                s = dec.s[p]
                m = m * (jnp.sum(s, -1, keepdims=True) / jnp.sum(s * m, -1, keepdims=True))
            out[p] = m
    return out


def mix_many(es: ExpertSet, dec: core.Decomposition, alphas, *, space: str = "multipliers",
             normalise: bool = True) -> dict:
    """Multipliers {path: [P, L, r]} of P mixtures (alphas [P, K] or [P, K, M]), vmapped."""
    return jax.vmap(lambda a: mix(es, dec, a, space=space, normalise=normalise))(jnp.asarray(alphas, jnp.float32))


def with_identity(es: ExpertSet, dec: core.Decomposition) -> dict:
    """Multiplier sets {path: [K + 1, L, r]}: the K experts, then the base weights (g = 1)."""
    return {p: jnp.concatenate([es.g[p], jnp.ones_like(dec.s[p])[None]], 0) for p in es.paths}


def row_params(params: dict, dec: core.Decomposition, sets: Mapping[str, jax.Array], rows, mesh=None) -> dict:
    """The tree in which batch row b runs multiplier set ``rows[b]`` of ``sets`` ({path: [E, L, r]})
    through the factored apply. With ``mesh``, the row assignments are split over its ``data``
    axis like the batch they index (the sets, U and Vᵀ stay as placed)."""
    rows = np.asarray(rows, np.int32)
    flat = dict(flatten(params))
    E = None
    missing = [p for p in dec.paths if p not in sets]
    if missing:
        raise core.SVFError(f"multiplier sets lack the target matrices {missing}")
    for p in dec.paths:
        g = jnp.asarray(sets[p], jnp.float32)
        if g.ndim != 3 or g.shape[1:] != dec.s[p].shape:
            raise core.SVFError(f"multiplier sets for {p} must be [E, {', '.join(map(str, dec.s[p].shape))}]; "
                                f"got {tuple(g.shape)}")
        E = g.shape[0] if E is None else E
        L = g.shape[1]
        base = p[: -len("/w")]
        flat[base + "/svf_u"] = dec.u[p]
        flat[base + "/svf_vt"] = dec.vt[p]
        flat[base + "/svf_d"] = jnp.swapaxes(dec.s[p][None] * (g - 1.0), 0, 1)  # [L, E, r]
        lr = np.broadcast_to(rows[None], (L, rows.shape[0]))
        flat[base + "/svf_rows"] = jnp.asarray(lr) if mesh is None else place(lr, _row_sharding(mesh))
    return nest(flat)


def _row_sharding(mesh):
    return NamedSharding(mesh, PartitionSpec(None, "data" if data_size(mesh) > 1 else None))


def _chunks(n: int, max_rows: int | None, multiple: int = 1):
    """(start, end, padded size) of each chunk; the size is rounded up to ``multiple`` (the data axis)."""
    size = n if not max_rows or max_rows >= n else int(max_rows)
    size = -(-size // multiple) * multiple
    for s in range(0, n, size):
        yield s, min(s + size, n), size


def loglik_rows(model, dec: core.Decomposition, sets, rows, batch: Mapping[str, np.ndarray], *,
                max_rows: int | None = None, reduce: str = "mean", mesh=None, route: str = "auto") -> np.ndarray:
    """Per-row mean (or sum) log-likelihood of the batch's target tokens, row b under set rows[b]
    (``batch``: ids / attn / target [B, T], as :mod:`lensjax.models.lm`). With ``mesh``, each
    chunk's rows are split over its ``data`` axis (chunks padded to a multiple of it). ``route``:
    ``"factored"`` (per-row sets through the factored apply), ``"recompose"`` (each set's W′ once;
    needs every set's rows contiguous and equally many, one device) or ``"auto"``: recompose where
    that is possible and cheaper by FLOPs (module notes)."""
    if route not in ("auto", "factored", "recompose"):
        raise ValueError(f"unknown route {route!r}; choose auto, factored or recompose")
    rows = np.asarray(rows, np.int32)
    group = _group_size(rows) if mesh is None or data_size(mesh) == 1 else None
    possible = group is not None and (max_rows is None or max_rows >= group)
    if route == "recompose" and not possible:
        raise core.SVFError("route='recompose' needs every set's rows contiguous and equally many, on one device, "
                            "and max_rows at least that many")
    if route == "recompose" or (route == "auto" and possible and
                                _recompose_is_cheaper(dec, group * np.asarray(batch["ids"]).shape[1])):
        return _loglik_by_set(model, dec, sets, rows, batch, group, max_rows, reduce, mesh)
    out = []
    for s, e, size in _chunks(len(rows), max_rows, data_size(mesh)):
        pad = size - (e - s)
        take = lambda a: np.concatenate([a[s:e], np.repeat(a[e - 1:e], pad, 0)], 0)  # noqa: E731
        host = {k: take(np.asarray(v)) for k, v in batch.items()}
        b = {k: jnp.asarray(v) for k, v in host.items()} if mesh is None else shard_batch(host, mesh)
        p = row_params(model.params, dec, sets, take(rows), mesh)
        with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
            out.append(to_host(_loglik(model.config, p, b, reduce))[: e - s])
    return np.concatenate(out)


_loglik = xla.jit(sample_loglik, static_argnums=(0, 3), mixed="auto")  # bf16 parameters: lensjax.kernels.xla


def _group_size(rows: np.ndarray) -> int | None:
    """Rows per set when every set's rows are contiguous and equally many (each set once), else None."""
    if len(rows) == 0:
        return None
    starts = np.concatenate([[0], np.flatnonzero(np.diff(rows)) + 1])
    sizes = np.diff(np.concatenate([starts, [len(rows)]]))
    if np.any(sizes != sizes[0]) or len(np.unique(rows[starts])) != len(starts):
        return None
    return int(sizes[0])


def _recompose_is_cheaper(dec: core.Decomposition, tokens_per_set: int) -> bool:
    """Recomposing every target once (Σ in·r·out) against the factored extra work for the set's
    tokens (Σ N·r·(in + out)), as :func:`lensjax.kernels.svd.prefer_factored` compares one leaf."""
    recompose = factored = 0
    for p in dec.paths:
        L, d_in, r = dec.u[p].shape
        d_out = dec.vt[p].shape[-1]
        recompose += L * d_in * r * d_out
        factored += L * tokens_per_set * r * (d_in + d_out)
    return recompose < factored


def _loglik_by_set(model, dec, sets, rows, batch, group, max_rows, reduce, mesh):
    """:func:`loglik_rows` by recomposing each set's W′ once (see the module notes)."""
    missing = [p for p in dec.paths if p not in sets]
    if missing:
        raise core.SVFError(f"multiplier sets lack the target matrices {missing}")
    set_ids = rows[::group]
    per_chunk = len(set_ids) if max_rows is None else max(1, min(len(set_ids), int(max_rows) // group))
    out = []
    for s, e, size in _chunks(len(set_ids), per_chunk):
        pad = size - (e - s)  # the last chunk repeats its last set (and that set's rows)
        ids = np.concatenate([set_ids[s:e], np.repeat(set_ids[e - 1:e], pad)])
        b = {k: jnp.asarray(_pad_groups(np.asarray(v)[s * group:e * group], group, pad)) for k, v in batch.items()}
        g = {p: jnp.asarray(sets[p], jnp.float32)[ids] for p in dec.paths}
        with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
            ll = _loglik_sets(model.config, model.params, dict(dec.u), dict(dec.s), dict(dec.vt), g, b, reduce)
        out.append(to_host(ll)[: (e - s) * group])
    return np.concatenate(out)


def _pad_groups(a: np.ndarray, group: int, pad: int) -> np.ndarray:
    """``a`` (whole groups of ``group`` rows) with its last group repeated ``pad`` times."""
    return np.concatenate([a] + [a[-group:]] * pad, 0)


@functools.partial(xla.jit, static_argnums=(0, 7), mixed="auto")
def _loglik_sets(cfg, params, u, s, vt, g, batch, reduce):
    """Rows [E·R, T] of E sets (g {path: [E, L, r]}): set e's W′ recomposed once, its R rows scored."""
    E = jax.tree.leaves(g)[0].shape[0]
    per_set = jax.tree.map(lambda a: a.reshape((E, -1) + a.shape[1:]), batch)
    flat0 = dict(flatten(params))

    def one(args):
        ge, be = args
        flat = dict(flat0)
        for p, gp in ge.items():
            flat[p] = svd_kernel.recompose(flat0[p], u[p], s[p], vt[p], gp)
        return sample_loglik(cfg, nest(flat), be, reduce)

    return jax.lax.map(one, (g, per_set)).reshape(-1)


def generate_rows(model, dec: core.Decomposition, sets, rows, task, prompts: Sequence[str], *,
                  max_new_tokens: int, max_rows: int | None = None, on_chunk=None, mesh=None, **kw):
    """Greedy (or sampled, ``kw``) completions of ``prompts`` (user turns of ``task``), prompt b
    answered by multiplier set ``rows[b]``; a list of :class:`~lensjax.svf.rollout.Rollout`, one per
    chunk of ``max_rows`` rows (each trimmed to the real rows). With ``mesh``, each chunk's rows
    are split over its ``data`` axis (chunks padded to a multiple of it)."""
    from lensjax.svf.rollout import complete

    rows = np.asarray(rows, np.int32)
    prompts = list(prompts)
    if len(rows) != len(prompts):
        raise core.SVFError(f"{len(rows)} row assignments for {len(prompts)} prompts")
    outs = []
    for s, e, size in _chunks(len(rows), max_rows, data_size(mesh)):
        pad = size - (e - s)
        r = np.concatenate([rows[s:e], np.repeat(rows[e - 1:e], pad)])
        p = row_params(model.params, dec, sets, r, mesh)
        roll = complete(model, p, task, prompts[s:e] + [prompts[e - 1]] * pad, max_new_tokens=max_new_tokens,
                        mesh=mesh, **kw)
        outs.append(_trim(roll, e - s))
        if on_chunk is not None:
            on_chunk(e - s)
    return outs


def _trim(roll, n: int):
    return dataclasses.replace(roll, texts=roll.texts[:n], ids=roll.ids[:n], attn=roll.attn[:n],
                               target=roll.target[:n], logprobs=roll.logprobs[:n])
