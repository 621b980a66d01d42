"""Benchmark: SVF training steps with prompts of many lengths, bucketed shapes vs exact shapes.

    python benchmarks/bench_svf_buckets.py [--steps 20] [--out docs/bench_svf_buckets.json] [--smoke]

One process, one model (a Llama of width 256, 4 layers, character tokenizer, built offline with
``transformers``; ~3.2M parameters), the same 20 training steps of ``lensjax.svf.trainer.train``
(paper preset, targets ``mlp``, 4 prompts × 2 samples, 16 new tokens) on arithmetic prompts of
5-60 tokens, twice:

* ``exact``: ``prompt_bucket=1, completion_bucket=0`` — the training batch has the raw longest
  prompt length and the full ``max_new_tokens`` completion, as before the bucketing change (the
  sampler itself still pads prompts to multiples of 16 inside);
* ``bucketed`` (the default): prompts left-padded to multiples of 16 and completions cut to a
  multiple of 16 after the batch stopped.

Per run: wall time of the 20 steps (compilation included, as a user sees it), the median step
time after the first step of each shape, the number of compilations of the jitted update, and the
ratio exact / bucketed. Writes the JSON atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from lensllm_experiment import char_tokenizer, hf_config  # noqa: E402


def mixed_task(n: int, seed: int = 0):
    from lensjax.svf.tasks import Task

    rng = np.random.default_rng(seed)
    prompts, refs = [], []
    for _ in range(n):
        k = int(rng.integers(2, 30))  # 5-60 characters = tokens
        terms = [str(int(d)) for d in rng.integers(0, 10, k)]
        prompts.append("+".join(terms) + "=")
        refs.append(str(sum(int(t) for t in terms)))
    return Task("mixed", "arithmetic", tuple(prompts), tuple(refs))


def run(model, dec, task, steps: int, prompt_bucket: int, completion_bucket: int, out: Path) -> dict:
    from lensjax.svf import trainer

    cfg = trainer.make_config("paper", steps=steps, targets="mlp", batch_prompts=4, samples_per_prompt=2,
                              max_new_tokens=16, val_every=10_000, eval_batch=4, prompt_bucket=prompt_bucket,
                              completion_bucket=completion_bucket, seed=prompt_bucket)
    times, shapes, seen, t_last = [], [], set(), [time.perf_counter()]

    def on_step(rec):
        now = time.perf_counter()
        times.append(now - t_last[0])
        t_last[0] = now
        shapes.append(tuple(rec["shape"]))

    t0 = time.perf_counter()
    trainer.train(model, dec, task, task.subset(range(4)), cfg, out, on_step=on_step)
    wall = time.perf_counter() - t0
    warm = []
    for t, s in zip(times, shapes):
        if s in seen:
            warm.append(t)
        seen.add(s)
    return {"wall_s": wall, "step_s": times, "shapes": [list(s) for s in shapes],
            "median_warm_step_s": float(np.median(warm)) if warm else None,
            "compilations": trainer._update_fn(model.config, cfg)._cache_size(), "distinct_shapes": len(seen)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="docs/bench_svf_buckets.json")
    ap.add_argument("--smoke", action="store_true", help="a tiny model and 3 steps")
    args = ap.parse_args(argv)
    import torch
    import transformers as tf
    from tokenizers import decoders

    import lensjax
    from lensjax.io import atomic_write
    from lensjax.svf import core

    arch = {"d": 32, "layers": 2, "heads": 4, "ffn": 64} if args.smoke else {"d": 256, "layers": 4, "heads": 8, "ffn": 1024}
    steps = 3 if args.smoke else args.steps
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        tf.AutoModelForCausalLM.from_config(hf_config("llama", arch, max_pos=128)).save_pretrained(tmp + "/m")
        tok = char_tokenizer()
        tok.backend_tokenizer.decoder = decoders.Fuse()  # "11", not "1 1"
        tok.save_pretrained(tmp + "/m")
        model = lensjax.load(tmp + "/m")
        dec = core.decompose_params(model.params, "mlp")
        task = mixed_task(400)
        n_params = sum(int(np.prod(a.shape)) for a in __import__("jax").tree.leaves(model.params))
        for name, pb, cb in (("exact", 1, 0), ("bucketed", 16, 16)):
            res[name] = run(model, dec, task, steps, pb, cb, Path(tmp) / name)
            r = res[name]
            print(f"{name:<9} wall {r['wall_s']:6.1f} s  median warm step {r['median_warm_step_s'] or float('nan'):.3f} s  "
                  f"compilations {r['compilations']:2d}  distinct shapes {r['distinct_shapes']}", flush=True)
    ratio = res["exact"]["wall_s"] / res["bucketed"]["wall_s"]
    print(f"\n| run | wall ({steps} steps) | median warm step | compilations |\n|---|---|---|---|")
    for name in ("exact", "bucketed"):
        r = res[name]
        print(f"| {name} | {r['wall_s']:.1f} s | {r['median_warm_step_s'] or float('nan'):.3f} s | {r['compilations']} |")
    print(f"exact / bucketed wall time: {ratio:.2f}×")
    payload = {"arch": arch, "params": n_params, "steps": steps, "runs": res, "ratio_wall_exact_over_bucketed": ratio,
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "smoke": args.smoke,
               "date": time.strftime("%Y-%m-%d")}
    atomic_write(args.out, json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from lensjax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()  # glibc huge pages for XLA's buffers (lensjax/runtime.py)
    raise SystemExit(main())
