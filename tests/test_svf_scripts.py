"""Smoke runs of the experiment and benchmark scripts at their smallest settings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script, out, *args):
    res = subprocess.run([sys.executable, str(ROOT / script), "--smoke", "--out", str(out), *args], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads(out.read_text()), res.stdout


@pytest.mark.slow
def test_svf_presets_experiment_smoke(tmp_path):
    data, out = _run("scripts/svf_presets_experiment.py", tmp_path / "p.json")
    assert {r["preset"] for r in data["runs"]} == {"reference", "paper"} and data["smoke"]
    assert all(0 <= r["final"] <= 1 for r in data["runs"]) and "| reference |" in out


@pytest.mark.slow
def test_bench_svf_buckets_smoke(tmp_path):
    data, out = _run("benchmarks/bench_svf_buckets.py", tmp_path / "b.json")
    runs = data["runs"]
    assert runs["bucketed"]["compilations"] == runs["bucketed"]["distinct_shapes"]
    assert all((s[1] - 16) % 16 == 0 for s in runs["bucketed"]["shapes"]) and "exact / bucketed" in out


@pytest.mark.slow
def test_t2_experiment_smoke(tmp_path):
    data, out = _run("scripts/t2_experiment.py", tmp_path / "t2.json")
    res = data["results"]
    for name in ("base", "expert math", "expert reasoning", "expert code", "oracle", "prompt", "classifier", "fewshot"):
        assert 0 <= res[name]["accuracy"] <= 1, name
    assert set(res["fewshot"]["alpha"]) == {"math", "reasoning", "code"}
    assert res["prompt"]["pass1_seconds"] > 0 and "| oracle |" in out


@pytest.mark.slow
def test_bench_cem_smoke(tmp_path):
    data, out = _run("benchmarks/bench_cem.py", tmp_path / "c.json")
    tiny = data["results"]["tiny-short"]
    assert tiny["generate"]["tokens_equal_fraction"] == 1.0  # batched greedy tokens = per-member ones
    assert tiny["loglik"]["max_abs_loglik_difference"] < 1e-4
    assert tiny["generate"]["torch per-member"]["batched_speedup"] > 0 and "speed-up of batched" in out


@pytest.mark.slow
def test_bench_forward_smoke(tmp_path):
    """benchmarks/bench_forward.py --smoke: tiny GPT-2, Llama and T5 against HF in one run."""
    data, out = _run("benchmarks/bench_forward.py", tmp_path / "f.json")
    assert set(data["models"]) == {"gpt2-tiny", "llama-tiny", "t5-tiny"}
    for r in data["models"].values():
        assert r["forward_s"]["max_abs_logit_diff"] < 1e-4 and r["generate"]["greedy_token_agreement"] == 1.0
        assert r["forward_s"]["flops"] > 0 and 0 < r["forward_s"]["lensjax_fraction_of_peak"]
    assert data["matmul_peak_gflop_s"] > 0
