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
