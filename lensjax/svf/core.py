"""SVF on the common tree: target sets, the decomposition cache, z parameterisations, and the
adapted parameters.

* Targets: ``mlp`` (the reference's default: gate/up/down), ``attn`` (q and v, as in the paper's
  attention experiments), ``all`` (q, k, v, o and the MLP).
* Parameterisations of the per-layer scale g(z) applied to σ:
  - ``paper``: g(z) = z, initialised at 1 (the identity: W′ = W exactly);
  - ``reference``: m = max_mult · sigmoid(z), rescaled so that Σσ is preserved per layer
    (g = m · Σσ / Σ(σ ⊙ m)), initialised z = 0.1 + 0.01·noise as the reference code.
* z is a pytree mirroring the chosen leaves (``{"layers/mlp/up/w": [L, r], ...}``), float32.

:func:`adapted_params` returns a full parameter tree for the forward pass: for each target either
the recomposed W′ (dense) or W plus the factors (``svf_u``, ``svf_d``, ``svf_vt``, applied inside
the forward pass), chosen per leaf by token count (:func:`lensjax.kernels.svd.prefer_factored`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lensjax.kernels import svd as svd_kernel
from lensjax.models.tree import flatten, nest

TARGETS = {
    "mlp": ("layers/mlp/gate/w", "layers/mlp/up/w", "layers/mlp/down/w"),
    "attn": ("layers/attn/q/w", "layers/attn/v/w"),
    "all": ("layers/attn/q/w", "layers/attn/k/w", "layers/attn/v/w", "layers/attn/o/w",
            "layers/mlp/gate/w", "layers/mlp/up/w", "layers/mlp/down/w"),
}
PARAMETERISATIONS = ("paper", "reference")


class SVFError(ValueError):
    """SVF cannot be applied as asked."""


def check_model(config) -> None:
    """SVF runs on decoder-only models (every family lensjax loads but the encoder-decoders)."""
    if config.is_encoder_decoder:
        raise SVFError(f"SVF supports decoder-only models; {config.family} is an encoder-decoder, whose encoder, "
                       "decoder and cross-attention matrices are not SVF targets in lensjax")


def target_paths(params: dict, targets: str) -> tuple[str, ...]:
    if targets not in TARGETS:
        raise SVFError(f"unknown targets {targets!r}; choose one of {', '.join(TARGETS)}")
    flat = flatten(params)
    paths = tuple(p for p in TARGETS[targets] if p in flat)  # GPT-2/OPT have no gate
    if not paths:
        raise SVFError(f"the model has none of the {targets} target matrices")
    return paths


class Decomposition(NamedTuple):
    """U, σ, Vᵀ per target leaf path (float32, stacked over layers); a pytree."""

    u: dict[str, jax.Array]
    s: dict[str, jax.Array]
    vt: dict[str, jax.Array]

    @property
    def paths(self):
        return tuple(self.s)


def content_hash(params: dict, paths) -> str:
    """sha256 over the target leaves' bytes and shapes: the cache key of a decomposition."""
    h = hashlib.sha256()
    flat = flatten(params)
    for p in sorted(paths):
        a = np.asarray(jax.device_get(flat[p]))
        h.update(p.encode())
        h.update(str(a.shape).encode() + str(a.dtype).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def decompose_params(params: dict, targets: str = "mlp", cache_dir: str | os.PathLike | None = None) -> Decomposition:
    """One batched SVD per target leaf; cached as safetensors under ``cache_dir`` keyed by the
    content hash of the target weights (computed once per checkpoint)."""
    paths = target_paths(params, targets)
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"svd-{content_hash(params, paths)[:24]}-{targets}.safetensors"
        if cache_file.exists():
            return load_decomposition(cache_file, paths)
    flat = flatten(params)
    u, s, vt = {}, {}, {}
    groups: dict[tuple, list[str]] = {}  # leaves of one shape are decomposed in one batched call
    for p in paths:
        groups.setdefault((tuple(flat[p].shape), str(flat[p].dtype)), []).append(p)
    for group in groups.values():
        w = flat[group[0]] if len(group) == 1 else jnp.concatenate([flat[p] for p in group])
        gu, gs, gvt = svd_kernel.decompose(w)
        n = flat[group[0]].shape[0]
        for i, p in enumerate(group):
            u[p], s[p], vt[p] = gu[i * n:(i + 1) * n], gs[i * n:(i + 1) * n], gvt[i * n:(i + 1) * n]
    dec = Decomposition(u, s, vt)
    if cache_file is not None:
        save_decomposition(dec, cache_file)
    return dec


def save_decomposition(dec: Decomposition, path: Path) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for p in dec.paths:
        for name, d in (("u", dec.u), ("s", dec.s), ("vt", dec.vt)):
            tensors[f"{p}:{name}"] = np.ascontiguousarray(jax.device_get(d[p]), np.float32)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def load_decomposition(path: Path, paths) -> Decomposition:
    from safetensors.numpy import load_file

    t = load_file(str(path))
    return Decomposition(*({p: jnp.asarray(t[f"{p}:{n}"]) for p in paths} for n in ("u", "s", "vt")))


def cast_factors(dec: Decomposition, dtype) -> Decomposition:
    """U and Vᵀ in ``dtype`` (σ stays float32): the factors a mixed-precision update reads, cast
    once per training run instead of inside every step (XLA CPU fuses a per-step cast into the
    recomposition's dot, which then ran at under half its speed: 1076 -> 468 GFLOP/s)."""
    return Decomposition({p: a.astype(dtype) for p, a in dec.u.items()}, dict(dec.s),
                         {p: a.astype(dtype) for p, a in dec.vt.items()})


def init_z(dec: Decomposition, parameterisation: str = "paper", key=None) -> dict[str, jax.Array]:
    if parameterisation == "paper":
        return {p: jnp.ones_like(s) for p, s in dec.s.items()}
    if parameterisation == "reference":
        key = jax.random.key(0) if key is None else key
        keys = jax.random.split(key, len(dec.s))
        return {p: 0.1 + 0.01 * jax.random.normal(k, s.shape, jnp.float32) for k, (p, s) in zip(keys, dec.s.items())}
    raise SVFError(f"unknown parameterisation {parameterisation!r}; choose one of {PARAMETERISATIONS}")


def scales(dec: Decomposition, z: dict, parameterisation: str = "paper", max_mult: float = 1.0) -> dict:
    """g(z) per leaf [L, r]."""
    if parameterisation == "paper":
        return dict(z)
    out = {}
    for p, zz in z.items():
        s = dec.s[p]
        m = max_mult * jax.nn.sigmoid(zz)
        out[p] = m * (jnp.sum(s, -1, keepdims=True) / jnp.sum(s * m, -1, keepdims=True))
    return out


def adapted_params(params: dict, dec: Decomposition, z: dict, parameterisation: str = "paper", *,
                   n_tokens: int | None = None, factored: bool | None = None, max_mult: float = 1.0,
                   matmul_dtype: str = "") -> dict:
    """The parameters the forward pass should use with expert ``z``. ``factored`` True/False forces
    the factored apply (W plus the factors of the delta, computed in the activations' dtype) or the
    recomposed dense W′ (rounded to W's dtype) for every leaf; otherwise ``n_tokens`` (tokens per
    call) chooses per leaf, factored for few tokens; neither: dense. ``matmul_dtype``
    (``ModelConfig.matmul_dtype`` of a mixed-precision SVF update), for the dense leaves: W, the
    factors and d = σ ⊙ (g − 1) go to the layers, which form W′ themselves and give d's gradient
    from ``x U`` and ``g V`` (:func:`lensjax.kernels.mixed.svf_matmul`); W and the factors then
    get no gradient."""
    g = scales(dec, z, parameterisation, max_mult)
    flat = dict(flatten(params))
    for p in dec.paths:
        w = flat[p]
        _, d_in, d_out = w.shape
        use = factored if factored is not None else (
            n_tokens is not None and svd_kernel.prefer_factored(n_tokens, d_in, d_out))
        if use or matmul_dtype:  # the layer gets W and the factors: factored apply, or W′ formed there
            base = p[: -len("/w")]
            flat[base + "/svf_u"], flat[base + "/svf_vt"] = dec.u[p], dec.vt[p]
            flat[base + ("/svf_d" if use else "/svf_zd")] = dec.s[p] * (g[p] - 1.0)
        else:
            flat[p] = svd_kernel.recompose(w, dec.u[p], dec.s[p], dec.vt[p], g[p])
    return nest(flat)


def merged_params(params: dict, dec: Decomposition, z: dict, parameterisation: str = "paper", max_mult: float = 1.0) -> dict:
    """Dense W′ everywhere (for export)."""
    return adapted_params(params, dec, z, parameterisation, n_tokens=None, max_mult=max_mult)
