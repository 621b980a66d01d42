"""Benchmark: evaluating a CEM population of expert mixtures — lensjax's one batched factored call
vs recomposing W′ and running the model once per member (the reference code's approach), in
PyTorch and in lensjax, same members, same shots, same run.

    python benchmarks/bench_cem.py [--out docs/bench_cem.json] [--smoke]

One process. For each workload (:data:`WORKLOADS`: ``tiny-short`` — the model of
``scripts/t2_experiment.py``, width 64, 2 layers, 16-token prompts and 4 new tokens, the regime of
that experiment's own CEM; ``tiny`` — the same model, 32 + 16 tokens; ``small`` — width 256,
4 layers, 32 + 16 tokens; Llama, character vocabulary, built offline with ``transformers``; SVF on
all 7 matrices per layer; 3 random experts), one CEM generation of ``--pop`` members (α random on
the simplex), each answering ``--shots`` shots, in two fitness modes:

* ``generate``: greedy decoding of the workload's new tokens per shot (no EOS, so every run decodes the same
  number of tokens);
* ``loglik``: teacher-forced log-likelihood of a reference answer of that many tokens per shot.

Contenders:

* ``lensjax batched``: the library's population scorer. The population's multipliers are mixed
  at once (``mixing.mix_many``); ``generate``: one jitted call over pop × shots rows with per-row
  experts (``mixing.row_params``: W, U, Vᵀ shared, the factored apply); ``loglik``:
  ``mixing.loglik_rows`` as the CEM search calls it, which takes the factored route or recomposes
  each member's W′ once under ``lax.map``, whichever has fewer FLOPs (the route taken is recorded);
* ``lensjax factored rows`` (``loglik`` only): the one factored call over all rows, whatever the
  FLOPs (the route ``loglik_rows`` took before it could recompose);
* ``lensjax per-member``: per member, a jitted dense recomposition W′ = W + U diag(σ(g − 1)) Vᵀ of
  every target, then ``lensjax.generate`` / the log-likelihood on that member's shots;
* ``torch per-member``: per member, W′ = U diag(σ ⊙ g) Vᵀ (the reference's ``compose_new_params``)
  copied into the Hugging Face model's weights, then ``model.generate(do_sample=False)`` / a
  forward pass; ``torch.inference_mode``.

Times are medians of ``--repeats`` runs after one warm-up (compilation excluded; the first call
with compilation is reported too). Members per second; speed-up = per-member time ÷ batched time.
FLOPs per member: the forward pass 2·(matmul parameters)·tokens (decode: cached attention
included at 4·T·d per layer per token), plus the factored delta 2·r·(in + out) per target per token
for the batched call, or the recomposition 2·in·r·out per target for the per-member ones. The
fraction of peak is achieved FLOP/s ÷ the measured float32 2048² matmul rate of the same library.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

SIZES = {"tiny": {"d": 64, "layers": 2}, "small": {"d": 256, "layers": 4}}
# (name, model size, prompt tokens, new tokens): "tiny-short" is the regime of the experiment's own
# CEM (scripts/t2_experiment.py: prompts of at most 16 tokens, 3 new tokens per shot)
WORKLOADS = {"tiny-short": ("tiny", 16, 4), "tiny": ("tiny", 32, 16), "small": ("small", 32, 16)}


def median_time(fn, repeats: int):
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def matmul_peak(repeats: int = 5) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    n = 2048
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    mm(ja, jb).block_until_ready()
    ta @ tb
    f = 2.0 * n ** 3
    return {"jax_gflops": f / median_time(lambda: mm(ja, jb).block_until_ready(), repeats) / 1e9,
            "torch_gflops": f / median_time(lambda: ta @ tb, repeats) / 1e9}


def flops(cfg, dec, tokens_prefill: int, tokens_decode: int, T: int, batched: bool) -> float:
    """Per member (see the module notes)."""
    d, L = cfg.hidden_size, cfg.num_layers
    kv = cfg.num_kv_heads * cfg.head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * cfg.intermediate_size
    mm = L * per_layer + d * cfg.vocab_size
    tok = tokens_prefill + tokens_decode
    f = 2.0 * mm * tok + 4.0 * T * d * L * tok
    for p in dec.paths:
        Ll, r = dec.s[p].shape
        din, dout = dec.u[p].shape[1], dec.vt[p].shape[2]
        f += (2.0 * r * (din + dout) * tok * Ll) if batched else (2.0 * din * r * dout * Ll)
    return f


def bench_size(name: str, spec: dict, Tp: int, N: int, args, peak: dict, tmp: Path) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    import transformers as tf

    from lensjax.models.lm import sample_loglik
    from lensjax.models.sampler import generate
    from lensjax.models.tree import flatten
    from lensjax.svf import core, mixing
    from t2_experiment import CHARS, SPECIALS, build_model

    model = build_model(tmp / name, 0, d=spec["d"], layers=spec["layers"])
    hf = tf.AutoModelForCausalLM.from_pretrained(str(tmp / name), dtype=torch.float32).eval()
    dec = core.decompose_params(model.params, "all")
    rng = np.random.default_rng(0)
    K, P, n = 3, args.pop, args.shots
    experts = [(f"e{k}", {p: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), jnp.float32) for p, s in dec.s.items()}, {})
               for k in range(K)]
    es = mixing.expert_set(dec, experts)
    alphas = rng.dirichlet(np.ones(K), P).astype(np.float32)
    vocab = len(SPECIALS + CHARS)
    shots = rng.integers(3, vocab, (n, Tp)).astype(np.int32)
    answers = rng.integers(3, vocab, (n, N)).astype(np.int32)
    cfg = model.config
    out = {"model": {"d": spec["d"], "layers": spec["layers"], "params": int(sum(np.asarray(v).size for v in flatten(model.params).values()))},
           "pop": P, "shots": n, "prompt_tokens": Tp, "new_tokens": N}

    # the fitness inputs
    rows = np.repeat(np.arange(P), n)
    ids_pop = np.tile(shots, (P, 1))
    full = np.concatenate([shots, answers], 1)
    batch1 = {"ids": full, "attn": np.ones_like(full, bool), "target": np.concatenate([np.zeros((n, Tp), bool), np.ones((n, N), bool)], 1)}
    batchP = {k: jnp.asarray(np.tile(v, (P, 1))) for k, v in batch1.items()}
    batch1 = {k: jnp.asarray(v) for k, v in batch1.items()}
    loglik = jax.jit(sample_loglik, static_argnums=0)
    recompose = jax.jit(lambda params, dec, g: core.adapted_params(params, dec, g, factored=False))
    gen_kw = dict(max_new_tokens=N, eos_token_id=[], pad_token_id=0)

    batchP_host = {k: np.asarray(v) for k, v in batchP.items()}
    route = "recompose" if mixing._recompose_is_cheaper(dec, n * (Tp + N)) else "factored"
    out["loglik_route"] = route

    def lj_batched(mode):
        sets = mixing.mix_many(es, dec, alphas)
        if mode == "generate":
            p = mixing.row_params(model.params, dec, sets, rows)
            return np.asarray(generate(cfg, p, ids_pop, **gen_kw))
        return mixing.loglik_rows(model, dec, sets, rows, batchP_host)

    def lj_factored(mode):
        sets = mixing.mix_many(es, dec, alphas)
        return np.asarray(loglik(cfg, mixing.row_params(model.params, dec, sets, rows), batchP))

    def lj_member(mode):
        res = []
        for a in alphas:
            p = recompose(model.params, dec, mixing.mix(es, dec, a))
            res.append(np.asarray(generate(cfg, p, shots, **gen_kw)) if mode == "generate" else np.asarray(loglik(cfg, p, batch1)))
        return res

    # torch: the HF model with W′ copied in per member (Linear weight is [out, in] = W′ᵀ)
    names = {"layers/attn/q/w": "self_attn.q_proj", "layers/attn/k/w": "self_attn.k_proj",
             "layers/attn/v/w": "self_attn.v_proj", "layers/attn/o/w": "self_attn.o_proj",
             "layers/mlp/gate/w": "mlp.gate_proj", "layers/mlp/up/w": "mlp.up_proj", "layers/mlp/down/w": "mlp.down_proj"}
    tu = {p: torch.from_numpy(np.array(dec.u[p])) for p in dec.paths}
    ts = {p: torch.from_numpy(np.array(dec.s[p])) for p in dec.paths}
    tvt = {p: torch.from_numpy(np.array(dec.vt[p])) for p in dec.paths}
    tg = {p: torch.from_numpy(np.array(es.g[p])) for p in dec.paths}  # [K, L, r]
    t_shots = torch.from_numpy(shots.astype(np.int64))
    t_full = torch.from_numpy(full.astype(np.int64))
    tmask = torch.ones_like(t_shots)

    def th_member(mode):
        res = []
        with torch.inference_mode():
            for a in torch.from_numpy(alphas):
                for p in dec.paths:
                    g = torch.einsum("k,klr->lr", a / a.sum(), tg[p])
                    w = torch.einsum("lir,lr,lro->loi", tu[p], ts[p] * g, tvt[p])  # [L, out, in]
                    for layer in range(w.shape[0]):
                        mod = hf.model.layers[layer].get_submodule(names[p])
                        mod.weight.copy_(w[layer])
                if mode == "generate":
                    res.append(hf.generate(t_shots, attention_mask=tmask, max_new_tokens=N, min_new_tokens=N,
                                           do_sample=False, pad_token_id=0))
                else:
                    logits = hf(t_full).logits[:, Tp - 1:-1].float()
                    res.append(torch.log_softmax(logits, -1).gather(-1, t_full[:, Tp:, None]).mean((1, 2)))
        return res

    for mode in ("generate", "loglik"):
        r = {}
        contenders = [("lensjax batched", lj_batched), ("lensjax per-member", lj_member), ("torch per-member", th_member)]
        if mode == "loglik":
            contenders.insert(1, ("lensjax factored rows", lj_factored))
        for label, fn in contenders:
            t = time.perf_counter()
            fn(mode)
            first = time.perf_counter() - t
            sec = median_time(lambda: fn(mode), args.repeats)
            batched = label == "lensjax factored rows" or (label == "lensjax batched" and (mode == "generate" or route == "factored"))
            fl = flops(cfg, dec, n * (Tp if mode == "generate" else Tp + N), n * N if mode == "generate" else 0,
                       Tp + N, batched)
            pk = peak["torch_gflops"] if label.startswith("torch") else peak["jax_gflops"]
            r[label] = {"seconds": sec, "first_call_seconds": first, "members_per_second": P / sec,
                        "flops_per_member": fl, "gflops": fl * P / sec / 1e9, "fraction_of_peak": fl * P / sec / 1e9 / pk}
        base = r["lensjax batched"]["seconds"]
        for label in [k for k in r if k != "lensjax batched"]:
            r[label]["batched_speedup"] = r[label]["seconds"] / base
        # the batched answers agree with the per-member ones (greedy tokens / log-likelihoods)
        a, b = lj_batched(mode), lj_member(mode)
        if mode == "generate":
            r["tokens_equal_fraction"] = float(np.mean(a[:, Tp:] == np.concatenate(b)[:, Tp:]))
        else:
            r["max_abs_loglik_difference"] = float(np.abs(a - np.concatenate(b)).max())
        out[mode] = r
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pop", type=int, default=32)
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--out", default="docs/bench_cem.json")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.pop, args.shots, args.repeats, args.workloads = 4, 2, 1, ["tiny-short"]

    import torch

    from lensjax.io import atomic_write

    torch.set_num_threads(os.cpu_count() or 1)
    peak = matmul_peak(1 if args.smoke else 5)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.workloads:
            size, Tp, N = WORKLOADS[name]
            results[name] = bench_size(size, SIZES[size], Tp, N, args, peak, Path(tmp))
    print(f"\nmatmul peak: jax {peak['jax_gflops']:.0f}, torch {peak['torch_gflops']:.0f} GFLOP/s")
    print("| workload | fitness | contender | s per generation | members/s | speed-up of batched | MFLOP/member | % of peak |")
    print("|---|---|---|---|---|---|---|---|")
    for name, res in results.items():
        wl = f"{name} (d {res['model']['d']}, {res['prompt_tokens']}+{res['new_tokens']} tokens)"
        for mode in ("generate", "loglik"):
            for label in [k for k in res[mode] if isinstance(res[mode][k], dict)]:
                x = res[mode][label]
                sp = f"{x['batched_speedup']:.1f}×" if "batched_speedup" in x else "–"
                print(f"| {wl} | {mode} | {label} | {x['seconds']:.3f} | {x['members_per_second']:.1f} | {sp} | "
                      f"{x['flops_per_member'] / 1e6:.1f} | {100 * x['fraction_of_peak']:.1f} |")
    payload = {"settings": vars(args), "matmul_peak": peak, "results": results, "machine": platform.platform(),
               "cpus": os.cpu_count(), "smoke": args.smoke}
    atomic_write(args.out, json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from lensjax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()  # glibc huge pages for XLA's buffers (lensjax/runtime.py)
    raise SystemExit(main())
