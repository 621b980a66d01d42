"""SVF experts on disk: z vectors as safetensors with metadata; merged-weight export."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lensjax.io import atomic_write
from lensjax.svf import core


def save_expert(path: str | os.PathLike, z: dict, model, cfg, task: str, metrics: dict,
                weights_hash: str | None = None) -> Path:
    """Write z (one tensor per target leaf) and its metadata (base model, a content hash of its
    target weights, targets, parameterisation, task, metrics) atomically."""
    from safetensors.numpy import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "base_model": str(getattr(model, "path", None)),
        "family": model.config.family,
        "targets": cfg.targets,
        "parameterisation": cfg.parameterisation,
        "max_mult": str(cfg.max_mult),
        "task": task,
        "metrics": json.dumps(metrics),
        "config": json.dumps(dataclasses.asdict(cfg)),
        "weights_hash": weights_hash or core.content_hash(model.params, tuple(z)),
    }
    data = save({k: np.asarray(jax.device_get(v), np.float32) for k, v in z.items()}, metadata=meta)
    return atomic_write(path, data)


def load_expert(path: str | os.PathLike) -> tuple[dict, dict]:
    """(z, metadata) of an expert file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise core.SVFError(f"expert not found: {path}")
    with safe_open(str(path), "numpy") as f:
        meta = dict(f.metadata() or {})
        z = {k: jnp.asarray(f.get_tensor(k)) for k in f.keys()}
    if "metrics" in meta:
        meta["metrics"] = json.loads(meta["metrics"])
    return z, meta


def check_expert(z: dict, dec: core.Decomposition, meta: dict | None = None, params: dict | None = None):
    """The expert must target the same matrices, with the same shapes, of the same base weights."""
    missing = set(dec.paths) ^ set(z)
    if missing:
        raise core.SVFError(f"expert and decomposition target different matrices: {sorted(missing)}")
    for p in dec.paths:
        if z[p].shape != dec.s[p].shape:
            raise core.SVFError(f"expert {p} has shape {tuple(z[p].shape)}, the model needs {tuple(dec.s[p].shape)}")
    if meta and params is not None and meta.get("weights_hash"):
        if core.content_hash(params, dec.paths) != meta["weights_hash"]:
            raise core.SVFError(f"the expert was trained on another base model ({meta.get('base_model')}); "
                                "its target weights differ from this model's")


def export(model, dec: core.Decomposition, z: dict, meta: dict, out: str | os.PathLike) -> Path:
    """Merged weights W′ written as an HF checkpoint (through :func:`lensjax.save`)."""
    import lensjax

    check_expert(z, dec, meta, model.params)
    params = core.merged_params(model.params, dec, z, meta.get("parameterisation", "paper"),
                                float(meta.get("max_mult", 1.0)))
    return lensjax.save(dataclasses.replace(model, params=params), out)
