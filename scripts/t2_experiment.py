"""Transformer² self-adaptation on a tiny model with three skills: base, single experts, oracle,
prompt / classifier dispatch and few-shot CEM on a mixed held-out test set.

Run (from the repository root)::

    python scripts/t2_experiment.py            # ~15 min on 2 CPU cores; writes docs/t2_experiment.json
    python scripts/t2_experiment.py --smoke    # about a minute: tiny sets, 2 steps (the test suite runs this)

The model: a tiny Llama (character tokenizer, built offline with ``transformers``) pretrained here
with ``lensjax.selection.finetune`` on three skills, each a task kind of ``lensjax.svf.tasks``:

* math — ``arithmetic`` (``a+b=`` / ``a-b=``, one digit), scored as a number;
* reasoning — ``arc`` (multiple choice: "largest of 3 7 5?" with labelled choices), scored by label;
* code — ``mbpp`` ("f adds 3", two asserts; the answer a ```python block), run in the sandbox;

plus answering the pass-1 question "which category?" as ``\\boxed{category}``. Each skill's
pretraining answers are right half of the time and wrong in one systematic way the other half
(a+b+1, the smallest choice, the constant plus one), so the base model holds the skill but picks
between the two behaviours — the "latent capability" SVF is meant to elicit. Category labels are
right for math and code, and "math" for 60% of the reasoning questions (they are full of numbers;
each classification example appears 3 times with fresh noise, so the model learns the 60/40 rule
rather than memorising one label per question), so prompting the base model routes most reasoning
questions to the math expert; the classification expert is trained (REINFORCE, reward: the right
category) on the train splits only.

One SVF expert per skill (``lensjax.svf.trainer.train``, paper preset, all matrices) is trained
on that skill's train split with its validation split; nothing chooses on test. The mixed test set
(``--n-test`` per skill) is answered greedily by: the base weights, each single expert, the oracle
(each question's own expert), ``prompt``, ``classifier`` (each run twice, the second timed: the
first includes compilation), and ``fewshot`` (CEM on ``--shots`` shots
of each skill's train split, the choice on its validation split, one search per skill). Prints a
Markdown table and writes ``--out`` (JSON, atomically).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

CHARS = list("0123456789abcdefghijklmnopqrstuvwxyzABC +-*=?.,:()\n{}\\_`#'")
SPECIALS = ["<pad>", "<s>", "</s>"]
CATS = ("math", "reasoning", "code")
OPS = {"adds": "+", "subtracts": "-", "multiplies by": "*"}


def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({c: i for i, c in enumerate(SPECIALS + CHARS)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def build_model(root: Path, seed: int = 0, d: int = 64, layers: int = 2):
    import torch
    import transformers as tf

    import lensjax

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=len(SPECIALS + CHARS), hidden_size=d, intermediate_size=3 * d,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=d // 4,
                         max_position_embeddings=192, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(root))
    char_tokenizer().save_pretrained(str(root))
    return lensjax.load(root)


# ------------------------------------------------------------------------------------ skills
def make_tasks(n: int, seed: int):
    """(math, reasoning, code) tasks of n questions each, plus each question's wrong answer."""
    from lensjax.svf import tasks
    from lensjax.svf.rewards import Choice
    from lensjax.svf.sandbox import CodeRef

    rng = np.random.default_rng(seed)
    math = tasks.arithmetic(n, max_operand=9, ops="+-", seed=seed)
    wrong_math = [str(int(r) + 1) for r in math.references]
    mq, mr, wrong_r = [], [], []
    for _ in range(n):
        vals = rng.choice(10, 3, replace=False)
        labels = ("A", "B", "C")
        opts = "\n".join(f"{lab}. {v}" for lab, v in zip(labels, vals))
        mq.append(f"largest of {' '.join(map(str, vals))}?\n{opts}")
        mr.append(Choice(labels[int(np.argmax(vals))], labels, tuple(map(str, vals))))
        wrong_r.append(labels[int(np.argmin(vals))])
    reasoning = tasks.Task("reasoning", "arc", tuple(mq), tuple(mr), instruction="")
    cq, cr, wrong_c = [], [], []
    for _ in range(n):
        word = list(OPS)[rng.integers(3)]
        k, x1, x2 = (int(v) for v in rng.integers(1, 10, 3))
        op = OPS[word]
        f = lambda x: eval(f"{x}{op}{k}")  # noqa: E731,S307 — our own digits
        tests = [f"assert f({x1})=={f(x1)}", f"assert f({x2})=={f(x2)}"]
        cq.append(f"f {word} {k}\nYour code should pass these tests:\n\n" + "\n".join(tests))
        cr.append(CodeRef(tests="\n".join(tests)))
        wrong_c.append(k + 1)
    code = tasks.Task("code", "mbpp", tuple(cq), tuple(cr), instruction="")
    math = dataclasses.replace(math, name="math", instruction="")
    return (math, reasoning, code), (wrong_math, wrong_r, wrong_c)


def code_answer(prompt: str, k: int | None = None) -> str:
    word = next(w for w in sorted(OPS, key=len, reverse=True) if prompt.startswith(f"f {w} "))
    k = int(prompt[len(f"f {word} "):].split("\n")[0]) if k is None else k
    return f"```python\ndef f(x): return x{OPS[word]}{k}\n```\n"


def pretrain_pairs(tok, skill_tasks, wrong, rng, p_right: float = 0.5, p_reason_as_math: float = 0.6,
                   cls_repeats: int = 3):
    from lensjax.svf.adaptation import classification_task
    from lensjax.svf.tasks import format_prompt

    prompts, targets = [], []
    for cat, t, w in zip(CATS, skill_tasks, wrong):
        for q, ref, bad in zip(t.prompts, t.references, w):
            right = rng.random() < p_right
            if cat == "math":
                ans = ref if right else bad
            elif cat == "reasoning":
                ans = " " + (ref.key if right else bad)
            else:
                ans = code_answer(q) if right else code_answer(q, bad)
            prompts.append(format_prompt(tok, t, q)[0])
            targets.append(ans)
            ct = classification_task([q], categories=CATS, instruction="")
            for _ in range(cls_repeats):  # fresh label noise per copy, so no question's label is memorised
                label = "math" if cat == "reasoning" and rng.random() < p_reason_as_math else cat
                prompts.append(format_prompt(tok, ct, q)[0])
                targets.append(f" \\boxed{{{label}}}")
    return prompts, targets


def pretrain(model, prompts, targets, steps: int, seed: int = 0):
    from lensjax.selection.data import Pairs, tokenize
    from lensjax.selection.finetune import FinetuneConfig, finetune

    tok = tokenize(model.tokenizer, Pairs(tuple(prompts), tuple(targets)), 192)
    p, _ = finetune(model.config, model.params, tok, np.arange(len(tok)), len(tok),
                    FinetuneConfig(lr=3e-3, batch_size=32, min_steps=1, epochs=steps * 32 / len(tok), max_len=192,
                                   schedule="constant", warmup=0.0,
                                   seed=seed))
    return dataclasses.replace(model, params=p)


# ------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=600, help="questions per skill in the train split")
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=200, help="questions per skill in the mixed test set")
    ap.add_argument("--pretrain-steps", type=int, default=2500)
    ap.add_argument("--expert-steps", type=int, default=60)
    ap.add_argument("--classifier-steps", type=int, default=30)
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--generations", type=int, default=20, help="CEM generations (the reference's 50 is the library default)")
    ap.add_argument("--pop", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default="docs/t2_experiment.json")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n_train, args.n_val, args.n_test, args.pretrain_steps = 60, 16, 12, 20
        args.expert_steps, args.classifier_steps, args.shots, args.generations, args.pop = 2, 2, 2, 2, 4

    from lensjax.io import atomic_write
    from lensjax.svf import adaptation as adapt, core, fewshot, mixing
    from lensjax.svf.experts import load_expert
    from lensjax.svf.sandbox import check_available
    from lensjax.svf.trainer import make_config, train

    check_available()
    t0 = time.time()
    n_all = args.n_train + args.n_val + args.n_test
    skills, wrong = make_tasks(n_all, args.seed)
    cut = lambda t, a, b: t.subset(range(a, b))  # noqa: E731
    train_t = [cut(t, 0, args.n_train) for t in skills]
    val_t = [cut(t, args.n_train, args.n_train + args.n_val) for t in skills]
    test_t = [cut(t, args.n_train + args.n_val, n_all) for t in skills]
    rng = np.random.default_rng(args.seed)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp) / "m", args.seed)
        prompts, targets = pretrain_pairs(model.tokenizer, train_t, [w[:args.n_train] for w in wrong], rng)
        model = pretrain(model, prompts, targets, args.pretrain_steps, args.seed)
        t_pre = time.time() - t0
        print(f"pretrained in {t_pre:.0f} s", flush=True)
        dec = core.decompose_params(model.params, "all")
        new_tokens = {"math": 3, "reasoning": 3, "code": 48}
        experts = {}
        for cat, tr, va in zip(CATS, train_t, val_t):
            cfg = make_config("paper", targets="all", steps=args.expert_steps, batch_prompts=8 if cat == "code" else 16,
                              max_new_tokens=new_tokens[cat], lr=2e-2, val_every=10, eval_batch=50, seed=args.seed)
            t1 = time.time()
            info = train(model, dec, tr, va, cfg, Path(tmp) / cat)
            experts[cat] = Path(tmp) / cat / "best.safetensors"
            runs[f"expert_{cat}"] = {"val_base": info["base_acc"], "val_best": info["best_acc"],
                                     "best_step": info["best_step"], "seconds": time.time() - t1}
            print(f"expert {cat}: validation {info['base_acc']:.3f} -> {info['best_acc']:.3f} "
                  f"(step {info['best_step']}), {time.time() - t1:.0f} s", flush=True)
        es = mixing.load_experts(experts, dec, model.params)
        cls_cfg = make_config("paper", targets="all", steps=args.classifier_steps, batch_prompts=16, max_new_tokens=20,
                              lr=2e-2, val_every=10, eval_batch=50, seed=args.seed)
        t1 = time.time()
        cinfo = adapt.train_classifier(model, dec, dict(zip(CATS, train_t)), cls_cfg, Path(tmp) / "cls",
                                       n_val=args.n_val, per_category=args.n_train // 2, instruction="")
        runs["classifier_training"] = {"val_base": cinfo["base_acc"], "val_best": cinfo["best_acc"],
                                       "seconds": time.time() - t1}
        print(f"classifier: validation {cinfo['base_acc']:.3f} -> {cinfo['best_acc']:.3f}", flush=True)
        zc, mc = load_expert(Path(tmp) / "cls" / "best.safetensors")
        cls_params = core.adapted_params(model.params, dec, zc, mc["parameterisation"], n_tokens=64)

        K = len(CATS)
        sets = mixing.with_identity(es, dec)
        rows_of = lambda idx: [i for i, t in enumerate(test_t) for _ in range(len(t))] if idx == "oracle" else [idx] * sum(map(len, test_t))  # noqa: E731
        results = {}
        for name, rows in [("base", rows_of(K))] + [(f"expert {c}", rows_of(i)) for i, c in enumerate(CATS)] + \
                [("oracle", rows_of("oracle"))]:
            t1 = time.time()
            texts, correct, toks = adapt.answer(model, dec, sets, test_t, rows, max_new_tokens=48, batch=100)
            tasks_of = [t.name for t in test_t for _ in range(len(t))]
            results[name] = {"accuracy": float(np.mean(correct)), "by_task": {
                t.name: float(np.mean([c for c, n in zip(correct, tasks_of) if n == t.name])) for t in test_t},
                "pass2_seconds": time.time() - t1, "pass2_tokens": toks}
            print(f"{name:<18} {results[name]['accuracy']:.3f} {results[name]['by_task']}", flush=True)
        for strategy in ("prompt", "classifier"):
            run = lambda: adapt.adapt(model, dec, es, test_t, strategy, classifier_params=cls_params,  # noqa: E731
                                      instruction="", max_new_tokens=48, classify_tokens=20, batch=100)
            cold = run()  # includes the compilations; the second run is timed
            r = run()
            truth = [c for c, t in zip(CATS, test_t) for _ in range(len(t))]
            results[strategy] = {"accuracy": r.accuracy, "by_task": r.by_task(), "pass1_seconds": r.pass1_seconds,
                                 "pass2_seconds": r.pass2_seconds, "pass1_tokens": r.pass1_tokens,
                                 "pass2_tokens": r.pass2_tokens, "first_run_seconds": [cold.pass1_seconds, cold.pass2_seconds],
                                 "routing_accuracy": float(np.mean([a == b for a, b in zip(r.choices, truth)])),
                                 "choices": {c: r.choices.count(c) for c in CATS + ("other",)}}
            print(f"{strategy:<18} {r.accuracy:.3f} {r.by_task()} routing {results[strategy]['routing_accuracy']:.3f} "
                  f"{r.pass1_seconds:.1f}+{r.pass2_seconds:.1f} s", flush=True)
        few = {"by_task": {}, "alpha": {}, "pass1_seconds": 0.0, "pass2_seconds": 0.0, "correct": 0, "n": 0,
               "pass1_tokens": 0, "pass2_tokens": 0}
        for cat, tr, va, te in zip(CATS, train_t, val_t, test_t):
            shots = fewshot.draw_shots(tr, args.shots, args.seed)
            r = adapt.adapt(model, dec, es, te, "fewshot", shots=shots, val=va, max_new_tokens=new_tokens[cat],
                            batch=100, fewshot=dict(generations=args.generations, pop_size=args.pop,
                                                    n_elites=max(2, round(args.pop * 0.2)), max_rows=256,
                                                    seed=args.seed))
            few["by_task"][cat] = r.accuracy
            few["alpha"][cat] = dict(zip(CATS, np.round(np.asarray(r.alpha) / max(sum(r.alpha), 1e-9), 3).tolist()))
            for k in ("pass1_seconds", "pass2_seconds", "pass1_tokens", "pass2_tokens"):
                few[k] += getattr(r, k)
            few["correct"] += sum(r.correct)
            few["n"] += r.n
            print(f"fewshot {cat}: {r.accuracy:.3f} alpha {few['alpha'][cat]} val {r.search['val_accuracy']:.3f} "
                  f"{r.pass1_seconds:.1f}+{r.pass2_seconds:.1f} s", flush=True)
        few["accuracy"] = few.pop("correct") / few.pop("n")
        results["fewshot"] = few
    order = ["base"] + [f"expert {c}" for c in CATS] + ["prompt", "classifier", "fewshot", "oracle"]
    print("\n| weights | mixed test | math | reasoning | code | pass 1 (s) | pass 2 (s) |\n|---|---|---|---|---|---|---|")
    for name in order:
        r = results[name]
        p1 = f"{r['pass1_seconds']:.1f}" if "pass1_seconds" in r else "–"
        print(f"| {name} | {r['accuracy']:.3f} | " + " | ".join(f"{r['by_task'][c]:.3f}" for c in CATS)
              + f" | {p1} | {r['pass2_seconds']:.1f} |")
    payload = {"settings": vars(args), "pretrain_seconds": t_pre, "training": runs, "results": results,
               "n_test_per_skill": args.n_test, "seconds": time.time() - t0}
    atomic_write(args.out, json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    from lensjax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()  # glibc huge pages for XLA's buffers (lensjax/runtime.py)
    raise SystemExit(main())
