"""Progressive fine-tuning, the resumable curves store, and `lensjax select --models` end to end."""

import csv
import dataclasses
import json

import jax

import numpy as np
import pytest
from typer.testing import CliRunner

import lensjax
from lensjax import programs
from lensjax.cli import app
from lensjax.selection import pipeline
from lensjax.selection.data import DataError, load_pairs, tokenize
from lensjax.selection.finetune import CurvesStore, FinetuneConfig, evaluate, finetune
from lensjax.selection.selectors import SelectionError
from tiny_hf import make_with_tokenizer, write_addition_jsonl

FT = FinetuneConfig(lr=1e-3, batch_size=8, min_steps=5)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    dirs = []
    for fam in ("gpt2", "llama", "opt"):
        make_with_tokenizer(fam, root / fam)
        dirs.append(str(root / fam))
    data = write_addition_jsonl(root / "add.jsonl", n=300)
    return dirs, str(data), root


def test_finetuning_lowers_heldout_loss(zoo):
    dirs, data, _ = zoo
    m = lensjax.load(dirs[1])
    train, held = load_pairs(data)
    tr, he = tokenize(m.tokenizer, train), tokenize(m.tokenizer, held)
    before = evaluate(m.config, m.params, he)
    p, t = finetune(m.config, m.params, tr, np.arange(len(tr)), 200, FT)
    after = evaluate(m.config, p, he)
    assert t == 25 and after < before - 0.5, (before, after)
    # the pretrained weights are untouched (the train step donates only its own copy)
    assert evaluate(m.config, m.params, he) == pytest.approx(before, rel=1e-6)


def test_mixed_precision_ladder_step_follows_float32(zoo):
    """The ladder's own path with compute_dtype="bfloat16": tokenized pairs of uneven lengths,
    right-padded to a length bucket, the scheduled (warm-up, cosine) step; gpt2's head is tied."""
    dirs, data, _ = zoo
    m = lensjax.load(dirs[0])
    train, held = load_pairs(data)
    tr, he = tokenize(m.tokenizer, train), tokenize(m.tokenizer, held)
    before = evaluate(m.config, m.params, he)
    after = {}
    for dt in ("float32", "bfloat16"):
        p, t = finetune(m.config, m.params, tr, np.arange(len(tr)), 80, dataclasses.replace(FT, compute_dtype=dt))
        assert t == 10 and all(x.dtype == np.float32 for x in jax.tree.leaves(p))
        after[dt] = evaluate(m.config, p, he)
    assert after["float32"] < before - 0.3, (before, after)
    assert after["bfloat16"] == pytest.approx(after["float32"], rel=2e-3), after  # measured: 2e-5


def test_killed_run_resumes_to_the_same_curves(zoo, tmp_path, monkeypatch):
    dirs, data, _ = zoo
    kw = dict(budget=100, target_size=800, method="rectified", base=25, ft=FT)
    full = tmp_path / "full.csv"
    pipeline.run(dirs[:2], data, curves_out=full, **kw)
    part = tmp_path / "part.csv"
    calls = {"n": 0}
    orig = CurvesStore.record

    def dying(self, *a, **k):
        if calls["n"] == 6:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return orig(self, *a, **k)

    monkeypatch.setattr(CurvesStore, "record", dying)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(dirs[:2], data, curves_out=part, **kw)
    monkeypatch.setattr(CurvesStore, "record", orig)
    rows = list(csv.reader(open(part)))
    assert sum(c != "" for r in rows[1:] for c in r[1:5]) == 6  # what was measured before the kill is kept
    # the resumed run on a crowded process (a memory-mapping limit of 2): the compiled programs are
    # released after each candidate (lensjax.programs); the curves stay the same
    (tmp_path / "max_map_count").write_text("2\n")
    monkeypatch.setattr(programs, "LIMIT_PATH", str(tmp_path / "max_map_count"))
    logs = []
    pipeline.run(dirs[:2], data, curves_out=part, log=logs.append, **kw)
    assert part.read_text() == full.read_text()
    assert sum(line.startswith("released compiled programs") for line in logs) == 2, logs


@pytest.mark.slow
def test_cli_end_to_end(zoo, tmp_path):
    dirs, data, _ = zoo
    out, curves, ntk = tmp_path / "res.json", tmp_path / "curves.csv", tmp_path / "ntk.safetensors"
    res = CliRunner().invoke(app, ["select", "--models", ",".join(dirs), "--dataset", data, "--budget", "100",
                                   "--base", "25", "--target-size", "1600", "--lr", "1e-3", "--json", str(out),
                                   "--curves-out", str(curves), "--ntk-out", str(ntk), "--n-probe", "16"])
    assert res.exit_code == 0, res.output
    payload = json.loads(out.read_text())
    assert payload["method"] == "lensllm" and sorted(payload["ranking"]) == sorted(dirs)
    assert set(payload["ntk"]) == set(dirs) and payload["ladder"] == [25, 50, 100]
    assert 0 < payload["cost_fraction"] < 1
    rows = list(csv.reader(open(curves)))
    assert rows[0][:5] == ["config name", "0", "25", "50", "100"] and len(rows) == 4
    from safetensors import safe_open

    with safe_open(str(ntk), "numpy") as f:
        assert f.get_tensor("0.eigvecs").shape == (16, 16)
        assert json.loads(f.metadata()["models"])["0"] == dirs[0]
    for d in dirs:
        assert d in res.output


def test_bad_inputs_keep_partial_results(zoo, tmp_path):
    dirs, data, root = zoo
    kw = dict(budget=50, target_size=800, method="ats", base=25, ft=FT)
    nocol = root / "nocol.jsonl"
    nocol.write_text('{"question": "1+1=", "answer": "2"}\n' * 20)
    with pytest.raises(DataError, match=r"no prompt column 'input'; its columns are \['question', 'answer'\]"):
        pipeline.run(dirs[:1], str(nocol), curves_out=tmp_path / "a.csv", **kw)
    empty = root / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty|cannot load"):
        pipeline.run(dirs[:1], str(empty), curves_out=tmp_path / "b.csv", **kw)
    with pytest.raises(SelectionError, match=r"budget 10 is below the smallest ladder size 25"):
        pipeline.run(dirs[:1], data, curves_out=tmp_path / "c.csv", **{**kw, "budget": 10})
    out = tmp_path / "d.csv"
    with pytest.raises(SelectionError, match=r"model '.*nope' cannot be loaded"):
        pipeline.run([dirs[0], str(root / "nope")], data, curves_out=out, **kw)
    rows = list(csv.reader(open(out)))
    assert rows[1][0] == dirs[0] and all(c != "" for c in rows[1][1:4])  # the first model's curve is kept
    res = CliRunner().invoke(app, ["select", "--models", f"{dirs[0]},{root / 'nope'}", "--dataset", data,
                                   "--budget", "50", "--base", "25", "--curves-out", str(out), "--method", "ats"])
    assert res.exit_code == 2 and "cannot be loaded" in res.output and "measurements made so far" in res.output


@pytest.mark.slow
def test_resumed_curves_with_uneven_sizes_fit_what_is_there(zoo, tmp_path):
    """A curves CSV where one model has a size the other lacks (a resumed run with a larger budget)
    used to crash with a KeyError in store.steps; now the selection fits what is measured."""
    dirs, data, _ = zoo
    out = tmp_path / "uneven.csv"
    kw = dict(target_size=800, base=25, ft=FT, curves_out=out)
    pipeline.run(dirs[:1], data, budget=200, method="ats", n_eval=20, **kw)  # model 0: 0, 25, ..., 200
    res = pipeline.run(dirs[:2], data, budget=100, method="lensllm", n_eval=20, **kw)  # model 1 only up to 100
    assert sorted(res["ranking"]) == sorted(dirs[:2]) and all(np.isfinite(list(res["predicted"].values())))
    assert res["steps"][dirs[1]] == {"0": 0, "25": 5, "50": 7, "100": 13} and "200" in res["steps"][dirs[0]]
    # A cell without its .meta.json entry is a clear SelectionError, not a KeyError.
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    del meta[dirs[1]]["sizes"]["50"]
    out.with_name(out.name + ".meta.json").write_text(json.dumps(meta))
    with pytest.raises(SelectionError, match="disagree"):
        pipeline.run(dirs[:2], data, budget=100, method="lensllm", n_eval=20, **kw)


@pytest.mark.slow
def test_early_stopping_records_its_step_and_cost_counts_eval_and_ntk(zoo, tmp_path):
    dirs, data, _ = zoo
    ft = FinetuneConfig(lr=3e-2, batch_size=8, min_steps=5, epochs=6, patience=1, eval_every=3, n_dev=40)
    out = tmp_path / "es.csv"
    res = pipeline.run(dirs[1:2], data, budget=50, target_size=800, method="lensllm_reference", base=25, ft=ft,
                       curves_out=out, n_eval=30)
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())[dirs[1]]["sizes"]
    for d in ("25", "50"):
        cell = meta[d]
        assert cell["planned_steps"] == ft.steps(int(d)) and cell["steps"] <= cell["steps_run"] <= cell["planned_steps"]
        assert cell["dev_evals"] >= 1 and cell["n_dev"] == 40 and cell["protocol"]["patience"] == 1
        assert cell["protocol"]["schedule"] == "cosine" and cell["n_eval"] == 30
    assert any(meta[d]["steps"] < meta[d]["planned_steps"] for d in ("25", "50")), meta  # lr 3e-2 overfits
    c = res["cost"]
    assert c["eval_flops"] > 0 and c["ntk_flops"] > 0 and c["train_flops"] > 0
    assert res["flops"] == pytest.approx(c["train_flops"] + c["eval_flops"] + c["ntk_flops"])
    assert res["n_heldout"] == 30 and res["n_dev"] == 40


def test_validation_split_is_capped_with_a_fixed_seed(tmp_path):
    import datasets

    d = tmp_path / "ds"
    rows = [{"input": f"{i}+1=", "target": str(i + 1)} for i in range(50)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:20]),
                          "validation": datasets.Dataset.from_list(rows[20:])}).save_to_disk(str(d))
    f = tmp_path / "val.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from lensjax.selection import data as data_mod

    tr, held = load_pairs(str(f), n_eval=7, seed=3)
    assert len(held) == 7 and len(tr) == 43
    # A dataset with its own validation split: capped to n_eval, the same draw every time.
    orig = data_mod.MAX_HELD_OUT
    try:
        data_mod.MAX_HELD_OUT = 12
        import datasets as ds_mod

        real = ds_mod.load_dataset
        ds_mod.load_dataset = lambda *a, **k: ds_mod.load_from_disk(str(d))
        try:
            a = load_pairs("some/hub-dataset", seed=1)[1]
            b = load_pairs("some/hub-dataset", seed=1)[1]
            c = load_pairs("some/hub-dataset", seed=1, n_eval=5)[1]
        finally:
            ds_mod.load_dataset = real
    finally:
        data_mod.MAX_HELD_OUT = orig
    assert len(a) == 12 and a == b and len(c) == 5 and set(a.prompts) <= {r["input"] for r in rows[20:]}


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_encoder_decoder_target_loss_is_hf_labels_loss(tmp_path, family):
    """The batch of an encoder-decoder (prompt → encoder, start token + target → decoder) gives
    Hugging Face's own ``model(input_ids, labels=...)`` loss, which shifts the labels itself."""
    import torch

    from lensjax.models.lm import mean_target_loss
    from lensjax.selection.data import Pairs, make_batch

    hf = make_with_tokenizer(family, tmp_path / family)
    m = lensjax.load(tmp_path / family)
    tok = tokenize(m.tokenizer, Pairs(("12+30=", "7+5="), ("42", "12")), decoder_start=m.config.decoder_start_token_id)
    for i in range(2):
        b = make_batch(tok, [i], pad_id=m.tokenizer.pad_token_id)
        enc = torch.tensor(np.asarray(tok.ids[i][: tok.n_prompt[i]])[None])
        labels = torch.tensor(np.asarray(tok.ids[i][tok.n_prompt[i]:])[None])
        with torch.no_grad():
            ref = float(hf(input_ids=enc, labels=labels).loss)
        got = float(mean_target_loss(m.config, m.params, {k: np.asarray(v) for k, v in b.items()}))
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_select_on_a_mixed_decoder_and_encoder_decoder_set(tmp_path):
    """`lensjax select --models` with one decoder-only and two encoder-decoder candidates: curves,
    NTK statistics and a ranking for all three."""
    for fam in ("llama", "t5", "bart"):
        make_with_tokenizer(fam, tmp_path / fam)
    dirs = [str(tmp_path / f) for f in ("llama", "t5", "bart")]
    data = write_addition_jsonl(tmp_path / "add.jsonl", n=200)
    out, curves, ntk = tmp_path / "res.json", tmp_path / "curves.csv", tmp_path / "ntk.safetensors"
    res = CliRunner().invoke(app, ["select", "--models", ",".join(dirs), "--dataset", str(data), "--budget", "40",
                                   "--base", "10", "--target-size", "400", "--lr", "1e-3", "--json", str(out),
                                   "--curves-out", str(curves), "--ntk-out", str(ntk), "--n-probe", "8",
                                   "--n-eval", "20", "--patience", "0"])
    assert res.exit_code == 0, res.output
    payload = json.loads(out.read_text())
    assert sorted(payload["ranking"]) == sorted(dirs) and set(payload["ntk"]) == set(dirs)
    rows = list(csv.reader(open(curves)))
    assert rows[0][:5] == ["config name", "0", "10", "20", "40"] and len(rows) == 4
    for r in rows[1:]:
        losses = [float(x) for x in r[1:5]]
        assert all(np.isfinite(losses)) and losses[-1] < losses[0], r  # fine-tuning helps every family
    from safetensors import safe_open

    with safe_open(str(ntk), "numpy") as f:
        for i in range(3):
            assert np.all(np.isfinite(f.get_tensor(f"{i}.eigvals")))
