"""Benchmark: the exact empirical NTK and one fine-tuning step, lensjax vs PyTorch, on CPU.

    python benchmarks/bench_ntk.py [--out benchmarks/results/bench_ntk.json] [--quick] [--wait-idle 300]

One run, one model: a ~10.1M-parameter Llama with random weights (vocab 8192, hidden 256, MLP
1024, 6 layers, 8 heads / 4 kv heads, untied head; built with ``transformers``, saved once with
``save_pretrained`` under ``--models`` and loaded from there by both sides). Float32 throughout,
``torch.set_num_threads(2)``; JAX uses its CPU default (all cores).

1. Exact empirical NTK ``K = J Jᵀ`` [n, n] over n = 64 probe sequences of T = 64 tokens, where
   ``J[i] = ∂f(θ, x_i)/∂θ`` over all P parameters and ``f`` is the mean log-likelihood of sample
   i's target tokens (the last half of the sequence; token t scored by the logits at t − 1).

   * lensjax: ``lensjax.models.lm_ntk.ntk_exact(cfg, params, batch)``, the library's path for
     language models (one batched forward/backward whose Gram taps give every parameter's block
     of K; no [n, P] Jacobian; jitted; compile time = first call minus a warm call, reported
     separately; timed warm with ``block_until_ready``). Since 2026-12-06 13:00 UTC (544eefa) it runs the
     final norm, the head and the log-softmax on the scored positions only (``logit_pos``, which
     ``ntk_exact`` adds: 32 of 64 rows here), so the head's share of the FLOPs halves;
   * lensjax rows route (``lensjax_rows``): the generic ``lensjax.kernels.ntk.ntk_exact(
     scalar_fn(cfg), params, batch, chunk_size=8)`` for any scalar function (J by ``vmap(grad)``
     in chunks, then J Jᵀ), with its per-sample-gradient stage timed alone;
   * PyTorch loop: for each sample, forward the HF model on that one sequence,
     ``torch.autograd.grad`` of f w.r.t. all parameters, flatten into row i of J; then J @ J.T
     (SDPA attention, the HF default);
   * ``torch.func``: ``functional_call`` + ``vmap(grad(f))`` in chunks of 8 samples, rows written
     into J, then J @ J.T (eager attention: SDPA has no vmap batching rule on CPU and falls back
     to a per-sample loop, which is slower).
   * ``torch.func, logits_to_keep`` (a row without a goal): the same with Hugging Face's
     ``logits_to_keep`` set to the scored positions, the head on those only, like lensjax's.

   Agreement: max |K − K_loop| / max |K_loop| for lensjax and torch.func against the loop, and of
   every K against the float64 product of the loop's J (``max_rel_diff_vs_float64``): the
   per-sample gradients of both libraries agree to ~2e-7 (in K), and the ~1e-4 gap between
   lensjax's K and torch's is the float32 accumulation of torch's ``J @ J.T`` over P = 10M
   (measured on a 1-layer model, n = 16: torch 1.1e-4 from float64, lensjax 1.8e-5). (With
   n < 16, torch's float32 ``J @ J.T`` takes a less accurate CPU path — ~1e-3 relative error on
   this K, measured against float64 — so the check is only meaningful for n ≥ 16.)
   FLOP estimate: n · 3 · (2 · P · T) for the per-sample gradients (backward ≈ 2× forward, 2·P
   flops per token; P counts all parameters, embeddings included) + 2 · n² · P for J Jᵀ.

2. One AdamW fine-tuning step on a batch of 8 × 128 tokens, loss = mean NLL of the target tokens
   (last half): ``lensjax.selection.finetune.make_train_step(cfg, optax.adamw(1e-4))`` (jitted)
   vs a PyTorch eager step (``loss.backward(); opt.step(); opt.zero_grad()`` with
   ``torch.optim.AdamW(lr=1e-4, weight_decay=1e-4)``, optax's defaults). Median of warm steps;
   both start from the same weights on the same batch, so their loss trajectories are compared.
   lensjax's batch carries ``logit_pos`` (``with_logit_positions``, as the fine-tuning ladder's
   batches do: the head on the 64 scored positions of 128); PyTorch eager computes all logits, as a
   Hugging Face training loop does, and ``PyTorch eager, logits_to_keep`` (rows without a goal)
   the scored ones only.
   Mixed precision, the same step: lensjax ``make_train_step(..., compute_dtype="bfloat16")``
   (``lensjax.kernels.mixed``: bf16 operands, float32 accumulation and results, float32 weights
   and AdamW) against PyTorch under ``torch.autocast("cpu", torch.bfloat16)`` (bf16 matmul
   outputs too) and against PyTorch float32; each mixed run's losses are compared with PyTorch
   float32's (``max_abs_loss_diff_vs_float32``).
   The autocast run is skipped where PyTorch's bf16 matmul is slow on this CPU (no bf16 units:
   ``--torch-bf16``, ``benchmarks/torch_bf16.py``; the probe and the reason go to ``setup``).
   ``--no-bf16`` leaves every mixed-precision run out (``run_all.py --quick`` does on a CPU
   without bf16 units, where the goal does not count bf16).
   The same steps ``--steps-per-call`` k (8) at a time (``make_train_steps``: one jitted call runs
   k steps as a ``lax.scan`` over k stacked copies of the batch; ``finetune`` runs its twin with a
   per-step learning rate), in float32 and bf16 mixed: per-step time = call time / k, median over
   ⌈train_repeats / k⌉ (at least 3) calls after the compiling call and ⌈train_warmup / k⌉ warm
   ones (before 2026-12-06 11:40 UTC: 2 calls, no warm one); its losses against PyTorch float32's
   step by step. XLA's CPU
   runtime maps fresh memory for each call's temporaries (≈ 240 MB here) and faults it in 4 KiB
   at a time, once per call.

3. What bounds lensjax's float32 step (``step_bounds`` in the JSON; ``--no-step-bounds`` skips it;
   ``benchmarks/step_bounds.py``): the k-steps-per-call program traced with ``jax.profiler`` over
   ``--profile-calls`` calls, its op time per step by kind (element-wise fusions, copies, zero-filled
   scan stacks, ...; XLA CPU's Eigen dots run asynchronously and are traced by their launch only),
   and the step's weight products (forward, input and weight gradients of every matrix, the head
   on the scored positions) timed alone in XLA with lensjax's options, in PyTorch and in NumPy:
   how long the dots alone take at each library's rates for these shapes.

4. What bounds lensjax's exact NTK (``ntk_bounds``; ``--no-ntk-bounds`` skips it;
   ``benchmarks/ntk_bounds.py``): ``ntk_exact`` timed with each parameter group (MLP, attention,
   head, embedding tables) left out and with the norms only (the model's own forward and backward),
   and the dense taps' ``[n, M] · [M, n]`` Grams timed alone in XLA, PyTorch and NumPy.

The PyTorch sides are in ``benchmarks/ntk_torch.py``. Also reported: the time of J Jᵀ alone on
the torch sides and of lensjax's per-sample-gradient stage alone (``ntk.jacobian_rows``, a
separate program; ``--no-breakdown`` skips it), and the share of CPU time other processes used
during each timed section (the box is shared: oversubscribed cores slow thread pools down far
more than proportionally, so a warning is printed above 10%).

Times are medians of ``--repeats`` (NTK) / ``--train-repeats`` (step) warm runs. Prints a table
(baseline time, lensjax time, ratio = baseline / lensjax, goal, met?) and writes JSON atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import ntk_bounds  # benchmarks/ntk_bounds.py: the exact NTK's blocks by parameter group, its Grams alone
from ntk_torch import median_time, ntk_torch_func, ntk_torch_loop, train_torch  # benchmarks/ntk_torch.py: the PyTorch sides
import step_bounds  # benchmarks/step_bounds.py: the step's dot shapes alone and its trace by kind of op
import torch_bf16  # benchmarks/torch_bf16.py: whether PyTorch's bf16 baseline can run on this CPU

GOALS = {"ntk_vs_loop": 5.0, "ntk_vs_func": 1.5, "train_vs_eager": 1.5}


class OtherLoad:
    """Share of the machine's CPU time used by *other* processes over a section (from
    /proc/stat minus this process's own CPU time): the benchmark runs on a shared 2-core box, and
    oversubscribed cores slow OpenMP/Eigen thread pools down far more than proportionally."""

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_s(), _own_s()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        other = (_busy_s() - self.busy0) - (_own_s() - self.own0)
        self.fraction = max(other, 0.0) / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0
        return False


def _busy_s():
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return 0.0


def _own_s():
    t = os.times()
    return t.user + t.system


def wait_idle(max_s: float, busy_below: float = 0.10, window_s: float = 2.0) -> float:
    """Wait (at most ``max_s``) until the CPUs were less than ``busy_below`` busy over one
    ``window_s`` window; returns the seconds waited. No-op for ``max_s <= 0``."""
    t0 = time.perf_counter()
    while max_s > 0 and time.perf_counter() - t0 < max_s:
        b0, w0 = _busy_s(), time.perf_counter()
        time.sleep(window_s)
        if (_busy_s() - b0) / ((time.perf_counter() - w0) * (os.cpu_count() or 1)) < busy_below:
            break
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------ model
def llama_config(args):
    import transformers as tf

    return tf.LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=args.layers,
                          num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                          tie_word_embeddings=False)


def make_model(root: Path, args) -> Path:
    import torch
    import transformers as tf

    d = root / f"llama-h256-f1024-l{args.layers}-v8192"
    if not (d / "model.safetensors").exists():
        torch.manual_seed(0)
        m = tf.AutoModelForCausalLM.from_config(llama_config(args))
        d.mkdir(parents=True, exist_ok=True)
        m.save_pretrained(str(d))
        del m
    return d


def make_batch(rng, n, T, vocab):
    ids = rng.integers(3, vocab, size=(n, T)).astype(np.int32)
    attn = np.ones((n, T), bool)
    target = np.zeros((n, T), bool)
    target[:, T // 2:] = True
    return {"ids": ids, "attn": attn, "target": target}


# -------------------------------------------------------------------------------------- NTK
def ntk_lensjax(model, batch_np, args, route: str = "taps") -> dict:
    """``route="taps"``: ``lensjax.models.lm_ntk.ntk_exact`` (one batched backward, per-parameter
    Grams; the library's path for language models); ``"rows"``: the generic
    ``lensjax.kernels.ntk.ntk_exact`` (J [n, P] by ``vmap(grad)`` in chunks, then J Jᵀ)."""
    import jax.numpy as jnp

    from lensjax.kernels import ntk
    from lensjax.models import lm_ntk
    from lensjax.models.lm import scalar_fn

    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    f = scalar_fn(model.config)
    if route == "taps":
        run = lambda: lm_ntk.ntk_exact(model.config, model.params, batch, chunk_size=args.chunk)  # noqa: E731
    else:
        run = lambda: ntk.ntk_exact(f, model.params, batch, chunk_size=args.chunk)  # noqa: E731
    t0 = time.perf_counter()
    K = run().block_until_ready()
    first = time.perf_counter() - t0
    med, ts, K = median_time(run, args.repeats, lambda r: r.block_until_ready())
    out = {"K": np.asarray(K, np.float64), "time_s": med, "times_s": ts, "first_call_s": first,
           "compile_s": max(first - med, 0.0)}
    del K
    if route == "rows" and args.breakdown:  # the per-sample-gradient stage alone (J [n, P]), a separate program
        rows = lambda: ntk.jacobian_rows(f, model.params, batch, chunk_size=args.chunk)  # noqa: E731
        rows().block_until_ready()
        out["jacobian_rows_s"] = median_time(rows, args.repeats, lambda r: (r.block_until_ready(), None)[1])[0]
    return out


def rel_diff(K, ref):
    return float(np.abs(K - ref).max() / np.abs(ref).max())


# ------------------------------------------------------------------------------ train step
def train_lensjax(model, batch_np, args, compute_dtype: str = "float32", steps_per_call: int = 1) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    try:
        from lensjax.selection.finetune import make_train_step, make_train_steps
    except ImportError as e:  # the module is being written; report instead of failing the run
        return {"error": f"lensjax.selection.finetune.make_train_step unavailable: {e}"}
    from lensjax.models.lm import with_logit_positions

    # the fine-tuning ladder's batches carry the scored positions (the head runs on those only)
    batch = {k: jnp.asarray(v) for k, v in with_logit_positions(batch_np).items()}
    tx = optax.adamw(args.lr)
    k = steps_per_call
    if k > 1:  # k steps per call on the same batch (as the single-step run takes it k times)
        step = make_train_steps(model.config, tx, compute_dtype=compute_dtype)
        batch = jax.tree.map(lambda a: jnp.stack([a] * k), batch)
        calls = max(3, -(-args.train_repeats // k))
        warm = -(-args.train_warmup // k)
    else:
        step = make_train_step(model.config, tx, compute_dtype=compute_dtype)
        calls, warm = args.train_repeats, args.train_warmup
    params = jax.tree.map(jnp.copy, model.params)  # the step may donate its inputs
    opt_state = tx.init(params)
    losses, ts = [], []
    t0 = time.perf_counter()
    params, opt_state, loss = jax.block_until_ready(step(params, opt_state, batch))
    first = time.perf_counter() - t0
    losses.extend(np.ravel(np.asarray(loss)).tolist())
    for i in range(warm + calls):
        t0 = time.perf_counter()
        params, opt_state, loss = jax.block_until_ready(step(params, opt_state, batch))
        dt = time.perf_counter() - t0
        losses.extend(np.ravel(np.asarray(loss)).tolist())
        if i >= warm:
            ts.append(dt / k)
    med = float(np.median(ts))
    return {"time_s": med, "times_s": ts, "first_call_s": first, "compile_s": max(first - med * k, 0.0), "losses": losses,
            "steps_per_call": k}


def train_bounds(model, batch_np, args) -> dict:
    """What bounds lensjax's float32 step (``step_bounds``): the k-steps-per-call program traced
    over ``args.profile_calls`` calls, its op time by kind, and the step's weight products timed
    alone in XLA, PyTorch and NumPy (``--no-step-bounds`` skips it)."""
    import jax
    import jax.numpy as jnp
    import optax

    from lensjax.models.lm import with_logit_positions
    from lensjax.selection.finetune import make_train_steps

    k = max(args.steps_per_call, 1)
    batch = {key: jnp.asarray(v) for key, v in with_logit_positions(batch_np).items()}
    head_rows = int(batch["logit_pos"].size) if "logit_pos" in batch else None
    tokens = int(batch["ids"].size)
    batch = jax.tree.map(lambda a: jnp.stack([a] * k), batch)
    tx = optax.adamw(args.lr)
    step = make_train_steps(model.config, tx)
    params = jax.tree.map(jnp.copy, model.params)
    opt_state = tx.init(params)
    compiled = step.lower(params, opt_state, batch).compile()  # one compile: its text and the program traced
    hlo = compiled.as_text()
    state = [params, opt_state]

    def run(calls):
        for _ in range(calls):
            state[0], state[1], _ = jax.block_until_ready(compiled(state[0], state[1], batch))

    run(1)  # warm: XLA's first execution of a program maps and faults in its buffers

    out = {"steps_per_call": k, "tokens": tokens, "head_rows": head_rows,
           "profile": step_bounds.profile(lambda: run(args.profile_calls), hlo, args.profile_calls * k)}
    out["dots"] = step_bounds.time_dot_shapes(step_bounds.dot_shapes(model.params, tokens, head_rows),
                                              repeats=args.dot_repeats, torch_threads=2)
    return out


def diagnostic(enabled: bool, flag: str, args, fn) -> dict:
    """A diagnostic section (not a table row): ``fn()``'s dict with the other processes' CPU load
    while it ran, why it was skipped, or the error it raised (the rows are kept either way)."""
    if not enabled:
        return {"error": "skipped: --quick (a diagnostic; the default run has it)" if args.quick and not args.smoke
                else f"skipped: {flag}"}
    try:
        wait_idle(args.wait_idle)
        with OtherLoad() as ol:
            out = fn()
        out["other_cpu_load"] = ol.fraction
        return out
    except Exception as e:  # report and keep the rows
        return {"error": f"{type(e).__name__}: {e}"}


def print_bounds(b: dict, multi: dict, eager: dict) -> None:
    """The step-bounds summary: op time by kind, the dots alone at each library's rates, and every
    shape's rates (largest share of the FLOPs first)."""
    if "error" in b:
        print(f"step bounds: {b['error']}")
        return
    p, d = b["profile"], b["dots"]
    if "error" in p:
        print(f"step bounds, trace: {p['error']}")
    else:
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in p["ms_per_step"].items() if v >= 0.05)
        print(f"step bounds ({b['steps_per_call']} steps per call, traced over {p['steps']} steps): "
              f"{p['wall_ms_per_step']:.1f} ms per step; op time by kind, ms per step over {p['threads']} threads: {kinds}"
              f" (non-dot ops {p['non_dot_op_ms_per_step']:.1f}; Eigen dots are traced by their launch only)")
    alone = ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in d["dots_alone_s"].items())
    print(f"  the step's weight products alone ({d['gflop']:.1f} GFLOP; {d['left_out']} left out), at each library's "
          f"rates: {alone}" + (f"; lensjax's whole step {1e3 * multi['time_s']:.0f} ms" if "time_s" in multi else "")
          + (f", PyTorch eager's {1e3 * eager['time_s']:.0f} ms" if "time_s" in eager else ""))
    print_shapes(d)


def print_shapes(d: dict) -> None:
    """The table of ``step_bounds.time_dot_shapes``: every shape's rates in each library."""
    libs = list(d["shapes"][0]["gflop_s"]) if d["shapes"] else []
    print(f"  {'layout':<7}{'M x K x N':>24}{'count':>7}{'GFLOP':>8}" + "".join(f"{lib + ' GF/s':>13}" for lib in libs))
    for r in d["shapes"]:
        print(f"  {r['layout']:<7}{r['M']:>8} x{r['K']:>7} x{r['N']:>7}{r['count']:>7}{r['gflop']:>8.2f}"
              + "".join(f"{r['gflop_s'][lib]:>13.1f}" for lib in libs) + f"   {','.join(r['weights'])}")


# ------------------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/bench_ntk.json")
    ap.add_argument("--models", default=os.environ.get("LENSJAX_BENCH_MODELS", str(Path(tempfile.gettempdir()) / "lensjax-bench-models")))
    ap.add_argument("--layers", type=int, default=6, help="6 layers: 10,095,872 parameters")
    ap.add_argument("--n", type=int, default=64, help="NTK probe samples")
    ap.add_argument("--seq", type=int, default=64, help="NTK sequence length T")
    ap.add_argument("--chunk", type=int, default=8, help="per-sample-gradient chunk (lensjax and torch.func)")
    ap.add_argument("--repeats", type=int, default=3, help="warm NTK runs per method (median)")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-seq", type=int, default=128)
    ap.add_argument("--train-warmup", type=int, default=2)
    ap.add_argument("--train-repeats", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--steps-per-call", type=int, default=8,
                    help="also time lensjax's k-steps-per-call program (make_train_steps; finetune runs its scheduled twin); "
                         "times are per step; 1: skip")
    ap.add_argument("--no-step-bounds", dest="step_bounds", action="store_false",
                    help="skip what-bounds-the-step: the traced k-step program by kind of op and the step's dot "
                         "shapes timed alone in XLA, PyTorch and NumPy (benchmarks/step_bounds.py)")
    ap.add_argument("--no-ntk-bounds", dest="ntk_bounds", action="store_false",
                    help="skip what-bounds-the-NTK: ntk_exact with each parameter group left out, and the taps' "
                         "Grams timed alone in XLA, PyTorch and NumPy (benchmarks/ntk_bounds.py)")
    ap.add_argument("--profile-calls", type=int, default=2, help="traced calls of the k-step program (step bounds)")
    ap.add_argument("--dot-repeats", type=int, default=20, help="timed runs of each dot shape (step bounds; median)")
    ap.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                    help="skip timing lensjax's per-sample-gradient stage (jacobian_rows) on its own")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each timed section, wait up to this long for the CPUs to be <10%% busy "
                         "(for a shared machine; default 0: don't wait)")
    torch_bf16.add_argument(ap)
    ap.add_argument("--no-bf16", dest="bf16", action="store_false",
                    help="skip the bf16 mixed-precision steps (run_all.py --quick does on a CPU without bf16 units)")
    ap.add_argument("--quick", action="store_true",
                    help="1 NTK repeat, 4 timed train steps, no per-sample-gradient breakdown and no step bounds "
                         "(run_all.py --quick)")
    ap.add_argument("--smoke", action="store_true",
                    help="1 layer, n = 16 × T = 16, train 2 × 16, 1 repeat (for the test suite; numbers mean nothing)")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.train_repeats, args.train_warmup = 1, 4, 1
        args.step_bounds = args.smoke  # a diagnostic, not a row: ≈ 40 s on 2 cores (the default run has it)
        args.ntk_bounds = args.smoke  # likewise: ≈ 50 s on a 2-core Xeon
        args.breakdown = args.smoke  # the J-alone timing (the table's "J Jᵀ part" row): ≈ 12 s on 2 cores
    if args.smoke:
        args.layers, args.n, args.seq, args.train_batch, args.train_seq = 1, 16, 16, 2, 16
        args.repeats, args.train_repeats, args.train_warmup = 1, 1, 0
        args.steps_per_call = min(args.steps_per_call, 2)
        args.profile_calls, args.dot_repeats = 1, 2

    import jax
    import torch
    import transformers as tf

    import lensjax

    warnings.filterwarnings("ignore", message=".*batching rule.*")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    path = make_model(Path(args.models), args)
    hf = tf.AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa").eval()
    hf_eager = tf.AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager").eval()
    model = lensjax.load(path, tokenizer=False)
    P = int(sum(p.numel() for p in hf.parameters()))
    P_lj = int(sum(x.size for x in jax.tree.leaves(model.params)))
    P_embed = int(hf.get_input_embeddings().weight.numel())
    n, T = args.n, args.seq
    print(f"model: Llama {P:,} parameters (lensjax tree: {P_lj:,}; input embedding {P_embed:,}), {path}")
    print(f"NTK: n = {n} probe sequences × T = {T} tokens (targets: last {T - T // 2}), chunk {args.chunk}; "
          f"train: {args.train_batch} × {args.train_seq} tokens; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)")

    rng = np.random.default_rng(0)
    probe = make_batch(rng, n, T, 8192)
    res_ntk = {}
    for name, fn in (("lensjax", lambda: ntk_lensjax(model, probe, args)),
                     ("lensjax_rows", lambda: ntk_lensjax(model, probe, args, "rows")),
                     ("torch_loop", lambda: ntk_torch_loop(hf, probe, args)),
                     ("torch_func", lambda: ntk_torch_func(hf_eager, probe, args)),
                     ("torch_func_keep", lambda: ntk_torch_func(hf_eager, probe, args, keep=True))):
        try:
            wait_idle(args.wait_idle)
            with OtherLoad() as ol:
                res_ntk[name] = fn()
            res_ntk[name]["other_cpu_load"] = ol.fraction
            print(f"  NTK {name:<11} {res_ntk[name]['time_s']:8.3f} s  (runs {', '.join(f'{t:.2f}' for t in res_ntk[name]['times_s'])}; "
                  f"other processes' CPU load {100 * ol.fraction:.0f}%)")
        except Exception as e:  # report and go on: one side failing should not lose the others
            res_ntk[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  NTK {name:<11} FAILED: {res_ntk[name]['error']}")

    if n < 16:
        print("  note: n < 16: torch's float32 J @ J.T is itself ~1e-3 off here, so the agreement check is loose")
    ref = res_ntk.get("torch_loop", {}).get("K")
    for name in ("lensjax", "lensjax_rows", "torch_func", "torch_func_keep"):
        if ref is not None and "K" in res_ntk[name]:
            res_ntk[name]["max_rel_diff_vs_loop"] = rel_diff(res_ntk[name]["K"], ref)
    if "K" in res_ntk.get("lensjax", {}) and "K" in res_ntk.get("torch_func", {}):
        res_ntk["lensjax"]["max_rel_diff_vs_func"] = rel_diff(res_ntk["lensjax"]["K"], res_ntk["torch_func"]["K"])
    K64 = res_ntk.get("torch_loop", {}).pop("K64", None)
    for r in res_ntk.values():
        if K64 is not None and "K" in r:
            r["max_rel_diff_vs_float64"] = rel_diff(r["K"], K64)
    Kref = next((r["K"] for r in res_ntk.values() if "K" in r), None)
    k_summary = None
    if Kref is not None:
        w = np.linalg.eigvalsh(0.5 * (Kref + Kref.T))[::-1]
        k_summary = {"trace": float(np.trace(Kref)), "max_abs": float(np.abs(Kref).max()),
                     "top_eigenvalues": [float(x) for x in w[:4]], "effective_rank": float(w.sum() ** 2 / (w ** 2).sum())}
    for r in res_ntk.values():
        r.pop("K", None)
    grad_flops = n * 3 * 2 * P * T
    jjt_flops = 2 * n * n * P
    flops = grad_flops + jjt_flops
    # lensjax's head runs on the scored positions only: the FLOPs it skips (the table's GFLOP and
    # GFLOP/s columns keep the all-logits count, the same for every side)
    from lensjax.models.lm import logit_positions

    head = int(model.params["lm_head"]["w"].size) if "lm_head" in model.params else 0
    k_ntk = (logit_positions(probe) if T > 1 else None)
    k_ntk = T if k_ntk is None else k_ntk.shape[1]
    head_skipped_ntk = n * 3 * 2 * head * (T - k_ntk)

    del hf_eager
    train_batch = make_batch(rng, args.train_batch, args.train_seq, 8192)
    res_train = {}
    no_bf16 = {"error": "skipped: --no-bf16"}
    bf16 = (torch_bf16.decide(args.torch_bf16, args.smoke) if args.bf16  # PyTorch's bf16 baseline only where it can run
            else {"run": False, "reason": no_bf16["error"], "probe": None})
    kc = args.steps_per_call
    runs = [("lensjax", lambda: train_lensjax(model, train_batch, args)),
            ("torch_eager", lambda: train_torch(path, train_batch, args)),
            ("torch_eager_keep", lambda: train_torch(path, train_batch, args, keep=True)),
            ("lensjax_bf16", lambda: train_lensjax(model, train_batch, args, "bfloat16") if args.bf16 else dict(no_bf16)),
            ("torch_autocast", lambda: train_torch(path, train_batch, args, autocast=True) if bf16["run"]
             else {"error": bf16["reason"]})]
    if kc > 1:
        runs += [("lensjax_multi", lambda: train_lensjax(model, train_batch, args, steps_per_call=kc)),
                 ("lensjax_bf16_multi", lambda: train_lensjax(model, train_batch, args, "bfloat16", kc)
                  if args.bf16 else dict(no_bf16))]
    for name, fn in runs:
        try:
            wait_idle(args.wait_idle)
            with OtherLoad() as ol:
                res_train[name] = fn()
            res_train[name]["other_cpu_load"] = ol.fraction
        except Exception as e:
            res_train[name] = {"error": f"{type(e).__name__}: {e}"}
        r = res_train[name]
        print(f"  train {name:<18} " + (f"{r['time_s']:8.4f} s (min {min(r['times_s']):.4f}; other processes' CPU load "
                                        f"{100 * r['other_cpu_load']:.0f}%)" if "time_s" in r else f"FAILED/SKIPPED: {r['error']}"))
    if "losses" in res_train["lensjax"] and "losses" in res_train["torch_eager"]:
        a, b = np.array(res_train["lensjax"]["losses"]), np.array(res_train["torch_eager"]["losses"])
        res_train["max_abs_loss_diff"] = float(np.abs(a - b).max())
    for name in ("lensjax_bf16", "torch_autocast", "lensjax_multi", "lensjax_bf16_multi", "torch_eager_keep"):
        # mixed precision's numerics (and the k-step program's): its losses against float32's, step by step
        if "losses" in res_train.get(name, {}) and "losses" in res_train["torch_eager"]:
            a, b = np.array(res_train[name]["losses"]), np.array(res_train["torch_eager"]["losses"])
            m = min(len(a), len(b))
            res_train[name]["max_abs_loss_diff_vs_float32"] = float(np.abs(a[:m] - b[:m]).max())
            res_train[name]["loss_steps_compared"] = m
    train_flops = 3 * 2 * P * args.train_batch * args.train_seq
    k_tr = logit_positions(train_batch)
    k_tr = args.train_seq if k_tr is None else k_tr.shape[1]
    head_skipped_train = 3 * 2 * head * args.train_batch * (args.train_seq - k_tr)

    # ------------------------------------------------------------------------------ table
    def ratio(base, lj):
        return base["time_s"] / lj["time_s"] if "time_s" in base and "time_s" in lj else None

    rows = [
        (f"exact NTK n={n} T={T}", "PyTorch loop", res_ntk["torch_loop"], res_ntk["lensjax"], "ntk_vs_loop"),
        (f"exact NTK n={n} T={T}", "torch.func", res_ntk["torch_func"], res_ntk["lensjax"], "ntk_vs_func"),
        (f"exact NTK n={n} T={T}", "torch.func, logits_to_keep", res_ntk["torch_func_keep"], res_ntk["lensjax"], None),
        (f"AdamW step {args.train_batch}x{args.train_seq}", "PyTorch eager", res_train["torch_eager"], res_train["lensjax"], "train_vs_eager"),
        (f"AdamW step {args.train_batch}x{args.train_seq}, bf16 mixed", "PyTorch eager", res_train["torch_eager"],
         res_train["lensjax_bf16"], "train_vs_eager"),
        (f"AdamW step {args.train_batch}x{args.train_seq}, bf16 mixed", "PyTorch autocast bf16", res_train["torch_autocast"],
         res_train["lensjax_bf16"], None),
    ] + ([] if kc <= 1 else [
        (f"AdamW step {args.train_batch}x{args.train_seq}, {kc} steps per call", "PyTorch eager", res_train["torch_eager"],
         res_train["lensjax_multi"], "train_vs_eager"),
        (f"AdamW step {args.train_batch}x{args.train_seq}, bf16 mixed, {kc} steps per call", "PyTorch eager",
         res_train["torch_eager"], res_train["lensjax_bf16_multi"], "train_vs_eager"),
        (f"AdamW step {args.train_batch}x{args.train_seq}, {kc} steps per call", "PyTorch eager, logits_to_keep",
         res_train["torch_eager_keep"], res_train["lensjax_multi"], None),
        (f"AdamW step {args.train_batch}x{args.train_seq}, bf16 mixed, {kc} steps per call", "PyTorch eager, logits_to_keep",
         res_train["torch_eager_keep"], res_train["lensjax_bf16_multi"], None),
    ])
    if not args.bf16:  # --no-bf16: no mixed-precision rows at all
        rows = [row for row in rows if "bf16" not in row[0]]
    table = []
    fmt = lambda r: f"{r['time_s']:.4f}" if "time_s" in r else "n/a"  # noqa: E731
    print(f"\n{'task':<48}{'baseline':<31}{'base (s)':>10}{'lensjax (s)':>13}{'ratio':>8}{'goal':>7}  met?")
    for task, base_name, base, lj, goal_key in rows:
        rt, goal = ratio(base, lj), GOALS.get(goal_key)
        met = None if rt is None or goal is None else bool(rt >= goal)
        rs = f"{rt:.2f}x" if rt is not None else "n/a"
        gs = f"{goal:>6.1f}x" if goal is not None else f"{'-':>7}"
        print(f"{task:<48}{base_name:<31}{fmt(base):>10}{fmt(lj):>13}{rs:>8}{gs}  "
              + ("-" if met is None else ("yes" if met else "NO")))
        table.append({"task": task, "baseline": base_name, "baseline_s": base.get("time_s"), "lensjax_s": lj.get("time_s"),
                      "ratio": rt, "goal": goal, "met": met, "precision": "bfloat16" if "bf16" in task else "float32"})

    lj = res_ntk["lensjax"]
    print(f"\nNTK FLOP estimate: {flops / 1e9:.1f} GFLOP = per-sample gradients n·3·2·P·T {grad_flops / 1e9:.1f} "
          f"+ J Jᵀ 2·n²·P {jjt_flops / 1e9:.1f} (P = {P:,}, all parameters)")
    if "time_s" in lj:
        print(f"  lensjax NTK: {flops / lj['time_s'] / 1e9:.1f} GFLOP/s; compile {lj['compile_s']:.1f} s (first call {lj['first_call_s']:.1f} s)")
    for name, r in res_ntk.items():
        if "time_s" in r:
            r["gflops_per_s"] = flops / r["time_s"] / 1e9
    parts = []
    lr = res_ntk.get("lensjax_rows", {})
    if "jacobian_rows_s" in lr and "time_s" in lr:
        parts.append(f"lensjax rows route {lr['time_s']:.2f} s: J alone {lr['jacobian_rows_s']:.2f} s "
                     f"(so J Jᵀ + glue ≈ {lr['time_s'] - lr['jacobian_rows_s']:.2f} s)")
    for name in ("torch_loop", "torch_func"):
        if "jjt_s" in res_ntk[name]:
            parts.append(f"{name} J Jᵀ {res_ntk[name]['jjt_s']:.2f} s")
    if parts:
        print("  breakdown: " + "; ".join(parts))
    for name in ("lensjax", "torch_func", "torch_func_keep"):
        r = res_ntk[name]
        if "max_rel_diff_vs_loop" in r:
            print(f"  {name} vs PyTorch loop: max |ΔK| / max |K| = {r['max_rel_diff_vs_loop']:.2e}")
    if "max_rel_diff_vs_func" in lj:
        print(f"  lensjax vs torch.func:    max |ΔK| / max |K| = {lj['max_rel_diff_vs_func']:.2e}")
    for name, r in res_ntk.items():
        if "max_rel_diff_vs_float64" in r:
            print(f"  {name} vs float64 J Jᵀ of the loop's J: max |ΔK| / max |K| = {r['max_rel_diff_vs_float64']:.2e}")
    if k_summary:
        print(f"  K: trace {k_summary['trace']:.4g}, top eigenvalues {', '.join(f'{x:.4g}' for x in k_summary['top_eigenvalues'])}, "
              f"effective rank {k_summary['effective_rank']:.2f}")
    print(f"  lensjax's head runs on {k_ntk} of {T} positions: {head_skipped_ntk / 1e9:.1f} GFLOP of the estimate skipped")
    tl = res_train["lensjax"]
    print(f"train step FLOP estimate: {train_flops / 1e9:.1f} GFLOP (3·2·P·B·T); lensjax's head on {k_tr} of "
          f"{args.train_seq} positions skips {head_skipped_train / 1e9:.1f} GFLOP of it")
    if "time_s" in tl:
        tl["gflops_per_s"] = train_flops / tl["time_s"] / 1e9
        print(f"  lensjax step: {tl['gflops_per_s']:.1f} GFLOP/s; compile {tl['compile_s']:.1f} s (first call {tl['first_call_s']:.1f} s)")
    for name in ("torch_eager", "torch_eager_keep", "lensjax_bf16", "torch_autocast", "lensjax_multi", "lensjax_bf16_multi"):
        if "time_s" in res_train.get(name, {}):
            res_train[name]["gflops_per_s"] = train_flops / res_train[name]["time_s"] / 1e9
    for name in ("lensjax_bf16", "torch_autocast", "lensjax_multi", "lensjax_bf16_multi", "torch_eager_keep"):
        if "max_abs_loss_diff_vs_float32" in res_train.get(name, {}):
            print(f"  {name}: max |Δloss| against PyTorch float32 over {res_train[name]['loss_steps_compared']} steps = "
                  f"{res_train[name]['max_abs_loss_diff_vs_float32']:.2e}")
    if "max_abs_loss_diff" in res_train:
        print(f"  loss trajectories ({len(tl['losses'])} steps from the same weights): max |Δloss| = {res_train['max_abs_loss_diff']:.2e}")

    bounds = diagnostic(args.step_bounds, "--no-step-bounds", args, lambda: train_bounds(model, train_batch, args))
    print_bounds(bounds, res_train.get("lensjax_multi", {}), res_train.get("torch_eager", {}))

    import jax.numpy as jnp

    nb = diagnostic(args.ntk_bounds, "--no-ntk-bounds", args, lambda: ntk_bounds.measure(
        model.config, model.params, {k: jnp.asarray(v) for k, v in probe.items()}, args.repeats, args.dot_repeats))
    if "error" in nb:
        print(f"NTK bounds: {nb['error']}")
    else:
        print(f"NTK bounds: {ntk_bounds.summary(nb)}.")
        print_shapes(nb["grams"])

    busy = {k: r.get("other_cpu_load", 0.0) for k, r in [*res_ntk.items(), *[(f"train_{a}", b) for a, b in res_train.items()
                                                                              if isinstance(b, dict)]]}
    if max(busy.values(), default=0.0) > 0.10:
        print(f"WARNING: other processes used up to {100 * max(busy.values()):.0f}% of the CPUs during a timed section; "
              "timings are unreliable (see other_cpu_load in the JSON)")

    payload = {
        "setup": {"params": P, "params_lensjax": P_lj, "input_embedding_params": P_embed, "layers": args.layers,
                  "model_dir": str(path), "ntk_n": n, "ntk_T": T, "ntk_target_tokens": T - T // 2, "chunk": args.chunk,
                  "repeats": args.repeats, "train_batch": args.train_batch, "train_seq": args.train_seq,
                  "train_warmup": args.train_warmup, "train_repeats": args.train_repeats, "lr": args.lr,
                  "steps_per_call": args.steps_per_call,
                  "torch_threads": torch.get_num_threads(), "jax": jax.__version__, "torch": torch.__version__,
                  "transformers": tf.__version__, "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                  "loadavg_at_end": list(os.getloadavg()),
                  "torch_attention": {"loop": "sdpa", "func": "eager", "train": "sdpa"},
                  "torch_bf16": bf16, "bf16_rows": args.bf16,
                  "scored_positions": "lensjax's head runs on the scored positions only (logit_pos: lensjax.models.lm."
                                      "with_logit_positions; ntk_exact adds them, the ladder's batches carry them); the "
                                      "*_keep torch rows do the same with logits_to_keep, the others compute all logits"},
        "ntk": {**res_ntk, "flops": flops, "grad_flops": grad_flops, "jjt_flops": jjt_flops, "K_summary": k_summary,
                "lensjax_head_positions": k_ntk, "lensjax_head_flops_skipped": head_skipped_ntk},
        "train_step": {**res_train, "flops": train_flops, "lensjax_head_positions": k_tr,
                       "lensjax_head_flops_skipped": head_skipped_train},
        "step_bounds": bounds,
        "ntk_bounds": nb,
        "table": table,
        "goals": GOALS,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are meant to be read by others
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    print(f"wrote {out}")


if __name__ == "__main__":
    from lensjax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()  # glibc huge pages for XLA's buffers (lensjax/runtime.py)
    main()
