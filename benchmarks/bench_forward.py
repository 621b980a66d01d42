"""Benchmark: lensjax vs Hugging Face PyTorch on CPU, in one run.

    python benchmarks/bench_forward.py [--out benchmarks/results/bench_forward.json] [--quick]

Random weights (no hub access) on two shapes: GPT-2 small (124M) and a ~150M Llama
(hidden 768, 12 layers, 12 heads / 4 kv heads, MLP 3072, vocab 32000).

* forward: logits for a batch of 8 × 128 tokens (median of repeats, after warm-up / compile);
* generate: greedy decoding of 64 new tokens for 8 prompts of 128 tokens (tokens/s; HF
  ``generate(do_sample=False)``, EOS suppressed in both so both produce 64 tokens);
* load: wall time and peak RSS of loading the GPT-2 checkpoint (float32 safetensors, ~500 MB),
  each in a fresh subprocess, vs ``transformers`` ``from_pretrained``. "peak − base" is the
  process's peak RSS minus its RSS just before the load.

Prints a table with lensjax/HF ratios and writes JSON (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from lensjax.io import atomic_write


def _median_time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def make_models(root: Path):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    shapes = {
        "gpt2-124M": tf.GPT2Config(),
        "llama-150M": tf.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                                     tie_word_embeddings=False, pad_token_id=0),
    }
    out = {}
    for name, cfg in shapes.items():
        d = root / name
        if not (d / "model.safetensors").exists():
            m = tf.AutoModelForCausalLM.from_config(cfg)
            m.save_pretrained(str(d))
            del m
        out[name] = d
    return out


def bench_compute(path: Path, args) -> dict:
    import jax
    import torch
    import transformers as tf

    import lensjax

    torch.set_num_threads(os.cpu_count() or 2)
    hf = tf.AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa").eval()
    model = lensjax.load(path, tokenizer=False)
    n_params = sum(p.numel() for p in hf.parameters())
    rng = np.random.default_rng(0)
    B, T, N = 8, 128, args.new_tokens
    ids = rng.integers(3, 1000, size=(B, T))
    tids = torch.tensor(ids)

    def hf_fwd():
        with torch.no_grad():
            return hf(tids).logits

    def lj_fwd():
        return lensjax.forward(model.config, model.params, ids).block_until_ready()

    t0 = time.perf_counter()
    lj_fwd()
    compile_fwd = time.perf_counter() - t0
    hf_fwd()
    r = args.repeats
    t_hf, t_lj = _median_time(hf_fwd, r), _median_time(lj_fwd, r)
    a, b = hf_fwd().numpy(), np.asarray(lj_fwd())
    fwd_err = float(np.abs(a - b).max())

    def hf_gen():
        with torch.no_grad():
            return hf.generate(tids, attention_mask=torch.ones_like(tids), max_new_tokens=N, min_new_tokens=N,
                               do_sample=False, pad_token_id=0)

    def lj_gen():
        return jax.block_until_ready(lensjax.generate(model.config, model.params, ids, max_new_tokens=N,
                                                      eos_token_id=[], pad_token_id=0))

    t0 = time.perf_counter()
    g_lj = lj_gen()
    compile_gen = time.perf_counter() - t0
    g_hf = hf_gen()
    rg = max(1, r // 2)
    tg_hf, tg_lj = _median_time(hf_gen, rg), _median_time(lj_gen, rg)
    same = float((np.asarray(g_lj)[:, T:] == g_hf.numpy()[:, T:]).mean())
    return {
        "params": int(n_params),
        "forward_s": {"hf": t_hf, "lensjax": t_lj, "speedup": t_hf / t_lj, "lensjax_compile_s": compile_fwd,
                      "max_abs_logit_diff": fwd_err},
        "generate": {"hf_tok_s": B * N / tg_hf, "lensjax_tok_s": B * N / tg_lj, "speedup": tg_hf / tg_lj,
                     "lensjax_compile_s": compile_gen, "greedy_token_agreement": same},
    }


LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    def status(key):  # /proc/self/status: VmRSS now, VmHWM peak of this process image (reset by exec)
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    rss = lambda: status("VmRSS")
    which, path = sys.argv[1], sys.argv[2]
    if which == "lensjax":
        import jax, lensjax
        jax.numpy.zeros(1).block_until_ready()
        base = rss(); t0 = time.perf_counter()
        m = lensjax.load(path, tokenizer=False)
        jax.block_until_ready(m.params)
    else:
        import torch, transformers as tf
        base = rss(); t0 = time.perf_counter()
        m = tf.AutoModelForCausalLM.from_pretrained(path)
    dt = time.perf_counter() - t0
    peak = status("VmHWM")
    print(json.dumps({"wall_s": dt, "base_rss": base, "peak_rss": peak}))
    """
)


def bench_load(path: Path) -> dict:
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    out = {"file_bytes": size}
    for which in ("lensjax", "hf"):
        r = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, which, str(path)], capture_output=True, text=True,
                           env=dict(os.environ, JAX_PLATFORMS="cpu"))
        if r.returncode:
            raise RuntimeError(r.stderr[-2000:])
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res["peak_minus_base_over_file"] = (res["peak_rss"] - res["base_rss"]) / size
        out[which] = res
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/bench_forward.json")
    ap.add_argument("--models", default=os.environ.get("LENSJAX_BENCH_MODELS", str(Path(tempfile.gettempdir()) / "lensjax-bench-models")))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    args = ap.parse_args()
    if args.quick:
        args.repeats = 2
    paths = make_models(Path(args.models))
    results = {name: bench_compute(p, args) for name, p in paths.items()}
    load = bench_load(paths["gpt2-124M"])

    print(f"\n{'model':<12}{'task':<28}{'HF torch':>12}{'lensjax':>12}{'ratio':>8}")
    for name, r in results.items():
        f, g = r["forward_s"], r["generate"]
        print(f"{name:<12}{'forward 8x128 (s)':<28}{f['hf']:>12.4f}{f['lensjax']:>12.4f}{f['speedup']:>7.2f}x")
        print(f"{'':<12}{'greedy 8x64 new (tok/s)':<28}{g['hf_tok_s']:>12.1f}{g['lensjax_tok_s']:>12.1f}{g['speedup']:>7.2f}x")
        print(f"{'':<12}compile: forward {f['lensjax_compile_s']:.1f} s, generate {g['lensjax_compile_s']:.1f} s; "
              f"max |Δlogit| {f['max_abs_logit_diff']:.2e}; greedy agreement {g['greedy_token_agreement']:.3f}")
    mb = load["file_bytes"] / 2**20
    print(f"\nload gpt2-124M ({mb:.0f} MiB safetensors):")
    for which in ("lensjax", "hf"):
        r = load[which]
        print(f"  {which:<8} wall {r['wall_s']:.2f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB, "
              f"peak − base {(r['peak_rss'] - r['base_rss']) / 2**20:.0f} MiB = {r['peak_minus_base_over_file']:.2f}x file")
    payload = {"models": results, "load": load}
    path = atomic_write(args.out, json.dumps(payload, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
