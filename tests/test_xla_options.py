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
    assert len(f._refused) == 1 and f._opts == xla.MIXED_CPU_OPTIONS
    np.testing.assert_allclose(np.asarray(y32, np.float64), np.asarray(a32, np.float64) @ np.asarray(b32, np.float64),
                               rtol=1e-5, atol=1e-5)
