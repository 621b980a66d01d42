"""What bounds a training step here: its dot shapes timed alone, and a trace of the step by kind of op.

Used by ``bench_ntk.py`` for the AdamW step (the ``step_bounds`` entry of its JSON); issue 14 asks
for the measured breakdown of every row that misses its goal.

1. :func:`dot_shapes` lists the step's weight products from the parameter tree: for every 2-D
   weight ``[d_in, d_out]`` (a stacked ``[L, d_in, d_out]`` one counts L times) the forward
   ``x W`` (NN), the input gradient ``g Wᵀ`` (NT) and the weight gradient ``xᵀ g`` (TN), over the
   batch's tokens (the head's over the scored positions only). The attention's own batched
   products (QKᵀ, PV: 2.6% of the 10M Llama step's FLOPs) and the embedding's gather are left out.
   :func:`time_dot_shapes` times each distinct shape in XLA with lensjax's compiler options
   (``lensjax.kernels.xla.jit``), in PyTorch and in NumPy (its BLAS: OpenBLAS in the wheels), one
   after another in this process; multiplied by the count of each shape, that gives how long the
   step's dots alone take at each library's rates.
2. :func:`profile` traces a few calls of a step with ``jax.profiler`` and sums the trace's op
   events by kind (element-wise fusions, copies and transposes, reductions, zero-filling
   broadcasts, dynamic-update-slices, loop control), over the executor threads. XLA's CPU
   ``DotThunk`` runs a large dot asynchronously on Eigen's thread pool, so its event covers the
   launch only (20 chained [1024, 256]·[256, 1024]-sized dots on a 2-core EPYC: 13-15 ms of dot
   events for 85-87 ms of wall time; YNN's dot fusions are traced whole): the dots are reported
   by their launches and not counted in the op time. CPU only (on GPU the trace holds device
   kernels under other names); elsewhere the entry says why it is missing.
"""

from __future__ import annotations

import glob
import gzip
import json
import re
import tempfile
import time
import timeit

import numpy as np

KINDS = ("dot launches", "zero-fill broadcasts", "dynamic-update-slices", "copies and transposes", "reductions",
         "element-wise fusions", "loop control", "other ops")


def path_keys(path) -> list[str]:
    """A pytree key path (``jax.tree_util.tree_leaves_with_path``) as the plain dict keys / indices."""
    return [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]


def dot_shapes(params, tokens: int, head_rows: int | None = None) -> list[dict]:
    """The weight products of one forward + backward over ``tokens`` tokens: one entry per
    distinct (layout, M, K, N) with its ``count`` per step and ``gflop`` (all of that count).
    ``head_rows``: the tokens the head (``params["lm_head"]["w"]``) runs on (default ``tokens``)."""
    import jax

    seen: dict = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = path_keys(path)
        if keys[-1] != "w" or leaf.ndim not in (2, 3) or (keys and keys[0] == "embed"):
            continue
        n_stack = leaf.shape[0] if leaf.ndim == 3 else 1
        d_in, d_out = leaf.shape[-2:]
        m = head_rows if keys[0] == "lm_head" and head_rows else tokens
        name = "head" if keys[0] == "lm_head" else keys[-2]
        for lay, (M, K, N) in (("NN", (m, d_in, d_out)), ("NT", (m, d_out, d_in)), ("TN", (d_in, m, d_out))):
            key = (lay, M, K, N)
            e = seen.setdefault(key, {"layout": lay, "M": M, "K": K, "N": N, "count": 0, "weights": []})
            e["count"] += n_stack
            if name not in e["weights"]:
                e["weights"].append(name)
    out = sorted(seen.values(), key=lambda e: (-e["M"] * e["K"] * e["N"] * e["count"], e["layout"]))
    for e in out:
        e["gflop"] = 2 * e["M"] * e["K"] * e["N"] * e["count"] / 1e9
    return out


def _median_s(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after two warm ones."""
    fn()
    fn()
    return float(np.median(timeit.repeat(fn, repeat=repeats, number=1)))


def time_dot_shapes(shapes: list[dict], repeats: int = 20, torch_threads: int | None = None) -> dict:
    """GFLOP/s of each shape of :func:`dot_shapes` in XLA (lensjax's options), PyTorch and NumPy
    (float32, median of ``repeats``), and the seconds the whole list takes at each library's rates
    (``dots_alone_s``). PyTorch and NumPy run where JAX's backend is the CPU only."""
    import jax
    import jax.numpy as jnp

    from lensjax.kernels import xla

    cpu = jax.default_backend() == "cpu"
    torch = None
    if cpu:
        try:
            import torch
        except ImportError:
            torch = None
    if torch is not None and torch_threads:
        torch.set_num_threads(torch_threads)
    eqs = {"NN": "mk,kn->mn", "NT": "mk,nk->mn", "TN": "km,kn->mn"}
    rng = np.random.default_rng(0)
    rows, total = [], {}
    for e in shapes:
        M, K, N, lay = e["M"], e["K"], e["N"], e["layout"]
        # the operands as stored ([K, M] for TN, [N, K] for NT); ``ops`` views them as [M, K] and [K, N]
        a = rng.standard_normal((K, M) if lay == "TN" else (M, K), dtype=np.float32)
        b = rng.standard_normal((N, K) if lay == "NT" else (K, N), dtype=np.float32)
        ops = lambda x, y, lay=lay: (x.T if lay == "TN" else x, y.T if lay == "NT" else y)  # noqa: E731
        flop = 2 * M * K * N
        f = xla.jit(lambda x, y, eq=eqs[lay]: jnp.einsum(eq, x, y))
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        r = dict(e, gflop_s={"xla": flop / _median_s(lambda: f(ja, jb).block_until_ready(), repeats) / 1e9})
        if cpu:
            na, nb = ops(a, b)
            r["gflop_s"]["numpy"] = flop / _median_s(lambda: na @ nb, repeats) / 1e9
            if torch is not None:
                ta, tb = ops(torch.from_numpy(a), torch.from_numpy(b))
                r["gflop_s"]["torch"] = flop / _median_s(lambda: ta @ tb, repeats) / 1e9
        for lib, rate in r["gflop_s"].items():
            total[lib] = total.get(lib, 0.0) + e["gflop"] / rate
        rows.append(r)
    return {"shapes": rows, "dots_alone_s": total, "gflop": sum(e["gflop"] for e in shapes), "repeats": repeats,
            "left_out": "the attention's batched QKᵀ and PV products, the embedding gather"}


def kind_of(name: str) -> str:
    """The kind (:data:`KINDS`) of an XLA CPU op event, by its HLO instruction name."""
    if name.startswith(("dot", "wrapped_dot")):
        return "dot launches"
    if name.startswith("wrapped_broadcast"):
        return "zero-fill broadcasts"
    if name.startswith(("while", "conditional", "call")):
        return "loop control"
    if "dynamic-update-slice" in name:
        return "dynamic-update-slices"
    if "copy" in name or name.startswith("transpose"):
        return "copies and transposes"
    if "reduce" in name:
        return "reductions"
    if "fusion" in name or name.startswith("wrapped_"):
        return "element-wise fusions"
    return "other ops"


def summarise_trace(events: list[dict], op_names: set[str], steps: int) -> dict:
    """Per-step milliseconds of the op events (those named like an instruction in ``op_names``)
    by :func:`kind_of`, summed over threads, and the top ten ops."""
    by_kind = dict.fromkeys(KINDS, 0.0)
    by_op: dict = {}
    threads = set()
    for e in events:
        if e.get("ph") != "X" or e.get("name") not in op_names:
            continue
        by_kind[kind_of(e["name"])] += e["dur"] / 1e3 / steps
        by_op[e["name"]] = by_op.get(e["name"], 0.0) + e["dur"] / 1e3 / steps
        threads.add(e.get("tid"))
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:10]
    ops = sum(v for k, v in by_kind.items() if k != "dot launches")
    return {"ms_per_step": {k: round(v, 3) for k, v in by_kind.items()}, "non_dot_op_ms_per_step": round(ops, 3),
            "threads": len(threads), "top_ops_ms_per_step": [[k, round(v, 3)] for k, v in top]}


def op_names_of(hlo_text: str) -> set[str]:
    """The instruction names of a compiled program's text (``compiled.as_text()``)."""
    return set(re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", hlo_text, flags=re.M))


def profile(run, hlo_text: str, steps: int) -> dict:
    """Trace ``run()`` (which runs ``steps`` training steps and blocks) with ``jax.profiler`` and
    summarise it (:func:`summarise_trace`); ``wall_ms_per_step`` is the traced run's."""
    import jax

    if jax.default_backend() != "cpu":
        return {"error": f"skipped: the breakdown reads XLA CPU's op events; the backend is {jax.default_backend()}"}
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            t0 = time.perf_counter()
            run()
            wall = time.perf_counter() - t0
        files = glob.glob(f"{d}/**/*.json.gz", recursive=True)
        if not files:
            return {"error": "jax.profiler wrote no perfetto trace"}
        with gzip.open(files[0]) as fh:
            trace = json.load(fh)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    out = summarise_trace(events, op_names_of(hlo_text), steps)
    out["wall_ms_per_step"] = round(wall * 1e3 / steps, 3)
    out["steps"] = steps
    out["note"] = ("op events summed over the executor threads; XLA CPU's Eigen dots run asynchronously and are "
                   "traced by their launch only, so their time is not in the op time")
    return out
