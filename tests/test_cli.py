"""The `lensjax select` command: default run, JSON, plots and clear errors on bad input."""

import csv
import json
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lensjax.cli import app
from lensjax.selection.curves import embedded_path, load_embedded

runner = CliRunner()


def run(*args):
    return runner.invoke(app, ["select", *args])


def _write_copy(tmp_path, edit=None, name="c.csv"):
    rows = list(csv.reader(open(embedded_path("flan"))))
    if edit:
        edit(rows)
    path = tmp_path / name
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def test_no_arguments_ranks_the_30_flan_models():
    # Through the installed console script, as a user runs it.
    exe = shutil.which("lensjax") or [sys.executable, "-m", "lensjax.cli"]
    cmd = [exe, "select"] if isinstance(exe, str) else exe + ["select"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for model in load_embedded("flan").models:
        assert model in out.stdout
    assert "Pearson" in out.stdout and "RelAcc" in out.stdout


def test_json_schema_single_and_all_ratios(tmp_path):
    one = tmp_path / "one.json"
    res = run("--method", "ats", "--ratio", "16", "--json", str(one))
    assert res.exit_code == 0, res.output
    data = json.loads(one.read_text())
    for key in ("method", "ratio", "target_size", "ranking", "predicted", "metrics", "cost_fraction"):
        assert key in data
    assert data["ratio"] == 16 and data["method"] == "ats" and len(data["ranking"]) == 30
    assert set(data["metrics"]) >= {"pearson", "relacc", "spearman", "kendall"}
    assert round(100 * data["metrics"]["pearson"], 1) == 73.1  # Table 1, FLAN AtS 1/16
    many = tmp_path / "many.json"
    res = run("--curves", "gigaword", "--all-ratios", "--method", "rectified", "--n-boot", "0", "--json", str(many))
    assert res.exit_code == 0, res.output
    data = json.loads(many.read_text())
    assert [d["ratio"] for d in data] == [8, 16, 32, 64, 128, 256, 512]
    assert all(d["method"] == "rectified" and len(d["predicted"]) == 30 for d in data)
    assert all("interval" not in d for d in data)
    assert 0 < data[0]["cost_fraction"] < 0.26


@pytest.mark.slow
def test_all_ratios_json_has_intervals_and_p_best_for_every_model(tmp_path):
    # The acceptance command of the uncertainty issue, on a curves file: `--curves X --all-ratios --json OUT`.
    x, out = _write_copy(tmp_path), tmp_path / "out.json"
    res = run("--curves", str(x), "--all-ratios", "--json", str(out))
    assert res.exit_code == 0, res.output
    assert "P(best)" in res.output and "95% interval" in res.output
    data = json.loads(out.read_text())
    models = load_embedded("flan").models
    assert len(data) == 7
    for d in data:
        assert d["method"] == "ensemble" and d["level"] == 0.95 and d["n_boot"] == 200
        assert set(d["interval"]) == set(models) and set(d["p_best"]) == set(models)
        for m in models:
            lo, hi = d["interval"][m]
            assert 0 < lo <= d["predicted"][m] <= hi
            assert 0 <= d["p_best"][m] <= d["p_within"][m] <= 1
        assert abs(sum(d["p_best"].values()) - 1) < 1e-9
        assert 0 <= d["p_selected_within_eps"] <= 1
    # Intervals widen as the budget shrinks (further extrapolation): median width, 1/512 vs 1/8.
    width = [sorted(h - lo for lo, h in d["interval"].values())[15] for d in data]
    assert width[-1] > width[0]


@pytest.mark.slow
def test_plot(tmp_path):
    png = tmp_path / "fit.png"
    res = run("--ratio", "64", "--plot", str(png))
    assert res.exit_code == 0, res.output
    assert png.stat().st_size > 10_000


def test_not_converged_is_shown(tmp_path):
    out = tmp_path / "nc.json"
    res = run("--max-steps", "2", "--json", str(out))
    assert res.exit_code == 0, res.output
    assert "not converged" in res.output
    assert not any(json.loads(out.read_text())["converged"].values())


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda r: r[3].__setitem__(4, "abc"), "row 4 (MBZUAI/LaMini-GPT-1.5B), column '800'"),
        (lambda r: r[2].__setitem__(0, r[1][0]), "duplicate model id 'MBZUAI/LaMini-GPT-124M'"),
        (lambda r: r[5].__setitem__(7, "nan"), "column '6400'"),
        (lambda r: r[5].__setitem__(7, "inf"), "not finite"),
        (lambda r: r[6].__setitem__(2, "-1"), "must be > 0"),
        (lambda r: r[0].__setitem__(3, "foo"), "header 'foo'"),
    ],
)
def test_bad_cells_name_row_and_column(tmp_path, edit, message):
    res = run("--curves", str(_write_copy(tmp_path, edit)))
    assert res.exit_code == 2
    assert message in " ".join(res.output.split())


def test_too_few_points_in_budget(tmp_path):
    def blank(rows):
        for c in range(2, 6):  # sizes 200..1600 missing for one model
            rows[4][c] = ""
    res = run("--curves", str(_write_copy(tmp_path, blank)), "--ratio", "512", "--method", "rectified")
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "needs at least 4 measured points" in text and "cerebras/Cerebras-GPT-111M (2)" in text
    res = run("--curves", str(_write_copy(tmp_path, blank)), "--ratio", "512")  # the default, ensemble
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "needs at least 2 measured points" in text and "cerebras/Cerebras-GPT-111M (1)" in text


def test_bad_compute_dtype_stops_before_any_work(tmp_path):
    res = run("--models", "gpt2", "--dataset", str(tmp_path / "none.jsonl"), "--compute-dtype", "int8")
    assert res.exit_code == 2 and "compute_dtype must be float32, bfloat16 or float16" in " ".join(res.output.split())
    res = run("--models", "gpt2", "--dataset", str(tmp_path / "none.jsonl"), "--steps-per-call", "0")
    assert res.exit_code == 2 and "steps_per_call must be >= 1" in " ".join(res.output.split())


def test_unknown_method_and_missing_file(tmp_path):
    res = run("--method", "magic")
    assert res.exit_code == 2 and "unknown method 'magic'" in res.output
    res = run("--curves", str(tmp_path / "nope.csv"))
    assert res.exit_code == 2 and "not found" in res.output


def test_lensllm_without_f_errors():
    res = run("--method", "lensllm")
    assert res.exit_code == 2 and "needs the NTK term F" in " ".join(res.output.split())


def test_json_write_is_atomic(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("old")
    res = run("--method", "nope", "--json", str(out))
    assert res.exit_code == 2 and out.read_text() == "old"  # a failed run loses nothing
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_svf_train_bad_compute_dtype_stops_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from lensjax.cli import app

    res = CliRunner().invoke(app, ["svf", "train", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "run"),
                                   "--compute-dtype", "int8"])
    assert res.exit_code == 2 and "compute_dtype must be float32, bfloat16 or float16" in " ".join(res.output.split())
    assert not (tmp_path / "run").exists()
