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
    ("gpt2-32x2", "gpt2", dict(d=32, layers=2, heads=4), 600),
    ("gpt2-48x2", "gpt2", dict(d=48, layers=2, heads=4), 400),
    ("gpt2-64x3", "gpt2", dict(d=64, layers=3, heads=4), 250),
    ("llama-48x2", "llama", dict(d=48, layers=2, heads=4, ffn=128), 700),
    ("llama-64x2", "llama", dict(d=64, layers=2, heads=4, ffn=176), 300),
    ("llama-96x3", "llama", dict(d=96, layers=3, heads=4, ffn=256), 200),
    ("opt-48x2", "opt", dict(d=48, layers=2, heads=4, ffn=192), 500),
    ("opt-64x3", "opt", dict(d=64, layers=3, heads=4, ffn=256), 300),
    ("qwen2-48x2", "qwen2", dict(d=48, layers=2, heads=4, kv=2, ffn=128), 450),
    ("qwen2-96x2", "qwen2", dict(d=96, layers=2, heads=4, kv=2, ffn=256), 350),
    ("mistral-48x3", "mistral", dict(d=48, layers=3, heads=4, kv=2, ffn=128), 650),
    ("mistral-64x2", "mistral", dict(d=64, layers=2, heads=4, kv=2, ffn=192), 150),
]
QUICK_ZOO = [
    ("gpt2-32x1", "gpt2", dict(d=32, layers=1, heads=4), 40),
    ("llama-32x1", "llama", dict(d=32, layers=1, heads=4, ffn=64), 60),
    ("opt-32x1", "opt", dict(d=32, layers=1, heads=4, ffn=64), 20),
]
METHODS = ("lensllm", "lensllm_nofloor", "lensllm_reference", "lensllm_tfit", "lensllm_fixed", "rectified",
           "rectified_joint", "rectified_nofloor_joint", "ats", "ensemble")
# Ablations of where the NTK's information goes: lensllm (D_l = s·F, s tied) with F replaced.
ABLATIONS = {"lensllm[F=1]": "a constant F: D_l = s, one pooled pre-learned size (no NTK information)",
             "lensllm[F=F(0)]": "F_i(0) = mean r0^2 per candidate, constant in D",
             "lensllm[F permuted]": "each candidate gets another candidate's F (per size)"}


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
    tasks: tuple[str, ...] = ("mul", "sort")
    ft_patience: int = 3
    ft_n_dev: int = 200
    ft_warmup: float = 0.1
    ft_schedule: str = "cosine"
    n_probe: int = 32
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:12]

    def zoo_key(self) -> str:
        z = dict(corpus=CORPUS, zoo=self.zoo, pre_batch=self.pre_batch, pre_seq=self.pre_seq, pre_lr=self.pre_lr, seed=self.seed)
        return hashlib.sha256(json.dumps(z, sort_keys=True, default=str).encode()).hexdigest()[:12]


def full_spec() -> Spec:
    # train = target + dev 200 + 300 spare; held out by load_pairs: min(500, n // 10) = 500
    return Spec(zoo=tuple(ZOO), target=3200, base=50, budgets=(200, 400, 800), methods=METHODS, n_spare=500,
                n_heldout=500)


def quick_spec() -> Spec:
    # 400 train + 60 dev + 40 spare: n = 555 -> load_pairs holds out n // 10 = 55
    return Spec(zoo=tuple(QUICK_ZOO), target=400, base=50, budgets=(200,), methods=METHODS, n_spare=100,
                n_heldout=55, ft_epochs=1.0, ft_n_dev=60, n_probe=16, pre_batch=16, tasks=("mul", "sort"))


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
    * ``sort``: ``{"input": "srt 80413=", "target": "01348"}``, 3-8 digits (not in pretraining).
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
    elif task == "sort":
        seen = set()
        while len(seen) < n:
            s = "".join(rng.choice(list("0123456789"), rng.integers(3, 9)))
            if s not in seen:
                seen.add(s)
                rows.append({"input": f"srt {s}=", "target": "".join(sorted(s))})
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
    out["rmse_target"] = float(np.sqrt(np.mean((pred - true) ** 2)))
    return out


def fmt(x, nd=3):
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "n/a"
    return f"{x:.{nd}f}"


def run_task(spec: Spec, task: str, zoo: dict, dirs: list, root: Path, log, quick: bool) -> dict:
    """Measure every candidate's curve up to the target, its NTK, then score every method."""
    import lensjax
    from lensjax.selection import pipeline
    from lensjax.selection.curves import read_curves
    from lensjax.selection.data import load_pairs, tokenize
    from lensjax.selection.finetune import FinetuneConfig, evaluate
    from lensjax.selection.selectors import select_many

    n_total = spec.target + spec.ft_n_dev + spec.n_spare + spec.n_heldout
    data = root / f"{task}-{n_total}.jsonl"
    if not data.exists():
        write_task(data, n_total, spec.seed + 7, task)
    ft = FinetuneConfig(lr=spec.ft_lr, batch_size=spec.ft_batch, epochs=spec.ft_epochs, min_steps=spec.ft_min_steps,
                        max_len=spec.ft_max_len, eval_batch_size=100, seed=spec.seed, schedule=spec.ft_schedule,
                        warmup=spec.ft_warmup, patience=spec.ft_patience, n_dev=spec.ft_n_dev)
    ntk_cfg = pipeline.NTKConfig(n_probe=spec.n_probe)
    train, held = load_pairs(str(data), seed=ft.seed, n_eval=spec.n_heldout)
    log(f"[{task}] {data}: {len(train)} train ({ft.n_dev} of them for early stopping) / {len(held)} held out; "
        f"ladder {pipeline.ladder(spec.target, spec.base)}")
    timings = {}
    # parity: PyTorch vs lensjax target-token loss of each pretrained checkpoint
    t = time.time()
    probe = held.take(range(min(16 if quick else 32, len(held))))
    parity = {}
    for name, d in zip(zoo, dirs):
        m = lensjax.load(d)
        lj = evaluate(m.config, m.params, tokenize(m.tokenizer, probe, ft.max_len), 32, m.tokenizer.pad_token_id)
        pt = torch_target_loss(Path(d), probe, ft.max_len)
        parity[name] = dict(torch=pt, lensjax=lj, abs_diff=abs(pt - lj))
    worst = max(v["abs_diff"] for v in parity.values())
    log(f"[{task}] parity torch vs lensjax zero-shot target loss: max |diff| = {worst:.2e}"
        + ("" if worst < 1e-3 else "  <-- MISMATCH"))
    timings["parity_s"] = time.time() - t
    # curves up to the target, measured once (pipeline.run with the budget = the target)
    curves_csv = root / f"curves-{task}-{spec.key()}.csv"
    t = time.time()
    full = pipeline.run(dirs, str(data), budget=spec.target, target_size=spec.target, method="ats", base=spec.base,
                        ft=ft, curves_out=curves_csv, n_eval=spec.n_heldout, log=lambda msg: log(f"[{task}] {msg}"))
    timings["curves_s"] = time.time() - t
    curves = read_curves(curves_csv)
    curves = curves.subset([curves.models.index(d) for d in dirs])
    names = list(zoo)
    true = curves.column(spec.target)
    assert true is not None and np.all(np.isfinite(true)), "target column missing"
    steps = np.array([[full["steps"][d][str(int(sz))] for sz in curves.sizes] for d in dirs], np.float64)
    planned = np.array([ft.steps(int(sz)) for sz in curves.sizes], np.float64)
    # NTK per candidate, once (F is a function of t; each prediction evaluates it at its own steps)
    t = time.time()
    ntks = []
    for d in dirs:
        m = lensjax.load(d)
        tok = tokenize(m.tokenizer, train.take(range(ntk_cfg.n_probe)), ft.max_len)
        ntks.append(pipeline.compute_ntk(m.config, m.params, tok, ntk_cfg, m.tokenizer.pad_token_id, ft.lr))
    timings["ntk_s"] = time.time() - t
    log_f = np.stack([c.log_F(steps[i]) for i, c in enumerate(ntks)])
    col = {int(sz): j for j, sz in enumerate(curves.sizes)}

    def log_f_at(size, budget):
        # F at a size beyond the budget: planned steps scaled by the fraction of its schedule the
        # candidate ran at the budget (what pipeline.run does for the target).
        frac = steps[:, col[budget]] / planned[col[budget]]
        return np.array([c.log_F(ft.steps(size) * frac[i]) for i, c in enumerate(ntks)])

    def variants(budget):
        lf_t = log_f_at(spec.target, budget)
        base = dict(log_F=log_f, log_F_target=lf_t)
        out = {m: ("lensllm" if m.startswith("lensllm[") else m, base) for m in spec.methods}
        const = np.zeros_like(log_f)
        out["lensllm[F=1]"] = ("lensllm", dict(log_F=const, log_F_target=const[:, 0]))
        f0 = np.broadcast_to(log_f[:, :1], log_f.shape)
        out["lensllm[F=F(0)]"] = ("lensllm", dict(log_F=f0, log_F_target=f0[:, 0]))
        perm = np.roll(np.arange(len(names)), 1)
        out["lensllm[F permuted]"] = ("lensllm", dict(log_F=log_f[perm], log_F_target=lf_t[perm]))
        return out

    rows = []
    t = time.time()
    beyond_all = [int(sz) for sz in curves.sizes if sz > 0]
    for b in spec.budgets:
        beyond = [sz for sz in beyond_all if b < sz <= spec.target]
        for label, (method, kw) in variants(b).items():
            t1 = time.time()
            sel = select_many(curves, method, None, budgets=[b], target_size=spec.target, base=spec.base, **kw)[0]
            pred = sel.predicted
            # along the measured curve beyond the budget: the same method predicting each size
            along = []
            for sz in beyond:
                kk = dict(kw)
                if "log_F_target" in kk and label not in ("lensllm[F=1]", "lensllm[F=F(0)]"):
                    lf = log_f_at(sz, b)
                    kk["log_F_target"] = lf[np.roll(np.arange(len(names)), 1)] if label == "lensllm[F permuted]" else lf
                p = pred if sz == spec.target else select_many(curves, method, None, budgets=[b], target_size=sz,
                                                               base=spec.base, **kk)[0].predicted
                along.append(p - curves.loss[:, col[sz]])
            curve_rmse = np.sqrt(np.mean(np.square(along), axis=0))  # per candidate
            sc = score(pred, true)
            sc["rmse_curve"] = float(np.mean(curve_rmse))
            rows.append(dict(task=task, method=label, budget=b, ratio=spec.target / b, **sc,
                             selected=names[int(np.argmin(pred))], true_best=names[int(np.argmin(true))],
                             converged=int(np.sum(sel.converged)), seconds=time.time() - t1,
                             predicted={n: float(v) for n, v in zip(names, pred)},
                             rmse_curve_per_model={n: float(v) for n, v in zip(names, curve_rmse)}))
            log(f"[{task}]  {label:<22} budget {b:>5}: RMSE@target {sc['rmse_target']:.4f}  curve {sc['rmse_curve']:.4f}"
                f"  Spearman {fmt(sc['spearman'])}  RelAcc {sc['relacc']:.3f}")
    timings["predict_s"] = time.time() - t
    # cost per budget: what pipeline.run reports at that budget (training, evaluation; nothing is
    # re-measured), plus the NTKs computed above
    costs = {}
    ntk_flops = float(sum(c.flops for c in ntks))
    for b in spec.budgets:
        c = pipeline.run(dirs, str(data), budget=b, target_size=spec.target, method="ats", base=spec.base,
                         ft=ft, curves_out=curves_csv, n_eval=spec.n_heldout)["cost"]
        c["ntk_flops"], c["ntk_fraction"] = ntk_flops, ntk_flops / c["full_flops"]
        costs[b] = c
    sizes = [int(x) for x in curves.sizes]
    return dict(task=task, data=str(data), n_train=len(train), n_heldout=len(held), ft=dataclasses.asdict(ft),
                parity=parity, sizes=sizes, curves_csv=str(curves_csv),
                curves={n: {str(sz): float(v) for sz, v in zip(sizes, curves.loss[i])} for i, n in enumerate(names)},
                steps={n: {str(sz): int(v) for sz, v in zip(sizes, steps[i])} for i, n in enumerate(names)},
                ntk={n: {"F0": float(c.F(0.0)), "top_eigenvalues": c.stats["top_eigenvalues"][:3],
                         "log_F_at_steps": [float(v) for v in log_f[i]]} for i, (n, c) in enumerate(zip(names, ntks))},
                true_target_loss={n: float(v) for n, v in zip(names, true)}, true_best=names[int(np.argmin(true))],
                results=rows, cost={str(b): c for b, c in costs.items()}, timings=timings)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 one-layer models, target 400, budget 200 (the smoke test)")
    ap.add_argument("--fresh", action="store_true", help="delete the zoo and the curves CSVs first")
    ap.add_argument("--task", action="append", choices=("mul", "sort", "reverse"), default=None,
                    help="downstream task(s) (default: mul and sort)")
    ap.add_argument("--root", default=None, help="zoo folder (default /tmp/lensjax-zoo[-quick])")
    ap.add_argument("--out", default=None, help="result JSON (default docs/lensllm_experiment[_quick].json)")
    ap.add_argument("--report", default=None, metavar="JSON", help="only print the tables of a result JSON")
    args = ap.parse_args(argv)
    if args.report:
        payload = json.loads(Path(args.report).read_text())
        print(summary_table(payload))
        return 0

    spec = quick_spec() if args.quick else full_spec()
    if args.task:
        spec = dataclasses.replace(spec, tasks=tuple(args.task))
    root = Path(args.root or ("/tmp/lensjax-zoo-quick" if args.quick else "/tmp/lensjax-zoo"))
    out_json = Path(args.out or REPO / "docs" / ("lensllm_experiment" + ("_quick" if args.quick else "") + ".json"))
    if args.fresh:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    t = time.time()
    zoo = build_zoo(spec, root, log)
    zoo_s = time.time() - t
    dirs = [str(root / n) for n, *_ in spec.zoo]
    tasks = [run_task(spec, task, zoo, dirs, root, log, args.quick) for task in spec.tasks]
    total = time.time() - t_start
    report(spec, zoo, tasks)
    payload = dict(spec=dataclasses.asdict(spec) | {"zoo": [list(z) for z in spec.zoo]}, zoo=zoo, tasks=tasks,
                   ablations=ABLATIONS, timings={"zoo_pretrain_s": zoo_s, "total_s": total},
                   error_measures={"rmse_target": "RMSE across candidates of the predicted vs measured loss at the "
                                                  "target size (lensjax's measure)",
                                   "rmse_curve": "per candidate, RMSE of the method's predictions at every measured "
                                                 "size beyond the budget up to the target, averaged over candidates "
                                                 "(how the LensLLM paper's Table 2 appears to measure)"},
                   python=sys.version.split()[0])
    from lensjax.io import atomic_write

    out_json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_json, json.dumps(payload, indent=1, default=float) + "\n")
    print(f"\nwrote {out_json} ({total:.0f} s)")
    return 0


def summary_table(payload) -> str:
    """The README's table: every method and ablation, per task and budget, from a result JSON."""
    lines = []
    for tk in payload["tasks"]:
        lines.append(f"**{tk['task']}** (target {payload['spec']['target']}, true best {tk['true_best']})\n")
        lines.append("| method | budget | RMSE at target | RMSE along curve | Pearson | Spearman | RelAcc | selected | cost |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---|---:|")
        for r in tk["results"]:
            c = tk["cost"][str(r["budget"])]
            cost = c["train_fraction"] + c["eval_fraction"] + (c["ntk_fraction"] if r["method"].startswith("lensllm") else 0)
            lines.append(f"| {r['method']} | {r['budget']} | {r['rmse_target']:.4f} | {r['rmse_curve']:.4f} | "
                         f"{fmt(r['pearson'])} | {fmt(r['spearman'])} | {fmt(r['relacc'])} | {r['selected']} | "
                         f"{100 * cost:.1f}% |")
        lines.append("")
    return "\n".join(lines)


def report(spec, zoo, tasks) -> None:
    for tk in tasks:
        names = list(zoo)
        print(f"\n### {tk['task']}: measured curves (mean target-token NLL on {tk['n_heldout']} held-out examples; "
              f"t = early-stopping step in brackets)\n")
        print("| model | family | params | pretrain steps | " + " | ".join(f"D={s}" for s in tk["sizes"]) + " |")
        print("|---|---|---:|---:|" + "---:|" * len(tk["sizes"]))
        for n in names:
            z = zoo[n]
            print(f"| {n} | {z['family']} | {z['params']:,} | {z['steps']} | "
                  + " | ".join(f"{tk['curves'][n][str(s)]:.3f} ({tk['steps'][n][str(s)]})" for s in tk["sizes"]) + " |")
        print(f"\n### {tk['task']}: predictions at D={spec.target} (true best {tk['true_best']})\n")
        print("| method | budget | RMSE at target | RMSE along curve | Pearson | Spearman | RelAcc | selected | cost |")
        print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
        for r in tk["results"]:
            c = tk["cost"][str(r["budget"])]
            cost = c["train_fraction"] + c["eval_fraction"] + (c["ntk_fraction"] if r["method"].startswith("lensllm") else 0)
            print(f"| {r['method']} | {r['budget']} | {r['rmse_target']:.4f} | {r['rmse_curve']:.4f} | {fmt(r['pearson'])} | "
                  f"{fmt(r['spearman'])} | {fmt(r['relacc'])} | {r['selected']} | {100 * cost:.1f}% |")


if __name__ == "__main__":
    from lensjax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()  # glibc huge pages for XLA's buffers (lensjax/runtime.py)
    raise SystemExit(main())
