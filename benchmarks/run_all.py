"""Every benchmark, one after another, into one JSON and one Markdown table.

    python benchmarks/run_all.py [--quick | --smoke] [--out DIR] [--only ntk,svf,...]

Runs ``bench_fit``, ``bench_forward``, ``bench_ntk``, ``bench_svf``, ``bench_svf_buckets``,
``bench_cem`` and ``bench_bf16_scan`` as child processes, never two at once (each gets the whole
machine; their own JSON lands in ``DIR/<name>.json``), then writes ``DIR/benchmarks.json`` and ``DIR/benchmarks.md``
(atomically) and prints the table. Default ``DIR``: ``docs/benchmarks`` (the README's tables come
from the committed copy); ``--quick`` cuts repeats and sizes (under 15 minutes on 2 cores),
``--smoke`` runs every script at its smallest setting (the test suite; the numbers mean nothing).

Per row: the baseline (PyTorch, SciPy, or lensjax's own slower path where that is the point),
both times, ratio = baseline time / lensjax time, the goal, FLOPs and a lower bound on the bytes
moved (the formulas are in ``FORMULAS`` and in the JSON), lensjax's GFLOP/s and its fraction of the
matmul peak that this script measures in the same run (float32 2048³ ``jnp.matmul``, median of 5,
before and after the benchmarks; the higher one is the peak). Recorded with it: the device, the
library versions, the 1-minute load average before each benchmark and the share of the CPUs that
other processes used while it ran (from ``/proc/stat`` minus the child's own CPU time).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import ntk_bounds  # benchmarks/ntk_bounds.py (this script's folder is on sys.path): its summary paragraph
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

# name -> (script, {mode: extra arguments})
BENCHES = {
    "fit": ("bench_fit.py", {"full": [], "quick": ["--quick"], "smoke": ["--smoke"]}),
    "forward": ("bench_forward.py", {"full": [], "quick": ["--quick"], "smoke": ["--smoke"]}),
    "ntk": ("bench_ntk.py", {"full": [], "quick": ["--quick"], "smoke": ["--smoke"]}),
    "svf": ("bench_svf.py", {"full": [], "quick": ["--quick"], "smoke": ["--smoke"]}),
    "svf_buckets": ("bench_svf_buckets.py", {"full": [], "quick": ["--steps", "5"], "smoke": ["--smoke"]}),
    # --quick: the experiment's own regime and the largest workload (the middle one adds ≈ 25 s)
    "cem": ("bench_cem.py", {"full": [], "quick": ["--repeats", "1", "--workloads", "tiny-short", "small"],
                             "smoke": ["--smoke"]}),
    "bf16_scan": ("bench_bf16_scan.py", {"full": [], "quick": ["--quick"], "smoke": ["--smoke"]}),
}
# lensjax's own bf16 rows: the benchmarks that take --no-bf16, and the one that is all bf16
BF16_FLAG = {"forward", "ntk", "svf"}
BF16_ONLY = {"bf16_scan"}
FORMULAS = {
    "fit": "no FLOP count (iterative solver); bytes: not counted",
    "forward": "FLOPs as bench_forward counts them; bytes: the float32 weights read once per forward / per generated token",
    "ntk": "FLOPs n·3·2·P·T (per-sample gradients) + 2·n²·P (J Jᵀ); bytes: J written and read, 2·n·P·4",
    "ntk_jjt": "FLOPs 2·n²·P; bytes: J read once, n·P·4",
    "adamw": "FLOPs 3·2·P·B·T; bytes: params, grads, two moments read + params, moments written, 7·P·4",
    "svd": "FLOPs 4mn²+8n³ per matrix; bytes: W read, U and Vᵀ written, 4·(2mn + n²) per matrix (m ≥ n)",
    "svf_step": "FLOPs as bench_svf counts them (6·P·tokens + recomposition); bytes: the weights read forward and backward, 2·P·4",
    "svf_buckets": "no FLOP count (the row compares two lensjax shape policies)",
    "cem": "FLOPs: bench_cem's per-member count × population; bytes: not counted",
    "bf16_scan": "FLOPs 2·L·M·K·N; bytes: the bf16 weights read and the bf16 outputs written, 2·L·(K·N + M·N)",
}


# ------------------------------------------------------------------------------ measurement
def _busy_s() -> float:
    try:
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def matmul_peak(repeats: int = 5, dtype: str = "float32") -> dict:
    """Median GFLOP/s of a 2048³ matmul; "bfloat16": bf16 operands, float32 accumulation and result
    (the mixed-precision training step's dots), XLA's default dot routing."""
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)).astype(dtype)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    mm(a, a).block_until_ready()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, a).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return {"n": n, "dtype": dtype, "seconds": float(np.median(ts)), "gflop_s": 2 * n ** 3 / float(np.median(ts)) / 1e9}


def cpu_info(path: str = "/proc/cpuinfo") -> dict:
    """The CPU's model name and its bfloat16 features (x86 ``avx512_bf16`` / ``amx_bf16``, Arm
    ``bf16``) where ``/proc/cpuinfo`` says (Linux); empty elsewhere. The rows' ratios depend on
    them: a CPU without bf16 units runs PyTorch's bf16 baselines on a slow path (they are skipped,
    benchmarks/torch_bf16.py) and lensjax's bf16 programs through float32."""
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError:
        return {}
    model, flags = None, set()
    for ln in text.splitlines():
        key, _, value = ln.partition(":")
        key = key.strip()
        if key in ("model name", "Processor") and model is None:  # x86; older Arm kernels
            model = value.strip()
        elif key in ("flags", "Features"):
            flags |= set(value.split())
    return {"cpu_model": model, "cpu_bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})}


def machine() -> dict:
    import jax

    versions = {"python": platform.python_version(), "numpy": np.__version__, "jax": jax.__version__}
    for mod in ("jaxlib", "flax", "optax", "torch", "transformers", "scipy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional library is recorded as absent
            versions[mod] = None
    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
            "cpu_count": os.cpu_count(), "host": platform.platform(), "processor": platform.processor() or platform.machine(),
            "versions": versions, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "ld_preload": os.environ.get("LD_PRELOAD", ""),  # an allocator swap (tcmalloc) changes both sides' times
            **cpu_info()}


def bf16_rows(mode: str, choice: str, info: dict) -> dict:
    """Whether lensjax's own bfloat16 rows run (``--bf16-rows``): ``{"run": bool, "reason": str | None}``.

    ``auto`` (the default) leaves them out of ``--quick`` on a CPU whose ``/proc/cpuinfo`` lists no
    bf16 feature (``cpu_info``): there issue 14's goals do not count bf16, and XLA widens the bf16
    dots to float32, so those rows run slower than the float32 ones and would take a fifth of the
    quick run's 15 minutes (≈ 4.5 min of 24 on a 2-core AMD EPYC, 2026-12-07). The full run and
    ``--smoke`` keep them; so does every GPU or TPU run, and a CPU that cannot be inspected."""
    if mode == "smoke" or choice == "on":
        return {"run": True, "reason": None}
    if choice == "off":
        return {"run": False, "reason": "left out: --bf16-rows off"}
    if mode != "quick" or info.get("platform") != "cpu" or not info.get("cpu_model") or info.get("cpu_bf16_flags"):
        return {"run": True, "reason": None}
    return {"run": False, "reason": f"left out of --quick: this CPU ({info['cpu_model']}) has no bf16 units, so bf16 does "
                                    "not count toward the goals and runs through float32 (--bf16-rows on keeps them)"}


def run_one(name: str, mode: str, out_dir: Path, timeout_s: float, bf16: dict | None = None) -> dict:
    script, modes = BENCHES[name]
    out = out_dir / f"{name}.json"
    no_bf16 = bf16 is not None and not bf16["run"]
    extra = ["--no-bf16"] if no_bf16 and name in BF16_FLAG else []
    if no_bf16 and name in BF16_ONLY:
        print(f"\n=== {name}: {bf16['reason']}", flush=True)
        return {"command": " ".join(["python", f"benchmarks/{script}", *modes[mode]]), "skipped": bf16["reason"]}
    cmd = [sys.executable, str(HERE / script), *modes[mode], *extra, "--out", str(out)]
    load = os.getloadavg()[0]
    busy0, child0, t0 = _busy_s(), _children_cpu_s(), time.perf_counter()
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=timeout_s, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        rc, log = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:
        rc, log = "timeout", (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    wall = time.perf_counter() - t0
    other = max(0.0, (_busy_s() - busy0) - (_children_cpu_s() - child0)) / (wall * (os.cpu_count() or 1))
    tail = "\n".join(log.strip().splitlines()[-25:])
    print(tail, flush=True)
    rec = {"command": " ".join(["python", f"benchmarks/{script}", *modes[mode], *extra]), "returncode": rc, "wall_s": wall,
           "loadavg_1min_before": load, "other_cpu_load": other, "json": str(out)}
    if rc == 0 and out.exists():
        rec["result"] = json.loads(out.read_text())
    else:
        rec["error"] = f"exit {rc}; last lines:\n{tail}"
    return rec


# ------------------------------------------------------------------------------ rows
def _row(bench, task, baseline, base_s, lj_s, goal=None, flops=None, nbytes=None, formula=None, **extra):
    ratio = base_s / lj_s if base_s and lj_s else None
    return {"benchmark": bench, "task": task, "baseline": baseline, "baseline_s": base_s, "lensjax_s": lj_s,
            "ratio": ratio, "goal": goal, "met": None if ratio is None or goal is None else bool(ratio >= goal),
            "flops": flops, "bytes": nbytes, "formula": formula, **extra}


def rows_fit(r):
    return [_row("fit", f"{r['n_fits']} rectified-law fits", "SciPy reference (per curve)",
                 r["scipy_reference"]["total_s"], r["lensjax"]["warm_s"], 100.0, formula=FORMULAS["fit"],
                 note=f"SciPy time from {r['scipy_reference']['timed_fits']} timed fits, scaled")]


def rows_forward(r):
    out = []
    B, T = r["settings"]["batch"], r["settings"]["tokens"]
    for name, m in r["models"].items():
        f, g = m["forward_s"], m["generate"]
        wbytes = 4 * m["params"]
        out.append(_row("forward", f"{name} forward {B}x{T}", "HF PyTorch", f["hf"], f["lensjax"], 1.0,
                        f.get("flops"), wbytes, FORMULAS["forward"]))
        if "forward_bf16" in m:  # bfloat16 parameters (bf16 peak): against HF bf16 and lensjax's plain program
            h, flops = m["forward_bf16"], f.get("flops")
            if h.get("hf_s") is not None:  # skipped where PyTorch's bf16 is slow (benchmarks/torch_bf16.py)
                out.append(_row("forward", f"{name} forward {B}x{T}, bf16 params", "HF PyTorch bf16", h["hf_s"],
                                h["lensjax_s"], None, flops, h["param_bytes"], FORMULAS["forward"], precision="bfloat16"))
            out.append(_row("forward", f"{name} forward {B}x{T}, bf16 params", "lensjax plain bf16 program",
                            h["plain_s"], h["lensjax_s"], None, flops, h["param_bytes"], FORMULAS["forward"],
                            precision="bfloat16", temp_bytes=h["temp_bytes"]))
        new = m.get("new_tokens", r["settings"]["new_tokens"])
        toks = m["batch"][0] * new
        out.append(_row("forward", f"{name} greedy generate {m['batch'][0]}x{new} new", "HF generate",
                        toks / g["hf_tok_s"], toks / g["lensjax_tok_s"], 1.0, 2.0 * m["params"] * toks,
                        g.get("weight_bytes_per_step", wbytes) * new, FORMULAS["forward"]))
    return out


def rows_ntk(r):
    s, ntk, tr = r["setup"], r["ntk"], r["train_step"]
    P, n = s["params"], s["ntk_n"]
    lj, out = ntk.get("lensjax", {}), []
    for t in r["table"]:
        if t["baseline_s"] is None and "autocast" in t["baseline"]:  # skipped: PyTorch's bf16 is slow here
            continue
        if t["task"].startswith("exact NTK"):
            out.append(_row("ntk", t["task"], t["baseline"], t["baseline_s"], t["lensjax_s"], t["goal"], ntk["flops"],
                            2 * n * P * 4, FORMULAS["ntk"]))
        else:
            out.append(_row("ntk", t["task"], t["baseline"], t["baseline_s"], t["lensjax_s"], t["goal"], tr["flops"],
                            7 * P * 4, FORMULAS["adamw"], precision=t.get("precision", "float32")))
    lr = ntk.get("lensjax_rows", lj if "jacobian_rows_s" in lj else {})  # older JSON: the rows route was "lensjax"
    if "time_s" in lr and lr is not lj and "time_s" in ntk.get("torch_func", {}):
        out.append(_row("ntk", f"exact NTK n={n}, generic rows route", "torch.func", ntk["torch_func"]["time_s"],
                        lr["time_s"], None, ntk["flops"], 2 * n * P * 4, FORMULAS["ntk"],
                        note="lensjax.kernels.ntk.ntk_exact: J by vmap(grad), then J Jᵀ"))
    if "jacobian_rows_s" in lr and "time_s" in lr and "jjt_s" in ntk.get("torch_func", {}):
        out.append(_row("ntk", f"exact NTK: J Jᵀ part (n={n})", "torch.func J @ J.T", ntk["torch_func"]["jjt_s"],
                        max(lr["time_s"] - lr["jacobian_rows_s"], 1e-9), None, ntk["jjt_flops"], n * P * 4,
                        FORMULAS["ntk_jjt"], note="lensjax rows route: whole NTK minus its per-sample-gradient program"))
    return out


def rows_svf(r):
    svd, tr = r["svd"], r["train_step"]
    nbytes = sum(4 * (2 * max(m, n) * min(m, n) + min(m, n) ** 2) * L
                 for L, m, n in svd["leaf_shapes_lensjax"].values())
    P = tr["flop_estimate"].get("non_embedding_matmul_params", r["params"])
    return [
        _row("svf", f"SVD of {svd['n_matrices']} MLP matrices", "torch.linalg.svd loop", svd["torch_warm_s"],
             svd["lensjax_warm_s"], r["goals"]["svd"], svd["flops"], nbytes, FORMULAS["svd"],
             reconstruction_rel=svd.get("lensjax_reconstruction_rel"), orthogonality=svd.get("lensjax_orthogonality")),
        _row("svf", f"SVF step {r['batch'][0]}x{r['batch'][1]}", "PyTorch eager", tr["torch"]["warm_s"],
             tr["lensjax"]["warm_s"], r["goals"]["train_step"], tr["flop_estimate"]["flops"], 2 * P * 4, FORMULAS["svf_step"]),
    ] + ([] if "lensjax_bf16" not in tr else [
        _row("svf", f"SVF step {r['batch'][0]}x{r['batch'][1]}, bf16 mixed", "PyTorch eager", tr["torch"]["warm_s"],
             tr["lensjax_bf16"]["warm_s"], r["goals"]["train_step"], tr["flop_estimate"]["flops"], 2 * P * 4,
             FORMULAS["svf_step"], precision="bfloat16", loss_drift=tr["loss_drift"]["lensjax_bf16"]),
    ] + ([] if "warm_s" not in tr.get("torch_autocast", {}) else [  # skipped where PyTorch's bf16 is slow
        _row("svf", f"SVF step {r['batch'][0]}x{r['batch'][1]}, bf16 mixed", "PyTorch autocast bf16",
             tr["torch_autocast"]["warm_s"], tr["lensjax_bf16"]["warm_s"], None, tr["flop_estimate"]["flops"], 2 * P * 4,
             FORMULAS["svf_step"], precision="bfloat16", loss_drift=tr["loss_drift"]["torch_autocast"]),
    ]))


def rows_svf_buckets(r):
    ex, bu = r["runs"]["exact"], r["runs"]["bucketed"]
    return [_row("svf_buckets", f"SVF {r['steps']} steps, ragged rollouts", "lensjax, exact shapes", ex["wall_s"],
                 bu["wall_s"], None, formula=FORMULAS["svf_buckets"],
                 note=f"compilations {ex['compilations']} -> {bu['compilations']}")]


def rows_cem(r):
    out = []
    pop = r["settings"]["pop"]
    for name, res in r["results"].items():
        for mode in ("generate", "loglik"):
            a, b = res[mode]["lensjax batched"], res[mode]["torch per-member"]
            out.append(_row("cem", f"CEM {name} {mode}, population {pop}", "PyTorch per member", b["seconds"],
                            a["seconds"], 1.0, a["flops_per_member"] * pop, None, FORMULAS["cem"]))
    return out


def rows_bf16_scan(r):
    s, t = r["scan"], r["train_step"]
    sh = s["shape"]
    note = "the same program, XLA CPU's float normalization on (LENSJAX_XLA_OPTIONS=0)"
    return [_row("bf16_scan", f"bf16 layer scan {sh['L']}x[{sh['K']},{sh['N']}], x [{sh['M']},{sh['K']}]",
                 "jax.jit, backend defaults", s["default_s"], s["lensjax_s"], None, s["flops"], s["bytes_min"],
                 FORMULAS["bf16_scan"], precision="bfloat16"),
            _row("bf16_scan", f"mixed AdamW step {t['batch'][0]}x{t['batch'][1]} ({t['model']})", "backend defaults",
                 t["default"]["median_s"], t["lensjax"]["median_s"], None, precision="bfloat16",
                 note=f"{note}; max |Δloss| {t['max_abs_loss_diff']:.1e}")]


ROWS = {"fit": rows_fit, "forward": rows_forward, "ntk": rows_ntk, "svf": rows_svf, "svf_buckets": rows_svf_buckets,
        "cem": rows_cem, "bf16_scan": rows_bf16_scan}


# ------------------------------------------------------------------------------ table
def _fmt(x, spec):
    return "–" if x is None else format(x, spec)


def markdown(payload) -> str:
    m, pk = payload["machine"], payload["peak"]
    v = m["versions"]
    lines = [
        f"Device: {m['device_kind']} ({m['platform']}, {m['device_count']} device(s)), {m['cpu_count']} CPUs"
        + (f" ({m['cpu_model']}; bf16 units: {', '.join(m.get('cpu_bf16_flags') or []) or 'none'})" if m.get("cpu_model") else "")
        + "; "
        f"jax {v['jax']}, torch {v['torch']}, transformers {v['transformers']}; {payload['date']}; mode {payload['mode']}.",
        f"Matmul peak measured in this run (float32 2048³ jnp.matmul): {pk['gflop_s']:.0f} GFLOP/s "
        f"(before {pk['before']['gflop_s']:.0f}, after {pk['after']['gflop_s']:.0f})."
        + (f" bfloat16 (float32 accumulation): {pk['bfloat16']['gflop_s']:.0f} GFLOP/s, the peak of the bf16 rows."
           if pk.get("bfloat16") else "")
        + (f" XLA_FLAGS: `{m['xla_flags']}`." if m.get("xla_flags") else "")
        + (f" GLIBC_TUNABLES: `{m['glibc_tunables']}`." if m.get("glibc_tunables") else "")
        + (f" LD_PRELOAD: `{m['ld_preload']}`." if m.get("ld_preload") else ""),
        "",
        "| benchmark | task | baseline | baseline s | lensjax s | ratio | goal | met | GFLOP | MB (min) | lensjax GFLOP/s | % of peak | other load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        met = "–" if r["met"] is None else ("yes" if r["met"] else "no")
        lines.append(
            f"| {r['benchmark']} | {r['task']} | {r['baseline']} | {_fmt(r['baseline_s'], '.4g')} | {_fmt(r['lensjax_s'], '.4g')} | "
            f"{_fmt(r['ratio'], '.2f')}× | {_fmt(r['goal'], 'g')} | {met} | {_fmt(r['flops'] and r['flops'] / 1e9, '.1f')} | "
            f"{_fmt(r['bytes'] and r['bytes'] / 1e6, '.0f')} | {_fmt(r['lensjax_gflop_s'], '.1f')} | "
            f"{_fmt(r['fraction_of_peak'] and 100 * r['fraction_of_peak'], '.0f')} | {100 * r['other_cpu_load']:.0f}% |")
    sb = ((payload["benchmarks"].get("ntk") or {}).get("result") or {}).get("step_bounds") or {}
    if "dots" in sb:  # bench_ntk.py: what bounds the float32 AdamW step (benchmarks/step_bounds.py)
        pr, d = sb["profile"], sb["dots"]
        alone = ", ".join(f"{lib} {1e3 * t:.0f} ms" for lib, t in d["dots_alone_s"].items())
        lines.append(f"\nWhat bounds the float32 AdamW step ({sb['steps_per_call']} steps per call): its weight products "
                     f"alone ({d['gflop']:.1f} GFLOP) take {alone} at each library's rates for their shapes"
                     + ("" if "error" in pr else
                        f"; in a trace of the step ({pr['wall_ms_per_step']:.0f} ms per step) its other ops take "
                        f"{pr['non_dot_op_ms_per_step']:.0f} ms per step over {pr['threads']} threads ("
                        + ", ".join(f"{k} {v:.0f}" for k, v in pr["ms_per_step"].items() if k != "dot launches" and v >= 0.5)
                        + ")") + ".")
    nb = ((payload["benchmarks"].get("ntk") or {}).get("result") or {}).get("ntk_bounds") or {}
    if "blocks" in nb:  # bench_ntk.py: what bounds the exact NTK (benchmarks/ntk_bounds.py)
        lines.append(f"\nWhat bounds the exact NTK (n = {nb['n']}, T = {nb['T']}): {ntk_bounds.summary(nb)}.")
    b16 = payload.get("bf16_rows") or {}
    if b16.get("run") is False:
        lines.append(f"\nlensjax's bf16 rows: {b16['reason']}.")
    for name, rec in payload["benchmarks"].items():
        if "error" in rec:
            lines.append(f"\n**{name} failed**: `{rec['command']}` exited {rec['returncode']}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="fewer repeats and smaller settings (< 15 min on 2 cores)")
    g.add_argument("--smoke", action="store_true", help="every script at its smallest setting (tests)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"), help="directory for the JSON and Markdown")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHES)}")
    ap.add_argument("--bf16-rows", choices=("auto", "on", "off"), default="auto",
                    help="lensjax's own bf16 rows: auto (default) leaves them out of --quick on a CPU without bf16 units")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per benchmark before it is stopped")
    args = ap.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    names = list(BENCHES) if args.only is None else [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in names if x not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHES)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    from lensjax.io import atomic_write

    t_start = time.perf_counter()
    info = machine()
    before = matmul_peak(2 if args.smoke else 5)
    print(f"matmul peak before: {before['gflop_s']:.0f} GFLOP/s on {info['device_kind']}", flush=True)
    bf16 = bf16_rows(mode, args.bf16_rows, info)
    if not bf16["run"]:
        print(f"lensjax's bf16 rows: {bf16['reason']}", flush=True)
    benches = {name: run_one(name, mode, out_dir, args.timeout, bf16) for name in names}
    after = matmul_peak(2 if args.smoke else 5)
    peak = {"gflop_s": max(before["gflop_s"], after["gflop_s"]), "before": before, "after": after,
            "bfloat16": matmul_peak(2 if args.smoke else 5, "bfloat16")}

    rows = []
    for name, rec in benches.items():
        if "result" not in rec:
            continue
        try:
            new = ROWS[name](rec["result"])
        except (KeyError, TypeError, ZeroDivisionError) as e:
            rec["error"] = f"its JSON lacks a field the table needs: {type(e).__name__}: {e}"
            continue
        for r in new:
            r["lensjax_gflop_s"] = r["flops"] / r["lensjax_s"] / 1e9 if r["flops"] and r["lensjax_s"] else None
            pk = peak["bfloat16"]["gflop_s"] if r.get("precision") == "bfloat16" else peak["gflop_s"]
            r["fraction_of_peak"] = r["lensjax_gflop_s"] / pk if r["lensjax_gflop_s"] else None
            r["other_cpu_load"] = rec["other_cpu_load"]
        rows += new
    payload = {"command": "python benchmarks/run_all.py" + ("" if mode == "full" else f" --{mode}"), "mode": mode,
               "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": info, "peak": peak,
               "formulas": FORMULAS, "bf16_rows": bf16, "rows": rows, "benchmarks": benches, "total_s": time.perf_counter() - t_start}
    md = markdown(payload)
    atomic_write(out_dir / "benchmarks.json", json.dumps(payload, indent=1, default=str) + "\n")
    atomic_write(out_dir / "benchmarks.md", md)
    print("\n" + md)
    print(f"wrote {out_dir / 'benchmarks.json'} and {out_dir / 'benchmarks.md'} in {payload['total_s']:.0f} s")
    return 1 if any("error" in rec for rec in benches.values()) else 0


if __name__ == "__main__":
    from lensjax.runtime import reexec_with_huge_pages

    reexec_with_huge_pages()  # glibc huge pages for XLA's buffers (lensjax/runtime.py)
    raise SystemExit(main())
