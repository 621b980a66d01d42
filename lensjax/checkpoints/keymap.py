"""Declarative key maps: Hugging Face tensor names → common-tree leaves.

An entry is ``(tree_path, hf_key, op)`` or ``(tree_path, hf_key, op, layers)``; ``{i}`` in the key
marks a per-layer tensor, stacked on a leading ``L`` axis over ``layers`` (the HF layer indices;
default all ``num_layers`` of the stack), and ``{x}`` a per-expert tensor, stacked on the next
axis over ``num_experts``. A key that starts with ``/`` is at the checkpoint's root (no family
prefix, e.g. BART's ``final_logits_bias`` beside ``model.``). Ops map a source tensor to our ``[in, out]`` layout:

* ``"id"`` — as stored;
* ``"T"`` — transpose (PyTorch ``Linear`` stores ``[out, in]``);
* ``("cols", k, n)`` — column block k of n of an ``[in, n·out]`` tensor (GPT-2's fused ``c_attn``);
* ``("part", k, n)`` — block k of n of a fused bias ``[n·out]``;
* ``"row"`` — the only row of a ``[1, n]`` tensor (BART's ``final_logits_bias``).

Each op can read just a slice of its source (see ``source_index``), so a device can load only its
own shard.
"""

from __future__ import annotations

from typing import Sequence

Op = str | tuple


def source_shape(op: Op, shape: Sequence[int]) -> tuple[int, ...]:
    """Shape the HF tensor must have for a (per-layer) leaf of ``shape``."""
    shape = tuple(shape)
    if op == "id":
        return shape
    if op == "T":
        return shape[::-1]
    if op == "row":
        return (1,) + shape
    kind, _, n = op
    if kind == "cols":
        return (shape[0], n * shape[1])
    if kind == "part":
        return (n * shape[0],)
    raise ValueError(f"unknown op {op!r}")


def source_index(op: Op, index: tuple[slice, ...], shape: Sequence[int]) -> tuple[tuple[slice, ...], bool]:
    """(index into the HF tensor, whether the read block must be transposed) for our ``index``."""
    if op == "id":
        return index, False
    if op == "T":
        return index[::-1], True
    if op == "row":
        return (slice(0, 1),) + tuple(index), False
    kind, k, _ = op
    if kind == "cols":
        rows, cols = index
        off = k * shape[1]
        start, stop, _ = cols.indices(shape[1])
        return (rows, slice(off + start, off + stop)), False
    if kind == "part":
        (part,) = index
        off = k * shape[0]
        start, stop, _ = part.indices(shape[0])
        return (slice(off + start, off + stop),), False
    raise ValueError(f"unknown op {op!r}")
