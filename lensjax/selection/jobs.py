"""Candidates as independent jobs: merge what sharded runs measured.

A selection over many candidates splits into jobs that any scheduler runs (a SLURM array, a
Kubernetes indexed job, one process per pod slice): job i of n runs
``lensjax select --models <all> --shard i/n --curves-out part-i.csv --ntk-out part-i.json ...``
and measures only its candidates. :func:`merge` combines the parts into one curves CSV (with its
``.meta.json``) and one NTK file; a last ``lensjax select --models <all>`` on the merged files
finds everything measured and only fits and ranks. Jobs may also share one curves file (its
store locks it). A cell measured twice must agree: a merge of overlapping parts with different
values is an error that names the model, the size and both files, and nothing is written.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lensjax.selection.curves import CurvesError
from lensjax.selection.store import CurvesStore
from lensjax.selection.pipeline import read_ntk, write_ntk
from lensjax.selection.selectors import SelectionError


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → (i, n) with 1 ≤ i ≤ n."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SelectionError(f"--shard must look like i/n (e.g. 2/8); got {text!r}") from None
    if not 1 <= i <= n:
        raise SelectionError(f"--shard {text}: need 1 <= i <= n")
    return i, n


def merge(curves: list[str | os.PathLike], curves_out: str | os.PathLike, ntks: list[str | os.PathLike] = (),
          ntk_out: str | os.PathLike | None = None, rtol: float = 0.0) -> dict:
    """Merge curve parts (CSV + ``.meta.json``) into ``curves_out`` and NTK parts into ``ntk_out``.

    A (model, size) cell in several parts must have the same loss (within ``rtol``) and the same
    recorded steps; an NTK in several parts the same eigenvalues. ``curves_out`` may be one of
    the parts or an existing file (its cells take part in the check). Returns a summary."""
    if not curves:
        raise SelectionError("nothing to merge: no curves files given")
    out = Path(curves_out)
    sources = [Path(p) for p in curves] + ([out] if out.exists() and out not in map(Path, curves) else [])
    loss: dict[str, dict[int, tuple[float, str]]] = {}
    meta: dict[str, dict] = {}
    for src in sources:
        if not src.exists():
            raise SelectionError(f"{src}: no such curves file")
        try:
            part = CurvesStore(src)
        except CurvesError as exc:
            raise SelectionError(f"{src}: {exc}") from None
        for m, cells in part.loss.items():
            for size, v in cells.items():
                seen = loss.setdefault(m, {}).get(size)
                if seen is not None and not np.isclose(seen[0], v, rtol=rtol, atol=0.0):
                    raise SelectionError(f"{m!r} at size {size}: loss {seen[0]!r} in {seen[1]} but {v!r} in {src}; "
                                         "the parts overlap with different measurements (nothing written)")
                steps = part.meta.get(m, {}).get("sizes", {}).get(str(size), {}).get("steps")
                had = meta.get(m, {}).get("sizes", {}).get(str(size), {}).get("steps")
                if seen is not None and had is not None and steps is not None and had != steps:
                    raise SelectionError(f"{m!r} at size {size}: {had} steps in {seen[1]} but {steps} in {src} "
                                         "(nothing written)")
                loss[m][size] = (v, str(src))
            pm = part.meta.get(m, {})
            mm = meta.setdefault(m, {"sizes": {}})
            mm.update({k: v for k, v in pm.items() if k != "sizes"})
            mm["sizes"].update(pm.get("sizes", {}))
    merged_ntk = {}
    for src in map(Path, ntks):
        for m, c in read_ntk(src).items():
            if m in merged_ntk and not np.allclose(merged_ntk[m][0].eigvals, c.eigvals, rtol=max(rtol, 1e-12), atol=0):
                raise SelectionError(f"{m!r}: different NTK eigenvalues in {merged_ntk[m][1]} and {src} (nothing written)")
            merged_ntk.setdefault(m, (c, src))
    if merged_ntk and ntk_out is None:
        raise SelectionError("NTK parts given without --ntk-out")
    store = CurvesStore.__new__(CurvesStore)
    store.path, store.meta_path = out, out.with_name(out.name + ".meta.json")
    store.lock_path = out.with_name(out.name + ".lock")
    store.loss = {m: {s: v for s, (v, _) in sorted(cells.items())} for m, cells in loss.items()}
    store.meta = meta
    with store._locked():
        store.write()
    if merged_ntk:
        write_ntk(ntk_out, {m: c for m, (c, _) in merged_ntk.items()})
    return {"curves_csv": str(out), "models": sorted(loss), "cells": sum(len(v) for v in loss.values()),
            "ntk_file": None if not merged_ntk else str(ntk_out), "ntk_models": sorted(merged_ntk),
            "parts": [str(p) for p in curves]}
