"""Per-program XLA compiler options, chosen by backend at the first call.

On CPU, this jaxlib routes dot products to the YNN library by default (``__ynn_fusion`` in the
compiled HLO). For the tall-skinny contractions of the kernels here (``J Jᵀ`` over millions of
parameters, the per-sample gradients and the train step's weight gradients) that path ran 3–4×
below the plain Eigen dots on a 2-core CPU (issue 14: a [64, 10M] Gram 28 → 98 GFLOP/s). The
option ``xla_cpu_experimental_ynn_fusion_type`` sets, for one program only (through
``jax.jit(..., compiler_options=...)``), which kinds of op YNN fuses; numerics change only by
summation order. lensjax sets it to reductions only (``LIBRARY_FUSION_TYPE_REDUCE``): dots go to
Eigen, while reductions stay with YNN as in the default. With the list empty, XLA rewrites each
row reduction (the softmax's and log-softmax's max and sum) into a slow reduce-window and reduce
pair. Measured on a 2-core Xeon with AMX, in interleaved rounds against the empty list:

* the float32 AdamW step (10M Llama, 8 × 128, 8 per call): 0.959× and 0.960× (ranges
  0.936–0.990, 0.944–0.978; 27.8 ms of reduce-windows per step in its trace);
* the float32 SVF step (150M Llama, 8 × 256): 0.954× (0.939–0.967);
* the exact NTK (64 × 64 tokens): 0.985× (0.963–1.010).

Adding element-wise fusions to the list made the step 1.12× slower. Other backends get no options.

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
Without the pass, a bfloat16 dot that YNN does not take (one with a bfloat16 result, or one whose
operands XLA ordered so that the left one does not contract its last axis) reaches XLA's own
emitters, which have no bfloat16: the dot emitter refuses it at compile time, or the DotThunk
fails when the program runs. So before the first run of each input signature (its tree, shapes
and dtypes) the program is compiled ahead of time and its text checked
(:func:`bf16_dots_outside_ynn`); inputs whose program fails the check run with the backend's
defaults instead (a mixed train step warns once); the others keep the options. The call then
reuses that compiled program.

``mixed="auto"`` is for programs that run in their inputs' dtype (forward, sampling, scoring):
float32 inputs get no options; bfloat16 inputs (``lensjax.load(dtype="bfloat16")``) get the mixed
ones, and the function is traced with :func:`f32_dots` on, so ``lensjax.models.layers.mm`` writes
each bfloat16 product as a bf16 × bf16 → f32 dot rounded once (the numbers XLA computes for a bf16
dot anyway). With the pass on, the layer scan of a bfloat16 Llama-150M widened every weight stack
to float32: a forward on 8 × 128 tokens compiled with 341 MiB of temporaries for 292 MiB of
parameters and took 1.14 s, as long as float32; with ``"auto"``, 29 MiB and 0.49 s (2-core Xeon
with AMX; ``docs/benchmarks/bf16_forward``). A program that fails the check (a Switch model's expert einsums) runs the plain
bfloat16 program with the defaults, as before.

The backend is read at the first call, not at import, so importing lensjax never initialises
JAX's backends (a user may still set ``jax_num_cpu_devices`` or ``XLA_FLAGS`` after the import).
``LENSJAX_XLA_OPTIONS=0`` in the environment turns the options off (for A/B measurements).
"""

from __future__ import annotations

import contextvars
import functools
import os
import re
import threading
import warnings

import jax
import jax.numpy as jnp

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
MIXED_CPU_OPTIONS = {"xla_disable_hlo_passes": "float-normalization-bf16"}
# the compile error of a dot that the options leave to an emitter without bfloat16 (see _Jit)
REFUSED = "dot_op_emitter"
_F32_DOTS = contextvars.ContextVar("lensjax_f32_dots", default=False)


def f32_dots() -> bool:
    """True while ``jit(mixed="auto")`` traces a program for bfloat16 inputs with the mixed
    options: its layers should then write bfloat16 products as bf16 × bf16 → f32 dots rounded to
    bfloat16 (``lensjax.models.layers.mm``), the kind YNN runs without float normalization."""
    return _F32_DOTS.get()


def _tracing_f32_dots(fun):
    @functools.wraps(fun)
    def traced(*args, **kwargs):
        token = _F32_DOTS.set(True)
        try:
            return fun(*args, **kwargs)
        finally:
            _F32_DOTS.reset(token)

    return traced


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


def bf16_dots_outside_ynn(hlo_text: str) -> bool:
    """Whether a compiled CPU program (``Compiled.as_text()``) has a dot with a bfloat16 operand
    outside the computations of its YNN fusions (such a dot runs through XLA's own emitters)."""
    types, ynn, dots, comp = {}, set(), [], None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            comp = head.group(1)
            continue
        inst = _INSTRUCTION.match(line)
        if not inst:
            continue
        types[inst.group(1)] = inst.group(2)
        if "__ynn_fusion" in line:
            called = _CALLS.search(line)
            if called:
                ynn.add(called.group(1))
        if inst.group(3) == "dot":
            dots.append((comp, _OPERANDS.search(line).group(1)))
    return any(comp not in ynn and any(types.get(o.strip().lstrip("%"), "").startswith("bf16")
                                       for o in ops.split(","))
               for comp, ops in dots)


_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\(")
_CALLS = re.compile(r"calls=%([\w.-]+)")
_OPERANDS = re.compile(r" dot\(([^)]*)\)")


def _signature(leaves, tree):
    """What jax.jit compiles one program per: the tree of the arguments, and each leaf's shape and
    dtype (static arguments by value)."""
    return tree, tuple((tuple(x.shape), str(x.dtype)) if hasattr(x, "shape") and hasattr(x, "dtype") else x
                       for x in leaves)


class _Jit:
    """``jax.jit`` whose compiler options are picked at the first call (see module notes)."""

    def __init__(self, fun, kwargs, mixed=False):
        if mixed not in (False, True, "auto"):
            raise ValueError(f"mixed must be False, True or 'auto', not {mixed!r}")
        self.fun, self.kwargs, self.mixed = fun, kwargs, mixed
        self._jitted: dict = {}  # kind (True: the mixed options) -> jax.jit with its options
        self._opts: dict = {}  # kind -> the options it was compiled with
        self._nested = jax.jit(fun, **kwargs)  # inside another trace: options belong to the outer program
        self._checked: dict = {}  # signature -> whether it runs with the mixed options (_accepts)
        self._lock = threading.Lock()
        # the name, docstring and __wrapped__ only: copying fun.__dict__ (update_wrapper's default)
        # would overwrite self.fun with the .fun attribute that jax.custom_vjp / custom_jvp objects
        # carry, and which jax.grad / value_and_grad copy onto their wrappers: the program would
        # then compute the undifferentiated function
        functools.update_wrapper(self, fun, updated=())

    def _kind(self, leaves) -> bool:
        """True where the program gets the mixed-precision options: always for ``mixed=True``;
        for ``"auto"`` when an input is bfloat16."""
        if self.mixed == "auto":
            return any(getattr(x, "dtype", None) == jnp.bfloat16 for x in leaves)
        return bool(self.mixed)

    def _get(self, kind: bool):
        with self._lock:
            if kind not in self._jitted:
                opts = dict(compiler_options(mixed=True)) if kind else (
                    {} if self.mixed == "auto" else dict(compiler_options()))
                self._opts[kind] = opts
                # "auto" for bfloat16 inputs: traced with f32_dots() on, a function of its own (so
                # jax caches its trace apart from the plain one that _nested falls back to)
                if not opts:  # nothing to set (float32 under "auto", another backend): the plain jit
                    self._jitted[kind] = self._nested
                else:
                    fun = _tracing_f32_dots(self.fun) if kind and self.mixed == "auto" else self.fun
                    self._jitted[kind] = jax.jit(fun, **self.kwargs, compiler_options=opts)
            return self._jitted[kind]

    def __call__(self, *args, **kwargs):
        leaves, tree = jax.tree.flatten((args, kwargs))
        if any(isinstance(x, jax.core.Tracer) for x in leaves):
            return self._nested(*args, **kwargs)
        kind = self._kind(leaves)
        jitted = self._get(kind)
        if kind and self._opts[kind] and not self._accepts(jitted, _signature(leaves, tree), args, kwargs):
            return self._nested(*args, **kwargs)
        return jitted(*args, **kwargs)

    def _accepts(self, jitted, sig, args, kwargs) -> bool:
        """Whether these inputs (their tree, shapes and dtypes) run with the mixed options: their
        program compiles, and every bfloat16 dot in it went to YNN. Without float normalization,
        XLA CPU refuses a bfloat16 dot that YNN does not take (one with a bf16 result, or one whose
        operands XLA ordered so that the left one does not contract its last axis) either at
        compile time (the dot emitter) or, worse, when it runs (``DotThunk``: "Unsupported element
        type"). Such inputs run with the backend's defaults instead (their bf16 arrays widened, as
        before the option); the check is one AOT compile per signature, which the call then reuses."""
        ok = self._checked.get(sig)
        if ok is not None:
            return ok
        try:
            ok = not bf16_dots_outside_ynn(jitted.lower(*args, **kwargs).compile().as_text())
        except jax.errors.JaxRuntimeError as e:
            if REFUSED not in str(e):
                raise
            ok = False
        with self._lock:
            first = sig not in self._checked
            self._checked[sig] = ok
        if not ok and first and self.mixed is True:
            warnings.warn(f"{getattr(self.fun, '__name__', 'program')}: a bfloat16 dot of this program does not run "
                          f"with the compiler options {self._opts[True]}; compiling these inputs with the "
                          "backend's defaults", RuntimeWarning, stacklevel=3)
        return ok

    def lower(self, *args, **kwargs):
        """AOT lowering with the options (no fallback: a refused program raises at ``compile()``)."""
        return self._get(self._kind(jax.tree.leaves((args, kwargs)))).lower(*args, **kwargs)

    def clear_cache(self):
        for j in self._programs(nested=True):
            j.clear_cache()

    def _programs(self, nested: bool):
        """The distinct jax.jit objects in use (``_nested`` where asked for or in ``_jitted``)."""
        progs = {id(j): j for j in list(self._jitted.values())}
        if nested:
            progs[id(self._nested)] = self._nested
        return list(progs.values())

    def _cache_size(self):
        return sum(j._cache_size() for j in self._programs(nested=not all(self._checked.values())))


def jit(fun=None, *, mixed: bool | str = False, **kwargs):
    """Drop-in ``jax.jit`` (decorator or call, same keyword arguments) with the backend's options;
    ``mixed=True`` for a mixed-precision program; ``mixed="auto"`` for a program that runs in its
    inputs' dtype (inference): the mixed options when an input is bfloat16, none otherwise."""
    if fun is None:
        return lambda f: _Jit(f, kwargs, mixed)
    return _Jit(fun, kwargs, mixed)
