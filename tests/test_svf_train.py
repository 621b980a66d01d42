"""SVF training mechanics: one compile per shape bucket, the loss scores the policy that sampled
(bf16), stop sequences end rows early, presets and their validation, the CLI on local task files."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lensjax
from lensjax.svf import core, rollout, tasks, trainer
from tiny_hf import make_with_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("svft") / "m"
    make_with_tokenizer("llama", d, max_pos=128)
    return lensjax.load(d)


def _mixed_length_task(n=200, seed=0):
    """Arithmetic prompts of 5-60 characters (= tokens for the character tokenizer)."""
    rng = np.random.default_rng(seed)
    prompts, refs = [], []
    for _ in range(n):
        length = int(rng.integers(5, 61))
        terms = []
        while len("+".join(terms)) + 1 < length:
            terms.append(str(rng.integers(0, 10)))
        p = ("+".join(terms) + "=")[-length:].lstrip("+")
        prompts.append(p)
        refs.append(str(sum(int(t) for t in p[:-1].split("+") if t)))
    return tasks.Task("mixed", "arithmetic", tuple(prompts), tuple(refs))


def test_training_step_compiles_once_per_bucket(tiny, tmp_path):
    task = _mixed_length_task()
    lengths = [len(p) for p in task.prompts]
    assert min(lengths) <= 8 and max(lengths) >= 57
    dec = core.decompose_params(tiny.params, "mlp")
    cfg = trainer.make_config("paper", steps=20, batch_prompts=2, samples_per_prompt=2, max_new_tokens=4,
                              val_every=100, eval_batch=8, seed=1234)
    info = trainer.train(tiny, dec, task, task.subset(range(8)), cfg, tmp_path / "run")
    # the raw longest prompt of each step's batch varies far more than the buckets do
    raw = set()
    for step in range(cfg.steps):
        pick = np.random.default_rng([cfg.seed, step]).choice(len(task), cfg.batch_prompts, replace=False)
        raw.add(max(lengths[i] for i in pick))
    shapes = {tuple(h["shape"]) for h in info["history"]}
    n_compiles = trainer._update_fn(tiny.config, cfg)._cache_size()
    print(f"raw longest-prompt lengths {len(raw)}, shape buckets {sorted(shapes)}, compiles {n_compiles}")
    assert len(raw) > 8
    assert {s[1] - 4 for s in shapes} <= {16, 32, 48, 64}  # prompt buckets (completion cut to 4)
    assert n_compiles == len(shapes) <= 4


def test_mixed_precision_training_runs_and_resumes(tiny, tmp_path):
    """compute_dtype="bfloat16" through train(): the update reads bf16 factors (cast once), z and its
    Adam state stay float32 on disk, and a second call resumes at the saved step."""
    task = _mixed_length_task(60, seed=3)
    dec = core.decompose_params(tiny.params, "mlp")
    cfg = trainer.make_config("paper", steps=2, batch_prompts=2, samples_per_prompt=2, max_new_tokens=3,
                              val_every=100, eval_batch=8, compute_dtype="bfloat16")
    info = trainer.train(tiny, dec, task, task.subset(range(8)), cfg, tmp_path / "run")
    assert [h["step"] for h in info["history"]] == [1, 2]
    assert all(np.isfinite(h["loss"]) and np.isfinite(h["grad_norm"]) for h in info["history"])
    z, opt_state, saved = trainer.load_state(tmp_path / "run", core.init_z(dec), trainer.make_optimizer(cfg).init(core.init_z(dec)))
    assert saved["step"] == 2 and all(v.dtype == jnp.float32 for v in jax.tree.leaves(z))
    more = trainer.train(tiny, dec, task, task.subset(range(8)), dataclasses.replace(cfg, steps=3), tmp_path / "run")
    assert [h["step"] for h in more["history"]] == [1, 2, 3]


def _bf16(model):
    cast = lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    return dataclasses.replace(model, params=jax.tree.map(cast, model.params))


def test_bf16_loss_scores_the_sampled_policy(tiny):
    """The per-token log-probs the loss sees equal those the sampler drew with (bf16 tolerance)."""
    model = _bf16(tiny)
    dec = core.decompose_params(model.params, "all")
    rng = np.random.default_rng(0)
    z = {p: jnp.asarray(rng.uniform(0.7, 1.3, s.shape), jnp.float32) for p, s in dec.s.items()}
    cfg = trainer.make_config("paper", targets="all")
    task = _mixed_length_task(16, seed=3)
    roll = rollout.complete(model, trainer.policy_params(model.params, dec, z, cfg, n_tokens=16), task,
                            list(task.prompts), max_new_tokens=12, temperature=1.0, key=jax.random.key(0))
    Tp = roll.prompt_len
    gen = roll.target[:, Tp:]
    assert gen.sum() >= 16 * 4
    lp, w, _ = trainer.policy_logprobs(model.config, cfg, z, model.params, dec, trainer.batch_of(roll))
    ours = np.asarray(lp)[:, Tp - 1:][gen]
    np.testing.assert_array_equal(np.asarray(w)[:, Tp - 1:] > 0, gen)
    err = np.abs(ours - roll.logprobs[gen])
    # the same policy, cached decode vs one full pass, both bf16: rounding only
    assert err.max() <= 0.1 and err.mean() <= 0.02, (err.max(), err.mean())
    # the dense W′ rounded to bf16 is another policy: its log-probs disagree with the sampler's more
    dense = core.adapted_params(model.params, dec, z, cfg.parameterisation, factored=False)
    logits, _ = lensjax.models.transformer._forward(model.config, dense, trainer.batch_of(roll)["ids"],
                                                    trainer.batch_of(roll)["attn"], None, None)
    lpd, _ = lensjax.models.lm.logprobs_from_logits(logits, trainer.batch_of(roll))
    err_dense = np.abs(np.asarray(lpd)[:, Tp - 1:][gen] - roll.logprobs[gen])
    print(f"bf16 |Δ log p| factored (used) max {err.max():.4f} mean {err.mean():.4f}; "
          f"dense W′ max {err_dense.max():.4f} mean {err_dense.mean():.4f}")
    assert err_dense.mean() > err.mean()


def test_stop_sequences_end_rows_and_the_batch(tiny):
    from lensjax.models.sampler import generate

    ids = np.asarray([[5, 6, 7, 8], [9, 10, 11, 12]], np.int32)
    free = np.asarray(generate(tiny.config, tiny.params, ids, max_new_tokens=12, eos_token_id=[]))[:, 4:]
    stop = [list(free[0, 2:4])]  # row 0 emits this pair at steps 3-4
    out = np.asarray(generate(tiny.config, tiny.params, ids, max_new_tokens=12, eos_token_id=[],
                              stop_sequences=stop))[:, 4:]
    np.testing.assert_array_equal(out[0, :4], free[0, :4])
    pad = tiny.config.pad_token_id
    assert (out[0, 4:] == pad).all()  # row 0 stopped right after the stop sequence
    hit = next((i for i in range(1, 12) if list(free[1, i - 1:i + 1]) == stop[0]), None)
    np.testing.assert_array_equal(out[1, :(hit or 11) + 1], free[1, :(hit or 11) + 1])
    # the returned log-probs are those of the full forward pass over prompt + completion (float32)
    full, lp = generate(tiny.config, tiny.params, ids, max_new_tokens=12, eos_token_id=[], return_logprobs=True)
    logits = np.asarray(lensjax.forward(tiny.config, tiny.params, np.asarray(full)), np.float64)
    ref = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    want = np.take_along_axis(ref[:, 3:-1], np.asarray(full)[:, 4:, None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(lp), want, atol=1e-5)


def test_presets_and_bad_settings():
    ref = trainer.make_config("reference")
    assert (ref.greedy_rollouts, ref.samples_per_prompt, ref.reward, ref.baseline, ref.kl, ref.kl_reduce,
            ref.optimizer, ref.schedule, ref.lr, ref.clip) == (True, 1, "pm1", "none", "reverse", "sum", "adam",
                                                               "constant", 2e-3, 1e-3)
    pap = trainer.make_config("paper", lr=5e-3)
    assert (pap.greedy_rollouts, pap.baseline, pap.kl, pap.optimizer, pap.schedule, pap.lr) == (
        False, "mean", "forward", "adamw", "cosine", 5e-3)
    assert trainer.make_config("reference", samples_per_prompt=None).samples_per_prompt == 1
    with pytest.raises(core.SVFError, match="unknown preset 'ppo'; choose one of paper, reference"):
        trainer.make_config("ppo")
    with pytest.raises(core.SVFError, match="kl must be one of forward, reverse"):
        trainer.make_config("paper", kl="js")
    with pytest.raises(tasks.TaskError, match="unknown task kind 'chess'"):
        tasks.from_records([{"question": "q", "answer": "1"}], "x", kind="chess")
    r, adv = trainer.advantages(np.array([1.0, 0.0, 0.0, 1.0]), ref)
    np.testing.assert_array_equal(r, [1, -1, -1, 1])
    np.testing.assert_array_equal(adv, r)  # no baseline
    r, adv = trainer.advantages(np.array([1.0, 0.0, 0.0, 0.0]), pap)
    np.testing.assert_allclose(adv, [0.75, -0.25, -0.25, -0.25])


def test_kl_reductions_match_numpy(tiny):
    """KL(π_W′‖π_W) token mean and KL(π_W‖π_W′) per-completion sum against float64 NumPy."""
    dec = core.decompose_params(tiny.params, "mlp")
    rng = np.random.default_rng(1)
    z = {p: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), jnp.float32) for p, s in dec.s.items()}
    ids = rng.integers(3, 40, size=(3, 9)).astype(np.int32)
    target = np.zeros((3, 9), bool)
    target[:, 5:] = True
    target[2, 7:] = False
    batch = {"ids": jnp.asarray(ids), "attn": jnp.ones((3, 9), bool), "target": jnp.asarray(target)}
    fwd = lambda p: np.asarray(lensjax.forward(tiny.config, p, ids), np.float64)[:, :-1]  # noqa: E731
    la, lb = fwd(core.adapted_params(tiny.params, dec, z)), fwd(tiny.params)
    lsm = lambda x: x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)  # noqa: E731
    pa, pb = lsm(la), lsm(lb)
    m = target[:, 1:]
    kf = (np.exp(pa) * (pa - pb)).sum(-1)
    kr = (np.exp(pb) * (pb - pa)).sum(-1)
    zero = jnp.zeros(3)
    for cfg, want in ((trainer.make_config("paper", kl_coef=1.0), (kf * m).sum() / m.sum()),
                      (trainer.make_config("reference", kl_coef=1.0, parameterisation="paper"), (kr * m).sum(-1).mean())):
        _, (_, kl) = trainer.policy_loss(tiny.config, cfg, z, tiny.params, dec, batch, zero)
        assert float(kl) == pytest.approx(want, rel=1e-4)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("preset", ["reference", "paper"])
def test_cli_trains_a_gsm8k_style_file_with_each_preset(tiny, tmp_path, preset):
    from typer.testing import CliRunner

    from lensjax.cli import app

    rows = [{"question": f"what is {a} plus {b}?", "answer": f"{a} plus {b} is {a + b}.\n#### {a + b}"}
            for a in range(6) for b in range(6)]
    f = _write_jsonl(tmp_path / "gsm.jsonl", rows)
    res = CliRunner().invoke(app, ["svf", "train", "--model", tiny.path, "--task", str(f), "--preset", preset,
                                   "--steps", "2", "--n-val", "8", "--max-new-tokens", "4", "--batch-prompts", "2",
                                   "--val-every", "2", "--out", str(tmp_path / preset)])
    assert res.exit_code == 0, res.output
    assert f"preset {preset}" in res.output and "28 train / 8 validation" in res.output
    state = json.loads((tmp_path / preset / "state.json").read_text())
    assert state["step"] == 2
    res = CliRunner().invoke(app, ["svf", "train", "--model", tiny.path, "--task", str(f), "--preset", "grpo",
                                   "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "unknown preset 'grpo'" in res.output


MATH_ROWS = [{"problem": "What is $\\frac{1}{4} + \\frac{1}{4}$?", "level": "Level 1", "type": "Prealgebra",
              "solution": "We add: $\\frac{1}{4} + \\frac{1}{4} = \\frac{2}{4} = \\boxed{\\frac{1}{2}}$."},
             {"problem": "Compute $2^{3}$.", "level": "Level 1", "type": "Algebra",
              "solution": "$2^3 = 2 \\cdot 2 \\cdot 2 = \\boxed{8}$."}]
ARC_ROWS = [{"id": "Mercury_1", "question": "Which gas do plants take in for photosynthesis?",
             "choices": {"text": ["oxygen", "carbon dioxide", "nitrogen", "helium"], "label": ["A", "B", "C", "D"]},
             "answerKey": "B"},
            {"id": "NYSEDREGENTS_2", "question": "Which is a mammal?",
             "choices": {"text": ["shark", "frog", "whale", "trout"], "label": ["1", "2", "3", "4"]}, "answerKey": "3"}]
MBPP_ROWS = [{"task_id": 2, "text": "Write a function to find the shared elements from the given two lists.",
              "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
              "test_list": ["assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
                            "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))"],
              "test_setup_code": "", "challenge_test_list": []}]


@pytest.mark.parametrize("kind,rows", [("math", MATH_ROWS), ("arc", ARC_ROWS), ("mbpp", MBPP_ROWS)])
def test_cli_eval_reports_accuracy_on_local_files(tiny, tmp_path, kind, rows):
    from typer.testing import CliRunner

    from lensjax.cli import app

    f = _write_jsonl(tmp_path / f"{kind}.jsonl", rows)
    out = tmp_path / "eval.json"
    res = CliRunner().invoke(app, ["svf", "eval", "--model", tiny.path, "--task", str(f), "--max-new-tokens", "8",
                                   "--batch", "4", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert f"({kind}): {len(rows)} examples" in res.output and "accuracy" in res.output
    got = json.loads(out.read_text())["results"]["base"]
    assert len(got["completions"]) == len(rows) and got["accuracy"] == pytest.approx(np.mean(got["correct"]))
    task = tasks.load_task(str(f))
    assert task.kind == kind
    assert list(task.score_many(got["completions"], task.references)) == got["correct"]


def test_task_references_from_real_record_formats():
    m = tasks.from_records(MATH_ROWS, "m")
    assert m.kind == "math" and m.references == ("\\frac{1}{2}", "8")
    assert m.score("so the sum is $\\boxed{0.5}$", m.references[0]) == 1.0
    a = tasks.from_records(ARC_ROWS, "a")
    assert a.references[1].labels == ("1", "2", "3", "4") and "3. whale" in a.prompts[1]
    assert a.score("Sharks and trout are fish, frogs are amphibians. The answer is 3.", a.references[1]) == 1.0
    listed = [dict(ARC_ROWS[0], choices=[{"label": "A", "text": "oxygen"}, {"label": "B", "text": "carbon dioxide"}])]
    assert tasks.from_records(listed, "l").references[0].labels == ("A", "B")
    with pytest.raises(tasks.TaskError, match=r"record 0: answerKey 'E' is not one of the labels"):
        tasks.from_records([dict(ARC_ROWS[0], answerKey="E")], "bad")
    with pytest.raises(tasks.TaskError, match="record 0: .*no"):
        tasks.from_records([{"problem": "p", "solution": "no boxed answer here"}], "nobox")
    g = tasks.from_records([{"question": "q", "answer": "Half of 3,000 is 1,500.\n#### 1,500"}], "g")
    assert g.references == ("1,500",) and g.score("... so she pays $1,500.00 in total.", g.references[0]) == 1.0
    with pytest.raises(tasks.TaskError, match="is empty"):
        tasks.from_records([], "empty")


def test_splits_hub_ids_and_folders(tmp_path, monkeypatch):
    import datasets

    calls = []
    gsm = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(30)]

    def fake_load(path, name=None, **kw):
        if path in ("json", "csv", "parquet"):
            return real(path, name, **kw)
        calls.append((path, name))
        if path == "openai/gsm8k":
            return datasets.DatasetDict(train=datasets.Dataset.from_list(gsm[:20]),
                                        test=datasets.Dataset.from_list(gsm[20:]))
        if path == "allenai/ai2_arc":
            ds = datasets.Dataset.from_list(ARC_ROWS)
            return datasets.DatasetDict(train=ds, validation=ds, test=ds)
        raise FileNotFoundError(f"Dataset {path} doesn't exist on the Hub")

    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    tr, val = tasks.train_val("gsm8k", n_val=5, seed=0)
    assert calls[-1] == ("openai/gsm8k", "main") and (len(tr), len(val)) == (15, 5)
    assert set(tr.references + val.references) == {str(i) for i in range(20)}  # carved from train; test unread
    assert tasks.train_val("gsm8k", n_val=5, seed=0)[1].references == val.references  # fixed seed
    test = tasks.load_task("gsm8k")
    assert test.references == tuple(str(i) for i in range(20, 30))
    tr, val = tasks.train_val("allenai/ai2_arc:ARC-Challenge", n_val=1)
    assert calls[-1] == ("allenai/ai2_arc", "ARC-Challenge") and (len(tr), len(val)) == (2, 1)
    with pytest.raises(tasks.TaskError, match="cannot load task 'nope/missing'.*doesn't exist"):
        tasks.load_task("nope/missing")
    d = tmp_path / "gsmdir"
    d.mkdir()
    _write_jsonl(d / "train.jsonl", gsm[:20])
    _write_jsonl(d / "test.jsonl", gsm[20:])
    tr, val = tasks.train_val(str(d), n_val=4)
    assert (len(tr), len(val)) == (16, 4) and tasks.load_task(str(d)).references[0] == "20"
    with pytest.raises(tasks.TaskError, match="has no 'validation' split"):
        tasks.load_task(str(d), split="validation")


def test_code_task_without_a_sandbox_says_why_and_runs_nothing(tiny, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lensjax.cli import app

    marker = tmp_path / "ran.txt"
    rows = [dict(MBPP_ROWS[0], test_list=[f"open({str(marker)!r}, 'w').write('x')"] + MBPP_ROWS[0]["test_list"])] * 3
    f = _write_jsonl(tmp_path / "mbpp.jsonl", rows)
    monkeypatch.setitem(__import__("sys").modules, "resource", None)  # a platform without POSIX rlimits
    for cmd in (["eval"], ["train", "--out", str(tmp_path / "run"), "--n-val", "1", "--steps", "1"]):
        res = CliRunner().invoke(app, ["svf", *cmd, "--model", tiny.path, "--task", str(f)])
        assert res.exit_code == 2 and "the sandbox needs POSIX rlimits" in res.output, res.output
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_every_kind_loads_from_csv_parquet_and_json(tmp_path, fmt):
    import datasets

    for kind, rows in (("math", MATH_ROWS), ("arc", ARC_ROWS), ("mbpp", MBPP_ROWS)):
        f = tmp_path / f"{kind}.{fmt}"
        ds = datasets.Dataset.from_list(rows)
        if fmt == "csv":  # as a spreadsheet export writes nested fields: JSON text in a cell
            ds = ds.map(lambda r: {k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
        getattr(ds, {"csv": "to_csv", "parquet": "to_parquet", "json": "to_json"}[fmt])(str(f))
        got, want = tasks.load_task(str(f)), tasks.from_records(rows, kind)
        assert (got.kind, got.prompts, got.references) == (kind, want.prompts, want.references)


def test_prompts_use_the_chat_template_with_a_system_turn_or_merged(tiny):
    tok = tiny.tokenizer
    task = tasks.from_records([{"question": "What is 2+3?", "answer": "#### 5"}], "g")
    text, special = tasks.format_prompt(tok, task, task.prompts[0])
    assert special and text.startswith(task.spec.instruction) and text.endswith("Question: What is 2+3?\nAnswer:")
    tok = type(tok).from_pretrained(tiny.path)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    text, special = tasks.format_prompt(tok, task, task.prompts[0])
    assert not special and text == f"<s><system>{task.spec.instruction}<user>What is 2+3?<assistant>"
    assert tasks.encode_prompts(tok, task, task.prompts)[0][0] == tok.bos_token_id  # BOS once, from the template
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                         "{% endif %}[{{ m['content'] }}]{% endfor %}")
    text, _ = tasks.format_prompt(tok, task, task.prompts[0])
    assert text == f"[{task.spec.instruction}\n\nWhat is 2+3?]"
    assert task.stop_strings(templated=False) == ("\nQuestion:", "\n\n\n")
