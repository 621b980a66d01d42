"""kernels/xla.py: per-program compiler options by backend, picked at the first call."""

import os
import subprocess
import sys

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lensjax.kernels import xla

# the tests of the options need them in force (CPU, LENSJAX_XLA_OPTIONS unset);
# the backend is asked when the test runs, not at collection (which would start JAX's backends)
needs_options = pytest.mark.skipif(
    "__import__('jax').default_backend() != 'cpu' or __import__('os').environ.get('LENSJAX_XLA_OPTIONS', '1') == '0'",
    reason="the compiler options apply on CPU only, when not turned off")


@needs_options
def test_cpu_programs_compile_without_the_ynn_dot_path():
    assert dict(xla.compiler_options("cpu")) == xla.CPU_OPTIONS
    assert xla.compiler_options("gpu") == () and xla.compiler_options("tpu") == ()
    f = xla.jit(lambda a, b: a @ b)
    a = jnp.ones((64, 4096))
    assert "__ynn" in jax.jit(lambda a, b: a @ b).lower(a, a.T).compile().as_text()  # the default path
    assert "__ynn" not in f.lower(a, a.T).compile().as_text()
    np.testing.assert_allclose(np.asarray(f(a, a.T)), np.asarray(a @ a.T), rtol=1e-6)


@needs_options
def test_cpu_programs_keep_row_reductions_in_ynn():
    """A softmax's max and sum stay one YNN reduction each (with no YNN at all, XLA CPU rewrites
    them into a reduce-window and a reduce), and agree with NumPy's float64 softmax."""
    s = np.random.default_rng(0).standard_normal((64, 8192)).astype(np.float32) * 4
    f = xla.jit(lambda s: jax.nn.log_softmax(s, axis=-1))
    text = f.lower(s).compile().as_text()
    assert "__ynn_fusion" in text and "reduce-window" not in text
    s64 = s.astype(np.float64)
    ref = s64 - s64.max(-1, keepdims=True)
    ref -= np.log(np.exp(ref).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(f(s), np.float64), ref, rtol=0, atol=1e-5)


def test_importing_lensjax_does_not_start_the_backends():
    code = ("import lensjax, lensjax.kernels.ntk, lensjax.selection.pipeline, jax; "
            "jax.config.update('jax_num_cpu_devices', 3); print(jax.device_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "3"


def test_the_options_can_be_turned_off():
    code = "from lensjax.kernels import xla; print(xla.compiler_options('cpu'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, LENSJAX_XLA_OPTIONS="0"))
    assert out.stdout.strip() == "()", out.stderr[-2000:]


@needs_options
def test_mixed_programs_keep_bfloat16_stacks_through_the_layer_scan():
    """XLA CPU's float normalization converts every bf16 array entering a while loop to a float32
    copy of the whole stack; the mixed programs turn that pass off (kernels/xla.py)."""
    bf = jnp.bfloat16
    ws = jax.random.normal(jax.random.key(0), (6, 64, 96), jnp.float32).astype(bf)
    x = jax.random.normal(jax.random.key(1), (8, 64), jnp.float32).astype(bf)

    def f(ws, x):
        def body(c, w):
            y = jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            return c + jnp.sum(y * y), y.astype(bf)
        return jax.lax.scan(body, jnp.float32(0), ws)

    assert dict(xla.compiler_options("cpu", mixed=True)) == xla.MIXED_CPU_OPTIONS
    plain = jax.jit(f).lower(ws, x).compile().as_text()
    mixed = xla.jit(f, mixed=True).lower(ws, x).compile().as_text()
    assert "f32[6,64,96]" in plain  # the backend's default: a float32 copy of the stacked weights
    assert "f32[6,64,96]" not in mixed and "f32[6,8,96]" not in mixed
    (c0, y0), (c1, y1) = jax.jit(f)(ws, x), xla.jit(f, mixed=True)(ws, x)
    w64, x64 = np.asarray(ws, np.float64), np.asarray(x, np.float64)
    ref = np.einsum("ik,lkj->lij", x64, w64)
    assert abs(float(c1) - (ref ** 2).sum()) <= 1e-5 * (ref ** 2).sum()
    # the same products, rounded to bf16: at most one bf16 step apart where summation order differs
    np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y0, np.float32), rtol=2 ** -7, atol=1e-6)
    np.testing.assert_allclose(float(c1), float(c0), rtol=1e-6)


@needs_options
def test_a_mixed_program_the_options_cannot_compile_falls_back_with_a_warning():
    """A bf16 x bf16 -> bf16 dot (bfloat16 parameters) does not compile on XLA CPU without float
    normalization; xla.jit compiles those inputs again with the backend's defaults and says so
    once, while float32 inputs of the same function keep the options."""
    bf = jnp.bfloat16
    a32 = jax.random.normal(jax.random.key(0), (64, 32), jnp.float32)
    b32 = jax.random.normal(jax.random.key(1), (32, 48), jnp.float32)
    a, b = a32.astype(bf), b32.astype(bf)
    f = xla.jit(lambda a, b: a @ b, mixed=True)
    with pytest.warns(RuntimeWarning, match="compiling these inputs with the backend's defaults"):
        y = f(a, b)
    assert y.dtype == bf
    ref = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=2e-2 * np.abs(ref).max())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a second warning nor a second refusal
        np.testing.assert_array_equal(np.asarray(f(a, b), np.float32), np.asarray(y, np.float32))
        y32 = f(a32, b32)  # float32 inputs: compiled with the options, no fallback
    assert list(f._checked.values()).count(False) == 1 and f._opts[True] == xla.MIXED_CPU_OPTIONS
    np.testing.assert_allclose(np.asarray(y32, np.float64), np.asarray(a32, np.float64) @ np.asarray(b32, np.float64),
                               rtol=1e-5, atol=1e-5)


def _bf16_dot(a, b):
    return jax.lax.dot_general(a, b, (((2,), (2,)), ((0, 1), (0, 1))), preferred_element_type=jnp.float32)


@needs_options
def test_a_bf16_dot_outside_ynn_is_found_in_the_compiled_program():
    """bf16 x bf16 -> f32 dots that YNN takes pass; one it leaves to XLA's own emitters (which have
    no bfloat16: DotThunk fails when the program runs, not when it compiles) is found, so the
    program falls back before it runs."""
    bf = jnp.bfloat16
    a, b = jnp.ones((64, 32), bf), jnp.ones((32, 48), bf)
    ok = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32),
                 compiler_options=xla.MIXED_CPU_OPTIONS).lower(a, b).compile().as_text()
    assert "__ynn_fusion" in ok and not xla.bf16_dots_outside_ynn(ok)
    # the dot XLA left outside YNN in a tiny T5's cross-attention (its compiled text, abridged)
    bad = """HloModule jit_forward_encdec, is_scheduled=true

%fused_computation.7 (param_0: bf16[14,32], param_1: bf16[32,32]) -> f32[14,32] {
  %param_0 = bf16[14,32]{1,0} parameter(0)
  %param_1 = bf16[32,32]{1,0} parameter(1)
  ROOT %dot_general.65 = f32[14,32]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.38 (Arg_0.1: bf16[2,4,7,8], Arg_1.2: bf16[2,4,7,7], Arg_2.3: bf16[14,32], Arg_3.4: bf16[32,32]) -> f32[2,4,8,7] {
  %Arg_0.1 = bf16[2,4,7,8]{3,2,1,0} parameter(0)
  %Arg_1.2 = bf16[2,4,7,7]{3,2,1,0} parameter(1)
  %Arg_2.3 = bf16[14,32]{1,0} parameter(2)
  %Arg_3.4 = bf16[32,32]{1,0} parameter(3)
  %ynn_fusion.7 = f32[14,32]{1,0} fusion(%Arg_2.3, %Arg_3.4), kind=kCustom, calls=%fused_computation.7, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  ROOT %dot.26 = f32[2,4,8,7]{3,2,1,0} dot(%Arg_0.1, %Arg_1.2), lhs_batch_dims={0,1}, lhs_contracting_dims={2}, rhs_batch_dims={0,1}, rhs_contracting_dims={2}
}
"""
    assert xla.bf16_dots_outside_ynn(bad)
    assert not xla.bf16_dots_outside_ynn(bad.replace("bf16[2,4,7,8]{3,2,1,0} parameter", "f32[2,4,7,8]{3,2,1,0} parameter")
                                         .replace("bf16[2,4,7,7]{3,2,1,0} parameter", "f32[2,4,7,7]{3,2,1,0} parameter"))
    x, y = jnp.ones((2, 4, 7, 8), bf), jnp.ones((2, 4, 7, 5), bf)
    f = xla.jit(lambda x, y: jnp.einsum("bkts,bktv->bksv", x.astype(jnp.float32), y.astype(jnp.float32)),
                mixed="auto")
    np.testing.assert_allclose(np.asarray(f(x, y)), np.full((2, 4, 8, 5), 7.0))
    assert list(f._checked.values()) == [True]  # float32 dots: nothing left out


@needs_options
def test_bfloat16_parameters_run_without_float32_copies_of_the_weights(tmp_path):
    """forward/generate with bfloat16 parameters (mixed="auto"): the compiled program keeps the
    layer stacks in bfloat16 (its temporaries are a fraction of the parameters, not the float32
    copies of them that XLA's float normalization made), and its logits match the program the
    backend's defaults compile (LENSJAX_XLA_OPTIONS=0, the plain bf16 dots) to bf16 rounding, and
    HF PyTorch's float32 logits as closely as that program does."""
    import torch
    import transformers as tf

    import lensjax
    from lensjax.models import transformer as T

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    hf = tf.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    m16 = lensjax.load(tmp_path, dtype="bfloat16", tokenizer=False)
    ids = np.random.default_rng(0).integers(0, 512, (2, 24)).astype(np.int32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids).long()).logits.double().numpy()
    from lensjax.models import sampler

    T._forward_jit._checked.clear()  # other tests of this worker ran bf16 programs too
    sampler._generate._checked.clear()
    ours = np.asarray(lensjax.forward(m16.config, m16.params, ids), np.float64)
    assert list(T._forward_jit._checked.values()) == [True]
    compiled = T._forward_jit.lower(m16.config, m16.params, jnp.asarray(ids), None, None, None).compile()
    text = compiled.as_text()
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(m16.params))
    assert "f32[4,128,512]" not in text and "f32[4,512,128]" not in text  # no float32 weight stacks
    assert compiled.memory_analysis().temp_size_in_bytes < 0.5 * nbytes
    code = ("import sys, numpy as np, lensjax; m = lensjax.load(sys.argv[1], dtype='bfloat16', tokenizer=False); "
            "np.save(sys.argv[2], np.asarray(lensjax.forward(m.config, m.params, np.load(sys.argv[3])), np.float64))")
    np.save(tmp_path / "ids.npy", ids)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(tmp_path / "plain.npy"), str(tmp_path / "ids.npy")],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, LENSJAX_XLA_OPTIONS="0"))
    assert out.returncode == 0, out.stderr[-2000:]
    plain = np.load(tmp_path / "plain.npy")
    scale = np.abs(ref).max()
    assert np.abs(ours - plain).max() <= 0.05 * scale  # bf16 rounding of the activations, either program
    err, err_plain = np.abs(ours - ref).max(), np.abs(plain - ref).max()
    assert err <= max(1.5 * err_plain, 0.02 * scale), (err, err_plain)
    # greedy generation (the sampler's program, KV cache) with the same options: its first token is
    # the argmax of the forward's logits at the prompt's end
    g = np.asarray(sampler.generate(m16.config, m16.params, ids[:, :8], max_new_tokens=4))
    assert list(sampler._generate._checked.values()) == [True]
    first = np.asarray(lensjax.forward(m16.config, m16.params, ids[:, :8]))[:, -1].argmax(-1)
    np.testing.assert_array_equal(g[:, 8], first)


def test_jit_of_the_gradient_of_a_custom_vjp_function_computes_the_gradient():
    """jax.grad / value_and_grad copy a custom_vjp (or custom_jvp) object's attributes, its
    primal ``fun`` among them, onto their wrapper; xla.jit must still run the wrapper itself (it
    once ran the primal and returned the bare loss). Checked against NumPy's float64 gradient of
    the same function, on any backend."""

    @jax.custom_vjp
    def loss(x):
        return jnp.sum(jnp.exp(x) * x)

    loss.defvjp(lambda x: (jnp.sum(jnp.exp(x) * x), x), lambda x, g: (g * jnp.exp(x) * (1.0 + x),))

    @jax.custom_jvp
    def soft(x):
        return jnp.log1p(jnp.exp(x))

    soft.defjvps(lambda t, y, x: t / (1.0 + jnp.exp(-x)))

    x = np.linspace(-1.0, 1.0, 7)
    value, grad = xla.jit(jax.value_and_grad(loss))(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(value, np.sum(np.exp(x) * x), rtol=1e-5)
    np.testing.assert_allclose(grad, np.exp(x) * (1.0 + x), rtol=1e-5)
    np.testing.assert_allclose(xla.jit(jax.grad(soft))(jnp.float32(0.5)), 1.0 / (1.0 + np.exp(-0.5)), rtol=1e-6)
    assert xla.jit(jax.grad(loss)).__name__ == jax.grad(loss).__name__
