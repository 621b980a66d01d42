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
def test_t2_experiment_smoke(tmp_path):
    data, out = _run("scripts/t2_experiment.py", tmp_path / "t2.json")
    res = data["results"]
    for name in ("base", "expert math", "expert reasoning", "expert code", "oracle", "prompt", "classifier", "fewshot"):
        assert 0 <= res[name]["accuracy"] <= 1, name
    assert set(res["fewshot"]["alpha"]) == {"math", "reasoning", "code"}
    assert res["prompt"]["pass1_seconds"] > 0 and "| oracle |" in out
