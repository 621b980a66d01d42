"""kernels/xla.py: per-program compiler options by backend, picked at the first call."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lensjax.kernels import xla


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
