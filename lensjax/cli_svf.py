"""``lensjax svf``: decompose, train (``--preset paper|reference``), eval and export SVF experts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from lensjax.io import atomic_write

svf_app = typer.Typer(no_args_is_help=True, help="Transformer² singular-value fine-tuning (SVF).")
console = Console()
if not console.is_terminal:
    console = Console(width=160)

TASK_HELP = ("arithmetic; a hub id (gsm8k, arc_easy, arc_challenge, allenai/ai2_arc:ARC-Challenge, competition_math, "
             "mbpp, mbpp:sanitized, humaneval, or any name[:config]); a folder with train/validation/test files; or a "
             "local json/jsonl/csv/parquet file.")
KIND_HELP = "Task kind (default: from the records' fields): gsm8k, math, arc, mbpp, humaneval."


def _fail(exc) -> None:
    console.print(f"[bold red]error:[/bold red] {exc}")
    raise typer.Exit(2)


def _svf_load(model: str, targets: str, cache_dir: Optional[Path]):
    import lensjax
    from lensjax.svf import core

    m = lensjax.load(model)
    core.check_model(m.config)
    if m.tokenizer is None:
        raise core.SVFError(f"{model}: SVF needs the model's tokenizer")
    cache = cache_dir if cache_dir is not None else Path(m.path) / ".lensjax-svd"
    return m, core.decompose_params(m.params, targets, cache_dir=cache)


def _svf_errors():
    from lensjax.checkpoints import CheckpointError
    from lensjax.svf.core import SVFError
    from lensjax.svf.sandbox import SandboxError
    from lensjax.svf.tasks import TaskError

    return (SVFError, TaskError, CheckpointError, SandboxError, ValueError)


@svf_app.command("decompose")
def svf_decompose(model: str = typer.Option(..., help="Model folder or hub id."),
                  targets: str = typer.Option("mlp", help="mlp, attn (q, v) or all."),
                  cache_dir: Optional[Path] = typer.Option(None, help="Where to cache U, σ, Vᵀ (default: <model>/.lensjax-svd).")):
    """Decompose the target matrices once (cached, keyed by the weights' content hash)."""
    try:
        m, dec = _svf_load(model, targets, cache_dir)
    except _svf_errors() as exc:
        _fail(exc)
    t = Table(title=f"SVD of {model} ({targets})")
    for c in ("matrix", "layers × rank", "σ max", "σ min", "z parameters"):
        t.add_column(c)
    for p in dec.paths:
        s = np.asarray(dec.s[p])
        t.add_row(p, f"{s.shape[0]} × {s.shape[1]}", f"{s.max():.3g}", f"{s.min():.3g}", f"{s.size:,}")
    console.print(t)


@svf_app.command("train")
def svf_train(model: str = typer.Option(..., help="Model folder or hub id."),
              task: str = typer.Option("arithmetic", help=TASK_HELP), kind: Optional[str] = typer.Option(None, help=KIND_HELP),
              preset: str = typer.Option("paper", help="paper (the paper's description, default) or reference (the released code); the flags below override it."),
              steps: int = typer.Option(100), out: Path = typer.Option(..., help="Run folder (resumable)."),
              targets: str = typer.Option("mlp"), parameterisation: Optional[str] = typer.Option(None, help="paper (g = z) or reference (sigmoid mask, Σσ kept)."),
              lr: Optional[float] = typer.Option(None), optimizer: Optional[str] = typer.Option(None, help="adamw or adam."),
              schedule: Optional[str] = typer.Option(None, help="cosine or constant."), clip: Optional[float] = typer.Option(None, help="Global-norm gradient clip."),
              kl_coef: Optional[float] = typer.Option(None, help="λ of the KL penalty."),
              kl: Optional[str] = typer.Option(None, help="forward: KL(π_W′ ‖ π_W) (paper); reverse: KL(π_W ‖ π_W′) (reference)."),
              kl_reduce: Optional[str] = typer.Option(None, help="mean over tokens (paper) or sum per completion (reference)."),
              reward: Optional[str] = typer.Option(None, help="binary (1/0) or pm1 (±1)."),
              baseline: Optional[str] = typer.Option(None, help="mean or none."),
              batch_prompts: int = typer.Option(8), samples: Optional[int] = typer.Option(None, help="Samples per prompt."),
              greedy: Optional[bool] = typer.Option(None, "--greedy/--sample", help="Greedy or sampled rollouts."),
              max_new_tokens: int = typer.Option(16, help="Up to 512; the batch stops when every row has stopped."),
              temperature: Optional[float] = typer.Option(None), normalise_rewards: Optional[bool] = typer.Option(None),
              val_every: int = typer.Option(10), n_val: int = typer.Option(100, help="Validation examples (carved from train when the task has no validation split)."),
              limit: Optional[int] = typer.Option(None, help="Use at most this many training examples."),
              seed: int = typer.Option(0), cache_dir: Optional[Path] = typer.Option(None),
              compute_dtype: str = typer.Option("float32", help="The update's matmuls: float32, or bfloat16 (mixed precision: bf16 operands, float32 accumulation, z and Adam; rollouts stay float32).")):
    """Train an SVF expert with REINFORCE (+ KL); writes out/best.safetensors and resumable state."""
    from rich.progress import Progress

    from lensjax.svf.tasks import train_val
    from lensjax.svf.trainer import make_config, train

    try:
        cfg = make_config(preset, targets=targets, parameterisation=parameterisation, lr=lr, optimizer=optimizer,
                          schedule=schedule, clip=clip, kl_coef=kl_coef, kl=kl, kl_reduce=kl_reduce, reward=reward,
                          baseline=baseline, steps=steps, batch_prompts=batch_prompts, samples_per_prompt=samples,
                          greedy_rollouts=greedy, max_new_tokens=max_new_tokens, temperature=temperature,
                          normalise_rewards=normalise_rewards, val_every=val_every, seed=seed,
                          compute_dtype=compute_dtype)
        tr, val = train_val(task, n_val, seed, limit, kind)
        if tr.kind in ("mbpp", "humaneval"):
            from lensjax.svf.sandbox import check_available

            check_available()
        m, dec = _svf_load(model, targets, cache_dir)
        with Progress(console=console) as prog:
            bar = prog.add_task("SVF", total=steps)
            info = train(m, dec, tr, val, cfg, out, on_step=lambda r: prog.update(bar, completed=r["step"],
                         description=f"SVF reward {r['reward']:.2f}"))
    except _svf_errors() as exc:
        _fail(exc)
    console.print(f"task {tr.name} ({tr.kind}): {len(tr)} train / {len(val)} validation · preset {preset}")
    t = Table(title=f"SVF on {tr.name}")
    for c in ("step", "reward", "loss", "KL", "val accuracy"):
        t.add_column(c)
    for h in info["history"]:
        if "val_accuracy" in h:
            t.add_row(str(h["step"]), f"{h['reward']:.3f}", f"{h['loss']:.4f}", f"{h['kl']:.2e}", f"{h['val_accuracy']:.3f}")
    console.print(t)
    console.print(f"validation accuracy: base {info['base_acc']:.3f} → best {info['best_acc']:.3f} "
                  f"(step {info['best_step']}); expert: {out / 'best.safetensors'}")


@svf_app.command("eval")
def svf_eval(model: str = typer.Option(...), expert: Optional[Path] = typer.Option(None, help="Expert file (none: the base model)."),
             task: str = typer.Option("arithmetic", help=TASK_HELP), kind: Optional[str] = typer.Option(None, help=KIND_HELP),
             split: str = typer.Option("test", help="Split of a hub or folder task (a single file is used whole)."),
             limit: Optional[int] = typer.Option(None), max_new_tokens: int = typer.Option(256),
             batch: int = typer.Option(32), json_out: Optional[Path] = typer.Option(None, "--json", help="Accuracy and every completion with its score."),
             cache_dir: Optional[Path] = typer.Option(None)):
    """Greedy accuracy of the base model and (with --expert) the adapted one."""
    from lensjax.svf import core
    from lensjax.svf.experts import check_expert, load_expert
    from lensjax.svf.rollout import evaluate
    from lensjax.svf.tasks import load_task
    from lensjax.svf.trainer import low_precision

    try:
        data = load_task(task, split, limit, kind)
        if data.kind in ("mbpp", "humaneval"):
            from lensjax.svf.sandbox import check_available

            check_available()
        z, meta = load_expert(expert) if expert is not None else (None, {"targets": "mlp"})
        m, dec = _svf_load(model, meta["targets"], cache_dir)
        rows = [("base", m.params)]
        if z is not None:
            check_expert(z, dec, meta, m.params)
            rows.append((f"+ {expert}", core.adapted_params(
                m.params, dec, z, meta.get("parameterisation", "paper"), n_tokens=batch,
                factored=True if low_precision(m.params) else None, max_mult=float(meta.get("max_mult", 1.0)))))
        results = {name: evaluate(m, p, data, max_new_tokens=max_new_tokens, batch=batch) for name, p in rows}
    except _svf_errors() as exc:
        _fail(exc)
    console.print(f"task {data.name} ({data.kind}): {len(data)} examples")
    t = Table(title=f"greedy accuracy on {data.name}")
    t.add_column("model")
    t.add_column("accuracy")
    t.add_column("correct")
    for name, res in results.items():
        t.add_row(name, f"{res['accuracy']:.4f}", f"{int(sum(res['correct']))}/{len(data)}")
    console.print(t)
    if json_out is not None:
        payload = {"task": data.name, "kind": data.kind, "n": len(data),
                   "results": {k: {"accuracy": v["accuracy"], "completions": v["completions"],
                                   "correct": [float(c) for c in v["correct"]]} for k, v in results.items()}}
        atomic_write(json_out, json.dumps(payload, indent=1) + "\n")
        console.print(f"wrote {json_out}")


@svf_app.command("export")
def svf_export(model: str = typer.Option(...), expert: Path = typer.Option(...), out: Path = typer.Option(...),
               cache_dir: Optional[Path] = typer.Option(None)):
    """Write the merged weights W′ as a Hugging Face checkpoint that transformers loads."""
    from lensjax.svf.experts import export, load_expert

    try:
        z, meta = load_expert(expert)
        m, dec = _svf_load(model, meta["targets"], cache_dir)
        path = export(m, dec, z, meta, out)
    except _svf_errors() as exc:
        _fail(exc)
    console.print(f"wrote {path}")


# ------------------------------------------------------------------------------ self-adaptation
def _pairs(spec: str, what: str) -> dict[str, str]:
    """``a=x,b=y`` → {"a": "x", "b": "y"}."""
    from lensjax.svf.core import SVFError

    out = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name, eq, value = part.partition("=")
        if not eq or not name.strip() or not value.strip():
            raise SVFError(f"{what}: expected category=value pairs separated by commas; got {part!r}")
        if name.strip() in out:
            raise SVFError(f"{what}: category {name.strip()!r} given twice")
        out[name.strip().lower()] = value.strip()
    if not out:
        raise SVFError(f"{what}: no category=value pairs in {spec!r}")
    return out


@svf_app.command("train-classifier")
def svf_train_classifier(model: str = typer.Option(..., help="Model folder or hub id."),
                         tasks: str = typer.Option(..., help="category=task pairs, e.g. math=gsm8k,code=mbpp,reasoning=arc_challenge; only their TRAIN splits are read."),
                         steps: int = typer.Option(100), out: Path = typer.Option(..., help="Run folder (resumable); the expert is out/best.safetensors."),
                         targets: str = typer.Option("mlp"), preset: str = typer.Option("paper"),
                         per_category: Optional[int] = typer.Option(None, help="At most this many questions per category."),
                         n_val: int = typer.Option(50, help="Validation questions, carved from the training questions."),
                         instruction: Optional[str] = typer.Option(None, help="Replaces the classification instruction (default: the reference's categories prompt)."),
                         lr: Optional[float] = typer.Option(None), batch_prompts: int = typer.Option(8),
                         max_new_tokens: int = typer.Option(16), kind: Optional[str] = typer.Option(None, help=KIND_HELP),
                         seed: int = typer.Option(0), cache_dir: Optional[Path] = typer.Option(None)):
    """Train the pass-1 classification expert (REINFORCE, reward: the right category)."""
    from rich.progress import Progress

    from lensjax.svf.adaptation import train_classifier
    from lensjax.svf.tasks import load_task
    from lensjax.svf.trainer import make_config

    try:
        sources = _pairs(tasks, "--tasks")
        cfg = make_config(preset, targets=targets, steps=steps, lr=lr, batch_prompts=batch_prompts,
                          max_new_tokens=max_new_tokens, seed=seed)
        train_tasks = {cat: load_task(src, "train", None, kind) for cat, src in sources.items()}
        m, dec = _svf_load(model, targets, cache_dir)
        with Progress(console=console) as prog:
            bar = prog.add_task("classifier", total=steps)
            info = train_classifier(m, dec, train_tasks, cfg, out, n_val=n_val, per_category=per_category,
                                    instruction=instruction,
                                    on_step=lambda r: prog.update(bar, completed=r["step"],
                                                                  description=f"classifier reward {r['reward']:.2f}"))
    except _svf_errors() as exc:
        _fail(exc)
    console.print(f"categories {', '.join(sources)}; {sum(len(t) for t in train_tasks.values())} training questions")
    console.print(f"classification accuracy on validation: base {info['base_acc']:.3f} → best {info['best_acc']:.3f} "
                  f"(step {info['best_step']}); expert: {out / 'best.safetensors'}")


@svf_app.command("adapt")
def svf_adapt(model: str = typer.Option(..., help="Model folder or hub id."),
              experts: str = typer.Option(..., help="category=expert-file pairs, e.g. math=m.safetensors,code=c.safetensors."),
              strategy: str = typer.Option(..., help="prompt, classifier or fewshot."),
              task: str = typer.Option(..., help=TASK_HELP), kind: Optional[str] = typer.Option(None, help=KIND_HELP),
              classifier: Optional[Path] = typer.Option(None, help="Classification expert (strategy classifier), from svf train-classifier."),
              shots: int = typer.Option(10, help="Few-shot examples from the task's train split (strategy fewshot)."),
              n_val: int = typer.Option(50, help="Validation examples for the few-shot choice (the task's validation split, else carved from train)."),
              generations: int = typer.Option(50), pop_size: int = typer.Option(32), elites: int = typer.Option(6),
              per_matrix: bool = typer.Option(False, help="One α per expert per target matrix."),
              max_rows: Optional[int] = typer.Option(None, help="Rows per batched call of the CEM population (pop × shots), when it does not fit at once."),
              mix_space: str = typer.Option("multipliers", help="multipliers (g(z), default) or raw_z (the reference code's)."),
              split: str = typer.Option("test"), limit: Optional[int] = typer.Option(None),
              instruction: Optional[str] = typer.Option(None, help="Replaces the classification instruction."),
              max_new_tokens: int = typer.Option(256), classify_tokens: int = typer.Option(16),
              batch: int = typer.Option(32), seed: int = typer.Option(0),
              json_out: Optional[Path] = typer.Option(None, "--json", help="Result, per-question choices / α and answers."),
              cache_dir: Optional[Path] = typer.Option(None)):
    """Two-pass Transformer² inference: pass 1 picks the expert(s), pass 2 answers with them."""
    from rich.progress import Progress

    from lensjax.svf import core, mixing
    from lensjax.svf.adaptation import CLASSIFIER_PREFIX, STRATEGIES, adapt
    from lensjax.svf.experts import check_expert, load_expert
    from lensjax.svf.tasks import load_task

    try:
        if strategy not in STRATEGIES:
            raise core.SVFError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        files = _pairs(experts, "--experts")
        metas = {c: load_expert(f)[1] for c, f in files.items()}
        tgts = {m.get("targets") for m in metas.values()}
        if len(tgts) != 1:
            raise core.SVFError("the experts target different matrices: "
                                + ", ".join(f"{c}: {m.get('targets')}" for c, m in metas.items()))
        m, dec = _svf_load(model, tgts.pop(), cache_dir)
        es = mixing.load_experts(files, dec, m.params)
        cls_params, shot_set, val_set = None, None, None
        if strategy == "classifier":
            if classifier is None:
                raise core.SVFError("strategy classifier needs --classifier (from `lensjax svf train-classifier`)")
            zc, mc = load_expert(classifier)
            cats = mc.get("task", "")[len(CLASSIFIER_PREFIX):].split(",") if mc.get("task", "").startswith(CLASSIFIER_PREFIX) else []
            missing = [c for c in cats if c not in es.names]
            if missing:
                raise core.SVFError(f"the classifier predicts {', '.join(missing)}, which has no expert (give it in --experts)")
            cdec = dec if mc.get("targets") == metas[es.names[0]].get("targets") else core.decompose_params(
                m.params, mc["targets"], cache_dir=cache_dir if cache_dir is not None else Path(m.path) / ".lensjax-svd")
            check_expert(zc, cdec, mc, m.params)
            cls_params = core.adapted_params(m.params, cdec, zc, mc.get("parameterisation", "paper"), n_tokens=batch,
                                             max_mult=float(mc.get("max_mult", 1.0)))
        if strategy == "fewshot":
            from lensjax.svf.fewshot import fewshot_sets

            shot_set, val_set = fewshot_sets(task, shots, n_val, seed, kind)
        data = load_task(task, split, limit, kind)  # the test split, read once
        if data.kind in ("mbpp", "humaneval"):
            from lensjax.svf.sandbox import check_available

            check_available()
        n_q = len(data)
        with Progress(console=console) as prog:
            bars = {"pass 1": prog.add_task("pass 1", total=generations if strategy == "fewshot" else n_q),
                    "pass 2": prog.add_task("pass 2", total=n_q)}
            res = adapt(m, dec, es, data, strategy, classifier_params=cls_params, shots=shot_set, val=val_set,
                        instruction=instruction, max_new_tokens=max_new_tokens, classify_tokens=classify_tokens,
                        batch=batch, fewshot=dict(generations=generations, pop_size=pop_size, n_elites=elites,
                                                  per_matrix=per_matrix, space=mix_space, max_rows=max_rows,
                                                  seed=seed),
                        on_progress=lambda name, n: prog.advance(bars[name], n))
    except _svf_errors() as exc:
        _fail(exc)
    t = Table(title=f"Transformer² on {data.name} ({n_q} questions)")
    for c in ("strategy", "accuracy", "pass 1 (s)", "pass 2 (s)", "pass 1 tokens", "pass 2 tokens", "choice"):
        t.add_column(c)
    if res.choices is not None:
        choice = ", ".join(f"{c} {res.choices.count(c)}" for c in dict.fromkeys(res.choices))
    else:
        choice = "α = " + json.dumps(np.round(np.asarray(res.alpha), 3).tolist())
    t.add_row(strategy, f"{res.accuracy:.4f}", f"{res.pass1_seconds:.2f}", f"{res.pass2_seconds:.2f}",
              f"{res.pass1_tokens:,}", f"{res.pass2_tokens:,}", choice)
    console.print(t)
    if json_out is not None:
        atomic_write(json_out, json.dumps(res.to_json(files), indent=1) + "\n")
        console.print(f"wrote {json_out}")
