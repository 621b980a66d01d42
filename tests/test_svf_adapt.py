"""Transformer² self-adaptation: mixing on the multipliers (one-hot = the expert), a population
in one forward = separate forwards, per-row generate = per-expert generate, routing of "other" to
the base weights, the split discipline, the CLI end to end, and bad input."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

import lensjax
from lensjax.cli import app
from lensjax.svf import adaptation as adapt_mod
from lensjax.svf import core, fewshot, mixing, tasks
from lensjax.svf.experts import save_expert
from lensjax.svf.rollout import complete
from lensjax.svf.trainer import make_config
from tiny_hf import make_with_tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapt") / "m"
    make_with_tokenizer("llama", d)
    return lensjax.load(d)


def _z(dec, seed, lo=0.5, hi=1.5):
    rng = np.random.default_rng(seed)
    return {p: jnp.asarray(rng.uniform(lo, hi, s.shape), jnp.float32) for p, s in dec.s.items()}


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize("parameterisation", ["paper", "reference"])
def test_one_hot_mixture_is_the_expert(tiny, parameterisation):
    dec = core.decompose_params(tiny.params, "all")
    lo, hi = (0.5, 1.5) if parameterisation == "paper" else (-2.0, 2.0)
    zs = [_z(dec, s, lo, hi) for s in range(3)]
    meta = {"parameterisation": parameterisation, "max_mult": "2.0"}
    es = mixing.expert_set(dec, [(f"e{i}", z, meta) for i, z in enumerate(zs)])
    ids = np.random.default_rng(0).integers(3, 40, (3, 11))
    for k in range(3):
        want = lensjax.forward(tiny.config, core.adapted_params(tiny.params, dec, zs[k], parameterisation,
                                                                factored=True, max_mult=2.0), ids)
        g = mixing.mix(es, dec, np.eye(3)[k] * 0.7)  # normalised: any positive one-hot
        got = lensjax.forward(tiny.config, core.adapted_params(tiny.params, dec, g, factored=True), ids)
        assert _rel(got, want) <= 1e-6
        # per expert per matrix: one-hot in every column
        a = np.zeros((3, len(dec.paths)))
        a[k] = 1.0
        g2 = mixing.mix(es, dec, a)
        assert all(np.array_equal(np.asarray(g2[p]), np.asarray(g[p])) for p in dec.paths)
    # the reference code's raw-z mixing: exact for g(z) = z, not for its own sigmoid experts
    graw = mixing.mix(es, dec, np.eye(3)[0], space="raw_z")
    gexp = core.scales(dec, zs[0], parameterisation, 2.0)
    diff = max(float(jnp.abs(graw[p] - gexp[p]).max()) for p in dec.paths)
    assert (diff < 1e-6) if parameterisation == "paper" else (diff > 0.1)


def test_mixture_is_the_weighted_multipliers_in_float64(tiny):
    dec = core.decompose_params(tiny.params, "mlp")
    zs = [_z(dec, s) for s in range(2)]
    es = mixing.expert_set(dec, [("a", zs[0], {}), ("b", zs[1], {})])
    a = np.asarray([[0.2, 0.9, 0.0], [0.6, 0.3, 0.0]])  # [K, M]; third column sums to 0 -> equal weights
    g = mixing.mix(es, dec, a)
    for j, p in enumerate(dec.paths):
        w = a[:, j] / a[:, j].sum() if a[:, j].sum() > 0 else np.full(2, 0.5)
        ref = w[0] * np.asarray(zs[0][p], np.float64) + w[1] * np.asarray(zs[1][p], np.float64)
        np.testing.assert_allclose(np.asarray(g[p]), ref, rtol=1e-6)
    with pytest.raises(core.SVFError, match="alpha"):
        mixing.mix(es, dec, np.ones(3))
    with pytest.raises(core.SVFError, match="mixing space"):
        mixing.mix(es, dec, np.ones(2), space="z")


def test_population_in_one_call_equals_separate_forwards(tiny):
    dec = core.decompose_params(tiny.params, "all")
    es = mixing.expert_set(dec, [(f"e{i}", _z(dec, i), {}) for i in range(3)])
    P, n = 5, 2
    alphas = np.random.default_rng(1).uniform(0, 1, (P, 3))
    sets = mixing.mix_many(es, dec, alphas)
    rows = np.repeat(np.arange(P), n)
    ids = np.random.default_rng(2).integers(3, 40, (P * n, 12))
    got = np.asarray(lensjax.forward(tiny.config, mixing.row_params(tiny.params, dec, sets, rows), ids))
    for b in range(P * n):
        g = mixing.mix(es, dec, alphas[rows[b]])
        want = np.asarray(lensjax.forward(tiny.config, core.adapted_params(tiny.params, dec, g, factored=True), ids[b:b + 1]))
        assert _rel(got[b:b + 1], want) <= 1e-5
    # the log-likelihood scorer, chunked (3 rows per call, last chunk padded) = one call
    target = np.zeros_like(ids, bool)
    target[:, 7:] = True
    batch = {"ids": ids, "attn": np.ones_like(ids, bool), "target": target}
    whole = mixing.loglik_rows(tiny, dec, sets, rows, batch)
    chunked = mixing.loglik_rows(tiny, dec, sets, rows, batch, max_rows=3)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5)
    from lensjax.models.lm import sample_loglik
    for b in (0, 7):
        g = mixing.mix(es, dec, alphas[rows[b]])
        one = {k: jnp.asarray(v[b:b + 1]) for k, v in batch.items()}
        ref = sample_loglik(tiny.config, core.adapted_params(tiny.params, dec, g, factored=True), one)
        np.testing.assert_allclose(whole[b], np.asarray(ref)[0], rtol=1e-5)


@pytest.mark.parametrize("max_rows", [None, 6, 4])
def test_loglik_recomposing_each_set_equals_the_factored_rows(tiny, max_rows):
    """A CEM population's shots (each set's rows contiguous): recomposing W′ once per set gives the
    factored per-row scores; 'auto' picks recomposition when it has the fewer FLOPs."""
    dec = core.decompose_params(tiny.params, "all")
    es = mixing.expert_set(dec, [(f"e{i}", _z(dec, i), {}) for i in range(3)])
    P, n = 5, 2
    sets = mixing.mix_many(es, dec, np.random.default_rng(1).uniform(0, 1, (P, 3)))
    rows = np.repeat(np.arange(P)[::-1], n)  # any order of the sets, each set's rows together
    ids = np.random.default_rng(2).integers(3, 40, (P * n, 48))
    target = np.zeros_like(ids, bool)
    target[:, 30:] = True
    attn = np.ones_like(ids, bool)
    attn[1, -5:] = False
    batch = {"ids": ids, "attn": attn, "target": target}
    factored = mixing.loglik_rows(tiny, dec, sets, rows, batch, route="factored")
    by_set = mixing.loglik_rows(tiny, dec, sets, rows, batch, max_rows=max_rows, route="recompose")
    np.testing.assert_allclose(by_set, factored, rtol=2e-5)
    assert mixing._recompose_is_cheaper(dec, n * 48)  # so "auto" recomposes here
    np.testing.assert_allclose(mixing.loglik_rows(tiny, dec, sets, rows, batch, max_rows=max_rows), by_set, rtol=0)
    # rows that interleave the sets cannot be recomposed per set
    with pytest.raises(core.SVFError, match="contiguous"):
        mixing.loglik_rows(tiny, dec, sets, np.tile(np.arange(P), n), batch, route="recompose")
    with pytest.raises(ValueError, match="unknown route"):
        mixing.loglik_rows(tiny, dec, sets, rows, batch, route="dense")


def test_generate_with_per_row_experts_equals_per_expert_generate(tiny):
    dec = core.decompose_params(tiny.params, "mlp")
    zs = [_z(dec, i, 0.2, 1.8) for i in range(3)]
    es = mixing.expert_set(dec, [(f"e{i}", z, {}) for i, z in enumerate(zs)])
    sets = mixing.with_identity(es, dec)
    task = tasks.arithmetic(8, seed=3)
    rows = np.asarray([0, 1, 2, 3, 2, 1, 0, 3])  # 3: the base weights
    rolls = mixing.generate_rows(tiny, dec, sets, rows, task, list(task.prompts), max_new_tokens=6, max_rows=3)
    assert [len(r.texts) for r in rolls] == [3, 3, 2]  # chunks of 3 rows, the last padded then trimmed
    texts = [t for r in rolls for t in r.texts]
    tokens = [r.ids[b][r.target[b]].tolist() for r in rolls for b in range(len(r.texts))]
    for e in range(4):
        params = tiny.params if e == 3 else core.adapted_params(tiny.params, dec, zs[e], factored=True)
        idx = np.flatnonzero(rows == e)
        ref = complete(tiny, params, task, [task.prompts[i] for i in idx], max_new_tokens=6, completion_bucket=0)
        for j, i in enumerate(idx):
            assert tokens[i] == ref.ids[j][ref.target[j]].tolist() and len(tokens[i]) > 0
            assert texts[i] == ref.texts[j]
    assert len({tuple(t) for t in tokens}) > 1  # the experts do answer differently


def test_choice_parsing_on_realistic_answers():
    cats = ("code", "math", "reasoning")
    cases = {
        "Let me think. The question asks for a sum of numbers.\nClassification: \\boxed{math}": "math",
        "Classification: \\boxed{ Reasoning }.": "reasoning",
        "\\boxed{\\text{code}} because it asks for a function": "code",
        "It is math. \\boxed{reasoning} or maybe \\boxed{math}": "reasoning",  # the first box, as the reference
        "Classification: \\boxed{poetry}": "other",  # not a category with an expert
        "Classification: math": "other",  # no box
        "\\boxed{other}": "other",
        "": "other",
    }
    for text, want in cases.items():
        assert adapt_mod.parse_choice(text, cats) == want, text
    instr = adapt_mod.classification_instruction(cats)
    assert "'other'" in instr and "\\boxed{" in instr


def test_other_and_unparseable_labels_run_the_base_weights(tiny, monkeypatch):
    dec = core.decompose_params(tiny.params, "mlp")
    zs = [_z(dec, i, 0.2, 1.8) for i in range(2)]
    es = mixing.expert_set(dec, [("math", zs[0], {}), ("code", zs[1], {})])
    test = tasks.arithmetic(6, seed=4)
    labels = ["math", "other", "garbage", "code", "other", "math"]
    monkeypatch.setattr(adapt_mod, "classify", lambda *a, **k: ([adapt_mod.parse_choice(
        f"\\boxed{{{x}}}" if x != "garbage" else "no label here", es.names) for x in labels], labels, 0))
    res = adapt_mod.adapt(tiny, dec, es, test, "prompt", max_new_tokens=6, batch=6)
    assert res.choices == ["math", "other", "other", "code", "other", "math"]
    for i, c in enumerate(res.choices):
        params = tiny.params if c == "other" else core.adapted_params(tiny.params, dec, zs[es.index(c)], factored=True)
        ref = complete(tiny, params, test, [test.prompts[i]], max_new_tokens=6)
        assert res.completions[i] == ref.texts[0], (i, c)


# ----------------------------------------------------------------------------------- CLI
def _write_split(folder, split, n, offset):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{split}.jsonl", "w") as f:
        for i in range(n):
            a, b = (offset + i) % 7, (offset + 3 * i) % 5
            f.write(json.dumps({"question": f"[{split} {i}] What is {a} plus {b}?",
                                "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}) + "\n")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("t2zoo")
    mdir = tiny.path
    dec = core.decompose_params(tiny.params, "mlp")
    cfg = make_config("paper", targets="mlp")
    files = {}
    for i, cat in enumerate(("math", "code", "reasoning")):
        files[cat] = save_expert(root / f"{cat}.safetensors", _z(dec, 10 + i), tiny, cfg, cat, {})
    for name in ("gsm", "arc"):
        for split, n, off in (("train", 30, 0), ("validation", 8, 100), ("test", 10, 200)):
            _write_split(root / name, split, n, off)
    return {"root": root, "model": str(mdir), "files": files}


def test_cli_adapt_every_strategy_end_to_end(zoo, monkeypatch):
    root = zoo["root"]
    reads = []
    real = tasks.load_task

    def counting(source, split="test", *a, **k):
        reads.append((source, split))
        return real(source, split, *a, **k)

    monkeypatch.setattr(tasks, "load_task", counting)
    trained = []
    import lensjax.svf.trainer as trainer_mod
    real_train = trainer_mod.train

    def spy_train(model, dec, task, val, cfg, out, on_step=None):
        trained.append((task, val))
        return real_train(model, dec, task, val, cfg, out, on_step=on_step)

    monkeypatch.setattr(trainer_mod, "train", spy_train)
    r = runner.invoke(app, ["svf", "train-classifier", "--model", zoo["model"], "--tasks",
                            f"math={root / 'gsm'},reasoning={root / 'arc'}", "--steps", "2", "--out",
                            str(root / "cls"), "--n-val", "6", "--max-new-tokens", "4", "--instruction", ""])
    assert r.exit_code == 0, r.output
    assert reads and all(split == "train" for _, split in reads)  # the classifier never reads test
    (cls_train, cls_val), = trained
    test_qs = {json.loads(line)["question"] for n in ("gsm", "arc") for line in open(root / n / "test.jsonl")}
    assert not (set(cls_train.prompts) | set(cls_val.prompts)) & test_qs
    assert set(cls_train.references) <= {"math", "reasoning"}
    experts = ",".join(f"{c}={f}" for c, f in zoo["files"].items())
    for strategy, extra in (("prompt", []), ("classifier", ["--classifier", str(root / "cls" / "best.safetensors")]),
                            ("fewshot", ["--shots", "3", "--n-val", "4", "--generations", "2", "--pop-size", "4",
                                         "--elites", "2"])):
        reads.clear()
        out = root / f"{strategy}.json"
        r = runner.invoke(app, ["svf", "adapt", "--model", zoo["model"], "--experts", experts, "--strategy", strategy,
                                "--task", str(root / "gsm"), "--max-new-tokens", "6", "--classify-tokens", "4",
                                "--batch", "8", "--json", str(out), "--instruction", ""] + extra)
        assert r.exit_code == 0, r.output
        assert [s for _, s in reads].count("test") == 1, reads  # the test split is read once
        got = json.loads(out.read_text())
        for key in ("strategy", "n", "accuracy", "pass1_seconds", "pass2_seconds", "experts"):
            assert key in got
        assert got["strategy"] == strategy and got["n"] == 10
        assert set(got["experts"]) == {"math", "code", "reasoning"}
        if strategy == "fewshot":
            assert len(got["alpha"]) == 3 and "choices" not in got
            assert "test" not in [s for _, s in reads[:-1]]  # shots / validation before, never test
        else:
            assert len(got["choices"]) == 10 and set(got["choices"]) <= {"math", "code", "reasoning", "other"}


def test_fewshot_sets_never_touch_test(zoo):
    root = zoo["root"]
    shots, val = fewshot.fewshot_sets(str(root / "gsm"), 5, 6, seed=1)
    test = tasks.load_task(str(root / "gsm"), "test")
    assert len(shots) == 5 and len(val) == 6
    assert not (set(shots.prompts) | set(val.prompts)) & set(test.prompts)
    assert all(q.startswith("[train") for q in shots.prompts) and all(q.startswith("[validation") for q in val.prompts)
    # no validation split: carved from train, disjoint from the shots
    single = root / "single"
    _write_split(single, "train", 20, 0)
    s2, v2 = fewshot.fewshot_sets(str(single), 4, 5)
    assert not set(s2.prompts) & set(v2.prompts)


def test_bad_input_is_refused_with_a_clear_error(zoo, tiny, tmp_path):
    root = zoo["root"]
    experts = ",".join(f"{c}={f}" for c, f in zoo["files"].items())
    base = ["svf", "adapt", "--model", zoo["model"], "--task", str(root / "gsm"), "--max-new-tokens", "4"]
    cases = [
        (["--experts", experts, "--strategy", "vote"], "unknown strategy 'vote'"),
        (["--experts", experts, "--strategy", "fewshot", "--shots", "0"], "shot set is empty"),
        (["--experts", experts, "--strategy", "fewshot", "--shots", "500"], "500 shots asked"),
        (["--experts", experts, "--strategy", "classifier"], "needs --classifier"),
        (["--experts", "math", "--strategy", "prompt"], "category=value"),
    ]
    # an expert of another base model (same shapes, other weights) and one of other targets
    other = tmp_path / "other"
    make_with_tokenizer("llama", other, seed=1)
    om = lensjax.load(other)
    odec = core.decompose_params(om.params, "mlp")
    alien = save_expert(tmp_path / "alien.safetensors", _z(odec, 0), om, make_config("paper", targets="mlp"), "x", {})
    cases.append((["--experts", f"math={alien}", "--strategy", "prompt"], "another base model"))
    adec = core.decompose_params(tiny.params, "attn")
    attn = save_expert(tmp_path / "attn.safetensors", _z(adec, 0), tiny, make_config("paper", targets="attn"), "x", {})
    cases.append((["--experts", f"math={zoo['files']['math']},code={attn}", "--strategy", "prompt"],
                  "different matrices"))
    # a classifier that predicts a category without an expert
    dec = core.decompose_params(tiny.params, "mlp")
    cls = save_expert(tmp_path / "cls.safetensors", _z(dec, 3), tiny, make_config("paper", targets="mlp"),
                      "classifier:math,code,reasoning", {})
    cases.append((["--experts", f"math={zoo['files']['math']},code={zoo['files']['code']}", "--strategy",
                   "classifier", "--classifier", str(cls)], "reasoning, which has no expert"))
    for args, msg in cases:
        r = runner.invoke(app, base + args)
        assert r.exit_code == 2, (args, r.output)
        assert msg in " ".join(r.output.split()), (msg, r.output)
    es = mixing.expert_set(dec, [("math", _z(dec, 0), {})])
    with pytest.raises(core.SVFError, match="no expert for category 'poetry'"):
        es.index("poetry")
    with pytest.raises(core.SVFError, match="test set is empty"):
        adapt_mod.adapt(tiny, dec, es, [], "prompt")
