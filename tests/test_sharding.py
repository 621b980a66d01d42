"""The batched fit sharded over a `candidate` mesh axis of 8 fake CPU devices gives the same numbers."""

import os
import subprocess
import sys
import textwrap
import pytest

SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np
    from lensjax.parallel import make_mesh
    from lensjax.selection.curves import load_embedded
    from lensjax.selection.fit import fit_curves
    from lensjax.selection.selectors import Protocol, RATIOS

    assert jax.device_count() == 8, jax.devices()
    d, y, m = [], [], []
    for name in ("flan", "gigaword"):
        c = load_embedded(name)
        for r in RATIOS:
            cols = np.isin(c.sizes, np.concatenate([[0.0], Protocol(ratio=r).ladder(c.sizes)]))
            d.append(np.broadcast_to(c.sizes, c.loss.shape)); y.append(c.loss)
            m.append(np.isfinite(c.loss) & cols[None, :])
    d, y, m = np.concatenate(d), np.concatenate(y), np.concatenate(m)
    n = 418  # not a multiple of 8: exercises the padding
    single = fit_curves("rectified", d[:n], y[:n], m[:n])
    mesh = make_mesh(candidate=8)
    sharded = fit_curves("rectified", d[:n], y[:n], m[:n], mesh=mesh)
    np.testing.assert_allclose(sharded.objective, single.objective, rtol=1e-10, atol=0)
    # Parameters along flat directions (E -> 0) may differ by rounding (XLA vectorises a shard of
    # 53 problems differently from 418); what the fit determines must agree.
    np.testing.assert_allclose(sharded.predict(1_638_400), single.predict(1_638_400), rtol=1e-7)
    np.testing.assert_allclose(sharded.predict(d[:n]), single.predict(d[:n]), rtol=1e-7)
    assert (sharded.converged == single.converged).all()
    # The joint (empirical-Bayes) fit: its per-group sums become cross-device reductions.
    from lensjax.selection.fit import fit_curves_joint
    g = np.repeat(np.arange(14), 30)[:n]
    js = fit_curves_joint("rectified_nofloor", d[:n], y[:n], m[:n], group=g)
    jm = fit_curves_joint("rectified_nofloor", d[:n], y[:n], m[:n], group=g, mesh=mesh)
    np.testing.assert_allclose(jm.group_mean["beta"], js.group_mean["beta"], rtol=1e-9)
    np.testing.assert_allclose(jm.group_tau["beta"], js.group_tau["beta"], rtol=1e-9)
    np.testing.assert_allclose(jm.predict(1_638_400), js.predict(1_638_400), rtol=1e-7)
    print("OK", n, float(np.max(np.abs(sharded.objective - single.objective))))
    """
)


@pytest.mark.slow
@pytest.mark.heavy  # 102 s; the sharded fit is also checked by test_scale_out's two-process run
def test_fit_on_8_fake_devices_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK 418")


NTK_SCRIPT = textwrap.dedent(
    """
    import sys, tempfile
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, sys.argv[1])
    import lensjax
    from lensjax.models import lm_ntk
    from lensjax.parallel import make_mesh, shard_batch, shard_params
    from tiny_hf import make

    d = tempfile.mkdtemp()
    make("llama", d, gqa=True)
    m = lensjax.load(d)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 100, size=(8, 12)).astype(np.int32)
    attn = np.ones((8, 12), bool); attn[3, 9:] = False
    target = np.zeros((8, 12), bool); target[:, 6:] = True
    batch = {"ids": jnp.asarray(ids), "attn": jnp.asarray(attn), "target": jnp.asarray(target)}
    single = np.asarray(lm_ntk.ntk_exact(m.config, m.params, batch))
    mesh = make_mesh(data=2, fsdp=4)
    K = lm_ntk.ntk_exact(m.config, shard_params(m.params, m.config, mesh), shard_batch(batch, mesh))
    err = np.abs(np.asarray(K) - single).max() / np.abs(single).max()
    assert err <= 1e-5, err
    print("OK", err)
    """
)


@pytest.mark.slow
def test_tapped_ntk_on_8_fake_devices_matches_single_device():
    """The Gram-tap NTK with fsdp-sharded parameters and a data-sharded probe batch equals one device."""
    from pathlib import Path

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    tests = str(Path(__file__).resolve().parent)
    out = subprocess.run([sys.executable, "-c", NTK_SCRIPT, tests], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("OK")
