"""What bounds the exact NTK here: its blocks of K timed by parameter group, and the taps' Grams
timed alone in XLA, PyTorch and NumPy.

Used by ``bench_ntk.py`` for ``lensjax.models.lm_ntk.ntk_exact`` (the ``ntk_bounds`` entry of its
JSON); issue 14 asks for the measured breakdown of every row that misses its goal.

1. :func:`block_times` runs ``ntk_exact`` with masks that leave one parameter group out (the MLP,
   the attention, the head, the embedding tables) and with the norms only. A group's blocks of K
   cost the whole time minus the time without them; the norms-only run is the model's own forward
   and backward over the probe batch plus the cheapest taps. Wall times (median of warm calls), not
   a trace: XLA CPU's Eigen dots run asynchronously and a trace shows only their launches
   (``step_bounds``).
2. :func:`gram_shapes` lists the ``[n, M] · [M, n]`` Grams that the dense taps compute
   (``lensjax.kernels.taps``: each weight's per-sample gradients [n, d_in, d_out], in the pieces
   that :func:`lensjax.kernels.taps.plan` picks, each piece Gram-reduced), as ``NT`` dot shapes for
   :func:`step_bounds.time_dot_shapes`; weights on the token-Gram route have none. On a 2-core Xeon
   with AMX (2026-12-07) these Grams ran at 135-148 GFLOP/s in XLA (Eigen; YNN 45-57, and XLA's
   oneDNN and XNNPACK options left them to Eigen), 209-224 in PyTorch and 92-100 in NumPy, against
   a 2048³ float32 peak of 330: a [64, M] Gram has a 64 × 64 output and a long contraction, the
   shape where Eigen packs every element twice for 128 FLOPs.
"""

from __future__ import annotations

import time

import numpy as np

import step_bounds

GROUPS = {"MLP": ("mlp",), "attention": ("attn", "cross_attn"), "head": ("lm_head",), "embedding tables": ("embed",)}


def group_mask(params, leave_out: tuple[str, ...]):
    """Bool tree like ``params``: False for the leaves under a key in ``leave_out``."""
    import jax

    return jax.tree_util.tree_map_with_path(lambda p, _: not set(step_bounds.path_keys(p)) & set(leave_out), params)


def gram_shapes(cfg, params, n: int, T: int, head_T: int | None = None) -> list[dict]:
    """The Grams of the dense taps over ``n`` samples of ``T`` positions (the head's over
    ``head_T`` scored positions per sample, default ``T``): one ``NT`` entry (M = N = n, K = the
    piece's size) per distinct piece with its ``count`` (pieces × stacked layers), the weights it
    serves and ``gflop`` (all of that count)."""
    import jax

    from lensjax.kernels import taps
    from lensjax.models import lm_ntk

    _, tapped = lm_ntk.tap_params(cfg, params, n)
    flags = jax.tree.leaves(tapped)
    seen: dict = {}
    for (path, leaf), on in zip(jax.tree_util.tree_leaves_with_path(params), flags):
        keys = step_bounds.path_keys(path)
        if not on or keys[-1] != "w" or leaf.ndim not in (2, 3):
            continue
        head = keys[0] == "lm_head"
        d_in, d_out = leaf.shape[-2:]
        route, _, pieces = taps.plan(n, (head_T or T) if head else T, d_in, d_out)
        if route != "per_sample":
            continue
        e = seen.setdefault(d_in * d_out // pieces, {"layout": "NT", "M": n, "K": d_in * d_out // pieces, "N": n,
                                                     "count": 0, "weights": []})
        e["count"] += pieces * (leaf.shape[0] if leaf.ndim == 3 else 1)
        name = "head" if head else keys[-2]
        if name not in e["weights"]:
            e["weights"].append(name)
    out = sorted(seen.values(), key=lambda e: -e["K"] * e["count"])
    for e in out:
        e["gflop"] = 2 * n * n * e["K"] * e["count"] / 1e9
    return out


def block_times(run, params, repeats: int) -> dict:
    """Seconds (median of ``repeats`` warm calls) of ``run(mask)`` (an exact NTK over the leaves
    where ``mask`` is True; None: all) for all parameters, each group of :data:`GROUPS` left out,
    and the norms only; ``groups_s``: each group's share (all minus all without it)."""
    import jax

    variants = {"all": None}
    for g, ks in GROUPS.items():
        mask = group_mask(params, ks)
        if not all(jax.tree.leaves(mask)):  # a group the tree has
            variants[f"without {g}"] = mask
    variants["norms only"] = group_mask(params, sum(GROUPS.values(), ()))
    times = {}
    for name, mask in variants.items():
        jax.block_until_ready(run(mask))  # compile and warm
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(run(mask))
            ts.append(time.perf_counter() - t0)
        times[name] = float(np.median(ts))
    groups = {g: times["all"] - times[f"without {g}"] for g in GROUPS if f"without {g}" in times}
    return {"times_s": times, "groups_s": groups, "repeats": repeats}


def measure(cfg, params, batch, repeats: int, dot_repeats: int) -> dict:
    """:func:`block_times` of ``lm_ntk.ntk_exact`` on ``batch`` and :func:`gram_shapes` timed alone
    (``step_bounds.time_dot_shapes``)."""
    from lensjax.models import lm_ntk
    from lensjax.models.lm import LOGIT_POS, with_logit_positions

    batch = with_logit_positions(batch)
    n, T = batch["ids"].shape
    head_T = int(batch[LOGIT_POS].shape[1]) if LOGIT_POS in batch else T
    blocks = block_times(lambda mask: lm_ntk.ntk_exact(cfg, params, batch, mask=mask), params, repeats)
    grams = step_bounds.time_dot_shapes(gram_shapes(cfg, params, n, T, head_T), repeats=dot_repeats, torch_threads=2)
    grams["left_out"] = "the per-sample products that feed them (batched dots), the token-Gram taps"
    return {"n": n, "T": T, "head_T": head_T, "blocks": blocks, "grams": grams}


def summary(b: dict) -> str:
    """One paragraph: the blocks by group and the Grams alone at each library's rates."""
    t, g = b["blocks"]["times_s"], b["blocks"]["groups_s"]
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in g.items())
    alone = ", ".join(f"{lib} {1e3 * s:.0f} ms" for lib, s in b["grams"]["dots_alone_s"].items())
    return (f"the whole exact NTK {t['all']:.2f} s; its blocks by parameter group (the time without them subtracted): "
            f"{parts}; the norms only (the model's forward and backward over the probe batch) {t['norms only']:.2f} s. "
            f"The dense taps' Grams alone ({b['grams']['gflop']:.1f} GFLOP) take {alone} at each library's rates")
