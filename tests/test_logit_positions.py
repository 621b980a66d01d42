"""Logits only at the scored positions (``batch["logit_pos"]``, lensjax.models.lm.logit_positions).

The head, final norm and log-softmax run on K rows per sample instead of T. The per-sample
log-likelihoods and the fine-tuning gradient must stay those of Hugging Face's model on the full
sequence (PyTorch, full logits), for uneven prompts, right padding and a gap in the targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tiny_hf import VOCAB, make

import lensjax
from lensjax.checkpoints.loader import _to_hf
from lensjax.models import lm
from lensjax.selection import finetune as ft_mod
from lensjax.selection.data import Tokenized, make_batch, scored_count


def _batch(rng, B=4, T=16):
    """Prompts of 3, 9, 5 and 12 tokens, rows of 16, 14, 11 and 16 real tokens (right padded);
    row 3 has a one-token gap in its targets (a mask as a user may write it)."""
    ids = rng.integers(3, VOCAB, size=(B, T)).astype(np.int32)
    attn = np.zeros((B, T), bool)
    target = np.zeros((B, T), bool)
    for b, (p, n) in enumerate(((3, 16), (9, 14), (5, 11), (12, 16))):
        attn[b, :n] = True
        target[b, p:n] = True
        ids[b, n:] = 0
    target[3, 14] = False
    return {"ids": ids, "attn": attn, "target": target}


def test_logit_positions_by_hand():
    b = _batch(np.random.default_rng(0))
    pos = lm.logit_positions(b)
    # scored tokens t (target & attn, t >= 1) are read at t - 1: row 0 tokens 3..15 -> 2..14 (13),
    # row 1 9..13 -> 8..12, row 2 5..10 -> 4..9, row 3 12, 13, 15 -> 11, 12, 14; K = 13 -> 16 >= T
    assert pos is None
    pos = lm.logit_positions(b, multiple=1)
    assert pos.shape == (4, 13) and pos.dtype == np.int32
    assert pos[0].tolist() == list(range(2, 15))
    assert pos[1].tolist() == list(range(8, 13)) + [15] * 8
    assert pos[3].tolist() == [11, 12, 14] + [15] * 10
    with pytest.raises(ValueError, match="less than"):
        lm.logit_positions(b, length=12)
    assert lm.with_logit_positions(b) is b  # nothing to save: unchanged


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loglik_and_gradient_match_pytorch_full_logits(tmp_path, family):
    hf = make(family, tmp_path)
    m = lensjax.load(tmp_path)
    b = _batch(np.random.default_rng(1), T=24)  # 13 scored positions at most -> K = 16 of 24
    b["ids"][:, 16:] = 0
    b["attn"][:, 16:] = False
    b["target"][:, 16:] = False
    kb = lm.with_logit_positions(b)
    assert kb["logit_pos"].shape == (4, 16)
    ids = torch.tensor(b["ids"], dtype=torch.long)
    logits = hf(input_ids=ids, attention_mask=torch.tensor(b["attn"], dtype=torch.long)).logits.float()
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    w = torch.tensor(b["target"][:, 1:] & b["attn"][:, 1:], dtype=torch.float32)
    ref_ll = ((lp * w).sum(-1) / w.sum(-1)).detach().numpy()
    hf.zero_grad()
    (-(lp * w).sum() / w.sum()).backward()
    ref_g = {n: p.grad.numpy() for n, p in hf.named_parameters() if p.grad is not None}

    ll = np.asarray(jax.jit(lm.sample_loglik, static_argnums=0)(m.config, m.params, kb))
    np.testing.assert_allclose(ll, ref_ll, rtol=2e-5, atol=2e-5)
    lpk, wk = lm.token_logprobs(m.config, m.params, kb)
    assert lpk.shape == wk.shape == (4, 16) and float(jnp.sum(wk)) == float(w.sum())
    grads = jax.jit(jax.grad(lambda p, x: lm.mean_target_loss(m.config, p, x)))(m.params, kb)
    ours = _to_hf(m.config, grads)
    scale = max(float(np.abs(g).max()) for g in ref_g.values())
    worst = max((float(np.abs(ours[n] - g).max()), n) for n, g in ref_g.items())
    assert worst[0] <= 2e-5 * scale, worst
    # the test can fail: positions one step late score the wrong tokens
    late = {**kb, "logit_pos": np.minimum(kb["logit_pos"] + 1, 23)}
    assert np.abs(np.asarray(lm.sample_loglik(m.config, m.params, late)) - ref_ll).max() > 1e-2


def test_encoder_decoder_scores_decoder_positions(tmp_path):
    hf = make("t5", tmp_path)
    m = lensjax.load(tmp_path)
    rng = np.random.default_rng(2)
    tok = Tokenized(tuple(tuple(int(x) for x in rng.integers(3, VOCAB, size=n)) for n in (20, 9, 30, 14)),
                    (15, 4, 27, 6), decoder_start=m.config.decoder_start_token_id)
    b = make_batch(tok, np.arange(4))
    kb = lm.with_logit_positions(b)
    assert kb["logit_pos"].shape[1] == 8 < b["dec_ids"].shape[1]
    assert max(scored_count(tok, i) for i in range(4)) == 8
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(b["ids"], dtype=torch.long),
                    attention_mask=torch.tensor(b["attn"], dtype=torch.long),
                    decoder_input_ids=torch.tensor(b["dec_ids"], dtype=torch.long),
                    decoder_attention_mask=torch.tensor(b["dec_attn"], dtype=torch.long)).logits.double()
    d = torch.tensor(b["dec_ids"], dtype=torch.long)
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, d[:, 1:, None])[..., 0].numpy()
    w = (b["dec_target"][:, 1:] & b["dec_attn"][:, 1:]).astype(np.float64)
    ref = (lp * w).sum(-1) / w.sum(-1)
    np.testing.assert_allclose(np.asarray(lm.sample_loglik(m.config, m.params, kb)), ref, rtol=1e-4, atol=1e-4)


def test_finetune_same_weights_with_and_without_positions(tmp_path, monkeypatch):
    """The ladder draws its batches with K scored rows per sample; with the full logits instead
    (the Hugging Face-parity path above) the run ends on the same weights."""
    make("llama", tmp_path)
    m = lensjax.load(tmp_path)
    rng = np.random.default_rng(3)
    lens = rng.integers(20, 40, size=24)
    tok = Tokenized(tuple(tuple(int(x) for x in rng.integers(3, VOCAB, size=n)) for n in lens),
                    tuple(int(n) - int(rng.integers(3, 9)) for n in lens))
    ft = ft_mod.FinetuneConfig(batch_size=4, epochs=1, lr=1e-3)
    seen = []
    real = ft_mod.with_logit_positions
    monkeypatch.setattr(ft_mod, "with_logit_positions", lambda b, **kw: seen.append(real(b, **kw)) or seen[-1])
    p1, t1 = ft_mod.finetune(m.config, m.params, tok, np.arange(24), 24, ft)
    assert seen and all(s["logit_pos"].shape == (4, 16) for s in seen)  # targets <= 8 -> 16 of 48
    monkeypatch.setattr(ft_mod, "with_logit_positions", lambda b, **kw: b)
    p0, t0 = ft_mod.finetune(m.config, m.params, tok, np.arange(24), 24, ft)
    assert t0 == t1
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(m.params)))
    assert moved > 1e-4


def test_readme_snippet_runs_as_written(monkeypatch):
    import textwrap
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    section = text[text.index("* Logits only where tokens are scored"):]
    start = section.index("```python") + len("```python")
    code = textwrap.dedent(section[start: section.index("```", start)])
    monkeypatch.chdir(root)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["kept"]["logit_pos"].shape == (2, 8)
    full = lm.mean_target_loss(scope["model"].config, scope["model"].params, scope["batch"])
    np.testing.assert_allclose(float(scope["loss"]), float(full), rtol=1e-6)


def test_evaluate_same_loss_with_and_without_positions(tmp_path, monkeypatch):
    """The held-out evaluation scores with K rows per sample (one K for the set, batches of
    several lengths, a padded last batch); the full-logit path gives the same loss."""
    make("llama", tmp_path)
    m = lensjax.load(tmp_path)
    rng = np.random.default_rng(4)
    lens = [12, 18, 25, 31, 40, 44, 47]
    tok = Tokenized(tuple(tuple(int(x) for x in rng.integers(3, VOCAB, size=n)) for n in lens),
                    tuple(n - int(rng.integers(2, 7)) for n in lens))
    seen = []
    real = ft_mod.with_logit_positions
    monkeypatch.setattr(ft_mod, "with_logit_positions", lambda b, **kw: seen.append(real(b, **kw)) or seen[-1])
    got = ft_mod.evaluate(m.config, m.params, tok, batch_size=3)
    assert seen and all(s["logit_pos"].shape == (3, 16) for s in seen)  # targets <= 6 -> 16 rows
    monkeypatch.setattr(ft_mod, "with_logit_positions", lambda b, **kw: b)
    ref = ft_mod.evaluate(m.config, m.params, tok, batch_size=3)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
