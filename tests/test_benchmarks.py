"""benchmarks/run_all.py --smoke: every benchmark script at its smallest setting, one after another,
merged into one table (the scripts stay alive at HEAD; their agreement checks hold)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_all_smoke(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--smoke", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    payload = json.loads((tmp_path / "benchmarks.json").read_text())
    md = (tmp_path / "benchmarks.md").read_text()
    assert set(payload["benchmarks"]) == {"fit", "forward", "ntk", "svf", "svf_buckets", "cem", "bf16_scan"}
    assert payload["peak"]["gflop_s"] > 0 and payload["machine"]["versions"]["jax"]
    assert {"xla_flags", "glibc_tunables", "ld_preload"} <= set(payload["machine"])  # what changes both sides
    assert {r["benchmark"] for r in payload["rows"]} == set(payload["benchmarks"])
    for r in payload["rows"]:
        assert r["baseline_s"] > 0 and r["lensjax_s"] > 0 and r["ratio"] > 0, r
        assert r["fraction_of_peak"] is None or 0 < r["fraction_of_peak"], r
        assert f"| {r['task']} |" in md
    assert "| benchmark | task | baseline |" in md and "% of peak" in md
    res_of = {k: v["result"] for k, v in payload["benchmarks"].items()}

    fwd = res_of["forward"]
    assert set(fwd["models"]) == {"gpt2-tiny", "llama-tiny", "t5-tiny"}
    for r in fwd["models"].values():
        assert r["forward_s"]["max_abs_logit_diff"] < 1e-4 and r["generate"]["greedy_token_agreement"] == 1.0
        h = r["forward_bf16"]  # bf16 parameters: as close to HF float32 as HF's own bf16 is, give or take
        err = h["max_abs_logit_diff_vs_hf32"]
        assert err["lensjax"] <= max(2 * err["hf"], 0.05 * h["max_abs_logit_ref"]), h

    ntk = res_of["ntk"]["ntk"]
    # Both J agree; the K of each side is compared with the float64 product of the torch loop's J.
    assert ntk["lensjax"]["max_rel_diff_vs_float64"] < 1e-4 and ntk["torch_func"]["max_rel_diff_vs_loop"] < 1e-5
    assert ntk["lensjax"]["max_rel_diff_vs_loop"] < 1e-3
    assert res_of["ntk"]["train_step"]["max_abs_loss_diff"] < 1e-4
    multi = res_of["ntk"]["train_step"]["lensjax_multi"]  # k steps per call: the same steps as PyTorch's
    assert multi["steps_per_call"] == 2 and multi["loss_steps_compared"] >= 2
    assert multi["max_abs_loss_diff_vs_float32"] < 1e-4
    bounds = res_of["ntk"]["step_bounds"]  # what bounds the step: its dots alone, its trace by kind of op
    assert bounds["dots"]["shapes"] and min(bounds["dots"]["dots_alone_s"].values()) > 0
    assert "error" in bounds["profile"] or bounds["profile"]["wall_ms_per_step"] > 0
    assert "What bounds the float32 AdamW step" in md
    nb = res_of["ntk"]["ntk_bounds"]  # what bounds the exact NTK: its blocks by parameter group, its Grams alone
    assert {"all", "norms only"} <= set(nb["blocks"]["times_s"]) and min(nb["blocks"]["times_s"].values()) > 0
    assert nb["grams"]["shapes"] and min(nb["grams"]["dots_alone_s"].values()) > 0
    assert "What bounds the exact NTK" in md

    svf = res_of["svf"]
    assert svf["svd"]["lensjax_reconstruction_rel"] < 1e-5 and svf["svd"]["lensjax_orthogonality"] < 1e-5
    assert svf["svd"]["max_rel_singular_value_diff"] < 1e-5 and svf["train_step"]["max_rel_loss_diff_same_step"] < 1e-4

    fit = res_of["fit"]
    assert fit["lensjax"]["hit_rate"] > 0.9 and fit["lensjax_le_scipy_fraction"] > 0.9

    buckets = res_of["svf_buckets"]["runs"]["bucketed"]
    assert buckets["compilations"] == buckets["distinct_shapes"]
    assert all((s[1] - 16) % 16 == 0 for s in buckets["shapes"])

    cem = res_of["cem"]["results"]["tiny-short"]
    assert cem["generate"]["tokens_equal_fraction"] == 1.0 and cem["loglik"]["max_abs_loglik_difference"] < 1e-4

    scan = res_of["bf16_scan"]
    if scan["train_step"]["lensjax"]["options"]:  # CPU with the mixed programs' options in force
        assert scan["scan"]["float32_stack_in_default_program"] and not scan["scan"]["float32_stack_in_lensjax_program"]
    # the same products rounded to bf16: one bf16 step apart at most where summation order differs
    assert scan["scan"]["max_rel_diff_stacked_outputs"] <= 2 ** -7 and scan["scan"]["rel_diff_sum"] < 1e-5
    assert scan["train_step"]["max_abs_loss_diff"] < 1e-4  # the option changes no arithmetic


def _bench_module(name):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def test_torch_bf16_decision(monkeypatch):
    """PyTorch's bf16 baselines run where its bf16 matmul keeps up with float32 and are skipped,
    with the measured rates in the reason, where it does not (a CPU without bf16 units)."""
    tb = _bench_module("torch_bf16")
    slow = {"float32_gflop_s": 68.0, "bfloat16_gflop_s": 0.8, "ratio": 0.8 / 68.0}
    fast = {"float32_gflop_s": 250.0, "bfloat16_gflop_s": 900.0, "ratio": 3.6}
    monkeypatch.setattr(tb, "probe", lambda: slow)
    d = tb.decide("auto")
    assert not d["run"] and "0.8 GFLOP/s" in d["reason"] and "68.0" in d["reason"] and d["probe"] == slow
    assert tb.decide("on")["run"] and tb.decide("auto", smoke=True)["run"]  # smoke: tiny shapes, the code path
    assert not tb.decide("off")["run"]
    monkeypatch.setattr(tb, "probe", lambda: fast)
    assert tb.decide("auto")["run"]


def test_torch_bf16_probe_measures_both_types():
    pytest.importorskip("torch")
    p = _bench_module("torch_bf16").probe(n=64, repeats=3)
    assert p["float32_gflop_s"] > 0 and p["bfloat16_gflop_s"] > 0
    assert p["ratio"] == pytest.approx(p["bfloat16_gflop_s"] / p["float32_gflop_s"])


def test_tables_without_the_skipped_bf16_baselines():
    """run_all's rows from JSONs whose PyTorch bf16 baselines were skipped: no row for them, the
    other rows intact."""
    ra = _bench_module("run_all")
    fwd = {"settings": {"batch": 8, "tokens": 128, "new_tokens": 64}, "models": {"m": {
        "params": 1000, "batch": [8, 128], "new_tokens": 64,
        "forward_s": {"hf": 2.0, "lensjax": 1.0, "flops": 1e9},
        "generate": {"hf_tok_s": 10.0, "lensjax_tok_s": 20.0},
        "forward_bf16": {"hf_s": None, "lensjax_s": 0.5, "plain_s": 0.6, "param_bytes": 2000, "temp_bytes": {}}}}}
    rows = ra.rows_forward(fwd)
    assert [r["baseline"] for r in rows] == ["HF PyTorch", "lensjax plain bf16 program", "HF generate"]
    assert rows[1]["ratio"] == pytest.approx(1.2)
    tr = {"flop_estimate": {"flops": 1e9, "non_embedding_matmul_params": 100}, "torch": {"warm_s": 4.0},
          "lensjax": {"warm_s": 2.0}, "lensjax_bf16": {"warm_s": 1.0}, "torch_autocast": {"error": "skipped: ..."},
          "loss_drift": {"lensjax_float32": 0.0, "lensjax_bf16": 1e-3}}
    svf = {"svd": {"leaf_shapes_lensjax": {"a": [2, 8, 4]}, "n_matrices": 2, "torch_warm_s": 1.0, "lensjax_warm_s": 0.5,
                   "flops": 1e6}, "train_step": tr, "params": 100, "batch": [8, 256], "goals": {"svd": 1.0, "train_step": 2.0}}
    rows = ra.rows_svf(svf)
    assert [r["baseline"] for r in rows] == ["torch.linalg.svd loop", "PyTorch eager", "PyTorch eager"]
    assert [r["ratio"] for r in rows] == [2.0, 2.0, 4.0]
    tr32 = {k: v for k, v in tr.items() if k not in ("lensjax_bf16", "torch_autocast")}  # --no-bf16
    assert [r["baseline"] for r in ra.rows_svf({**svf, "train_step": tr32})] == ["torch.linalg.svd loop", "PyTorch eager"]
    ntk = {"setup": {"params": 100, "ntk_n": 4}, "ntk": {"flops": 1e9}, "train_step": {"flops": 1e9}, "table": [
        {"task": "AdamW step 8x128", "baseline": "PyTorch eager", "baseline_s": 1.0, "lensjax_s": 0.5, "goal": 1.5},
        {"task": "AdamW step 8x128, bf16 mixed", "baseline": "PyTorch autocast bf16", "baseline_s": None,
         "lensjax_s": 0.4, "goal": None}]}
    assert [(r["task"], r["ratio"]) for r in ra.rows_ntk(ntk)] == [("AdamW step 8x128", 2.0)]
    assert ra.cpu_info("/nonexistent") == {}


def test_cpu_info_reads_model_and_bf16_flags(tmp_path):
    ra = _bench_module("run_all")
    x86 = tmp_path / "x86"  # the lines of a real /proc/cpuinfo (trimmed), two processors
    x86.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n"
                   "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\nprocessor\t: 1\n"
                   "model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n")
    assert ra.cpu_info(str(x86)) == {"cpu_model": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz",
                                     "cpu_bf16_flags": ["amx_bf16", "avx512_bf16"]}
    amd = tmp_path / "amd"
    amd.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx avx2 fma\n")
    assert ra.cpu_info(str(amd)) == {"cpu_model": "AMD EPYC", "cpu_bf16_flags": []}


def test_bf16_rows_left_out_of_quick_only_on_a_cpu_without_bf16_units(tmp_path, monkeypatch):
    """run_all's --bf16-rows auto: lensjax's own bf16 rows stay in the full and smoke runs and on
    CPUs with bf16 units or another backend; --quick on a CPU without them passes --no-bf16 to the
    benchmarks that take it and does not start the all-bf16 one."""
    ra = _bench_module("run_all")
    epyc = {"platform": "cpu", "cpu_model": "AMD EPYC", "cpu_bf16_flags": []}
    amx = {"platform": "cpu", "cpu_model": "Intel(R) Xeon(R)", "cpu_bf16_flags": ["amx_bf16", "avx512_bf16"]}
    d = ra.bf16_rows("quick", "auto", epyc)
    assert not d["run"] and "AMD EPYC" in d["reason"] and "--bf16-rows on" in d["reason"]
    assert ra.bf16_rows("full", "auto", epyc)["run"] and ra.bf16_rows("smoke", "off", epyc)["run"]
    assert ra.bf16_rows("quick", "auto", amx)["run"] and ra.bf16_rows("quick", "on", epyc)["run"]
    assert ra.bf16_rows("quick", "auto", {**epyc, "platform": "gpu"})["run"]
    assert ra.bf16_rows("quick", "auto", {"platform": "cpu"})["run"]  # no /proc/cpuinfo: nothing known, keep them
    assert not ra.bf16_rows("full", "off", amx)["run"]

    calls = []

    class Done:
        returncode, stdout = 0, ""

    def fake_run(cmd, **kw):
        calls.append(cmd)
        return Done()

    monkeypatch.setattr(ra.subprocess, "run", fake_run)
    rec = ra.run_one("ntk", "quick", tmp_path, 60, d)
    assert "--no-bf16" in calls[-1] and rec["command"].endswith("--quick --no-bf16") and "error" in rec  # no JSON written
    ra.run_one("fit", "quick", tmp_path, 60, d)
    assert "--no-bf16" not in calls[-1]
    n = len(calls)
    rec = ra.run_one("bf16_scan", "quick", tmp_path, 60, d)
    assert len(calls) == n and rec["skipped"] == d["reason"] and "error" not in rec
    ra.run_one("ntk", "quick", tmp_path, 60, ra.bf16_rows("quick", "auto", amx))
    assert "--no-bf16" not in calls[-1]
    payload = {"machine": {"device_kind": "cpu", "platform": "cpu", "device_count": 1, "cpu_count": 2, **epyc,
                           "versions": {"jax": "x", "torch": "y", "transformers": "z"}},
               "peak": {"gflop_s": 100.0, "before": {"gflop_s": 100.0}, "after": {"gflop_s": 90.0}},
               "date": "today", "mode": "quick", "bf16_rows": d, "rows": [], "benchmarks": {"bf16_scan": rec}}
    md = ra.markdown(payload)
    assert d["reason"] in md and "failed" not in md
