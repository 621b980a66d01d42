"""Meshes and the logical-axis → mesh-axis rules, declared in one place.

Mesh axes: ``data`` (batch), ``fsdp`` (parameter sharding), ``model`` (tensor parallel) and
``candidate`` (independent problems of model selection: curves, candidate models). Logical names
of array axes map to mesh axes through :data:`RULES`; an axis whose rule names a mesh axis that the
mesh lacks (or has size 1) stays replicated, so one code path runs on 1 CPU, 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) or a TPU pod.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

RULES: dict[str, str | None] = {
    "candidate": "candidate",
    "curve": "candidate",
    "batch": "data",
    "vocab": "model",
    "embed": "fsdp",
    "heads": "model",
    "mlp": "model",
    "layers": None,
    "expert": "model",  # Switch experts: expert-parallel on the model axis (their mlp axis then stays whole)
}


def make_mesh(**axes: int) -> Mesh:
    """A mesh with the named axes and sizes, e.g. ``make_mesh(candidate=8)``.

    Axes are Auto (the compiler propagates shardings), which is what the vmapped kernels expect;
    the product of the sizes must equal the number of devices used.
    """
    if not axes:
        axes = {"candidate": jax.device_count()}
    names, shape = tuple(axes), tuple(axes.values())
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def spec_for(logical: tuple[str | None, ...], mesh: Mesh, shape: tuple[int, ...] | None = None) -> PartitionSpec:
    """PartitionSpec for an array whose axes have these logical names, under ``mesh``.

    With ``shape``, an axis whose length the mesh axis does not divide stays replicated.
    """
    out, taken = [], set()
    for d, name in enumerate(logical):
        axis = RULES.get(name) if name is not None else None
        ok = axis in mesh.shape and mesh.shape[axis] > 1 and axis not in taken
        if ok and shape is not None and shape[d] % mesh.shape[axis]:
            ok = False
        out.append(axis if ok else None)
        if ok:
            taken.add(axis)
    return PartitionSpec(*out)


def sharding_for(logical: tuple[str | None, ...], mesh: Mesh, shape: tuple[int, ...] | None = None) -> NamedSharding:
    return NamedSharding(mesh, spec_for(logical, mesh, shape))


def shard_params(params: dict, config, mesh: Mesh) -> dict:
    """Place an (unsharded) common tree on ``mesh`` by the logical-axis rules."""
    from lensjax.models.tree import flatten, leaf_specs, nest

    specs = leaf_specs(config)
    flat = flatten(params)
    return nest({k: jax.device_put(v, sharding_for(specs[k][1], mesh, v.shape)) for k, v in flat.items()})
