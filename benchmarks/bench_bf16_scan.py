"""bfloat16 arrays through the layer scan on XLA CPU: the mixed-precision programs' compiler option.

    python benchmarks/bench_bf16_scan.py [--quick | --smoke] [--out FILE]

XLA CPU's ``float-normalization-bf16`` pass treats a ``while`` loop (``lax.scan``) as unable to
carry bfloat16: a bf16 stack that enters or leaves the scan becomes a float32 copy of the whole
stack outside the loop, narrowed again slice by slice inside it. ``lensjax.kernels.xla`` compiles
the mixed-precision programs (``xla.jit(..., mixed=True)``) without that pass. Two measurements,
each against the same program with the backend's defaults, in the same run:

(a) a scan over L stacked bf16 weights [L, K, N] that multiplies x [M, K] (bf16) by each with
    float32 accumulation and stacks the bf16 results [L, M, N] (what the SVF update's forward scan
    reads and writes: U, Vᵀ, W′ and the saved activations); FLOPs 2·L·M·K·N, bytes (lower bound)
    2·L·(K·N + M·N);
(b) lensjax's mixed-precision AdamW fine-tuning step (``make_train_step(compute_dtype=
    "bfloat16")``) on the 10M Llama of ``bench_ntk.py``, 8 × 128: the option against
    ``LENSJAX_XLA_OPTIONS=0`` (no options: the backend's float normalization), each in its own
    process; the losses of the two must agree (the option changes no arithmetic).

The bf16 peak (2048³, bf16 operands, float32 accumulation) is measured in the same run.
``--smoke``: the test suite's tiny version (numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_all import matmul_peak  # noqa: E402  (the same bf16 peak as run_all's)


def _median_time(fn, *args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def scan_case(L: int, M: int, K: int, N: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from lensjax.kernels import xla

    bf = jnp.bfloat16
    ws = jax.random.normal(jax.random.key(0), (L, K, N), jnp.float32).astype(bf)
    x = jax.random.normal(jax.random.key(1), (M, K), jnp.float32).astype(bf)

    def stack(ws, x):
        def body(c, w):
            y = jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            return c + jnp.sum(y), y.astype(bf)
        return jax.lax.scan(body, jnp.float32(0), ws)

    default, mixed = jax.jit(stack), xla.jit(stack, mixed=True)
    hlo_default = default.lower(ws, x).compile().as_text()
    hlo_mixed = mixed.lower(ws, x).compile().as_text()
    f32_stack = f"f32[{L},{K},{N}]"
    t_default = _median_time(default, ws, x, repeats=repeats)
    t_mixed = _median_time(mixed, ws, x, repeats=repeats)
    (c0, y0), (c1, y1) = default(ws, x), mixed(ws, x)
    flops = 2 * L * M * K * N
    return {"shape": {"L": L, "M": M, "K": K, "N": N}, "default_s": t_default, "lensjax_s": t_mixed,
            "ratio": t_default / t_mixed, "flops": flops, "bytes_min": 2 * L * (K * N + M * N),
            "lensjax_gflop_s": flops / t_mixed / 1e9, "default_gflop_s": flops / t_default / 1e9,
            "float32_stack_in_default_program": f32_stack in hlo_default,
            "float32_stack_in_lensjax_program": f32_stack in hlo_mixed,
            "max_rel_diff_stacked_outputs": float(jnp.max(jnp.abs(y0.astype(jnp.float32) - y1.astype(jnp.float32)))
                                                  / jnp.max(jnp.abs(y0.astype(jnp.float32)))),
            "rel_diff_sum": abs(float(c0) - float(c1)) / max(abs(float(c0)), 1e-30)}


def train_child(layers: int, batch: int, seq: int, steps: int, warmup: int, model_root: str) -> dict:
    """One process: the mixed AdamW step's median time and losses (options as the environment says)."""
    import jax
    import jax.numpy as jnp
    import optax

    import bench_ntk
    import lensjax
    from lensjax.kernels import xla
    from lensjax.selection.finetune import make_train_step

    model = lensjax.load(bench_ntk.make_model(Path(model_root), SimpleNamespace(layers=layers)), tokenizer=False)
    b = bench_ntk.make_batch(np.random.default_rng(0), batch, seq, 8192)
    b = {k: jnp.asarray(v) for k, v in b.items()}
    tx = optax.adamw(1e-4)
    step = make_train_step(model.config, tx, compute_dtype="bfloat16")
    params = jax.tree.map(jnp.copy, model.params)
    state = tx.init(params)
    ts, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        params, state, loss = jax.block_until_ready(step(params, state, b))
        if i >= warmup:
            ts.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {"median_s": float(np.median(ts)), "times_s": ts, "losses": losses,
            "options": dict(xla.compiler_options(mixed=True))}


def train_case(args, model_root: str) -> dict:
    res = {}
    for name, env in (("default", {"LENSJAX_XLA_OPTIONS": "0"}), ("lensjax", {})):
        spec = json.dumps({"layers": args.layers, "batch": args.batch, "seq": args.seq, "steps": args.steps,
                           "warmup": args.warmup, "model_root": model_root})
        proc = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"train child ({name}) failed:\n{proc.stderr[-3000:]}")
        res[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    d, m = res["default"], res["lensjax"]
    res["ratio"] = d["median_s"] / m["median_s"]
    res["max_abs_loss_diff"] = float(np.max(np.abs(np.array(d["losses"]) - np.array(m["losses"]))))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer repeats and train steps")
    mode.add_argument("--smoke", action="store_true", help="tiny shapes (the test suite; numbers mean nothing)")
    ap.add_argument("--out", default="bench_bf16_scan.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(train_child(**spec)))
        return 0

    import jax

    if args.smoke:
        shape, repeats = (2, 16, 64, 128), 2
        args.layers, args.batch, args.seq, args.steps, args.warmup = 1, 2, 16, 2, 1
    else:
        shape, repeats = (12, 2048, 768, 3072), (3 if args.quick else 7)
        args.layers, args.batch, args.seq = 6, 8, 128
        args.steps, args.warmup = (4, 2) if args.quick else (10, 2)
    peak = matmul_peak(repeats, dtype="bfloat16")["gflop_s"]
    scan = scan_case(*shape, repeats=repeats)
    root = tempfile.mkdtemp(prefix="lensjax-bench-models-") if args.smoke else "/tmp/lensjax-bench-models"
    try:
        train = train_case(args, root)
    finally:
        if args.smoke:
            shutil.rmtree(root, ignore_errors=True)
    scan["fraction_of_bf16_peak"] = scan["lensjax_gflop_s"] / peak
    payload = {"command": "python benchmarks/bench_bf16_scan.py" + (" --smoke" if args.smoke else " --quick" if args.quick else ""),
               "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "jax": jax.__version__,
               "bf16_peak_gflop_s": peak, "scan": scan,
               "train_step": {"model": f"llama h256 f1024 l{args.layers} v8192", "batch": [args.batch, args.seq], **train}}
    s, t = scan, train
    print(f"bf16 peak (2048³, float32 accumulation): {peak:.0f} GFLOP/s")
    print("| program | backend defaults | lensjax (no float normalization) | ratio | notes |")
    print("|---|---|---|---|---|")
    print(f"| scan over {shape[0]} × [{shape[2]}, {shape[3]}] bf16, x [{shape[1]}, {shape[2]}] | {s['default_s'] * 1e3:.1f} ms | "
          f"{s['lensjax_s'] * 1e3:.1f} ms | {s['ratio']:.2f}× | float32 stack in the program: "
          f"{s['float32_stack_in_default_program']} / {s['float32_stack_in_lensjax_program']}; "
          f"{s['lensjax_gflop_s']:.0f} GFLOP/s, {100 * s['fraction_of_bf16_peak']:.0f}% of the bf16 peak |")
    print(f"| mixed AdamW step {args.batch} × {args.seq}, {args.layers}-layer Llama | {t['default']['median_s']:.3f} s | "
          f"{t['lensjax']['median_s']:.3f} s | {t['ratio']:.2f}× | max |Δloss| {t['max_abs_loss_diff']:.1e} over "
          f"{len(t['lensjax']['losses'])} steps |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
