"""The ``lensjax`` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from lensjax.io import atomic_write
from lensjax.selection import selectors
from lensjax.selection.curves import EMBEDDED, CurvesError, load_embedded, read_curves

app = typer.Typer(no_args_is_help=True, add_completion=False, help="LLM selection and adaptation in JAX.")
console = Console()
if not console.is_terminal:  # pipes and CI: do not squeeze tables into 80 columns
    console = Console(width=160)

DEFAULT_METHOD = selectors.DEFAULT_METHOD
_ST = selectors.Settings()


@app.callback()
def _main() -> None:
    """LLM selection and adaptation in JAX."""


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, text)


def _fmt(x, nd=3):
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def _ranking_table(sel: selectors.Selection) -> Table:
    pr = sel.protocol
    title = (f"{sel.method} · ratio 1/{pr.ratio_value:g} · budget {pr.budget_size:,.0f} · "
             f"target {pr.target_size:,.0f}")
    t = Table(title=title)
    t.add_column("rank", justify="right")
    t.add_column("model")
    t.add_column("predicted" if sel.predicts_loss else "score (−log size)", justify="right")
    iv, pb, pw = sel.interval, sel.p_best, sel.p_within
    if iv is not None:
        t.add_column(f"{100 * sel.bootstrap.level:g}% interval", justify="right")
        t.add_column("P(best)", justify="right")
        t.add_column(f"P(≤best+{sel.eps:g})", justify="right")
    if sel.true is not None:
        t.add_column("true loss", justify="right")
    if sel.fit is not None:
        t.add_column("fit", justify="center")
    order = np.argsort(sel.predicted, kind="stable")
    for r, i in enumerate(order, start=1):
        row = [str(r), sel.models[i], _fmt(float(sel.predicted[i]))]
        if iv is not None:
            row += [f"{iv[i, 0]:.3f}–{iv[i, 1]:.3f}", f"{pb[i]:.2f}", f"{pw[i]:.2f}"]
        if sel.true is not None:
            row.append(_fmt(float(sel.true[i])))
        if sel.fit is not None:
            row.append("ok" if sel.converged[i] else "[red]not converged[/red]")
        t.add_row(*row)
    return t


def _metrics_line(sel: selectors.Selection) -> str:
    parts = []
    if sel.metrics:
        m = sel.metrics
        parts.append(f"Pearson {100 * m['pearson']:.1f}  RelAcc {100 * m['relacc']:.1f}  "
                     f"Spearman {100 * m['spearman']:.1f}  Kendall {100 * m['kendall']:.1f}  "
                     f"top-1 {m['top1']:.0f} top-3 {m['top3']:.0f}")
    if sel.rmse() is not None:
        parts.append(f"RMSE at target {sel.rmse():.3f}")
    if sel.bootstrap is not None:
        best = int(np.argmin(sel.predicted))
        parts.append(f"P(selected is best) {sel.p_best[best]:.2f}, P(selected within {sel.eps:g} of best) "
                     f"{sel.p_within[best]:.2f}")
    parts.append(f"cost {100 * sel.cost['cost_fraction']:.2f}% of full fine-tuning "
                 f"({sel.cost['flops']:.3g} FLOPs)")
    nc = int((~sel.converged).sum())
    if nc:
        parts.append(f"[red]{nc} fit(s) not converged[/red]")
    return " · ".join(parts)


def _summary_table(sels: list[selectors.Selection]) -> Table:
    t = Table(title=f"{sels[0].method}: all ratios")
    boot = sels[0].bootstrap is not None
    cols = ["ratio", "budget", "selected", "predicted"]
    if boot:
        cols += [f"{100 * sels[0].bootstrap.level:g}% interval", "P(best)", "P(≤best+ε)"]
    for col in cols + ["Pearson", "RelAcc", "RMSE", "cost", "unconv."]:
        t.add_column(col, justify="left" if col == "selected" else "right",
                     no_wrap=col in ("selected", "P(≤best+ε)", "unconv.") or "interval" in col)
    for s in sels:
        m = s.metrics or {}
        pct = lambda k: _fmt(100 * m[k], 1) if k in m else "—"  # noqa: E731
        i = int(np.argmin(s.predicted))
        row = [f"1/{s.protocol.ratio_value:g}", f"{s.protocol.budget_size:,.0f}", s.ranking[0], _fmt(float(s.predicted[i]))]
        if boot:
            row += [f"{s.interval[i, 0]:.3f}–{s.interval[i, 1]:.3f}", f"{s.p_best[i]:.2f}", f"{s.p_within[i]:.2f}"]
        t.add_row(*row, pct("pearson"), pct("relacc"), _fmt(s.rmse()), f"{100 * s.cost['cost_fraction']:.2f}%",
                  str(int((~s.converged).sum())))
    if boot:
        t.caption = (f"interval, P(best), P(≤best+ε): of the selected model; ε = {sels[0].eps:g}; "
                     f"{sels[0].bootstrap.draws.shape[1]} bootstrap replicates; Spearman and Kendall are in the JSON")
    return t


def _load(curves: Optional[str]):
    if curves is None:
        return load_embedded("flan")
    if curves in EMBEDDED and not Path(curves).exists():
        return load_embedded(curves)
    return read_curves(curves)


@app.command("select")
def select_cmd(
    curves: Optional[str] = typer.Option(None, help="Curves CSV (default: the embedded FLAN curves; 'flan' or 'gigaword' name the embedded sets)."),
    method: Optional[str] = typer.Option(None, help=f"One of: {', '.join(selectors.METHODS)} (default {DEFAULT_METHOD}; lensllm with --models). See the README's method list."),
    ratio: Optional[List[float]] = typer.Option(None, help="Budget ratio target/budget (repeatable; default 8)."),
    all_ratios: bool = typer.Option(False, "--all-ratios", help="Every ratio 8, 16, ..., 512."),
    budget: Optional[List[float]] = typer.Option(None, help="Data budget in samples (repeatable; overrides --ratio)."),
    target_size: float = typer.Option(selectors.TARGET_SIZE, help="Data size to predict the loss at."),
    base: float = typer.Option(selectors.BASE_SIZE, help="Smallest ladder size used."),
    ats_k: int = typer.Option(3, help="AtS: smallest window."),
    ats_delta: float = typer.Option(5.0, help="AtS: standardised-residual threshold."),
    ats_include_smallest: bool = typer.Option(False, help="AtS: allow the smallest ladder point (the published method never uses it)."),
    local_k: int = typer.Option(3, help="local: power law through the last k ladder points (<= 0: all)."),
    tied: str = typer.Option("beta", help="*_joint methods: comma-separated law parameters tied across candidates by an empirical-Bayes prior."),
    tau_scale: float = typer.Option(1.0, help="*_joint methods: multiply the estimated prior variance (< 1: stronger pooling)."),
    ens_short: str = typer.Option(_ST.ens_short, help="ensemble: short-range part, ats or local."),
    ens_k: int = typer.Option(_ST.ens_k, help="ensemble: AtS smallest window of the short-range part."),
    ens_delta: float = typer.Option(_ST.ens_delta, help="ensemble: AtS threshold of the short-range part."),
    ens_long: str = typer.Option(_ST.ens_long, help="ensemble: long-range law method."),
    ens_r0: float = typer.Option(_ST.ens_r0, help="ensemble: ratio target/budget at which the long-range weight starts to grow from 0."),
    ens_r1: float = typer.Option(_ST.ens_r1, help="ensemble: ratio at which the long-range weight reaches 1."),
    n_boot: int = typer.Option(200, help="Bootstrap replicates for intervals and P(best) (0: none)."),
    level: float = typer.Option(0.95, help="Interval level."),
    eps: float = typer.Option(selectors.DEFAULT_EPS, help="P(within eps of the best): eps in loss units."),
    model_error: Optional[float] = typer.Option(None, help=f"Model-error coefficient κ of the intervals (0: measurement noise only). ensemble: s.d. κ × RMS disagreement of its short- and long-range parts (default {selectors.DEFAULT_SPREAD_ERROR}); other methods: s.d. κ·ln(target/budget) (default {selectors.DEFAULT_MODEL_ERROR})."),
    model_error_corr: float = typer.Option(selectors.DEFAULT_MODEL_ERROR_CORR, help="Fraction of the model-error variance shared by all candidates of a budget (affects P(best), not the intervals)."),
    starts: int = typer.Option(8, help="Multi-start count per fit."),
    seed: int = typer.Option(0, help="Seed of the multi-start."),
    solver: str = typer.Option("lm", help="Fitting solver: lm (Levenberg–Marquardt) or lbfgs (Optax L-BFGS)."),
    max_steps: int = typer.Option(400, help="Iteration cap per fit; a fit that hits it is reported as not converged."),
    tokens_per_sample: int = typer.Option(512, help="For FLOP accounting."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result(s) as JSON (atomically)."),
    plot: Optional[Path] = typer.Option(None, help="Draw measured points and fitted curves (needs matplotlib)."),
    models: Optional[str] = typer.Option(None, help="Comma-separated model folders or hub ids: measure their curves by fine-tuning (needs --dataset and --budget)."),
    dataset: Optional[str] = typer.Option(None, help="Hub dataset name or local json/jsonl/csv/parquet file (with --models)."),
    prompt_column: str = typer.Option("input", help="Dataset column with the prompt."),
    target_column: str = typer.Option("target", help="Dataset column with the target."),
    curves_out: Path = typer.Option(Path("lensjax-curves.csv"), help="Measured curves CSV (resumable; with --models)."),
    ntk_out: Optional[Path] = typer.Option(None, help="NTK eigenpairs and stats (.safetensors or .json; with --models)."),
    lr: float = typer.Option(1e-4, help="Fine-tuning learning rate η (AdamW)."),
    batch_size: int = typer.Option(8, help="Fine-tuning batch size."),
    epochs: float = typer.Option(1.0, help="Passes over each subset: t(D) = max(min_steps, ceil(epochs·D/batch))."),
    min_steps: int = typer.Option(10, help="Minimum optimiser steps per subset."),
    max_len: int = typer.Option(128, help="Truncate prompt+target to this many tokens."),
    n_probe: int = typer.Option(32, help="NTK probe samples per candidate."),
    ntk_mode: str = typer.Option("exact", help="exact (vmap-grad) or sketch (random-tangent JVPs)."),
    ntk_kernel: str = typer.Option("plain", help="plain J·Jᵀ or adam: J·diag(1/(√v̂+ε))·Jᵀ after a 10-step Adam warm-up."),
    schedule: str = typer.Option("cosine", help="Fine-tuning lr decay after the warm-up: cosine, linear or constant."),
    warmup: float = typer.Option(0.1, help="Linear warm-up, as a fraction of t(D)."),
    patience: int = typer.Option(3, help="Early stopping: development evaluations without improvement (0: off)."),
    eval_every: int = typer.Option(0, help="Steps between development evaluations (0: t(D)/10)."),
    n_dev: int = typer.Option(200, help="Development examples for early stopping, held out of the training pool."),
    compute_dtype: str = typer.Option("float32", help="Fine-tuning matmuls: float32, or bfloat16 (mixed precision: bf16 operands, float32 accumulation, weights and AdamW)."),
    steps_per_call: int = typer.Option(8, help="Fine-tuning AdamW steps per jitted call (the same numbers; fewer per-call buffer faults on CPU)."),
    n_eval: Optional[int] = typer.Option(None, help="Held-out examples (default: the dataset's validation split capped at 1,000, else 10% up to 500), drawn with a fixed seed."),
    shard: Optional[str] = typer.Option(None, help="i/n: measure only candidates i, i+n, ... of --models (one job of n; no ranking). Combine the parts with `lensjax merge`, then run select on the merged files."),
) -> None:
    """Rank candidate models by their predicted fine-tuning loss at the target size."""
    if models is not None:
        from lensjax.selection.finetune import FinetuneConfig

        try:
            ft = FinetuneConfig(lr=lr, batch_size=batch_size, epochs=epochs, min_steps=min_steps, max_len=max_len,
                                schedule=schedule, warmup=warmup, patience=patience, eval_every=eval_every,
                                n_dev=n_dev, compute_dtype=compute_dtype, steps_per_call=steps_per_call)
        except ValueError as exc:
            console.print(f"[bold red]error:[/bold red] {exc}")
            raise typer.Exit(2)
        _pipeline_cmd(models, dataset, budget, target_size, method or "lensllm", base, prompt_column, target_column,
                      curves_out, ntk_out, ft, n_probe, ntk_mode, ntk_kernel, n_eval, json_out, shard)
        return
    method = method or DEFAULT_METHOD
    try:
        data = _load(curves)
        if all_ratios:
            ratios = list(selectors.RATIOS)
        else:
            ratios = ratio or [8]
        st = selectors.Settings(
            ats_k=ats_k, ats_delta=ats_delta, ats_include_smallest=ats_include_smallest, local_k=local_k,
            tied=tuple(t.strip() for t in tied.split(",") if t.strip()), tau_scale=tau_scale, ens_short=ens_short,
            ens_k=ens_k, ens_delta=ens_delta, ens_long=ens_long, ens_r0=ens_r0, ens_r1=ens_r1, n_starts=starts,
            seed=seed, solver=solver, max_steps=max_steps)
        sels = selectors.select_many(
            data, method, ratios, budgets=budget or None, target_size=target_size, base=base, settings=st,
            n_boot=n_boot, level=level, eps=eps, model_error=model_error, model_error_corr=model_error_corr, tokens_per_sample=tokens_per_sample,
        )
    except (CurvesError, selectors.SelectionError, ValueError) as exc:
        console.print(f"[bold red]error:[/bold red] {exc}")
        raise typer.Exit(2)
    for s in sels if len(sels) == 1 else []:
        console.print(_ranking_table(s))
        console.print(_metrics_line(s))
    if len(sels) > 1:
        console.print(_summary_table(sels))
    if json_out is not None:
        payload = sels[0].to_json() if len(sels) == 1 else [s.to_json() for s in sels]
        atomic_write_text(json_out, json.dumps(payload, indent=2) + "\n")
        console.print(f"wrote {json_out}")
    if plot is not None:
        try:
            from lensjax.selection.plot import plot_selection
        except ImportError as exc:  # matplotlib is an optional extra
            console.print(f"[bold red]error:[/bold red] --plot needs matplotlib ({exc}); pip install 'lensjax[plot]'")
            raise typer.Exit(2)
        plot_selection(data, sels[0], plot)
        console.print(f"wrote {plot}")


def _pipeline_cmd(models, dataset, budget, target_size, method, base, prompt_column, target_column, curves_out,
                  ntk_out, ft, n_probe, ntk_mode, ntk_kernel, n_eval, json_out, shard=None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lensjax.selection import pipeline
    from lensjax.selection.data import DataError
    if dataset is None or not budget:
        console.print("[bold red]error:[/bold red] --models needs --dataset and --budget")
        raise typer.Exit(2)
    names = [m.strip() for m in models.split(",") if m.strip()]
    ntk_cfg = pipeline.NTKConfig(n_probe=n_probe, mode=ntk_mode, kernel=ntk_kernel)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console)
    try:
        from lensjax.selection.jobs import parse_shard

        res = pipeline.run(names, dataset, budget=int(budget[0]), target_size=int(target_size), method=method,
                           base=int(base), ft=ft, ntk_cfg=ntk_cfg, prompt_column=prompt_column,
                           target_column=target_column, curves_out=curves_out, ntk_out=ntk_out, progress=progress,
                           n_eval=n_eval, shard=None if shard is None else parse_shard(shard))
    except (DataError, selectors.SelectionError, CurvesError, ValueError) as exc:
        console.print(f"[bold red]error:[/bold red] {exc}")
        if Path(curves_out).exists():
            console.print(f"measurements made so far are in {curves_out}")
        raise typer.Exit(2)
    if shard is not None:
        console.print(f"shard {shard}: measured {', '.join(res['measured']) or 'nothing (no candidate in this shard)'}; "
                      f"curves in {res['curves_csv']}" + (f", NTKs in {res['ntk_file']}" if res["ntk_file"] else ""))
        if json_out is not None:
            atomic_write_text(json_out, json.dumps(res, indent=2) + "\n")
        return
    t = Table(title=f"{method} · budget {budget[0]:,.0f} · target {target_size:,.0f}")
    for col in ("rank", "model", "predicted loss", "fit"):
        t.add_column(col)
    for r, m in enumerate(res["ranking"], start=1):
        t.add_row(str(r), m, f"{res['predicted'][m]:.4f}", "ok" if res["converged"][m] else "[red]not converged[/red]")
    console.print(t)
    if "ntk" in res:
        nt = Table(title="NTK statistics")
        for col in ("model", "trace (K/n)", "top eigenvalue", "effective rank", "condition", "F(0)", "log F(target)"):
            nt.add_column(col)
        for m, st in res["ntk"].items():
            nt.add_row(m, f"{st['trace']:.3g}", f"{st['top_eigenvalues'][0]:.3g}", f"{st['effective_rank']:.2f}",
                       f"{st['condition_number']:.3g}", f"{st['F0']:.3g}", f"{st['log_F_target']:.3g}")
        console.print(nt)
    c = res["cost"]
    console.print(f"curves: {res['curves_csv']} · cost {100 * res['cost_fraction']:.2f}% of fine-tuning every candidate "
                  f"at the target (training {100 * c['train_fraction']:.2f}%, evaluation {100 * c['eval_fraction']:.2f}%, "
                  f"NTK {100 * c['ntk_fraction']:.2f}%; {res['flops']:.3g} of {res['full_flops']:.3g} FLOPs)")
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(res, indent=2) + "\n")
        console.print(f"wrote {json_out}")


@app.command("merge")
def merge_cmd(
    parts: List[Path] = typer.Argument(..., help="Curves CSVs written by `lensjax select --models ... --shard i/n`."),
    curves_out: Path = typer.Option(..., help="The merged curves CSV (with its .meta.json)."),
    ntk: Optional[List[Path]] = typer.Option(None, help="NTK files of the parts (repeatable)."),
    ntk_out: Optional[Path] = typer.Option(None, help="The merged NTK file (.json or .safetensors)."),
) -> None:
    """Merge sharded measurements; a cell measured twice with different values is an error."""
    from lensjax.selection.jobs import merge

    try:
        res = merge([str(p) for p in parts], curves_out, [str(p) for p in ntk or []], ntk_out)
    except (selectors.SelectionError, CurvesError, ValueError) as exc:
        console.print(f"[bold red]error:[/bold red] {exc}")
        raise typer.Exit(2)
    console.print(f"merged {len(parts)} part(s): {res['cells']} measurements of {len(res['models'])} model(s) into "
                  f"{res['curves_csv']}" + (f"; {len(res['ntk_models'])} NTKs into {res['ntk_file']}" if res["ntk_file"] else ""))


from lensjax.cli_svf import svf_app  # noqa: E402  (after `app`: the svf commands are a sub-app)

app.add_typer(svf_app, name="svf")


def main() -> None:
    from lensjax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()  # glibc huge pages for XLA's buffers (see lensjax/runtime.py)
    app()


if __name__ == "__main__":
    main()
