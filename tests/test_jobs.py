"""Candidates as independent jobs: two concurrent `lensjax select --shard i/2` processes plus
`lensjax merge` give the curves and ranking of one sequential run; concurrent writers of one
curves or NTK file lose nothing; overlapping parts that disagree are refused."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from typer.testing import CliRunner

from lensjax.cli import app
from lensjax.selection import pipeline
from lensjax.selection.curves import read_curves
from tiny_hf import make_with_tokenizer, write_addition_jsonl


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    dirs = []
    for fam in ("gpt2", "llama"):
        make_with_tokenizer(fam, root / fam)
        dirs.append(str(root / fam))
    return dirs, str(write_addition_jsonl(root / "add.jsonl", n=300))


def _args(dirs, data, curves, ntk):
    return ["select", "--models", ",".join(dirs), "--dataset", data, "--budget", "100", "--base", "25",
            "--target-size", "1600", "--lr", "1e-3", "--n-probe", "16", "--curves-out", str(curves),
            "--ntk-out", str(ntk)]


@pytest.mark.slow
def test_two_concurrent_jobs_and_merge_equal_one_run(pair, tmp_path, monkeypatch):
    dirs, data = pair
    seq = CliRunner().invoke(app, _args(dirs, data, tmp_path / "seq.csv", tmp_path / "seq.json")
                             + ["--json", str(tmp_path / "seq_res.json")])
    assert seq.exit_code == 0, seq.output
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    jobs = [subprocess.Popen([sys.executable, "-m", "lensjax.cli"]
                             + _args(dirs, data, tmp_path / f"part{i}.csv", tmp_path / f"part{i}.safetensors")
                             + ["--shard", f"{i}/2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in (1, 2)]
    outs = [j.communicate(timeout=600)[0] for j in jobs]
    assert [j.returncode for j in jobs] == [0, 0], outs
    assert f"shard 1/2: measured {dirs[0]}" in outs[0] and f"shard 2/2: measured {dirs[1]}" in outs[1]
    assert len(read_curves(tmp_path / "part1.csv").models) == 1
    res = CliRunner().invoke(app, ["merge", str(tmp_path / "part1.csv"), str(tmp_path / "part2.csv"), "--curves-out",
                                   str(tmp_path / "merged.csv"), "--ntk", str(tmp_path / "part1.safetensors"),
                                   "--ntk", str(tmp_path / "part2.safetensors"), "--ntk-out", str(tmp_path / "merged.json")])
    assert res.exit_code == 0, res.output
    # the last run only fits and ranks: nothing is fine-tuned or recomputed
    boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-measured"))  # noqa: E731
    monkeypatch.setattr(pipeline, "finetune", boom)
    monkeypatch.setattr(pipeline, "compute_ntk", boom)
    fin = CliRunner().invoke(app, _args(dirs, data, tmp_path / "merged.csv", tmp_path / "merged.json")
                             + ["--json", str(tmp_path / "fin_res.json")])
    assert fin.exit_code == 0, fin.output
    a, b = read_curves(tmp_path / "seq.csv"), read_curves(tmp_path / "merged.csv")
    assert a.models == b.models and list(a.sizes) == list(b.sizes)
    np.testing.assert_allclose(b.loss, a.loss, rtol=1e-6)
    ra, rb = json.loads((tmp_path / "seq_res.json").read_text()), json.loads((tmp_path / "fin_res.json").read_text())
    assert ra["ranking"] == rb["ranking"]
    for m in dirs:
        assert rb["predicted"][m] == pytest.approx(ra["predicted"][m], rel=1e-6)
        assert rb["ntk"][m]["log_F_target"] == pytest.approx(ra["ntk"][m]["log_F_target"], rel=1e-6)


WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from lensjax.selection.finetune import CurvesStore
    from lensjax.selection.pipeline import CandidateNTK, update_ntk
    path, ntk, name = sys.argv[1], sys.argv[2], sys.argv[3]
    for s in range(1, 41):
        CurvesStore(path).record(name, s, 1.0 + s / 1000 + (name == "b") / 7, steps=s, lr=1e-4)
        if s % 10 == 0:
            update_ntk(ntk, {f"{name}{s}": CandidateNTK(f"{name}{s}", np.ones(2), np.eye(2), np.ones(2), {}, 1e-4)})
    """
)


def test_concurrent_writers_of_one_file_lose_nothing(tmp_path):
    path, ntk = tmp_path / "shared.csv", tmp_path / "shared.json"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(ntk), name]) for name in ("a", "b")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    c = read_curves(path)
    assert sorted(c.models) == ["a", "b"] and len(c.sizes) == 40
    assert np.isfinite(c.loss).all()
    i = c.models.index("b")
    np.testing.assert_allclose(c.loss[i], 1.0 + np.arange(1, 41) / 1000 + 1 / 7)
    assert sorted(pipeline.read_ntk(ntk)) == sorted(f"{n}{s}" for n in "ab" for s in (10, 20, 30, 40))


def test_merge_refuses_overlapping_parts_that_disagree(tmp_path):
    from lensjax.selection.finetune import CurvesStore

    for name, v in (("p1.csv", 2.5), ("p2.csv", 2.6)):
        s = CurvesStore(tmp_path / name)
        s.record("m", 0, 3.0, steps=0, lr=1e-4)
        s.record("m", 100, v, steps=13, lr=1e-4)
    res = CliRunner().invoke(app, ["merge", str(tmp_path / "p1.csv"), str(tmp_path / "p2.csv"),
                                   "--curves-out", str(tmp_path / "out.csv")])
    assert res.exit_code == 2
    assert "'m' at size 100" in res.output and "p1.csv" in res.output and "p2.csv" in res.output
    assert not (tmp_path / "out.csv").exists()
    # the same value twice is fine (a re-run job), and --shard must look like i/n
    res = CliRunner().invoke(app, ["merge", str(tmp_path / "p1.csv"), str(tmp_path / "p1.csv"),
                                   "--curves-out", str(tmp_path / "out.csv")])
    assert res.exit_code == 0, res.output
    assert list(read_curves(tmp_path / "out.csv").models) == ["m"]
    from lensjax.selection.jobs import parse_shard
    from lensjax.selection.selectors import SelectionError

    for bad in ("3/2", "0/2", "1-2"):
        with pytest.raises(SelectionError, match="shard"):
            parse_shard(bad)
