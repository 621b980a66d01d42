"""Per-program XLA compiler options, chosen by backend at the first call.

On CPU, this jaxlib routes dot products to the YNN library by default (``__ynn_fusion`` in the
compiled HLO). For the tall-skinny contractions of the kernels here (``J Jᵀ`` over millions of
parameters, the per-sample gradients and the train step's weight gradients) that path ran 3–4×
below the plain Eigen dots on a 2-core CPU (issue 14: a [64, 10M] Gram 28 → 98 GFLOP/s). The
option ``xla_cpu_experimental_ynn_fusion_type=""`` turns it off for one program only, through
``jax.jit(..., compiler_options=...)``; numerics change only by summation order. Other backends
get no options.

Mixed-precision programs (``jit(..., mixed=True)``: bfloat16 dots with float32 accumulation,
:mod:`lensjax.kernels.mixed`) keep the default routing: Eigen has no bfloat16 GEMM and XLA
converts such dots to float32, while YNN runs them on the CPU's bfloat16 units (AMX / AVX512-BF16
where present: 1.2-1.5 TFLOP/s on a 2-core Xeon against 0.28 for float32). They get
``xla_disable_hlo_passes=float-normalization-bf16`` instead: that pass treats a ``while`` loop
(``lax.scan``) as unable to carry bfloat16, so every bfloat16 array that enters or leaves the layer
scan (the SVF factors U and Vᵀ, the bfloat16 activations and W′ that the forward scan stacks for
the backward one) is converted to a float32 copy of the whole stack outside the loop and back to
bfloat16 slice by slice inside it. Without the pass those stacks stay bfloat16 (a scan over
[12, 768, 3072] bfloat16 weights: 80 → 26 ms); the programs' results were bit-identical (the SVF
update's and the AdamW step's losses), and their steps went 4.2 → 3.55 s and 0.283 → 0.252 s
on a 2-core Xeon with AMX. With float32 parameters (how ``compute_dtype`` runs them) every op of
these programs but the dots computes in float32, so there is nothing else for the pass to widen.
Without the pass, a bfloat16 dot that YNN does not take (one with a bfloat16 result, as with
bfloat16 parameters) reaches an emitter without bfloat16 and fails to compile; such a program is
compiled again with the backend's defaults for those inputs (their shapes and dtypes), with a
warning; other inputs of the same function keep the options.

The backend is read at the first call, not at import, so importing lensjax never initialises
JAX's backends (a user may still set ``jax_num_cpu_devices`` or ``XLA_FLAGS`` after the import).
``LENSJAX_XLA_OPTIONS=0`` in the environment turns the options off (for A/B measurements).
"""

from __future__ import annotations

import functools
import os
import threading
import warnings

import jax

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
MIXED_CPU_OPTIONS = {"xla_disable_hlo_passes": "float-normalization-bf16"}
# the compile error of a dot that the options leave to an emitter without bfloat16 (see _Jit)
REFUSED = "dot_op_emitter"


@functools.lru_cache(maxsize=None)
def compiler_options(backend: str | None = None, mixed: bool = False) -> tuple[tuple[str, str], ...]:
    """The options for ``backend`` (default: JAX's default backend) that this jaxlib accepts;
    ``mixed``: for a mixed-precision program (see the module notes)."""
    backend = backend or jax.default_backend()
    if backend != "cpu" or os.environ.get("LENSJAX_XLA_OPTIONS", "1") == "0":
        return ()
    opts = MIXED_CPU_OPTIONS if mixed else CPU_OPTIONS
    try:  # an older or newer jaxlib may not know the flag: then compile without it
        jax.jit(lambda x: x + 1, compiler_options=opts).lower(1.0).compile()
    except Exception:  # noqa: BLE001 - any refusal means "not supported here"
        return ()
    return tuple(opts.items())


def _signature(args, kwargs):
    """What jax.jit compiles one program per: the tree, and each leaf's shape and dtype (static
    arguments by value)."""
    leaves, tree = jax.tree.flatten((args, kwargs))
    return tree, tuple((tuple(x.shape), str(x.dtype)) if hasattr(x, "shape") and hasattr(x, "dtype") else x
                       for x in leaves)


class _Jit:
    """``jax.jit`` whose compiler options are picked at the first call (see module notes)."""

    def __init__(self, fun, kwargs, mixed=False):
        self.fun, self.kwargs, self.mixed, self._jitted, self._opts = fun, kwargs, mixed, None, {}
        self._nested = jax.jit(fun, **kwargs)  # inside another trace: options belong to the outer program
        self._refused: set = set()  # signatures that compile without the options (see __call__)
        self._lock = threading.Lock()
        functools.update_wrapper(self, fun)

    def _get(self):
        with self._lock:
            if self._jitted is None:
                self._opts = dict(compiler_options(mixed=self.mixed))
                self._jitted = jax.jit(self.fun, **self.kwargs, **({"compiler_options": self._opts} if self._opts else {}))
            return self._jitted

    def __call__(self, *args, **kwargs):
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs))):
            return self._nested(*args, **kwargs)
        jitted = self._get()
        if self._refused and _signature(args, kwargs) in self._refused:
            return self._nested(*args, **kwargs)
        try:
            return jitted(*args, **kwargs)
        except jax.errors.JaxRuntimeError as e:
            # Without float normalization, XLA CPU's dot emitter refuses (at compile time, before
            # any input is donated) a bfloat16 dot that YNN does not take, e.g. one with a bf16
            # result: that input signature runs with the backend's defaults instead; the others
            # keep the options.
            if not (self.mixed and self._opts and REFUSED in str(e)):
                raise
            sig = _signature(args, kwargs)
            with self._lock:
                if sig not in self._refused:
                    self._refused.add(sig)
                    warnings.warn(f"{getattr(self.fun, '__name__', 'program')}: XLA refused the compiler "
                                  f"options {self._opts} ({REFUSED}); compiling these inputs with the "
                                  "backend's defaults", RuntimeWarning, stacklevel=2)
            return self._nested(*args, **kwargs)

    def lower(self, *args, **kwargs):
        """AOT lowering with the options (no fallback: a refused program raises at ``compile()``)."""
        return self._get().lower(*args, **kwargs)

    def clear_cache(self):
        if self._jitted is not None:
            self._jitted.clear_cache()
        self._nested.clear_cache()

    def _cache_size(self):
        return self._get()._cache_size() + (self._nested._cache_size() if self._refused else 0)


def jit(fun=None, *, mixed: bool = False, **kwargs):
    """Drop-in ``jax.jit`` (decorator or call, same keyword arguments) with the backend's options;
    ``mixed=True`` for a mixed-precision program."""
    if fun is None:
        return lambda f: _Jit(f, kwargs, mixed)
    return _Jit(fun, kwargs, mixed)
