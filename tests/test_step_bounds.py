"""benchmarks/step_bounds.py: the step's weight products from a parameter tree, and a trace of a
program summed by kind of op (counted against hand-derived shapes and a hand-built trace; no
assertion on time)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import step_bounds as sb  # benchmarks/ is on sys.path (tests/conftest.py)


def test_dot_shapes_of_a_stacked_llama_like_tree():
    """3 layers stacked [3, d_in, d_out], an embedding (no product) and a head on 6 of 16 tokens:
    three products per weight, counted per layer, equal shapes merged."""
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    params = {"embed": {"tokens": z(50, 8)},
              "layers": {"attn": {"q": {"w": z(3, 8, 8)}, "o": {"w": z(3, 8, 8)}},
                         "mlp": {"up": {"w": z(3, 8, 20)}, "down": {"w": z(3, 20, 8)}, "norm": {"scale": z(3, 8)}}},
              "lm_head": {"w": z(8, 50)}}
    got = {(e["layout"], e["M"], e["K"], e["N"]): (e["count"], sorted(e["weights"])) for e in sb.dot_shapes(params, 16, 6)}
    want = {("NN", 16, 8, 8): (6, ["o", "q"]), ("NT", 16, 8, 8): (6, ["o", "q"]), ("TN", 8, 16, 8): (6, ["o", "q"]),
            ("NN", 16, 8, 20): (3, ["up"]), ("NT", 16, 20, 8): (3, ["up"]), ("TN", 8, 16, 20): (3, ["up"]),
            ("NN", 16, 20, 8): (3, ["down"]), ("NT", 16, 8, 20): (3, ["down"]), ("TN", 20, 16, 8): (3, ["down"]),
            ("NN", 6, 8, 50): (1, ["head"]), ("NT", 6, 50, 8): (1, ["head"]), ("TN", 8, 6, 50): (1, ["head"])}
    assert got == want
    total = sum(e["gflop"] for e in sb.dot_shapes(params, 16, 6))
    # 3 products of 2·tokens·d_in·d_out FLOPs per weight
    assert total == pytest.approx(3 * 2 * (16 * 3 * (64 + 64 + 160 + 160) + 6 * 400) / 1e9)


def test_dot_shapes_are_timed_on_every_library():
    shapes = sb.dot_shapes({"lm_head": {"w": np.zeros((16, 32), np.float32)}}, 8)
    r = sb.time_dot_shapes(shapes, repeats=1, torch_threads=1)
    libs = {"xla", "numpy", "torch"} if jax.default_backend() == "cpu" else {"xla"}
    assert all(set(s["gflop_s"]) == libs and min(s["gflop_s"].values()) > 0 for s in r["shapes"])
    assert set(r["dots_alone_s"]) == libs and r["gflop"] == pytest.approx(3 * 2 * 8 * 16 * 32 / 1e9)


def test_kinds_of_xla_cpu_op_names():
    k = sb.kind_of
    assert [k(n) for n in ("dot.10", "dot_general.84", "wrapped_broadcast.6", "bitcast_dynamic-update-slice_fusion.2",
                           "copy_bitcast_fusion.6", "transpose_copy_fusion.2", "wrapped_copy.1", "wrapped_reduce-window.14",
                           "multiply_divide_fusion", "wrapped_tanh", "while.6", "custom-call.3")] == [
        "dot launches", "dot launches", "zero-fill broadcasts", "dynamic-update-slices", "copies and transposes",
        "copies and transposes", "copies and transposes", "reductions", "element-wise fusions", "element-wise fusions",
        "loop control", "other ops"]


def test_trace_summary_counts_only_the_programs_ops_per_step():
    ev = [{"ph": "X", "name": "dot.1", "dur": 400.0, "tid": 1},
          {"ph": "X", "name": "add_fusion", "dur": 3000.0, "tid": 1},
          {"ph": "X", "name": "add_fusion", "dur": 1000.0, "tid": 2},
          {"ph": "X", "name": "wrapped_broadcast", "dur": 2000.0, "tid": 2},
          {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9e6, "tid": 3},  # not an op of the program
          {"ph": "i", "name": "add_fusion", "tid": 1}]  # not a complete event
    s = sb.summarise_trace(ev, {"dot.1", "add_fusion", "wrapped_broadcast"}, steps=2)
    assert s["ms_per_step"]["element-wise fusions"] == pytest.approx(2.0)
    assert s["ms_per_step"]["zero-fill broadcasts"] == pytest.approx(1.0)
    assert s["ms_per_step"]["dot launches"] == pytest.approx(0.2)
    assert s["non_dot_op_ms_per_step"] == pytest.approx(3.0) and s["threads"] == 2
    assert s["top_ops_ms_per_step"][0] == ["add_fusion", 2.0]


def test_profile_of_a_jitted_program():
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    x = jnp.ones((64, 32))
    f(x).block_until_ready()
    hlo = f.lower(x).compile().as_text()
    names = sb.op_names_of(hlo)
    assert names and all(" " not in n for n in names)
    p = sb.profile(lambda: [f(x).block_until_ready() for _ in range(3)], hlo, 3)
    if jax.default_backend() != "cpu":
        assert "error" in p
        return
    assert set(p["ms_per_step"]) == set(sb.KINDS) and p["steps"] == 3 and p["wall_ms_per_step"] > 0
    assert min(p["ms_per_step"].values()) >= 0 and p["top_ops_ms_per_step"]  # the program's ops were traced
    assert all(op in names for op, _ in p["top_ops_ms_per_step"])
