"""Benchmark: lensjax vs Hugging Face PyTorch on CPU, in one run.

    python benchmarks/bench_forward.py [--out docs/bench_forward.json] [--quick] [--shapes t5-base,...]
    python benchmarks/bench_forward.py --smoke      # tiny shapes, seconds (the test suite runs it)

Random weights (no hub access) on three shapes: GPT-2 small (124M), a ~150M Llama (hidden 768,
12 layers, 12 heads / 4 kv heads, MLP 3072, vocab 32000) and T5-base (223M: 12 + 12 layers,
d_model 768, d_ff 3072, 12 heads, vocab 32128, tied head).

* forward: logits for a batch of 8 × 128 tokens (median of repeats, after warm-up / compile);
  for T5 the encoder reads 8 × 128 tokens and the decoder 8 × 128 (teacher forcing);
* generate: greedy decoding of 64 new tokens for 8 prompts of 128 tokens (tokens/s; HF
  ``generate(do_sample=False)``, EOS suppressed in both so both produce 64 tokens; T5 encodes
  the prompt once and decodes 64 tokens);
* FLOPs: 2 · (matrix parameters touched per token) · tokens, plus attention; the achieved rate
  is compared with a float32 matmul peak measured in the same run (the best of 5 jax 4096³
  products);
* forward with bfloat16 parameters (``lensjax.load(dtype="bfloat16")``, HF
  ``from_pretrained(torch_dtype=torch.bfloat16)``): the same batch, against HF in bf16 and against
  lensjax's plain bf16 program (``_nested``: traced without ``xla.f32_dots``, compiled with XLA's
  bf16 float normalization, as before ``xla.jit(mixed="auto")``), with each side's max |Δlogit|
  from HF float32 and the compiled temporaries of both lensjax programs;
  HF in bf16 only where PyTorch's bf16 matmul is not slow on this CPU (``--torch-bf16``,
  ``benchmarks/torch_bf16.py``: without bf16 units one such forward takes minutes);
* load: wall time and peak RSS of loading the GPT-2 checkpoint (float32 safetensors, ~500 MB),
  each in a fresh subprocess, vs ``transformers`` ``from_pretrained``. "peak − base" is the
  process's peak RSS minus its RSS just before the load.

``--quick`` (``run_all.py --quick``): 2 repeats (1 for generation), 32 new tokens, a 2048³ peak
and no load section. Prints a table with lensjax/HF ratios and writes JSON (atomically).
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

import torch_bf16  # benchmarks/torch_bf16.py: whether HF's bf16 baseline can run on this CPU
from lensjax.io import atomic_write


def _median_time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def shape_configs(smoke: bool):
    import transformers as tf

    if smoke:
        return {
            "gpt2-tiny": tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=256),
            "llama-tiny": tf.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                         pad_token_id=0),
            "t5-tiny": tf.T5Config(vocab_size=512, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0),
        }
    return {
        "gpt2-124M": tf.GPT2Config(),
        "llama-150M": tf.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                                     tie_word_embeddings=False, pad_token_id=0),
        "t5-base": tf.T5Config(vocab_size=32128, d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_heads=12,
                               decoder_start_token_id=0, pad_token_id=0),
    }


def make_models(root: Path, smoke: bool = False, only=None):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    out = {}
    for name, cfg in shape_configs(smoke).items():
        if only and name not in only:
            continue
        d = root / name
        if not (d / "model.safetensors").exists():
            auto = tf.AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else tf.AutoModelForCausalLM
            m = auto.from_config(cfg)
            m.save_pretrained(str(d))
            del m
        out[name] = d
    return out


def matmul_peak(n: int = 4096, repeats: int = 5) -> float:
    """Measured float32 matmul rate of this device (GFLOP/s): the best of ``repeats`` jax n × n × n
    products (the best, not the median: a peak)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def forward_flops(cfg, B: int, T: int, T_dec: int = 0) -> float:
    """2 · matrix parameters · tokens + attention (QKᵀ and PV) for one forward pass."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    ffn = (3 if cfg.gated_mlp else 2) * D * F
    attn = 2 * D * cfg.q_dim + 2 * D * cfg.kv_dim
    if cfg.is_encoder_decoder:
        enc = 2 * B * T * cfg.encoder_layers * (attn + ffn) + 4 * B * T * T * cfg.q_dim * cfg.encoder_layers
        # decoder tokens: self-attention, cross q and o, FFN; encoder tokens: cross k and v
        dec = (2 * B * T_dec * L * (attn + 2 * D * cfg.q_dim + ffn) + 2 * B * T * L * 2 * D * cfg.kv_dim
               + 4 * B * T_dec * (T_dec + T) * cfg.q_dim * L)
        return float(enc + dec + 2 * B * T_dec * D * V)
    return float(2 * B * T * (L * (attn + ffn) + D * V) + 4 * B * T * T * cfg.q_dim * L)


def bench_compute(path: Path, args) -> dict:
    import jax
    import torch
    import transformers as tf

    import lensjax

    torch.set_num_threads(os.cpu_count() or 2)
    model = lensjax.load(path, tokenizer=False)
    cfg = model.config
    encdec = cfg.is_encoder_decoder
    auto = tf.AutoModelForSeq2SeqLM if encdec else tf.AutoModelForCausalLM
    hf = auto.from_pretrained(str(path), attn_implementation="sdpa").eval()
    n_params = sum(p.numel() for p in hf.parameters())
    rng = np.random.default_rng(0)
    B, T, N = args.batch, args.tokens, args.new_tokens
    ids = rng.integers(3, min(1000, cfg.vocab_size), size=(B, T))
    tids = torch.tensor(ids)
    dec = np.concatenate([np.zeros((B, 1), np.int64), ids[:, :-1]], axis=1)  # T5: start token 0, then shifted
    tdec = torch.tensor(dec)
    kw_hf = dict(decoder_input_ids=tdec) if encdec else {}
    kw_lj = dict(decoder_input_ids=dec) if encdec else {}

    def hf_fwd():
        with torch.no_grad():
            return hf(input_ids=tids, **kw_hf).logits

    def lj_fwd():
        return lensjax.forward(cfg, model.params, ids, **kw_lj).block_until_ready()

    t0 = time.perf_counter()
    lj_fwd()
    compile_fwd = time.perf_counter() - t0
    hf_fwd()
    r = args.repeats
    t_hf, t_lj = _median_time(hf_fwd, r), _median_time(lj_fwd, r)
    a, b = hf_fwd().numpy(), np.asarray(lj_fwd())
    fwd_err = float(np.abs(a - b).max())

    bf16 = bench_bf16_forward(path, args, ids, dec, a, hf_fwd) if args.bf16 else None

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
    skip = 1 if encdec else T  # HF returns the decoder start token / the prompt first
    same = float((np.asarray(g_lj)[:, skip:] == g_hf.numpy()[:, skip:]).mean())
    flops = forward_flops(cfg, B, T, T if encdec else 0)
    return {
        "params": int(n_params),
        "family": cfg.family,
        "batch": [B, T], "new_tokens": N,
        "forward_s": {"hf": t_hf, "lensjax": t_lj, "speedup": t_hf / t_lj, "lensjax_compile_s": compile_fwd,
                      "max_abs_logit_diff": fwd_err, "flops": flops, "lensjax_gflop_s": flops / t_lj / 1e9,
                      "hf_gflop_s": flops / t_hf / 1e9},
        "generate": {"hf_tok_s": B * N / tg_hf, "lensjax_tok_s": B * N / tg_lj, "speedup": tg_hf / tg_lj,
                     "lensjax_compile_s": compile_gen, "greedy_token_agreement": same,
                     "weight_bytes_per_step": int(4 * n_params)},
        **({"forward_bf16": bf16} if bf16 else {}),
    }


def bench_bf16_forward(path: Path, args, ids, dec, ref, hf_fwd32) -> dict:
    """The forward on bfloat16 parameters: lensjax (the program ``forward`` runs), lensjax's plain
    bf16 program and HF PyTorch in bf16; errors against HF float32's logits ``ref``."""
    import jax
    import jax.numpy as jnp
    import torch
    import transformers as tf

    import lensjax
    from lensjax.models import transformer as T

    m16 = lensjax.load(path, tokenizer=False, dtype="bfloat16")
    cfg = m16.config
    auto = tf.AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else tf.AutoModelForCausalLM
    with_hf = args.hf_bf16["run"]
    hf16 = auto.from_pretrained(str(path), attn_implementation="sdpa", torch_dtype=torch.bfloat16).eval() if with_hf else None
    jids = jnp.asarray(ids, jnp.int32)
    if cfg.is_encoder_decoder:  # the arguments lensjax.forward hands its jitted program, and its logits
        prog, pargs = T._forward_encdec_jit, (cfg, m16.params, jids, None, jnp.asarray(dec, jnp.int32), None)
        logits = lambda out: out  # noqa: E731
    else:
        prog, pargs = T._forward_jit, (cfg, m16.params, jids, None, None, None)
        logits = lambda out: out[0]  # noqa: E731  (logits, cache)
    tids = torch.tensor(ids)
    kw = dict(decoder_input_ids=torch.tensor(dec)) if cfg.is_encoder_decoder else {}

    def hf():
        with torch.no_grad():
            return hf16(input_ids=tids, **kw).logits

    def lj():
        return logits(prog(*pargs)).block_until_ready()

    def plain():
        return logits(prog._nested(*pargs)).block_until_ready()

    sides = (("lensjax", lj), ("plain", plain)) + ((("hf", hf),) if with_hf else ())
    outs = {k: np.asarray(fn(), np.float32) if k != "hf" else fn().float().numpy() for k, fn in sides}  # warm-up / compile, and the logits
    r = args.repeats
    times = {k: _median_time(fn, r) for k, fn in sides}
    times.setdefault("hf", None)
    temp = {k: int(j.lower(*pargs).compile().memory_analysis().temp_size_in_bytes)
            for k, j in (("lensjax", prog), ("plain", prog._nested))}
    return {"hf_s": times["hf"], "lensjax_s": times["lensjax"], "plain_s": times["plain"],
            "speedup_vs_hf": times["hf"] / times["lensjax"] if with_hf else None,
            "speedup_vs_plain": times["plain"] / times["lensjax"], "hf_bf16": args.hf_bf16,
            "max_abs_logit_diff_vs_hf32": {k: float(np.abs(v - ref).max()) for k, v in outs.items()},
            "max_abs_logit_ref": float(np.abs(ref).max()),
            "temp_bytes": temp, "param_bytes": int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(m16.params))),
            "options_accepted": all(prog._checked.values()) and bool(prog._checked)}


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
    ap.add_argument("--out", default="docs/bench_forward.json")
    ap.add_argument("--models", default=os.environ.get("LENSJAX_BENCH_MODELS", str(Path(tempfile.gettempdir()) / "lensjax-bench-models")))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens per prompt (64; --quick 32)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--shapes", default=None, help="comma-separated subset of the shapes")
    ap.add_argument("--quick", action="store_true",
                    help="2 repeats (1 for generation), 32 new tokens, a 2048³ peak, no load section (run_all.py --quick)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repeat, 2 x 16 tokens, 4 new (a test)")
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bfloat16-parameter forward")
    torch_bf16.add_argument(ap)
    args = ap.parse_args()
    if args.quick:
        args.repeats = 2
    args.new_tokens = args.new_tokens or (32 if args.quick else 64)
    if args.smoke:
        args.repeats, args.batch, args.tokens, args.new_tokens = 1, 2, 16, 4
        args.models = str(Path(args.out).parent / "models")
    args.hf_bf16 = torch_bf16.decide(args.torch_bf16, args.smoke) if args.bf16 else None
    if args.hf_bf16 and not args.hf_bf16["run"]:
        print(f"HF PyTorch bf16 forward: {args.hf_bf16['reason']}", flush=True)
    only = set(args.shapes.split(",")) if args.shapes else None
    paths = make_models(Path(args.models), smoke=args.smoke, only=only)
    peak = matmul_peak(256 if args.smoke else 2048 if args.quick else 4096)
    results = {name: bench_compute(p, args) for name, p in paths.items()}
    for r in results.values():
        r["forward_s"]["lensjax_fraction_of_peak"] = r["forward_s"]["lensjax_gflop_s"] / peak
    first = next(iter(paths.values()))
    load = None if args.quick and not args.smoke else bench_load(paths.get("gpt2-124M", first))  # not a table row

    B, T, N = args.batch, args.tokens, args.new_tokens
    print(f"\nmeasured float32 matmul peak: {peak:.0f} GFLOP/s")
    print(f"\n{'model':<12}{'task':<28}{'HF torch':>12}{'lensjax':>12}{'ratio':>8}{'GFLOP/s':>9}{'of peak':>9}")
    for name, r in results.items():
        f, g = r["forward_s"], r["generate"]
        print(f"{name:<12}{f'forward {B}x{T} (s)':<28}{f['hf']:>12.4f}{f['lensjax']:>12.4f}{f['speedup']:>7.2f}x"
              f"{f['lensjax_gflop_s']:>9.0f}{f['lensjax_fraction_of_peak']:>9.2f}")
        print(f"{'':<12}{f'greedy {B}x{N} new (tok/s)':<28}{g['hf_tok_s']:>12.1f}{g['lensjax_tok_s']:>12.1f}{g['speedup']:>7.2f}x")
        if "forward_bf16" in r:
            h = r["forward_bf16"]
            hf_s, sp = ("skipped", "  n/a") if h["hf_s"] is None else (f"{h['hf_s']:.4f}", f"{h['speedup_vs_hf']:.2f}")
            print(f"{'':<12}{f'forward {B}x{T}, bf16 (s)':<28}{hf_s:>12}{h['lensjax_s']:>12.4f}{sp:>7}x"
                  f"   plain bf16 program {h['plain_s']:.4f} s ({h['speedup_vs_plain']:.2f}x); temporaries "
                  f"{h['temp_bytes']['lensjax'] / 2**20:.0f} vs {h['temp_bytes']['plain'] / 2**20:.0f} MiB "
                  f"for {h['param_bytes'] / 2**20:.0f} MiB of bf16 parameters")
        print(f"{'':<12}compile: forward {f['lensjax_compile_s']:.1f} s, generate {g['lensjax_compile_s']:.1f} s; "
              f"max |Δlogit| {f['max_abs_logit_diff']:.2e}; greedy agreement {g['greedy_token_agreement']:.3f}")
    if load is not None:
        mb = load["file_bytes"] / 2**20
        print(f"\nload {Path(paths.get('gpt2-124M', first)).name} ({mb:.0f} MiB safetensors):")
        for which in ("lensjax", "hf"):
            r = load[which]
            print(f"  {which:<8} wall {r['wall_s']:.2f} s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB, "
                  f"peak − base {(r['peak_rss'] - r['base_rss']) / 2**20:.0f} MiB = {r['peak_minus_base_over_file']:.2f}x file")
    import jax
    import torch
    import transformers

    payload = {"models": results, "load": load, "matmul_peak_gflop_s": peak,
               "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
               "versions": {"jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
               "settings": {"batch": B, "tokens": T, "new_tokens": N, "repeats": args.repeats, "smoke": args.smoke}}
    path = atomic_write(args.out, json.dumps(payload, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    from lensjax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()  # glibc huge pages for XLA's buffers (lensjax/runtime.py)
    main()
