"""Benchmark: lensjax SVF (Transformer²) vs a PyTorch eager baseline on CPU, in one run.

    python benchmarks/bench_svf.py [--out benchmarks/results/bench_svf.json] [--quick]
                                   [--models /tmp/lensjax-bench-svf]

Model: a ~150M-parameter Llama-shaped model with random weights (no hub access):
``LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)``, built with
``AutoModelForCausalLM.from_config`` (seed 0) and saved once to ``--models``/llama-150M (reused by
later runs). lensjax loads it with ``lensjax.load``; PyTorch uses ``from_pretrained`` on the same
folder, so both sides hold the same float32 weights.

What is measured (wall clock, float32, everything in one process, run one after the other):

(a) SVD of every MLP matrix (gate, up, down of all 12 layers = 36 matrices of 768×3072 / 3072×768):
    * lensjax: ``core.decompose_params(model.params, "mlp")`` — leaves of one shape in one batched
      call of ``kernels.svd.decompose`` (on CPU the float64 Gram route with its gesdd guard); "warm" = the median of the calls after the first (the first
      call's compile + run is reported separately); ``jax.block_until_ready`` on the result;
    * PyTorch: a Python loop of ``torch.linalg.svd(W, full_matrices=False)`` over every MLP weight
      of the HF model (the SakanaAI/self-adaptive-llms approach); "warm" = the median of the full
      loops after the first (one small SVD is run before the first loop).
    * diagnostic (not a table row): the same leaves through the batched LAPACK gesdd
      (``decompose(w, "gesdd")``), and the float64 reconstruction error and orthogonality of
      lensjax's factors (goal: reconstruction ≤ 1e-5 relative).
(b) One SVF training step, batch 8 × 256 random token ids, forward + backward to z only + AdamW
    (lr 2e-3, no weight decay, no clipping, both sides) on z; loss = −mean_i adv_i · Σ_t log p(y_it)
    over the target tokens (positions ≥ 128), adv = 1; z initialised at 1 ("paper"); median of
    several warm steps (the same batch every step):
    * lensjax: the trainer's own jitted update (``lensjax.svf.trainer._update_fn``: value_and_grad
      of ``policy_loss`` + optax AdamW) with ``SVFConfig(targets="mlp", kl_coef=0.0,
      schedule="constant", clip=1e30)``; the parameters and the decomposition are jit arguments;
    * PyTorch eager (faithful to the reference): U, S, Vh of every MLP Linear (from (a)) kept as
      buffers, a trainable float32 z per matrix; every step recomposes W′ = (U · (S ⊙ z)) @ Vh for
      all 36 matrices (the column-scaled form of U @ diag(S ⊙ z) @ Vh, which avoids the extra
      r×r matmul), runs the HF model through ``torch.func.functional_call`` with the replaced
      weights, ``loss.backward()``, ``torch.optim.AdamW`` step. ``torch.set_num_threads(2)``.
    Losses of both sides are recorded at every step (same weights, batch and optimiser, so the
    trajectories should agree).
    Mixed precision, the same step: lensjax ``compute_dtype="bfloat16"`` against PyTorch float32
    and, where PyTorch's bf16 matmul is not slow on this CPU (``--torch-bf16``,
    ``benchmarks/torch_bf16.py``), against the same eager step under ``torch.autocast`` bf16.
    ``--no-bf16`` leaves the mixed-precision step out (``run_all.py --quick`` does on a CPU
    without bf16 units, where the goal does not count bf16).
(c) Matmul peak: a 2048×2048 @ 2048×2048 float32 matmul with numpy, torch and jax (median GFLOP/s),
    and the achieved GFLOP/s of (a) and (b) from nominal FLOP counts:
    * SVD of an m×n matrix (m ≥ n): 4·m·n² + 8·n³ (Golub & Van Loan's count for Σ and V; a thin U
      costs more, so this is a lower bound on the work done);
    * training step: 6 · P · tokens, P = non-embedding matmul parameters (attention q/k/v/o, MLP
      gate/up/down and the untied lm_head; the input embedding is a gather), plus the W′
      recomposition 2·in·r·out per MLP matrix forward, ×3 with backward. Attention-score FLOPs
      (4·B·T²·d per layer forward, ~4 % here) are left out and reported separately in the JSON.
      This is the requested nominal count; since only z is trained, no weight gradients are needed
      for the frozen attention / lm_head matrices and the recomposition's backward is one more
      in·r·out contraction, so a tighter count is 4·P·tokens + 2·P_mlp·tokens + 2·(2·in·r·out)
      per MLP matrix; it is printed and stored as ``flops_tight``.

Goals printed beside the ratios (PyTorch time / lensjax time): (a) ≥ 1.0×, (b) ≥ 2×.
The 1-minute load average at the start and end of the measurement is recorded (the machine is
shared; run it when ``/proc/loadavg`` is below 1). ``--quick`` keeps every shape and only cuts the
repeats of the SVF step and the matmul peak (the SVD keeps its 3 warm calls) and leaves out the
gesdd diagnostic. The JSON is written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch_bf16  # benchmarks/torch_bf16.py: whether PyTorch's bf16 baseline can run on this CPU

CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False)
MLP = ("gate_proj", "up_proj", "down_proj")
B, T, T_TARGET = 8, 256, 128
LR = 2e-3
SMOKE_CONFIG = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), ts


def make_model(root: Path) -> Path:
    import torch
    import transformers as tf

    d = root / ("llama-150M" if CONFIG["hidden_size"] == 768 else f"llama-h{CONFIG['hidden_size']}-l{CONFIG['num_hidden_layers']}")
    if not (d / "model.safetensors").exists():
        torch.manual_seed(0)
        m = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**CONFIG))
        d.mkdir(parents=True, exist_ok=True)
        m.save_pretrained(str(d))
        del m
    return d


def svd_flops(m: int, n: int) -> float:
    m, n = max(m, n), min(m, n)
    return 4.0 * m * n * n + 8.0 * n ** 3


# ------------------------------------------------------------------------------- (c) matmul peak
def bench_matmul(repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    n = 2048
    flops = 2.0 * n ** 3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = {"n": n, "flops": flops}
    a @ b
    out["numpy_s"], _ = median_time(lambda: a @ b, repeats)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ta @ tb
    out["torch_s"], _ = median_time(lambda: ta @ tb, repeats)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    mm(ja, jb).block_until_ready()
    out["jax_s"], _ = median_time(lambda: mm(ja, jb).block_until_ready(), repeats)
    for k in ("numpy", "torch", "jax"):
        out[f"{k}_gflops"] = flops / out[f"{k}_s"] / 1e9
    return out


# ------------------------------------------------------------------------------- (a) SVD
def bench_svd(model, hf, args) -> tuple[dict, object, dict]:
    import jax
    import torch

    from lensjax.svf import core

    mats = [(f"model.layers.{i}.mlp.{name}.weight", getattr(layer.mlp, name).weight.detach())
            for i, layer in enumerate(hf.model.layers) for name in MLP]
    flops = sum(svd_flops(*w.shape) for _, w in mats)

    # lensjax: first call = compile + run, warm = the following calls
    t0 = time.perf_counter()
    dec = jax.block_until_ready(core.decompose_params(model.params, "mlp"))
    lj_first = time.perf_counter() - t0
    lj_warm = []
    for _ in range(args.svd_repeats):
        del dec
        t0 = time.perf_counter()
        dec = jax.block_until_ready(core.decompose_params(model.params, "mlp"))
        lj_warm.append(time.perf_counter() - t0)

    # PyTorch loop (reference approach)
    torch.linalg.svd(torch.randn(256, 64), full_matrices=False)

    def torch_loop():
        return {k: torch.linalg.svd(w, full_matrices=False) for k, w in mats}

    t0 = time.perf_counter()
    tdec = torch_loop()
    pt_first = time.perf_counter() - t0
    pt_warm = []
    for _ in range(args.svd_repeats):
        del tdec
        t0 = time.perf_counter()
        tdec = torch_loop()
        pt_warm.append(time.perf_counter() - t0)

    # agreement of the singular values (lensjax stores [L, in, out] = torch's weightᵀ: same σ)
    max_rel = 0.0
    for p, s in dec.s.items():
        name = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}[p.split("/")[2]]
        s = np.asarray(s)
        for i in range(s.shape[0]):
            ts = tdec[f"model.layers.{i}.mlp.{name}.weight"].S.numpy()
            max_rel = max(max_rel, float(np.max(np.abs(s[i] - ts)) / ts.max()))
    # diagnostic: the same leaves through the batched LAPACK gesdd (lensjax's path before the Gram route)
    from lensjax.kernels import svd as svd_kernel
    from lensjax.models.tree import flatten

    leaves = [flatten(model.params)[p] for p in dec.paths]
    lj_gesdd = None
    if not args.quick or args.smoke:  # --quick leaves it out (≈ 20 s on a 2-core EPYC); --smoke keeps the code path
        jax.block_until_ready(svd_kernel.decompose(leaves[0], "gesdd"))
        t0 = time.perf_counter()
        jax.block_until_ready([svd_kernel.decompose(w, "gesdd") for w in leaves])
        lj_gesdd = time.perf_counter() - t0
    # accuracy of lensjax's factors, in float64: reconstruction and orthogonality
    rec, orth = 0.0, 0.0
    for p, w in zip(dec.paths, leaves):
        u, sv, vt = (np.asarray(x, np.float64) for x in (dec.u[p], dec.s[p], dec.vt[p]))
        w64 = np.asarray(w, np.float64)
        # batched float64 matmuls (BLAS), not np.einsum: its C loops took ≈ 2 minutes of this check
        rec = max(rec, float(np.linalg.norm((u * sv[:, None, :]) @ vt - w64) / np.linalg.norm(w64)))
        eye = np.eye(sv.shape[-1])
        orth = max(orth, float(np.abs(np.swapaxes(u, 1, 2) @ u - eye).max()),
                   float(np.abs(vt @ np.swapaxes(vt, 1, 2) - eye).max()))
    res = {
        "n_matrices": len(mats), "flops": flops,
        "lensjax_first_call_s": lj_first, "lensjax_warm_s": float(np.median(lj_warm)), "lensjax_warm_all_s": lj_warm,
        "torch_first_loop_s": pt_first, "torch_warm_s": float(np.median(pt_warm)), "torch_warm_all_s": pt_warm,
        "diagnostic_lensjax_gesdd_s": lj_gesdd, "lensjax_reconstruction_rel": rec, "lensjax_orthogonality": orth,
        "leaf_shapes_lensjax": {p: list(dec.u[p].shape[:2]) + [int(dec.vt[p].shape[-1])] for p in dec.paths},
        "max_rel_singular_value_diff": max_rel,
    }
    res["ratio"] = res["torch_warm_s"] / res["lensjax_warm_s"]
    res["lensjax_gflops"] = flops / res["lensjax_warm_s"] / 1e9
    res["torch_gflops"] = flops / res["torch_warm_s"] / 1e9
    return res, dec, tdec


# ------------------------------------------------------------------------------- (b) training step
def make_batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, CONFIG["vocab_size"], size=(B, T)).astype(np.int32)
    attn = np.ones((B, T), bool)
    target = np.zeros((B, T), bool)
    target[:, T_TARGET:] = True
    return ids, attn, target


def bench_train_lensjax(model, dec, repeats: int, compute_dtype: str = "float32") -> dict:
    import jax
    import jax.numpy as jnp

    from lensjax.svf import core
    from lensjax.svf.trainer import SVFConfig, _update_fn, make_optimizer

    # lensjax's own jitted SVF update (lensjax.svf.trainer), with a constant learning rate and a
    # clip so large it never acts, as on the torch side; "bfloat16": its mixed-precision update,
    # with the factors cast once as train() does
    cfg = SVFConfig(targets="mlp", kl_coef=0.0, lr=LR, schedule="constant", clip=1e30, weight_decay=0.0,
                    compute_dtype=compute_dtype)
    opt = make_optimizer(cfg)
    update = _update_fn(model.config, cfg)
    if compute_dtype != "float32":
        dec = core.cast_factors(dec, compute_dtype)

    def step(z, opt_state, params, dec, batch, adv):
        z, opt_state, info = update(z, opt_state, params, dec, batch, adv)
        return z, opt_state, info["loss"]

    ids, attn, target = make_batch()
    batch = {"ids": jnp.asarray(ids), "attn": jnp.asarray(attn), "target": jnp.asarray(target)}
    adv = jnp.ones(B, jnp.float32)
    z = core.init_z(dec, "paper")
    opt_state = opt.init(z)
    params = model.params
    losses = []
    state = {"z": z, "opt": opt_state}

    def run():
        state["z"], state["opt"], loss = jax.block_until_ready(step(state["z"], state["opt"], params, dec, batch, adv))
        losses.append(float(loss))

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    run()  # one warm step before timing
    med, ts = median_time(run, repeats)
    return {"first_step_s": first, "warm_s": med, "warm_all_s": ts, "losses": losses}


def bench_train_torch(hf, tdec, repeats: int, autocast: bool = False) -> dict:
    import contextlib

    import torch
    from torch.func import functional_call

    for p in hf.parameters():
        p.requires_grad_(False)
    hf.train(False)
    names = list(tdec)
    U = {k: tdec[k].U.contiguous() for k in names}
    S = {k: tdec[k].S.contiguous() for k in names}
    Vh = {k: tdec[k].Vh.contiguous() for k in names}
    z = {k: torch.nn.Parameter(torch.ones_like(S[k])) for k in names}
    opt = torch.optim.AdamW(list(z.values()), lr=LR, weight_decay=0.0)
    ids, attn, target = make_batch()
    tids = torch.from_numpy(ids.astype(np.int64))
    tattn = torch.from_numpy(attn.astype(np.int64))
    w = torch.from_numpy(target[:, 1:] & attn[:, 1:]).float()
    adv = torch.ones(B)
    losses = []

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
            new = {k: (U[k] * (S[k] * z[k])) @ Vh[k] for k in names}  # = U @ diag(S ⊙ z) @ Vh
            logits = functional_call(hf, new, args=(), kwargs={"input_ids": tids, "attention_mask": tattn}).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        lp = torch.gather(logp, -1, tids[:, 1:, None])[..., 0]
        loss = -(adv * (lp * w).sum(-1)).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    med, ts = median_time(run, repeats)
    return {"first_step_s": first, "warm_s": med, "warm_all_s": ts, "losses": losses}


def train_flops(hf) -> dict:
    L = CONFIG["num_hidden_layers"]
    d = CONFIG["hidden_size"]
    p_matmul = sum(p.numel() for n, p in hf.named_parameters() if p.ndim == 2 and "embed_tokens" not in n)
    recompose = sum(2.0 * min(p.shape) * p.shape[0] * p.shape[1]
                    for n, p in hf.named_parameters() if any(f"mlp.{m}" in n for m in MLP))
    p_mlp = sum(p.numel() for n, p in hf.named_parameters() if any(f"mlp.{m}" in n for m in MLP))
    tokens = B * T
    base = 6.0 * p_matmul * tokens
    tight = 4.0 * p_matmul * tokens + 2.0 * p_mlp * tokens + 2 * recompose
    attn_scores = 3 * 4.0 * B * T * T * d * L
    return {"non_embedding_matmul_params": int(p_matmul), "tokens": tokens, "model_flops": base,
            "recompose_fwd_flops": recompose, "recompose_flops": 3 * recompose,
            "flops": base + 3 * recompose, "attention_score_flops_not_counted": attn_scores,
            "flops_tight": tight, "flops_tight_formula": "4*P*tokens + 2*P_mlp*tokens + 2*sum(2*in*r*out)"}


# ------------------------------------------------------------------------------- main
def write_json(path: Path, payload: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/bench_svf.json")
    ap.add_argument("--models", default=str(Path(tempfile.gettempdir()) / "lensjax-bench-svf"))
    ap.add_argument("--quick", action="store_true", help="fewer repeats (same shapes)")
    torch_bf16.add_argument(ap)
    ap.add_argument("--no-bf16", dest="bf16", action="store_false",
                    help="skip the bf16 mixed-precision step (run_all.py --quick does on a CPU without bf16 units)")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer 64-wide model, batch 2 x 32, one repeat (tests)")
    args = ap.parse_args()
    if args.smoke:
        global CONFIG, B, T, T_TARGET
        CONFIG, (B, T, T_TARGET), args.quick = SMOKE_CONFIG, (2, 32, 16), True
    # the SVD row keeps 3 warm calls in --quick (≈ 30 s more): one call swung 7.0 -> 11.5 s in a
    # quick run on a fresh clone (2026-12-06 15:55 UTC), where a median of 3 holds against one outlier
    args.svd_repeats = 1 if args.smoke else 3
    args.steps = 2 if args.quick else 5
    args.mm_repeats = 2 if args.quick else 5

    import jax
    import torch
    import transformers as tf

    import lensjax

    torch.set_num_threads(2)
    path = make_model(Path(args.models))
    load_start = loadavg()
    print(f"load average (1 min) at start: {load_start:.2f}", flush=True)
    t_start = time.time()
    hf = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    model = lensjax.load(path)
    n_params = sum(p.numel() for p in hf.parameters())

    print("(c) matmul peak ...", flush=True)
    mm = bench_matmul(args.mm_repeats)
    print("(a) SVD of the MLP matrices ...", flush=True)
    svd, dec, tdec = bench_svd(model, hf, args)
    print("(b) SVF training step: lensjax ...", flush=True)
    lj = bench_train_lensjax(model, dec, args.steps)
    print("(b) SVF training step: PyTorch eager ...", flush=True)
    pt = bench_train_torch(hf, tdec, args.steps)
    lj16 = pt16 = bf16 = None
    if args.bf16:
        print("(b) SVF training step, mixed precision: lensjax bf16, PyTorch autocast bf16 ...", flush=True)
        lj16 = bench_train_lensjax(model, dec, args.steps, "bfloat16")
        bf16 = torch_bf16.decide(args.torch_bf16, args.smoke)  # PyTorch's bf16 baseline only where it can run
        pt16 = bench_train_torch(hf, tdec, args.steps, autocast=True) if bf16["run"] else None
        if pt16 is None:
            print(f"  PyTorch autocast bf16: {bf16['reason']}", flush=True)
    else:
        print("(b) SVF training step, mixed precision: skipped (--no-bf16)", flush=True)
    fl = train_flops(hf)

    def drift(side):  # max relative loss difference from PyTorch float32 at the same step
        n = min(len(side["losses"]), len(pt["losses"]))
        return max(abs(a - b) / max(abs(b), 1e-9) for a, b in zip(side["losses"][:n], pt["losses"][:n]))

    loss_diff = drift(lj)
    train = {"lensjax": lj, "torch": pt, "flop_estimate": fl, "ratio": pt["warm_s"] / lj["warm_s"],
             "lensjax_gflops": fl["flops"] / lj["warm_s"] / 1e9, "torch_gflops": fl["flops"] / pt["warm_s"] / 1e9,
             "max_rel_loss_diff_same_step": loss_diff,
             "lensjax_gflops_tight": fl["flops_tight"] / lj["warm_s"] / 1e9,
             "torch_gflops_tight": fl["flops_tight"] / pt["warm_s"] / 1e9,
             "loss_drift": {"lensjax_float32": loss_diff}}
    if lj16 is not None:
        # mixed precision: lensjax compute_dtype="bfloat16" against PyTorch float32 eager (the
        # table's baseline) and against torch.autocast bf16; loss drift from PyTorch float32
        train.update({"lensjax_bf16": lj16, "torch_autocast": pt16 if pt16 else {"error": bf16["reason"]},
                      "torch_bf16": bf16, "ratio_bf16": pt["warm_s"] / lj16["warm_s"],
                      "ratio_bf16_vs_autocast": pt16["warm_s"] / lj16["warm_s"] if pt16 else None})
        train["loss_drift"].update({"lensjax_bf16": drift(lj16), **({"torch_autocast": drift(pt16)} if pt16 else {})})
    load_end = loadavg()

    goals = {"svd": 1.0, "train_step": 2.0}
    rows = [
        (f"(a) SVD {svd['n_matrices']} MLP mats (s)", svd["torch_warm_s"], svd["lensjax_warm_s"], svd["ratio"], goals["svd"],
         svd["torch_gflops"], svd["lensjax_gflops"]),
        (f"(b) SVF step {B}x{T} (s)", pt["warm_s"], lj["warm_s"], train["ratio"], goals["train_step"],
         train["torch_gflops"], train["lensjax_gflops"]),
    ] + ([] if lj16 is None else [
        ("(b) same, lensjax bf16 mixed", pt["warm_s"], lj16["warm_s"], train["ratio_bf16"], goals["train_step"],
         train["torch_gflops"], fl["flops"] / lj16["warm_s"] / 1e9),
    ]) + ([] if pt16 is None else [
        ("(b) vs torch.autocast bf16", pt16["warm_s"], lj16["warm_s"], train["ratio_bf16_vs_autocast"], None,
         fl["flops"] / pt16["warm_s"] / 1e9, fl["flops"] / lj16["warm_s"] / 1e9),  # no goal: a like-for-like row
    ])
    print(f"\n{'task':<26}{'PyTorch':>10}{'lensjax':>10}{'ratio':>8}{'goal':>7}{'met?':>6}{'GF/s pt':>10}{'GF/s lj':>10}")
    for task, a, b, r, g, ga, gb in rows:
        goal, met = ("–", "") if g is None else (f"{g:.1f}x", "yes" if r >= g else "NO")
        print(f"{task:<26}{a:>10.3f}{b:>10.3f}{r:>7.2f}x{goal:>7}{met:>6}{ga:>10.1f}{gb:>10.1f}")
    print(f"{'(c) matmul 2048^3 peak':<26}{mm['torch_s']:>10.4f}{mm['jax_s']:>10.4f}{mm['torch_s'] / mm['jax_s']:>7.2f}x"
          f"{'':>6} {'':>5}{mm['torch_gflops']:>10.1f}{mm['jax_gflops']:>10.1f}   (numpy {mm['numpy_gflops']:.1f} GF/s)")
    print(f"\nlensjax compile+first run: SVD {svd['lensjax_first_call_s']:.1f} s, train step {lj['first_step_s']:.1f} s;"
          f" torch first SVD loop {svd['torch_first_loop_s']:.1f} s, first step {pt['first_step_s']:.1f} s")
    print(f"SVD FLOPs 4mn²+8n³ = {svd['flops'] / 1e9:.0f} G; step FLOPs 6·{fl['non_embedding_matmul_params'] / 1e6:.1f}M·"
          f"{fl['tokens']} + 3·{fl['recompose_fwd_flops'] / 1e9:.0f} G = {fl['flops'] / 1e9:.0f} G "
          f"(tight count {fl['flops_tight'] / 1e9:.0f} G: {train['torch_gflops_tight']:.1f} / "
          f"{train['lensjax_gflops_tight']:.1f} GF/s PyTorch / lensjax)")
    gesdd = svd["diagnostic_lensjax_gesdd_s"]
    print(f"lensjax factors: reconstruction {svd['lensjax_reconstruction_rel']:.1e} (relative, float64), orthogonality "
          f"{svd['lensjax_orthogonality']:.1e}; diagnostic: the batched gesdd path "
          + ("not timed (--quick)" if gesdd is None else f"{gesdd:.2f} s")
          + f" (lensjax warm {svd['lensjax_warm_s']:.2f} s; warm calls lensjax {[round(x, 2) for x in svd['lensjax_warm_all_s']]},"
          f" torch {[round(x, 2) for x in svd['torch_warm_all_s']]})")
    print(f"max rel σ diff {svd['max_rel_singular_value_diff']:.1e}; losses lensjax {[round(x, 3) for x in lj['losses']]}"
          f" torch {[round(x, 3) for x in pt['losses']]} (max rel diff {loss_diff:.1e})")
    print("loss drift from PyTorch float32 (max relative, same step): " +
          ", ".join(f"{k} {v:.1e}" for k, v in train["loss_drift"].items()))
    print(f"load average (1 min): start {load_start:.2f}, end {load_end:.2f}; total {time.time() - t_start:.0f} s")

    payload = {
        "command": "python benchmarks/bench_svf.py" + (" --smoke" if args.smoke else " --quick" if args.quick else ""),
        "quick": args.quick, "smoke": args.smoke, "model_config": CONFIG, "params": int(n_params), "batch": [B, T], "target_from": T_TARGET,
        "lr": LR, "loadavg_1min_start": load_start, "loadavg_1min_end": load_end,
        "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": tf.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "svd_flops_formula": "4*m*n^2 + 8*n^3 (m >= n) per matrix",
        "train_flops_formula": "6*P*tokens + 3*sum(2*in*r*out) over MLP matrices; P = non-embedding matmul params incl. lm_head",
        "goals": goals,
        "matmul": mm, "svd": svd, "train_step": train,
        "met": {"svd": svd["ratio"] >= goals["svd"], "train_step": train["ratio"] >= goals["train_step"],
                # the goal counts bf16 where the CPU has it (issue 14), with its loss drift reported
                "train_step_bf16": train.get("ratio_bf16") is not None and train["ratio_bf16"] >= goals["train_step"]},
    }
    write_json(Path(args.out), payload)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from lensjax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()  # glibc huge pages for XLA's buffers (lensjax/runtime.py)
    main()
