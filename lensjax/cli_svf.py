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
              seed: int = typer.Option(0), cache_dir: Optional[Path] = typer.Option(None)):
    """Train an SVF expert with REINFORCE (+ KL); writes out/best.safetensors and resumable state."""
    from rich.progress import Progress

    from lensjax.svf.tasks import train_val
    from lensjax.svf.trainer import make_config, train

    try:
        cfg = make_config(preset, targets=targets, parameterisation=parameterisation, lr=lr, optimizer=optimizer,
                          schedule=schedule, clip=clip, kl_coef=kl_coef, kl=kl, kl_reduce=kl_reduce, reward=reward,
                          baseline=baseline, steps=steps, batch_prompts=batch_prompts, samples_per_prompt=samples,
                          greedy_rollouts=greedy, max_new_tokens=max_new_tokens, temperature=temperature,
                          normalise_rewards=normalise_rewards, val_every=val_every, seed=seed)
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
