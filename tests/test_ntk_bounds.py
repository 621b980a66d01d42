"""benchmarks/ntk_bounds.py: the Grams of the exact NTK's dense taps from a parameter tree (against
hand-derived routes and pieces), and its blocks timed by parameter group (no assertion on time)."""

import jax
import numpy as np
import ntk_bounds as nb  # benchmarks/ is on sys.path (tests/conftest.py)
import pytest

from lensjax.config import ModelConfig


def _llama_like(L=2, d=256, f=1024, V=8192, kv=128, tied=False):
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    cfg = ModelConfig(family="llama", vocab_size=V, hidden_size=d, num_layers=L, num_heads=8, num_kv_heads=4,
                      head_dim=d // 8, intermediate_size=f, max_positions=128, norm="rmsnorm", norm_eps=1e-6,
                      tie_word_embeddings=tied)
    params = {"embed": {"tokens": z(V, d)}, "final_norm": {"scale": z(d)},
              "layers": {"attn": {"q": {"w": z(L, d, d)}, "k": {"w": z(L, d, kv)}, "v": {"w": z(L, d, kv)},
                                  "o": {"w": z(L, d, d)}},
                         "attn_norm": {"scale": z(L, d)}, "mlp_norm": {"scale": z(L, d)},
                         "mlp": {"up": {"w": z(L, d, f)}, "gate": {"w": z(L, d, f)}, "down": {"w": z(L, f, d)}}}}
    if not tied:
        params["lm_head"] = {"w": z(d, V)}
    return cfg, params


def test_gram_shapes_of_the_benchmark_llama():
    """n = 64 samples of T = 64 positions, the head on 32 scored ones. Per matrix, per-sample
    gradients cost 2·n·T·d·e + 2·n²·d·e FLOPs against 2·(nT)²·(d + e) for token Grams, so every
    dense weight takes the per-sample route. An MLP matrix's [64, 256, 1024] floats (64 MiB) are
    more than 32 MiB: 2 pieces of 128 MiB at most, along d_in for up and gate (d_in < d_out ≤
    4·d_in), along d_out for down. The head's [64, 256, 8192] (512 MiB): 4 pieces along the
    vocabulary. q, k, v, o fit in one piece. The token table is tapped by the id-masked route, the
    norms by their own small Grams: no entry."""
    cfg, params = _llama_like()
    got = {e["K"]: (e["count"], sorted(e["weights"])) for e in nb.gram_shapes(cfg, params, 64, 64, 32)}
    assert got == {256 * 1024 // 2: (2 * 3 * 2, ["down", "gate", "up"]), 256 * 8192 // 4: (4, ["head"]),
                   256 * 256: (2 * 2, ["o", "q"]), 256 * 128: (2 * 2, ["k", "v"])}
    shapes = nb.gram_shapes(cfg, params, 64, 64, 32)
    assert all(e["layout"] == "NT" and e["M"] == e["N"] == 64 for e in shapes)
    # the Grams' FLOPs: 2·n² per entry of every weight (each weight's pieces cover it once)
    weights = 2 * (256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 1024) + 256 * 8192
    assert sum(e["gflop"] for e in shapes) == pytest.approx(2 * 64 * 64 * weights / 1e9)


def test_token_route_and_tied_head_have_no_grams():
    """Few short samples (n = T = 2): token Grams, 2·(nT)²·(d + e) FLOPs, cost less than per-sample
    gradients, 2·n·T·d·e + 2·n²·d·e, for every matrix here, so no Gram is listed. At n = T = 64
    the same small model's head takes the per-sample route, unless it is tied (its table is used
    twice, so it is not tapped)."""
    cfg, params = _llama_like(L=1, d=32, f=64, V=50, kv=16)
    assert nb.gram_shapes(cfg, params, 2, 2) == []
    assert any("head" in e["weights"] for e in nb.gram_shapes(cfg, params, 64, 64))
    cfg, params = _llama_like(L=1, d=32, f=64, V=50, kv=16, tied=True)
    assert not any("head" in e["weights"] for e in nb.gram_shapes(cfg, params, 64, 64))


def test_block_times_leave_each_group_out_and_subtract():
    """A stand-in NTK whose time is what its mask keeps: the groups' shares come back as the
    whole time minus the time without them, and a group the tree lacks is not run."""
    cfg, params = _llama_like(L=1, d=8, f=16, V=20, kv=8)
    del params["lm_head"]
    seen = []

    def run(mask):
        kept = None if mask is None else sorted({jax.tree_util.keystr(p[:2]) for p, m in
                                                 jax.tree_util.tree_leaves_with_path(mask) if m})
        seen.append(kept)
        return np.zeros(())

    r = nb.block_times(run, params, repeats=1)
    assert set(r["times_s"]) == {"all", "without MLP", "without attention", "without embedding tables", "norms only"}
    assert set(r["groups_s"]) == {"MLP", "attention", "embedding tables"}
    norms_only = seen[-1]  # the last variant: every group out, the norms kept
    assert norms_only == ["['final_norm']['scale']", "['layers']['attn_norm']", "['layers']['mlp_norm']"]
    for g, s in r["groups_s"].items():
        assert s == pytest.approx(r["times_s"]["all"] - r["times_s"][f"without {g}"])
