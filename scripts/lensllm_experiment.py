"""LensLLM end to end on a zoo of tiny decoders, fully offline, on CPU.

Run (from the repository root)::

    python scripts/lensllm_experiment.py                  # full run, ~15 min on 2 busy CPU cores
    python scripts/lensllm_experiment.py --quick          # smoke run, ~2-3 min
    python scripts/lensllm_experiment.py --fresh          # delete the zoo and curves first, redo all
    python scripts/lensllm_experiment.py --task reverse   # the string-reversal task instead of a*b

What it does:

1. **Zoo.** Builds 7 small causal LMs of 5 families (gpt2, llama, opt, qwen2, mistral; about
   65k-820k parameters; ``--quick``: 5 models, 55k-110k) with ``transformers`` configs and
   ``AutoModelForCausalLM.from_config`` (random init, seeded), plus one shared character-level
   tokenizer made offline with the ``tokenizers`` library and saved as
   ``PreTrainedTokenizerFast`` into each model folder (vocab 47 tokens; models have
   ``vocab_size=48``, pad/bos/eos = 0/1/2). Nothing is downloaded; the Hugging Face hub is off
   (``HF_HUB_OFFLINE=1``).
2. **Pretraining.** Each model is pretrained here with PyTorch (1 thread, AdamW, warmup +
   cosine, batch 32 x 64 tokens) on a generated corpus of packed sequences (``a+b=c``,
   ``a-b=c``, ``cp abc=abc`` letter copying, ``rev 123=321`` digit reversal), for a different
   number of steps per model (200-1000) so the candidates differ in quality, and saved as
   safetensors + tokenizer under ``/tmp/lensjax-zoo/<name>``. A parity check compares the
   PyTorch target-token loss of each saved folder with ``lensjax.selection.finetune.evaluate``
   on ``lensjax.load`` of the same folder.
3. **Downstream task.** Multiplication, not in the pretraining corpus: ``{"input": "417*6=",
   "target": "2502"}`` (a in 0..999, b in 2..9, distinct pairs), written to
   ``/tmp/lensjax-zoo/mul-7200.jsonl``. ``pipeline.run`` holds out 10% (at most 500) of a local
   file, so the file has TARGET + 300 spare + 500 examples: 6700 training examples (more than
   the target size 6400) and a 500-example held-out set. (``--task reverse``: string reversal
   ``rev kqzma=`` -> ``amzqk``; there every model shows a sudden, grokking-like drop between
   D=3200 and 6400, which no curve law can foresee, so it is not the default.)
4. **Pipeline.** ``lensjax.selection.pipeline.run`` measures the loss curves by progressive
   fine-tuning (ladder ``base * 2^k``, base 50) into one resumable curves CSV. It is first called
   with ``budget = TARGET`` (method ``ats``, only to fill the CSV), so every model also has its
   true fine-tuned loss at the target size (6400 = 50 * 2^7). Then, for each method in
   ``lensllm``, ``rectified``, ``ats`` and each budget (200, 400, 800, 1600), ``pipeline.run``
   predicts the target loss from the in-budget part of the curve (cells are not re-measured;
   ``lensllm`` computes each candidate's NTK term F every call).
5. **Scoring.** For each (method, budget): RMSE over models of the predicted vs measured target
   loss, and ``lensjax.selection.metrics.selection_metrics`` (Pearson, RelAcc, Spearman,
   Kendall, top-k), computed here from the predictions and the measured target column and
   cross-checked against the numbers ``pipeline.run`` itself returns. Baselines from
   ``select_many`` on the same curves (subtuning, zeroshot, modelsize) are printed for context.
   Prints markdown tables and writes ``benchmarks/results/lensllm_experiment.json``
   (``..._quick.json`` with ``--quick``, ``..._reverse.json`` with ``--task reverse``).

Fine-tuning (lensjax, inside ``pipeline.run``): AdamW lr 1e-3, batch 16, 2 epochs, so
t(D) = max(10, ceil(2 D / 16)) steps (800 at the target), from the pretrained weights at every
ladder size; the loss is the mean NLL of the target tokens (+ EOS) on the held-out set.

Everything is seeded (numpy, torch, the fine-tuning order), so a rerun gives the same numbers.
The zoo is reused when its spec hash matches (``zoo.json``); the curves CSV is keyed by a hash of
the whole experiment spec, so an interrupted run resumes without re-measuring cells.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHARS = list("0123456789+-*=abcdefghijklmnopqrstuvwxyz ?.,")
SPECIALS = ["<pad>", "<s>", "</s>"]
PAD, BOS, EOS = 0, 1, 2
VOCAB_SIZE = 48  # >= 47 tokens of the tokenizer
LETTERS = "abcdefghijklmnopqrstuvwxyz"
CORPUS = "add,sub,cp-letters,rev-digits"  # part of the zoo hash: change it when pretrain_text changes

# name, family, architecture kwargs, pretraining steps. Sizes and steps are chosen so that
# neither "bigger" nor "longer pretrained" alone decides the downstream ranking.
ZOO = [
    ("gpt2-48x2", "gpt2", dict(d=48, layers=2, heads=4), 800),
    ("gpt2-96x4", "gpt2", dict(d=96, layers=4, heads=4), 300),
    ("llama-64x2", "llama", dict(d=64, layers=2, heads=4, ffn=176), 1000),
    ("llama-128x4", "llama", dict(d=128, layers=4, heads=4, ffn=352), 400),
    ("opt-64x3", "opt", dict(d=64, layers=3, heads=4, ffn=256), 600),
    ("qwen2-96x3", "qwen2", dict(d=96, layers=3, heads=4, kv=2, ffn=256), 700),
    ("mistral-64x3", "mistral", dict(d=64, layers=3, heads=4, kv=2, ffn=192), 200),
]
QUICK_ZOO = [
    ("gpt2-48x2", "gpt2", dict(d=48, layers=2, heads=4), 200),
    ("llama-64x2", "llama", dict(d=64, layers=2, heads=4, ffn=176), 300),
    ("opt-64x2", "opt", dict(d=64, layers=2, heads=4, ffn=256), 150),
    ("qwen2-64x2", "qwen2", dict(d=64, layers=2, heads=4, kv=2, ffn=192), 250),
    ("mistral-48x2", "mistral", dict(d=48, layers=2, heads=4, kv=2, ffn=128), 100),
]


@dataclasses.dataclass(frozen=True)
class Spec:
    zoo: tuple
    target: int
    base: int
    budgets: tuple[int, ...]
    methods: tuple[str, ...]
    n_spare: int  # training examples beyond the target size
    n_heldout: int  # what load_pairs holds out of a local file: min(500, n // 10)
    pre_batch: int = 32
    pre_seq: int = 64
    pre_lr: float = 2e-3
    ft_lr: float = 1e-3
    ft_batch: int = 16
    ft_epochs: float = 2.0
    ft_min_steps: int = 10
    ft_max_len: int = 32
    task: str = "mul"
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:12]

    def zoo_key(self) -> str:
        z = dict(corpus=CORPUS, zoo=self.zoo, pre_batch=self.pre_batch, pre_seq=self.pre_seq, pre_lr=self.pre_lr, seed=self.seed)
        return hashlib.sha256(json.dumps(z, sort_keys=True, default=str).encode()).hexdigest()[:12]


def full_spec() -> Spec:
    return Spec(zoo=tuple(ZOO), target=6400, base=50, budgets=(200, 400, 800, 1600),
                methods=("lensllm", "rectified", "ats"), n_spare=300, n_heldout=500)


def quick_spec() -> Spec:
    # 800 train + 300 spare + held-out: n = 1222 -> load_pairs holds out n // 10 = 122
    return Spec(zoo=tuple(QUICK_ZOO), target=800, base=50, budgets=(200, 400),
                methods=("lensllm", "rectified", "ats"), n_spare=300, n_heldout=122, ft_epochs=1.0)


# ----------------------------------------------------------------------------------- tokenizer
def char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


# -------------------------------------------------------------------------------------- models
def hf_config(family: str, a: dict, max_pos: int):
    import transformers as tf

    ids = dict(vocab_size=VOCAB_SIZE, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    d, L, h = a["d"], a["layers"], a["heads"]
    if family == "gpt2":
        return tf.GPT2Config(n_embd=d, n_layer=L, n_head=h, n_positions=max_pos, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    if family == "opt":
        return tf.OPTConfig(hidden_size=d, ffn_dim=a["ffn"], num_hidden_layers=L, num_attention_heads=h,
                            max_position_embeddings=max_pos, word_embed_proj_dim=d, do_layer_norm_before=True,
                            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, **ids)
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
    kw = dict(hidden_size=d, intermediate_size=a["ffn"], num_hidden_layers=L, num_attention_heads=h,
              num_key_value_heads=a.get("kv", h), head_dim=d // h, max_position_embeddings=max_pos,
              attention_dropout=0.0, tie_word_embeddings=(family == "qwen2"), **ids)
    if family == "mistral":
        kw["sliding_window"] = None
    if family == "qwen2":
        kw["use_sliding_window"] = False
    return cls(**kw)


# ------------------------------------------------------------------------------------- corpora
def pretrain_text(rng: np.random.Generator) -> str:
    k = rng.integers(4)
    if k == 0:
        a, b = rng.integers(0, 1000, 2)
        return f"{a}+{b}={a + b}"
    if k == 1:
        a, b = rng.integers(0, 1000, 2)
        return f"{a}-{b}={a - b}"
    if k == 2:  # copying letters
        s = "".join(rng.choice(list(LETTERS), rng.integers(2, 9)))
        return f"cp {s}={s}"
    s = "".join(rng.choice(list("0123456789"), rng.integers(2, 9)))  # reversing digits
    return f"rev {s}={s[::-1]}"


def pretrain_stream(n_tokens: int, seed: int) -> np.ndarray:
    """Packed token stream: example EOS example EOS ... (the fine-tuning data has no BOS either)."""
    rng = np.random.default_rng(seed)
    tok = {c: i for i, c in enumerate(SPECIALS + CHARS)}
    out, n = [], 0
    while n < n_tokens:
        ids = [tok[c] for c in pretrain_text(rng)] + [EOS]
        out.extend(ids)
        n += len(ids)
    return np.asarray(out[:n_tokens], np.int64)


def write_task(path: Path, n: int, seed: int, task: str) -> None:
    """n distinct downstream examples as jsonl with fields ``input`` and ``target``.

    * ``mul``: ``{"input": "417*6=", "target": "2502"}``, a in 0..999, b in 2..9 (n of the 8000
      pairs, drawn without replacement). Multiplication is not in the pretraining corpus.
    * ``reverse``: ``{"input": "rev kqzma=", "target": "amzqk"}``, 3-8 letters (pretraining
      reverses digits and copies letters).
    """
    rng = np.random.default_rng(seed)
    rows = []
    if task == "mul":
        pairs = [(a, b) for a in range(1000) for b in range(2, 10)]
        if n > len(pairs):
            raise ValueError(f"the mul task has {len(pairs)} distinct examples; {n} asked")
        for i in rng.permutation(len(pairs))[:n]:
            a, b = pairs[i]
            rows.append({"input": f"{a}*{b}=", "target": str(a * b)})
    elif task == "reverse":
        seen = set()
        while len(seen) < n:
            s = "".join(rng.choice(list(LETTERS), rng.integers(3, 9)))
            if s not in seen:
                seen.add(s)
                rows.append({"input": f"rev {s}=", "target": s[::-1]})
    else:
        raise ValueError(f"unknown task {task!r}")
    with open(path, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


# ---------------------------------------------------------------------------------- pretraining
def pretrain(family, arch, steps, directory: Path, spec: Spec, stream: np.ndarray, seed: int) -> dict:
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = hf_config(family, arch, max_pos=128)
    model = tf.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    n_params = sum(p.numel() for p in model.parameters())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.pre_lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    per = spec.pre_batch * spec.pre_seq
    t0, losses = time.time(), []
    for s in range(steps):
        off = (s * per) % (len(stream) - per)
        x = torch.from_numpy(stream[off: off + per].reshape(spec.pre_batch, spec.pre_seq))
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(str(directory))
    char_tokenizer().save_pretrained(str(directory))
    return dict(params=int(n_params), steps=steps, final_pretrain_loss=float(np.mean(losses[-20:])),
                pretrain_s=time.time() - t0)


def torch_target_loss(directory: Path, pairs, max_len: int) -> float:
    """Mean target-token NLL of the saved checkpoint with PyTorch (for the parity check)."""
    import torch
    import transformers as tf

    from lensjax.selection.data import tokenize

    tok = tf.AutoTokenizer.from_pretrained(str(directory))
    model = tf.AutoModelForCausalLM.from_pretrained(str(directory), attn_implementation="eager").eval()
    data = tokenize(tok, pairs, max_len)
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for ids, n_p in zip(data.ids, data.n_prompt):
            x = torch.tensor([ids])
            lp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
            nll = -lp[torch.arange(len(ids) - 1), x[0, 1:]]
            tot += float(nll[n_p - 1:].sum())
            cnt += len(ids) - n_p
    return tot / cnt


def build_zoo(spec: Spec, root: Path, log) -> dict:
    marker = root / "zoo.json"
    key = spec.zoo_key()
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("key") == key and all((root / n / "model.safetensors").exists() for n, *_ in spec.zoo):
            log(f"zoo: reusing {root} (spec {key})")
            return info["models"]
    import torch

    torch.set_num_threads(1)  # stable under contention; 2 threads spiked 10x
    max_steps = max(s for *_, s in spec.zoo)
    stream = pretrain_stream(max_steps * spec.pre_batch * spec.pre_seq + 1, spec.seed)
    models = {}
    for i, (name, family, arch, steps) in enumerate(spec.zoo):
        d = root / name
        shutil.rmtree(d, ignore_errors=True)
        info = pretrain(family, arch, steps, d, spec, stream, seed=spec.seed + 1000 * (i + 1))
        info["family"] = family
        models[name] = info
        log(f"  pretrained {name:<14} {family:<8} {info['params']:>8,d} params  {steps:>5} steps  "
            f"loss {info['final_pretrain_loss']:.3f}  {info['pretrain_s']:.1f}s")
    marker.write_text(json.dumps({"key": key, "models": models}, indent=1))
    return models


# ------------------------------------------------------------------------------------- scoring
def score(pred: np.ndarray, true: np.ndarray) -> dict:
    from lensjax.selection.metrics import selection_metrics

    out = selection_metrics(pred, true, ks=(1, 3))
    out["rmse"] = float(np.sqrt(np.mean((pred - true) ** 2)))
    return out


def fmt(x, nd=3):
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{nd}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="5 models, target 800, budgets 200/400")
    ap.add_argument("--fresh", action="store_true", help="delete the zoo and the curves CSV first")
    ap.add_argument("--task", choices=("mul", "reverse"), default="mul",
                    help="downstream task: mul (a*b=, default) or reverse (rev abc=cba)")
    ap.add_argument("--root", default=None, help="zoo folder (default /tmp/lensjax-zoo[-quick])")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/...)")
    args = ap.parse_args(argv)

    spec = dataclasses.replace(quick_spec() if args.quick else full_spec(), task=args.task)
    root = Path(args.root or ("/tmp/lensjax-zoo-quick" if args.quick else "/tmp/lensjax-zoo"))
    out_json = Path(args.out or REPO / "benchmarks" / "results" /
                    ("lensllm_experiment" + ("_quick" if args.quick else "")
                     + ("" if args.task == "mul" else f"_{args.task}") + ".json"))
    if args.fresh:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    timings = {}

    def log(msg):
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    # 1-2. zoo + pretraining ------------------------------------------------------------------
    t = time.time()
    zoo = build_zoo(spec, root, log)
    timings["zoo_pretrain_s"] = time.time() - t
    dirs = [str(root / n) for n, *_ in spec.zoo]

    # 3. downstream task ---------------------------------------------------------------------
    n_total = spec.target + spec.n_spare + spec.n_heldout
    data = root / f"{spec.task}-{n_total}.jsonl"
    if not data.exists():
        write_task(data, n_total, spec.seed + 7, spec.task)
    import lensjax
    from lensjax.selection import pipeline
    from lensjax.selection.curves import read_curves
    from lensjax.selection.data import load_pairs
    from lensjax.selection.finetune import FinetuneConfig, evaluate
    from lensjax.selection.selectors import select_many

    ft = FinetuneConfig(lr=spec.ft_lr, batch_size=spec.ft_batch, epochs=spec.ft_epochs,
                        min_steps=spec.ft_min_steps, max_len=spec.ft_max_len, eval_batch_size=100, seed=spec.seed)
    train, held = load_pairs(str(data), seed=ft.seed)
    log(f"task: {data} -> {len(train)} train / {len(held)} held-out ({spec.task}); "
        f"ladder {pipeline.ladder(spec.target, spec.base)}, t(D) = max({ft.min_steps}, ceil({ft.epochs:g}*D/{ft.batch_size}))")

    # parity: PyTorch vs lensjax target-token loss of each pretrained checkpoint -------------
    t = time.time()
    from lensjax.selection.data import tokenize

    probe = held.take(range(min(32, len(held))))
    parity = {}
    for name, d in zip(zoo, dirs):
        m = lensjax.load(d)
        lj = evaluate(m.config, m.params, tokenize(m.tokenizer, probe, ft.max_len), 32, m.tokenizer.pad_token_id)
        pt = torch_target_loss(Path(d), probe, ft.max_len)
        parity[name] = dict(torch=pt, lensjax=lj, abs_diff=abs(pt - lj))
    worst = max(v["abs_diff"] for v in parity.values())
    log(f"parity torch vs lensjax zero-shot target loss: max |diff| = {worst:.2e}"
        + ("" if worst < 1e-3 else "  <-- MISMATCH"))
    timings["parity_s"] = time.time() - t

    # 4. curves: measure once up to the target --------------------------------------------
    curves_csv = Path(root / f"curves-{spec.key()}.csv")
    t = time.time()
    log(f"measuring curves up to the target {spec.target} for {len(dirs)} models -> {curves_csv}")
    pipeline.run(dirs, str(data), budget=spec.target, target_size=spec.target, method="ats", base=spec.base,
                 ft=ft, curves_out=curves_csv, log=lambda *a: None)
    timings["curves_s"] = time.time() - t
    curves = read_curves(curves_csv)
    curves = curves.subset([curves.models.index(d) for d in dirs])
    names = list(zoo)
    true = curves.column(spec.target)
    assert true is not None and np.all(np.isfinite(true)), "target column missing"
    log(f"curves measured in {timings['curves_s']:.1f}s")

    # 4b. predictions per method and budget ---------------------------------------------------
    rows, mismatches, raw = [], [], {}
    t = time.time()
    for method in spec.methods:
        for b in spec.budgets:
            t1 = time.time()
            res = pipeline.run(dirs, str(data), budget=b, target_size=spec.target, method=method, base=spec.base,
                               ft=ft, curves_out=curves_csv, log=lambda *a: None)
            dt = time.time() - t1
            pred = np.array([res["predicted"][d] for d in dirs])
            s = score(pred, true)
            lib = dict(res.get("metrics") or {}, rmse=res.get("rmse"))
            for k in ("pearson", "relacc", "spearman", "kendall", "rmse"):
                a, c = s[k], lib.get(k)
                if c is None or not (np.isclose(a, c, rtol=1e-6, atol=1e-9) or (np.isnan(a) and np.isnan(c))):
                    mismatches.append(f"{method}@{b} {k}: script {a} vs pipeline {c}")
            sel = names[int(np.argmin(pred))]
            rows.append(dict(method=method, budget=b, ratio=spec.target / b, **s, selected=sel,
                             true_best=names[int(np.argmin(true))], cost_fraction=res["cost_fraction"],
                             converged=int(sum(res["converged"].values())), seconds=dt,
                             predicted={n: float(p) for n, p in zip(names, pred)}))
            raw[f"{method}@{b}"] = {k: v for k, v in res.items() if k not in ("ntk",)} | (
                {"ntk": res["ntk"]} if "ntk" in res else {})
            log(f"  {method:<9} budget {b:>5}: RMSE {s['rmse']:.4f}  Pearson {fmt(s['pearson'])}  "
                f"RelAcc {s['relacc']:.3f}  picks {sel}  ({dt:.1f}s)")
    timings["predict_s"] = time.time() - t

    # baselines on the same curves (no extra fine-tuning) -----------------------------------
    baselines = []
    for method in ("subtuning", "zeroshot", "modelsize"):
        sels = select_many(curves, method, None, budgets=list(spec.budgets), target_size=spec.target, base=spec.base)
        for b, sl in zip(spec.budgets, sels):
            s = score(sl.predicted, true)
            if method in ("zeroshot", "modelsize"):
                s["rmse"] = float("nan")  # not a prediction of the target loss
            baselines.append(dict(method=method, budget=b, ratio=spec.target / b, **s,
                                  selected=names[int(np.argmin(sl.predicted))], true_best=names[int(np.argmin(true))]))
            if method in ("zeroshot", "modelsize"):
                break  # budget-independent

    # 5. report --------------------------------------------------------------------------------
    timings["total_s"] = time.time() - t_start
    sizes = [int(x) for x in curves.sizes]
    print()
    print(f"### Zoo and measured curves (mean target-token NLL on {len(held)} held-out {spec.task} examples)\n")
    print("| model | family | params | pretrain steps | " + " | ".join(f"D={s}" for s in sizes) + " |")
    print("|---|---|---:|---:|" + "---:|" * len(sizes))
    for i, n in enumerate(names):
        z = zoo[n]
        print(f"| {n} | {z['family']} | {z['params']:,} | {z['steps']} | "
              + " | ".join(f"{v:.3f}" for v in curves.loss[i]) + " |")
    print(f"\n### Prediction of the loss at D={spec.target} (true best: {names[int(np.argmin(true))]})\n")
    hdr = "| method | budget (ratio) | RMSE | Pearson | RelAcc | Spearman | Kendall | top-1 | top-3 | selected | true best |"
    print(hdr)
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in rows + baselines:
        print(f"| {r['method']} | {r['budget']} ({r['ratio']:g}x) | {fmt(r['rmse'], 4)} | {fmt(r['pearson'])} | "
              f"{fmt(r['relacc'])} | {fmt(r['spearman'])} | {fmt(r['kendall'])} | {r['top1']:.0f} | {r['top3']:.0f} | "
              f"{r['selected']} | {r['true_best']} |")
    print("\n(zeroshot/modelsize are budget-independent baselines; their score is not a loss, so no RMSE.)")
    print("\n### Predicted target loss per model\n")
    print("| method@budget | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    print("| **measured** | " + " | ".join(f"**{v:.3f}**" for v in true) + " |")
    for r in rows:
        print(f"| {r['method']}@{r['budget']} | " + " | ".join(f"{r['predicted'][n]:.3f}" for n in names) + " |")
    print("\ntimings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    if mismatches:
        print("\nWARNING: script metrics differ from pipeline.run's own:\n  " + "\n  ".join(mismatches))

    out_json.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(
        spec=dataclasses.asdict(spec) | {"zoo": [list(z) for z in spec.zoo]}, zoo_dir=str(root), task=str(data),
        n_train=len(train), n_heldout=len(held), ft=dataclasses.asdict(ft), curves_csv=str(curves_csv),
        zoo=zoo, parity=parity, sizes=sizes,
        curves={n: {str(s): float(v) for s, v in zip(sizes, curves.loss[i])} for i, n in enumerate(names)},
        true_target_loss={n: float(v) for n, v in zip(names, true)}, true_best=names[int(np.argmin(true))],
        results=rows, baselines=baselines, metric_mismatches=mismatches, timings=timings,
        pipeline_results=raw, python=sys.version.split()[0],
    )
    out_json.write_text(json.dumps(payload, indent=1, default=float))
    print(f"\nwrote {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
