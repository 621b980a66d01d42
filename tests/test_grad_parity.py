"""The fine-tuning gradient against PyTorch autograd.

lensjax's ``jax.grad`` of the mean target loss (through the layer scan, whose save policy
recomputes the element-wise work of each layer in the backward pass) must equal the gradient that
``loss.backward()`` gives Hugging Face's model, tensor by tensor under HF's names: with the
default policy and with everything saved.
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
from lensjax.models import transformer
from lensjax.models.lm import mean_target_loss


def _batch(rng, B=3, T=12):
    ids = rng.integers(3, VOCAB, size=(B, T)).astype(np.int32)
    attn = np.ones((B, T), bool)
    attn[0, -3:] = False  # right padding, as make_batch writes it
    attn[1, -1:] = False
    target = np.zeros((B, T), bool)
    target[:, 5:] = True  # prompt, then the target part
    return {"ids": ids, "attn": attn, "target": target}


def _torch_grads(hf, batch) -> dict[str, np.ndarray]:
    hf.zero_grad()
    ids = torch.tensor(batch["ids"], dtype=torch.long)
    logits = hf(input_ids=ids, attention_mask=torch.tensor(batch["attn"], dtype=torch.long)).logits.float()
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    w = torch.tensor(batch["target"][:, 1:] & batch["attn"][:, 1:], dtype=torch.float32)
    (-(lp * w).sum() / w.sum()).backward()
    return {n: p.grad.numpy().copy() for n, p in hf.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("policy", ["default", "save_everything"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "phi"])
def test_gradient_matches_pytorch_autograd(tmp_path, monkeypatch, family, policy):
    hf = make(family, tmp_path)
    if policy == "save_everything":
        monkeypatch.setattr(transformer, "LAYER_SAVE_POLICY", None)
    m = lensjax.load(tmp_path)
    batch = _batch(np.random.default_rng(0))
    grads = jax.jit(jax.grad(lambda p, b: mean_target_loss(m.config, p, b)))(
        m.params, {k: jnp.asarray(v) for k, v in batch.items()})
    ours = _to_hf(m.config, grads)
    ref = _torch_grads(hf, batch)
    missing = sorted(set(ref) - set(ours))
    assert not missing, f"no lensjax gradient for {missing}"
    scale = max(float(np.abs(g).max()) for g in ref.values())
    worst = max((float(np.abs(ours[n] - g).max()), n) for n, g in ref.items())
    assert worst[0] <= 2e-5 * scale, f"{family}: {worst[1]} differs by {worst[0]:.3g} (largest gradient {scale:.3g})"
    # the test can fail: a perturbed gradient is caught
    name = max(ref, key=lambda n: float(np.abs(ref[n]).max()))
    assert float(np.abs(ours[name] * 1.001 - ref[name]).max()) > 2e-5 * scale


def test_layer_scan_keeps_less_for_the_backward_pass(tmp_path, monkeypatch):
    """The point of the save policy: the compiled gradient's temporary memory (the stacked
    per-layer residuals) shrinks against saving everything."""
    make("llama", tmp_path)
    m = lensjax.load(tmp_path)
    batch = {k: jnp.asarray(v) for k, v in _batch(np.random.default_rng(0), B=8, T=64).items()}

    def temp_bytes():
        g = jax.jit(jax.grad(lambda p, b: mean_target_loss(m.config, p, b)))
        return g.lower(m.params, batch).compile().memory_analysis().temp_size_in_bytes

    default = temp_bytes()
    monkeypatch.setattr(transformer, "LAYER_SAVE_POLICY", None)
    everything = temp_bytes()
    assert default < 0.8 * everything, (default, everything)
