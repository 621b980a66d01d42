"""Meshes, the logical-axis → mesh-axis rules (declared in one place) and multi-process start-up.

Mesh axes: ``data`` (batch), ``fsdp`` (parameter sharding), ``model`` (tensor parallel) and
``candidate`` (independent problems of model selection: curves, candidate models). Logical names
of array axes map to mesh axes through :data:`RULES`; an axis whose rule names a mesh axis that the
mesh lacks (or has size 1) stays replicated, so one code path runs on 1 CPU, 8 fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``) or a TPU pod.

Several processes (one per host, or several on one machine for tests) run the same program under
JAX's multi-controller runtime: :func:`initialize` starts ``jax.distributed`` from the environment,
after which ``jax.devices()`` lists every process's devices and a mesh spans them all.
:func:`shard_batch` builds a global batch from the host arrays (every process holds the same global
batch and contributes the rows of its own devices). Only :func:`is_main` (process 0) should print
or write files.
"""

from __future__ import annotations

import os

import jax
import numpy as np
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
    if any(not isinstance(v, int) or v < 1 for v in shape):
        raise ValueError(f"mesh axis sizes must be positive integers; got {axes}")
    size = int(np.prod(shape))
    if size != jax.device_count():
        raise ValueError(f"a mesh of {axes} needs {size} devices, but there are {jax.device_count()} "
                         f"({jax.process_count()} process(es) × {jax.local_device_count()} local); "
                         "the product of the axis sizes must equal the device count")
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
    return nest({k: place(v, sharding_for(specs[k][1], mesh, v.shape)) for k, v in flat.items()})


def place(value, sharding: NamedSharding):
    """A fresh array (never an alias of ``value``, so it may be donated) with ``sharding``: a
    device-to-device copy of a JAX array, or, on several processes, from a host or one-process
    value that is the same on every process (each supplies its own devices' shards)."""
    if isinstance(value, jax.Array) and (not value.is_fully_addressable or jax.process_count() == 1):
        return jax.device_put(value, sharding, may_alias=False)
    a = np.asarray(value)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


def shard_batch(batch: dict, mesh: Mesh, axis: int = 0) -> dict:
    """Place a host batch (dict of arrays [B, ...], the same global batch on every process) on
    ``mesh`` with the batch axis (``axis``: 1 for batches stacked per step, [k, B, ...]) on
    ``data``; every process supplies only its own devices' rows. Raises if B is not divisible by
    the ``data`` axis."""
    n = mesh.shape.get("data", 1)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.ndim <= axis or v.shape[axis] % n:
            raise ValueError(f"batch entry {k!r} has shape {v.shape}: its batch axis must be divisible by the "
                             f"mesh's data axis ({n})")
        out[k] = place(v, NamedSharding(mesh, PartitionSpec(*([None] * axis), "data" if n > 1 else None)))
    return out


def data_size(mesh: Mesh | None) -> int:
    """The size of ``mesh``'s ``data`` axis (1 without a mesh or without that axis)."""
    return 1 if mesh is None else int(mesh.shape.get("data", 1))


def replicate(tree, mesh: Mesh):
    """Every leaf of ``tree`` as a fresh array replicated over ``mesh``."""
    rep = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda a: place(a, rep), tree)


def params_on(params: dict, config, mesh: Mesh) -> dict:
    """``params`` placed by the logical-axis rules, or left as they are when every leaf already
    lives on ``mesh``'s devices (e.g. loaded with ``lensjax.load(..., mesh=mesh)``)."""
    devices = set(mesh.devices.flat)
    on = all(getattr(a, "sharding", None) is not None and a.sharding.device_set == devices
             for a in jax.tree.leaves(params))
    return params if on else shard_params(params, config, mesh)


def to_host(x) -> np.ndarray:
    """A NumPy copy of ``x``; an array spread over several processes is gathered first (every
    process gets the whole value)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental.multihost_utils import process_allgather

        return np.asarray(process_allgather(x, tiled=True))
    return np.asarray(x)


def is_main() -> bool:
    """True on process 0 (the one that prints and writes files)."""
    return jax.process_index() == 0


_ENV = ("LENSJAX_COORDINATOR", "LENSJAX_NUM_PROCESSES", "LENSJAX_PROCESS_ID")


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, *,
               timeout_s: int = 300, local_device_ids=None) -> bool:
    """Start JAX's multi-controller runtime (``jax.distributed.initialize``) when this process is
    one of several; returns whether it did.

    Arguments default to ``LENSJAX_COORDINATOR`` (host:port), ``LENSJAX_NUM_PROCESSES`` and
    ``LENSJAX_PROCESS_ID`` (set by ``scripts/local_cluster.py``); without them, JAX's own cluster
    detection (SLURM, Cloud TPU, Open MPI, Kubernetes) decides, and a single process is a no-op.
    On CPU the cross-process collectives use gloo. A coordinator that cannot be reached raises
    after ``timeout_s`` seconds instead of hanging."""
    env = os.environ
    coordinator = coordinator or env.get("LENSJAX_COORDINATOR")
    if num_processes is None and env.get("LENSJAX_NUM_PROCESSES"):
        num_processes = int(env["LENSJAX_NUM_PROCESSES"])
    if process_id is None and env.get("LENSJAX_PROCESS_ID"):
        process_id = int(env["LENSJAX_PROCESS_ID"])
    if jax.distributed.is_initialized():
        return True
    explicit = coordinator is not None or num_processes is not None
    cluster = (int(env.get("SLURM_NTASKS", "1") or 1) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
               or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
    if not explicit and not cluster:
        return False
    if explicit and (coordinator is None or num_processes is None or process_id is None):
        raise ValueError("multi-process start-up needs the coordinator address, the process count and this "
                         f"process's id; got coordinator={coordinator!r}, num_processes={num_processes!r}, "
                         f"process_id={process_id!r} (or set {', '.join(_ENV)})")
    if explicit and num_processes == 1:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices only; harmless elsewhere
    if coordinator is not None and process_id not in (None, 0):
        _wait_for_coordinator(coordinator, timeout_s)  # JAX itself aborts the process (LOG(FATAL)) instead
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids=local_device_ids,
                                   initialization_timeout=int(timeout_s))
    except Exception as e:  # noqa: BLE001 - the runtime raises bare RuntimeErrors/XlaRuntimeErrors
        raise RuntimeError(f"jax.distributed could not start (coordinator {coordinator!r}, process "
                           f"{process_id} of {num_processes}, timeout {timeout_s} s): {e}") from e
    return True


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Retry a TCP connection to ``host:port`` until ``timeout_s``; raise naming it if none succeeds."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator address must be host:port; got {address!r}")
    deadline, last = time.monotonic() + timeout_s, None
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(2.0, timeout_s)):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            raise RuntimeError(f"jax.distributed could not start: the coordinator {address} did not answer within "
                               f"{timeout_s} s ({last}); is process 0 running and the port open?")
        time.sleep(0.2)
