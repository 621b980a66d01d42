"""Transformer² SVF: decomposition and recomposition against NumPy float64, gradients against finite
differences, the KL term, sharding, experts on disk, resumable training, and an end-to-end RL gain."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lensjax
from lensjax.kernels import svd as svd_kernel
from lensjax.svf import core, tasks
from lensjax.svf.experts import export, load_expert, save_expert
from lensjax.svf.rollout import accuracy
from lensjax.svf.trainer import SVFConfig, load_state, make_optimizer, policy_loss, train
from tiny_hf import make_with_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("svf") / "m"
    make_with_tokenizer("llama", d)
    return lensjax.load(d)


def _batch(model, n=4, T=10, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 40, size=(n, T)).astype(np.int32)
    attn = np.ones((n, T), bool)
    target = np.zeros((n, T), bool)
    target[:, 6:] = True
    return {"ids": jnp.asarray(ids), "attn": jnp.asarray(attn), "target": jnp.asarray(target)}


@pytest.mark.parametrize("targets", ["mlp", "attn", "all"])
def test_identity_is_exact_and_random_z_matches_numpy(tiny, targets):
    dec = core.decompose_params(tiny.params, targets)
    z = core.init_z(dec, "paper")
    flat = lensjax.models.tree.flatten(tiny.params)
    ident = lensjax.models.tree.flatten(core.adapted_params(tiny.params, dec, z))
    for p in dec.paths:
        w = np.asarray(flat[p])
        assert np.abs(np.asarray(ident[p]) - w).max() <= 1e-6 * np.abs(w).max()
    ids = np.arange(3, 13)[None]
    base = np.asarray(lensjax.forward(tiny.config, tiny.params, ids))
    for n_tokens in (None, 1):  # dense recomposition and the factored apply
        adapted = core.adapted_params(tiny.params, dec, z, n_tokens=n_tokens)
        np.testing.assert_allclose(np.asarray(lensjax.forward(tiny.config, adapted, ids)), base, atol=1e-6)
    rng = np.random.default_rng(1)
    zr = {p: jnp.asarray(rng.uniform(0.5, 1.5, size=s.shape), jnp.float32) for p, s in dec.s.items()}
    got = lensjax.models.tree.flatten(core.adapted_params(tiny.params, dec, zr))
    for p in dec.paths:
        u, s, vt = (np.asarray(a, np.float64) for a in (dec.u[p], dec.s[p], dec.vt[p]))
        ref = np.einsum("lir,lr,lro->lio", u, s * np.asarray(zr[p], np.float64), vt)
        assert np.abs(np.asarray(got[p], np.float64) - ref).max() <= 1e-5 * np.abs(ref).max()
    # the factored apply equals the dense one
    dense = np.asarray(lensjax.forward(tiny.config, core.adapted_params(tiny.params, dec, zr), ids))
    fact = np.asarray(lensjax.forward(tiny.config, core.adapted_params(tiny.params, dec, zr, n_tokens=1), ids))
    np.testing.assert_allclose(fact, dense, atol=1e-5)


def test_gradient_matches_central_differences(tiny):
    dec = core.decompose_params(tiny.params, "mlp")
    z0 = core.init_z(dec, "paper")
    batch = _batch(tiny)
    adv = jnp.asarray([1.0, -0.5, 0.25, -0.75])
    cfg = SVFConfig(kl_coef=0.3)
    loss = lambda z: policy_loss(tiny.config, cfg, z, tiny.params, dec, batch, adv)[0]  # noqa: E731
    rng = np.random.default_rng(0)
    z = {p: v * jnp.asarray(rng.uniform(0.8, 1.2, v.shape), jnp.float32) for p, v in z0.items()}
    g = jax.grad(loss)(z)
    p = dec.paths[0]
    for idx in [(0, 0), (1, 3), (0, 7)]:
        e = 1e-2
        zp = {**z, p: z[p].at[idx].add(e)}
        zm = {**z, p: z[p].at[idx].add(-e)}
        fd = (float(loss(zp)) - float(loss(zm))) / (2 * e)
        assert float(g[p][idx]) == pytest.approx(fd, rel=2e-2, abs=1e-4)


def test_kl_is_zero_at_identity_and_reference_keeps_sigma_sum(tiny):
    dec = core.decompose_params(tiny.params, "mlp")
    z = core.init_z(dec, "paper")
    _, (_, kl) = policy_loss(tiny.config, SVFConfig(kl_coef=1.0), z, tiny.params, dec, _batch(tiny), jnp.zeros(4))
    assert abs(float(kl)) <= 1e-7
    _, (_, klr) = policy_loss(tiny.config, SVFConfig(kl_coef=1.0, kl="reverse"), z, tiny.params, dec, _batch(tiny), jnp.zeros(4))
    assert abs(float(klr)) <= 1e-7
    zr = core.init_z(dec, "reference", jax.random.key(3))
    g = core.scales(dec, zr, "reference")
    for p in dec.paths:
        np.testing.assert_allclose(np.sum(np.asarray(dec.s[p] * g[p]), -1), np.sum(np.asarray(dec.s[p]), -1), rtol=1e-5)
        assert float(jnp.mean(zr[p])) == pytest.approx(0.1, abs=0.01)


def test_decomposition_cache(tiny, tmp_path):
    a = core.decompose_params(tiny.params, "mlp", cache_dir=tmp_path)
    files = list(tmp_path.glob("svd-*-mlp.safetensors"))
    assert len(files) == 1
    b = core.decompose_params(tiny.params, "mlp", cache_dir=tmp_path)
    for p in a.paths:
        np.testing.assert_array_equal(np.asarray(a.s[p]), np.asarray(b.s[p]))


SHARD = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from lensjax.kernels import svd
    from lensjax.parallel import make_mesh
    assert jax.device_count() == 8
    w = jnp.asarray(np.random.default_rng(0).normal(size=(8, 24, 40)), jnp.float32)
    mesh = make_mesh(candidate=8)
    ws = jax.device_put(w, NamedSharding(mesh, P("candidate")))
    u1, s1, v1 = svd.decompose(w)
    u2, s2, v2 = svd.decompose(ws)
    assert len(s2.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(s2), np.asarray(s1), rtol=1e-6)
    r1 = np.einsum("lir,lr,lro->lio", u1, s1, v1); r2 = np.einsum("lir,lr,lro->lio", u2, s2, v2)
    np.testing.assert_allclose(r2, r1, atol=1e-5)
    print("OK")
    """
)


def test_sharded_decomposition_equals_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stderr[-3000:]


def test_factored_choice_by_token_count():
    assert svd_kernel.prefer_factored(1, 64, 64) and not svd_kernel.prefer_factored(1024, 64, 64)


@pytest.fixture(scope="module")
def pretrained(tiny):
    """The tiny Llama briefly pretrained on synthetic arithmetic so that it is imperfect."""
    from lensjax.selection.data import Pairs, tokenize
    from lensjax.selection.finetune import FinetuneConfig, finetune

    task = tasks.arithmetic(3000, max_operand=9, ops="+-", seed=0)
    tr, rest = task.split(400)
    val, test = rest.split(200)
    tok = tokenize(tiny.tokenizer, Pairs(tr.prompts, tr.references), 32)
    p, _ = finetune(tiny.config, tiny.params, tok, np.arange(len(tok)), len(tok),
                    FinetuneConfig(lr=3e-3, batch_size=16, min_steps=1, epochs=80 * 16 / len(tok), schedule="constant", warmup=0.0))
    return dataclasses.replace(tiny, params=p), tr, val, test


SVF_CFG = SVFConfig(steps=60, targets="all", normalise_rewards=True, batch_prompts=16, samples_per_prompt=8,
                    max_new_tokens=3, lr=2e-2, val_every=10, eval_batch=100, kl_coef=0.0)


@pytest.mark.slow
def test_svf_reinforce_raises_heldout_accuracy_over_three_seeds(pretrained, tmp_path):
    model, tr, val, test = pretrained
    dec = core.decompose_params(model.params, "all")
    base = accuracy(model, model.params, test, max_new_tokens=3)
    assert 0.05 < base < 0.5  # imperfect
    gains = []
    for seed in range(3):
        out = tmp_path / f"s{seed}"
        info = train(model, dec, tr, val, dataclasses.replace(SVF_CFG, seed=seed), out)
        z_best, _ = load_expert(out / "best.safetensors")
        z_final, _, _ = load_state(out, z_best, make_optimizer(SVF_CFG).init(z_best))
        acc = accuracy(model, core.adapted_params(model.params, dec, z_final), test, max_new_tokens=3)
        acc_best = accuracy(model, core.adapted_params(model.params, dec, z_best), test, max_new_tokens=3)
        gains.append(acc - base)
        print(f"seed {seed}: test accuracy base {base:.3f} -> SVF final z {acc:.3f}, best-on-validation z "
              f"{acc_best:.3f} (step {info['best_step']})")
    assert min(gains) >= 0.03, gains


def test_training_resumes_after_a_kill(pretrained, tmp_path):
    model, tr, val, _ = pretrained
    dec = core.decompose_params(model.params, "mlp")
    cfg = dataclasses.replace(SVF_CFG, steps=6, targets="mlp", val_every=3, eval_batch=50)
    val = val.subset(range(50))
    full = train(model, dec, tr, val, cfg, tmp_path / "full")

    def die(rec):
        if rec["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, dec, tr, val, cfg, tmp_path / "part", on_step=die)
    resumed = train(model, dec, tr, val, cfg, tmp_path / "part")
    assert [h["reward"] for h in resumed["history"]] == [h["reward"] for h in full["history"]]
    for name in ("best.safetensors", "state.safetensors"):  # best z and final z (and optimiser state)
        from safetensors.numpy import load_file

        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "part" / name))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_expert_roundtrip_and_export_loads_in_transformers(tiny, tmp_path):
    import torch
    import transformers as tf

    dec = core.decompose_params(tiny.params, "mlp")
    rng = np.random.default_rng(0)
    z = {p: jnp.asarray(rng.uniform(0.5, 1.5, s.shape), jnp.float32) for p, s in dec.s.items()}
    save_expert(tmp_path / "e.safetensors", z, tiny, SVFConfig(), "arithmetic", {"acc": 0.5})
    z2, meta = load_expert(tmp_path / "e.safetensors")
    assert meta["targets"] == "mlp" and meta["metrics"] == {"acc": 0.5} and meta["task"] == "arithmetic"
    out = export(tiny, dec, z2, meta, tmp_path / "merged")
    hf = tf.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = np.arange(3, 13)[None]
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(lensjax.forward(tiny.config, core.adapted_params(tiny.params, dec, z2), ids))
    np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_svf_cli(tiny, tmp_path):
    from typer.testing import CliRunner

    from lensjax.cli import app

    r = CliRunner()
    m = tiny.path
    res = r.invoke(app, ["svf", "decompose", "--model", m, "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 0 and "layers/mlp/up/w" in res.output, res.output
    res = r.invoke(app, ["svf", "train", "--model", m, "--steps", "2", "--out", str(tmp_path / "run"), "--limit", "200",
                         "--max-new-tokens", "3", "--val-every", "1", "--n-val", "50", "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    expert = tmp_path / "run" / "best.safetensors"
    res = r.invoke(app, ["svf", "eval", "--model", m, "--expert", str(expert), "--limit", "50", "--max-new-tokens", "3"])
    assert res.exit_code == 0 and "base" in res.output, res.output
    res = r.invoke(app, ["svf", "export", "--model", m, "--expert", str(expert), "--out", str(tmp_path / "merged")])
    assert res.exit_code == 0 and (tmp_path / "merged" / "model.safetensors").exists(), res.output
    res = r.invoke(app, ["svf", "train", "--model", m, "--task", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "cannot load task" in res.output


def test_svf_bad_inputs(tiny, tmp_path):
    dec = core.decompose_params(tiny.params, "mlp")
    z = core.init_z(dec)
    save_expert(tmp_path / "e.safetensors", z, tiny, SVFConfig(), "t", {})
    _, meta = load_expert(tmp_path / "e.safetensors")
    other = jax.tree.map(lambda a: a * 1.01, tiny.params)  # same shapes, other weights
    with pytest.raises(core.SVFError, match="trained on another base model"):
        export(dataclasses.replace(tiny, params=other), core.decompose_params(other, "mlp"), z, meta, tmp_path / "x")
    bad = {p: v[:, :5] for p, v in z.items()}
    with pytest.raises(core.SVFError, match=r"has shape \(2, 5\), the model needs \(2, 32\)"):
        export(tiny, dec, bad, meta, tmp_path / "y")
    with pytest.raises(core.SVFError, match="target different matrices"):
        export(tiny, core.decompose_params(tiny.params, "attn"), z, meta, tmp_path / "z")
    with pytest.raises(core.SVFError, match="unknown targets 'ffn'; choose one of mlp, attn, all"):
        core.decompose_params(tiny.params, "ffn")
    f = tmp_path / "t.jsonl"
    f.write_text('{"prompt": "1+1", "label": "2"}\n')
    with pytest.raises(tasks.TaskError, match=r"none of the field sets .*gsm8k: question, answer.*"
                                              r"humaneval: prompt, test, entry_point.*found \['label', 'prompt'\]"):
        tasks.load_task(str(f))
    g = tmp_path / "gsm.jsonl"
    g.write_text('{"question": "2+3?", "answer": "It is 5.\\n#### 5"}\n')
    t = tasks.load_task(str(g))
    assert t.kind == "gsm8k" and t.references == ("5",) and t.score("The answer is 5", t.references[0]) == 1.0
