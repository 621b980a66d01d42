"""SVF presets on the synthetic arithmetic task: held-out accuracy before/after, 3 seeds each.

Run (from the repository root)::

    python scripts/svf_presets_experiment.py            # ~5 min on 2 CPU cores
    python scripts/svf_presets_experiment.py --smoke    # seconds: 1 seed, 2 steps (the test suite runs this)

A tiny Llama (2 layers, width 32, character tokenizer; built offline with ``transformers`` and
saved as safetensors; the tokenizer decodes characters without spaces) is pretrained here with
``lensjax.selection.finetune`` for ``--pretrain-steps`` (200) steps on single-digit ``a+b=`` /
``a-b=`` so that it is imperfect (80 steps left it printing the same few answers for everything). The training prompts (400), validation
(200) and test (2400) problems are disjoint slices of one seeded stream; nothing chooses on test.
For each preset (``reference``, ``paper``; see ``lensjax.svf.trainer``) and each ``--lr`` and seed,
``lensjax.svf.trainer.train`` runs ``--steps`` REINFORCE steps on all target matrices (16 prompts
per step, 3 new tokens), and the held-out test accuracy of the base model, the final z and the
best-on-validation z is measured (greedy). Prints a Markdown table and writes ``--out`` (JSON,
atomically).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lensllm_experiment import char_tokenizer, hf_config  # noqa: E402  (this folder's shared zoo helpers)


def build_model(root: Path, seed: int = 0):
    import torch
    import transformers as tf
    from tokenizers import decoders

    import lensjax

    torch.manual_seed(seed)
    cfg = hf_config("llama", {"d": 32, "layers": 2, "heads": 4, "kv": 2, "ffn": 64}, max_pos=64)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(root))
    tok = char_tokenizer()
    tok.backend_tokenizer.decoder = decoders.Fuse()  # "11" decodes as "11", not "1 1"
    tok.save_pretrained(str(root))
    return lensjax.load(root)


def pretrain(model, task, steps: int = 80):
    import dataclasses

    from lensjax.selection.data import Pairs, tokenize
    from lensjax.selection.finetune import FinetuneConfig, finetune

    tok = tokenize(model.tokenizer, Pairs(task.prompts, task.references), 32)
    p, _ = finetune(model.config, model.params, tok, np.arange(len(tok)), len(tok),
                    FinetuneConfig(lr=3e-3, batch_size=16, min_steps=1, epochs=steps * 16 / len(tok), schedule="constant", warmup=0.0))
    return dataclasses.replace(model, params=p)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, nargs="+", default=[2e-3, 2e-2], help="learning rates (the presets' is 2e-3)")
    ap.add_argument("--presets", nargs="+", default=["reference", "paper"])
    ap.add_argument("--n-test", type=int, default=2400)
    ap.add_argument("--smoke", action="store_true", help="1 seed, 2 steps, small sets")
    ap.add_argument("--out", default="docs/svf_presets.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.seeds, args.lr, args.n_test, args.pretrain_steps = 2, 1, [2e-2], 100, 10

    from lensjax.io import atomic_write
    from lensjax.svf import core, tasks
    from lensjax.svf.experts import load_expert
    from lensjax.svf.rollout import accuracy
    from lensjax.svf.trainer import load_state, make_config, make_optimizer, train

    t0 = time.time()
    stream = tasks.arithmetic(600 + args.n_test, max_operand=9, ops="+-", seed=0)
    tr, val, test = stream.subset(range(400)), stream.subset(range(400, 600)), stream.subset(range(600, len(stream)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = pretrain(build_model(Path(tmp) / "m"), tr, args.pretrain_steps)
        dec = core.decompose_params(model.params, "all")
        base = accuracy(model, model.params, test, max_new_tokens=3, batch=200)
        print(f"base model: test accuracy {base:.4f} ({len(test)} problems); {time.time() - t0:.0f} s", flush=True)
        for preset in args.presets:
            for lr in args.lr:
                for seed in range(args.seeds):
                    cfg = make_config(preset, steps=args.steps, targets="all", batch_prompts=16, max_new_tokens=3,
                                      val_every=10, eval_batch=100, seed=seed, lr=lr)
                    out = Path(tmp) / f"{preset}-{lr}-{seed}"
                    t1 = time.time()
                    info = train(model, dec, tr, val, cfg, out)
                    secs = time.time() - t1
                    z_best, _ = load_expert(out / "best.safetensors")
                    z_final, _, _ = load_state(out, z_best, make_optimizer(cfg).init(z_best))
                    acc = {name: accuracy(model, core.adapted_params(model.params, dec, z, cfg.parameterisation),
                                          test, max_new_tokens=3, batch=200)
                           for name, z in (("final", z_final), ("best", z_best))}
                    rows.append({"preset": preset, "lr": lr, "seed": seed, "base": base, "final": acc["final"],
                                 "best_on_validation": acc["best"], "best_step": info["best_step"],
                                 "train_seconds": secs, "mean_reward_last10": float(np.mean(
                                     [h["reward"] for h in info["history"][-10:]]))})
                    print(f"{preset:<9} lr {lr:g} seed {seed}: {base:.3f} -> final {acc['final']:.3f}, best-on-val "
                          f"{acc['best']:.3f} (step {info['best_step']}); {secs:.0f} s", flush=True)
    print("\n| preset | lr | seed 0 | seed 1 | seed 2 | mean gain (final z) |\n|---|---|---|---|---|---|")
    for preset in args.presets:
        for lr in args.lr:
            rs = [r for r in rows if r["preset"] == preset and r["lr"] == lr]
            cells = " | ".join(f"{r['final']:.3f}" for r in rs)
            print(f"| {preset} | {lr:g} | {cells} | {np.mean([r['final'] - r['base'] for r in rs]):+.3f} |")
    payload = {"pretrain_steps": args.pretrain_steps, "base_test_accuracy": base, "n_test": len(test), "n_train": len(tr), "n_val": len(val),
               "steps": args.steps, "runs": rows, "seconds": time.time() - t0, "smoke": args.smoke}
    atomic_write(args.out, json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from lensjax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()  # glibc huge pages for XLA's buffers (lensjax/runtime.py)
    raise SystemExit(main())
