"""Mixed-precision training (``compute_dtype="bfloat16"``, ``lensjax.kernels.mixed``).

The kernel's three dots against NumPy float64 products of the same bfloat16-rounded operands
(ml_dtypes rounds them; float32 accumulation is the only difference left), and the whole model's
mixed gradient against PyTorch float64 autograd, where bfloat16 operands bound the error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import torch
from tiny_hf import make

import lensjax
from lensjax.checkpoints.loader import _to_hf
from lensjax.kernels import mixed
from lensjax.models.lm import mean_target_loss
from lensjax.selection.finetune import FinetuneConfig, compute_config, make_train_step

from test_grad_parity import _batch


def _bf16(a):
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


@pytest.mark.parametrize("n", [12, 24, 20])  # N < K: dw from gᵀ x transposed; N > K: from xᵀ g
@pytest.mark.parametrize("transpose_w", [False, True])
@pytest.mark.parametrize("shape", [(3, 7, 16), (21, 16), (1, 5, 16), (2, 3, 27), (4, 23)])
def test_kernel_equals_float64_products_of_bf16_operands(shape, transpose_w, n):
    rng = np.random.default_rng(0)
    k = shape[-1]  # 16 splits by 8, 27 by 3, 23 not at all (the xᵀ g route whatever N)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    g = rng.standard_normal(shape[:-1] + (n,)).astype(np.float32)
    if transpose_w:  # w stored [N, K] (a tied table); the product and dw are those of its transpose
        y, vjp = jax.vjp(lambda x, wt: mixed.matmul(x, wt, "bfloat16", True), jnp.asarray(x), jnp.asarray(w.T))
        dx, dwt = vjp(jnp.asarray(g))
        dw = dwt.T
    else:
        y, vjp = jax.vjp(lambda x, w: mixed.matmul(x, w, "bfloat16"), jnp.asarray(x), jnp.asarray(w))
        dx, dw = vjp(jnp.asarray(g))
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32
    xb, wb, gb = _bf16(x), _bf16(w), _bf16(g)
    ref = {"y": xb @ wb, "dx": gb @ wb.T, "dw": xb.reshape(-1, k).T @ gb.reshape(-1, n)}
    got = {"y": y, "dx": dx, "dw": dw}
    for k, r in ref.items():
        err = float(np.abs(np.asarray(got[k], np.float64) - r).max() / np.abs(r).max())
        assert err < 1e-6, (k, err)
    # and they are bfloat16 products, not float32 ones: the float32 product is ~1e-3 away
    assert float(np.abs(np.asarray(y, np.float64) - x.astype(np.float64) @ w).max()) > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi"])
def test_mixed_gradient_within_bf16_of_pytorch_float64(tmp_path, family):
    """llama: untied head; gpt2: the head is the token table (tied), with biases and LayerNorms;
    phi: parallel blocks, partial rotary, a head bias."""
    hf = make(family, tmp_path).double()
    m = lensjax.load(tmp_path)
    batch = _batch(np.random.default_rng(0))
    cfg = compute_config(m.config, "bfloat16")
    loss, grads = jax.jit(jax.value_and_grad(lambda p, b: mean_target_loss(cfg, p, b)))(
        m.params, {k: jnp.asarray(v) for k, v in batch.items()})
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    ours = _to_hf(m.config, grads)
    hf.zero_grad()
    ids = torch.tensor(batch["ids"], dtype=torch.long)
    logits = hf(input_ids=ids, attention_mask=torch.tensor(batch["attn"], dtype=torch.long)).logits
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    wt = torch.tensor(batch["target"][:, 1:] & batch["attn"][:, 1:], dtype=torch.float64)
    ref_loss = -(lp * wt).sum() / wt.sum()
    ref_loss.backward()
    ref = {n: p.grad.numpy() for n, p in hf.named_parameters() if p.grad is not None}
    rl = float(ref_loss.detach())
    assert abs(float(loss) - rl) < 1e-2 * abs(rl)
    scale = max(float(np.abs(g).max()) for g in ref.values())
    errs = {n: float(np.abs(ours[n] - g).max()) for n, g in ref.items()}
    worst = max(errs, key=errs.get)
    print(f"{family}: worst {worst} {errs[worst] / scale:.2e} of the largest gradient; loss {float(loss):.6f} vs {float(ref_loss.detach()):.6f}")
    assert errs[worst] <= 2e-2 * scale, f"{family}: {worst} off by {errs[worst]:.3g} (largest gradient {scale:.3g})"
    # bfloat16 is in use: the float32 path is within 2e-5 of this reference (test_grad_parity)
    assert errs[worst] > 1e-4 * scale


def test_mixed_train_step_follows_the_float32_losses(tmp_path):
    make("llama", tmp_path)
    m = lensjax.load(tmp_path)
    batch = {k: jnp.asarray(v) for k, v in _batch(np.random.default_rng(1)).items()}
    tx = optax.adamw(1e-2)
    curves = {}
    for dt in ("float32", "bfloat16"):
        step = make_train_step(m.config, tx, compute_dtype=dt)
        p = jax.tree.map(jnp.copy, m.params)
        s = tx.init(p)
        losses = []
        for _ in range(6):
            p, s, loss = step(p, s, batch)
            losses.append(float(loss))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
        curves[dt] = np.array(losses)
    assert curves["float32"][-1] < curves["float32"][0] - 0.5  # it trains
    np.testing.assert_allclose(curves["bfloat16"], curves["float32"], rtol=2e-2)


def test_compute_dtype_is_checked(tmp_path):
    with pytest.raises(ValueError, match="compute_dtype"):
        FinetuneConfig(compute_dtype="int8")
    make("llama", tmp_path)
    with pytest.raises(ValueError, match="compute_dtype"):
        compute_config(lensjax.load(tmp_path).config, "bf16")


# ------------------------------------------------------------------------------ SVF (Transformer²)
def _svf_setup(tmp_path):
    from lensjax.svf import core

    hf = make("llama", tmp_path).double()
    m = lensjax.load(tmp_path)
    dec = core.decompose_params(m.params, "mlp")
    rng = np.random.default_rng(3)
    z = {p: jnp.asarray(rng.uniform(0.7, 1.3, s.shape), jnp.float32) for p, s in dec.s.items()}
    batch = _batch(np.random.default_rng(4))
    return hf, m, dec, z, batch


def test_svf_mixed_z_gradient_within_bf16_of_pytorch_float64(tmp_path):
    """The REINFORCE loss's gradient with respect to z, W′ = W + U diag(σ ⊙ (z − 1)) Vᵀ for the
    MLP matrices, against PyTorch float64 autograd through the HF model with those weights."""
    from torch.func import functional_call

    from lensjax.kernels import xla
    from lensjax.models.tree import flatten
    from lensjax.svf import core
    from lensjax.svf.trainer import SVFConfig, policy_loss

    hf, m, dec, z, batch = _svf_setup(tmp_path)
    adv = np.linspace(1.0, -0.5, batch["ids"].shape[0]).astype(np.float32)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    cfg = SVFConfig(kl_coef=0.0)
    grads = {}
    for dt in ("float32", "bfloat16"):
        mc = compute_config(m.config, dt)
        d = dec if dt == "float32" else core.cast_factors(dec, dt)
        f = xla.jit(jax.grad(lambda zz, d: policy_loss(mc, cfg, zz, m.params, d, jb, jnp.asarray(adv))[0]),
                    mixed=dt != "float32")
        grads[dt] = {p: np.asarray(g, np.float64) for p, g in f(z, d).items()}
    # PyTorch float64: the same factors, W′ per layer, functional_call, autograd to z
    flat = flatten(m.params)
    zt = {p: torch.tensor(np.asarray(v, np.float64), requires_grad=True) for p, v in z.items()}
    names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    new = {}
    for p in dec.paths:
        w = torch.tensor(np.asarray(flat[p], np.float64))
        u, s, vt = (torch.tensor(np.asarray(a[p], np.float64)) for a in (dec.u, dec.s, dec.vt))
        wp = w + torch.einsum("lir,lr,lro->lio", u, s * (zt[p] - 1.0), vt)  # [L, in, out] = weightᵀ
        for layer in range(wp.shape[0]):
            new[f"model.layers.{layer}.mlp.{names[p.split('/')[2]]}.weight"] = wp[layer].T
    ids = torch.tensor(batch["ids"], dtype=torch.long)
    logits = functional_call(hf, new, args=(), kwargs={"input_ids": ids,
                                                       "attention_mask": torch.tensor(batch["attn"], dtype=torch.long)}).logits
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    wt = torch.tensor(batch["target"][:, 1:] & batch["attn"][:, 1:], dtype=torch.float64)
    loss = -(torch.tensor(adv, dtype=torch.float64) * (lp * wt).sum(-1)).mean()
    loss.backward()
    ref = {p: zt[p].grad.numpy() for p in dec.paths}
    scale = max(float(np.abs(g).max()) for g in ref.values())
    err = {dt: max(float(np.abs(grads[dt][p] - ref[p]).max()) for p in dec.paths) / scale for dt in grads}
    print(f"z gradient vs PyTorch float64, fraction of the largest: {err}")
    assert err["float32"] <= 1e-4  # the reference is the same function
    assert 1e-4 < err["bfloat16"] <= 2e-2


def test_svf_mixed_update_follows_float32(tmp_path):
    from lensjax.svf import core, trainer

    _, m, dec, _, batch = _svf_setup(tmp_path)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    adv = jnp.ones(batch["ids"].shape[0], jnp.float32)
    curves = {}
    for dt in ("float32", "bfloat16"):
        cfg = trainer.SVFConfig(kl_coef=0.1, lr=5e-2, schedule="constant", compute_dtype=dt)
        update = trainer._update_fn(m.config, cfg)
        d = dec if dt == "float32" else core.cast_factors(dec, dt)
        z = core.init_z(dec)
        st = trainer.make_optimizer(cfg).init(z)
        losses = []
        for _ in range(6):
            z, st, info = update(z, st, m.params, d, jb, adv)
            losses.append(float(info["loss"]))
        assert all(v.dtype == jnp.float32 for v in jax.tree.leaves((z, st)) if jnp.issubdtype(v.dtype, jnp.floating))
        curves[dt] = np.array(losses)
    assert curves["float32"][-1] < curves["float32"][0] - 0.05 * abs(curves["float32"][0])  # it trains
    np.testing.assert_allclose(curves["bfloat16"], curves["float32"], rtol=2e-2)
    with pytest.raises(core.SVFError, match="compute_dtype"):
        trainer.SVFConfig(compute_dtype="int8")


def test_svf_kernel_gives_d_gradient_without_a_weight_gradient():
    """kernels.mixed.svf_matmul: y = x (W + U diag(d) Vᵀ); d's gradient Σ (x U) ⊙ (g V) and x's
    against float64 (bf16-operand tolerance), and W, U, Vᵀ frozen (zero cotangents)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, 16)).astype(np.float32)
    w = rng.standard_normal((16, 12)).astype(np.float32)
    u = np.linalg.qr(rng.standard_normal((16, 12)))[0].astype(np.float32)
    vt = np.linalg.qr(rng.standard_normal((12, 12)))[0].astype(np.float32)
    d = rng.uniform(-0.5, 0.5, 12).astype(np.float32)
    g = rng.standard_normal((2, 6, 12)).astype(np.float32)
    args = [jnp.asarray(a) for a in (x, w, u, d, vt)]
    y, vjp = jax.vjp(lambda *a: mixed.svf_matmul(*a, "bfloat16"), *args)
    dx, dw, du, dd, dvt = vjp(jnp.asarray(g))
    x64, w64, u64, d64, vt64, g64 = (a.astype(np.float64) for a in (x, w, u, d, vt, g))
    wp = w64 + u64 @ np.diag(d64) @ vt64
    ref = {"y": x64 @ wp, "dx": g64 @ wp.T,
           "dd": np.einsum("btr,btr->r", x64 @ u64, g64 @ vt64.T)}  # = diag(Uᵀ (xᵀ g) V)
    got = {"y": y, "dx": dx, "dd": dd}
    for k, r in ref.items():
        err = float(np.abs(np.asarray(got[k], np.float64) - r).max() / np.abs(r).max())
        assert 1e-5 < err < 2e-2, (k, err)  # bf16 operands: off by their rounding, not more
    for z in (dw, du, dvt):
        assert not np.any(np.asarray(z))
    # and it is the derivative of the forward: a central difference along a random direction of d
    e = rng.standard_normal(12).astype(np.float32) * 0.1
    f = lambda dd_: float(jnp.sum(mixed.svf_matmul(args[0], args[1], args[2], jnp.asarray(dd_), args[4]) * g))  # noqa: E731
    fd = (f(d + e) - f(d - e)) / 2
    assert float(np.dot(np.asarray(dd), e)) == pytest.approx(fd, rel=3e-2)
