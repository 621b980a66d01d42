"""k AdamW steps per call (``make_train_steps``, ``FinetuneConfig.steps_per_call``).

The k-step program's losses follow PyTorch's ``torch.optim.AdamW`` on Hugging Face's model over
the same batches, and equal k calls of the single-step program to float32 rounding (XLA fuses
the scanned step a little differently: 1-ulp differences in a tiny model's losses);
``finetune`` returns the same weights, step count, development history and per-step losses
whatever its steps per call, early stopping included.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from tiny_hf import make

import lensjax
from lensjax.selection.data import Tokenized
from lensjax.selection.finetune import FinetuneConfig, finetune, make_train_step, make_train_steps

from test_grad_parity import _batch

LR, WD, K = 1e-2, 1e-3, 4


def _stack(batches):
    return {k: jnp.asarray(np.stack([b[k] for b in batches])) for k in batches[0]}


def _torch_losses(hf, batches):
    opt = torch.optim.AdamW(hf.parameters(), lr=LR, weight_decay=WD, eps=1e-8)
    out = []
    for b in batches:
        ids = torch.tensor(b["ids"], dtype=torch.long)
        logits = hf(input_ids=ids, attention_mask=torch.tensor(b["attn"], dtype=torch.long)).logits.float()
        lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
        w = torch.tensor(b["target"][:, 1:] & b["attn"][:, 1:], dtype=torch.float32)
        loss = -(lp * w).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(float(loss.detach()))
    return np.array(out)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_k_steps_per_call_follow_pytorch_adamw_and_equal_single_steps(tmp_path, dtype):
    hf = make("llama", tmp_path)
    m = lensjax.load(tmp_path)
    rng = np.random.default_rng(3)
    batches = [_batch(rng) for _ in range(K)]
    tx = optax.adamw(LR, weight_decay=WD)

    one = make_train_step(m.config, tx, compute_dtype=dtype)
    p1 = jax.tree.map(jnp.copy, m.params)
    s1 = tx.init(p1)
    single = []
    for b in batches:
        p1, s1, loss = one(p1, s1, {k: jnp.asarray(v) for k, v in b.items()})
        single.append(np.float32(loss))

    many = make_train_steps(m.config, tx, compute_dtype=dtype)
    pk = jax.tree.map(jnp.copy, m.params)
    pk, sk, losses = many(pk, tx.init(pk), _stack(batches))
    assert losses.shape == (K,) and losses.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(losses), np.array(single), rtol=1e-6)
    for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((pk, sk))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)

    ref = _torch_losses(hf, batches)
    assert ref[-1] < ref[0] - 0.1  # the steps train
    tol = 1e-5 if dtype == "float32" else 2e-2  # bf16 operands bound the mixed run
    np.testing.assert_allclose(np.asarray(losses), ref, rtol=tol)
    if dtype == "float32":  # the comparison can fail: one step's learning rate off by 10% is caught
        tx2 = optax.adamw(LR * 1.1, weight_decay=WD)
        p2 = jax.tree.map(jnp.copy, m.params)
        _, _, off = make_train_steps(m.config, tx2)(p2, tx2.init(p2), _stack(batches))
        assert np.abs(np.asarray(off) - ref).max() > 1e-5 * np.abs(ref).max()


def _data(n=48, seed=0, lo=3, hi=128):
    rng = np.random.default_rng(seed)
    ids = tuple(tuple(int(x) for x in rng.integers(lo, hi, size=int(k))) for k in rng.integers(6, 20, size=n))
    return Tokenized(ids=ids, n_prompt=tuple(3 for _ in ids))


def _same(a, b, k):
    (pa, ta, ha, sa), (pb, tb, hb, sb) = a, b
    assert tb == ta and [i for i, _ in hb] == [i for i, _ in ha] and [i for i, _ in sb] == [i for i, _ in sa], k
    np.testing.assert_allclose([x for _, x in hb], [x for _, x in ha], rtol=1e-5)
    np.testing.assert_allclose([x for _, x in sb], [x for _, x in sa], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_finetune_is_the_same_at_any_steps_per_call(tmp_path):
    make("llama", tmp_path)
    m = lensjax.load(tmp_path)
    # development tokens the training set never has: fitting the training tokens soon raises
    # their loss, so early stopping ends the run
    tok, dev = _data(48, hi=64), _data(12, seed=1, lo=64)
    order = np.arange(len(tok))

    def run(ft, **kw):
        seen, hist = [], []
        p, t = finetune(m.config, m.params, tok, order, 40, ft, history=hist,
                        on_step=lambda i, loss: seen.append((i, float(loss))), **kw)
        return p, t, hist, seen

    # 23 steps without early stopping: 4 per call runs 5 calls of 4 and 3 single steps
    plain = FinetuneConfig(lr=1e-2, batch_size=4, min_steps=23, epochs=0.0, warmup=0.2)
    one = run(dataclasses.replace(plain, steps_per_call=1))
    assert one[1] == 23 and [i for i, _ in one[3]] == list(range(23))
    _same(one, run(dataclasses.replace(plain, steps_per_call=4)), 4)

    # early stopping, evaluations every 5 steps (2 and 4 per call fit between them)
    early = dataclasses.replace(plain, patience=1, eval_every=5)
    one = run(dataclasses.replace(early, steps_per_call=1), dev=dev)
    p1, t1, h1, s1 = one
    assert h1[0][0] == 5 and len(s1) < 23 and t1 < len(s1), (t1, h1, len(s1))  # it stopped early, kept earlier weights
    for k in (2, 4):
        _same(one, run(dataclasses.replace(early, steps_per_call=k), dev=dev), k)
    # the record (the curves' protocol) does not carry how the steps were dispatched
    assert "steps_per_call" not in early.record() and early.record()["eval_every"] == 5
    with pytest.raises(ValueError, match="steps_per_call"):
        FinetuneConfig(steps_per_call=0)
