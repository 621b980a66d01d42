"""Mixed-precision matmul for training: operands rounded to a low-precision type (bfloat16),
products accumulated and returned in float32, weights and their gradients kept in float32.

``matmul(x, w, dtype)`` is ``x @ w`` for ``x`` [..., K] and ``w`` [K, N] whose three dots (the
forward product and the two gradients) all read ``dtype`` operands and accumulate in float32: the
forward ``bf16(x) @ bf16(w)``, ``dx = bf16(g) @ bf16(w)ᵀ`` and ``dw = bf16(x)ᵀ @ bf16(g)``, each
with a float32 result (``preferred_element_type``). That is PyTorch's ``torch.autocast`` recipe for
the matmuls, except that autocast also rounds their *outputs* to bfloat16; here outputs stay
float32, so only the operands lose precision.

Why a custom VJP rather than ``x.astype(bf16) @ w.astype(bf16)``: JAX's transpose rule of a
bf16 × bf16 → f32 dot multiplies the float32 cotangent with a bfloat16 operand, which XLA runs as
a float32 dot (and returns a bfloat16 weight gradient). Here every dot reads bfloat16 and gives
float32.

Dot layouts (XLA CPU): this jaxlib runs a bf16 × bf16 → f32 dot through its YNN library (AMX or
AVX512-BF16 where the CPU has them) only when the left operand contracts its last dimension; a dot
contracting the left operand's first dimension — the weight gradient ``xᵀ g`` over the tokens — is
converted to float32 and run by Eigen (measured on a 2-core Xeon with AMX: [1024, 256]ᵀ·[1024,
1024] 3.2 ms as a float32 dot, 0.64 ms with the transpose below). XLA's simplifier folds a plain
2-D transpose of ``x`` back into the dot, so ``x`` [B, T, K] is transposed as a 3-D array to
[K, B, T] and reshaped to [K, B·T], which it keeps as a copy. The transposed copy is made in the
backward pass from the saved bfloat16 ``x`` (tagged :data:`SAVE_NAME` for a remat policy): fused
with an element-wise producer that it would otherwise recompute (SiLU), XLA CPU's transposing
loop ran 10x slower than the copy alone.

Where ``g`` is narrower than ``x`` (N < K: an MLP's down projection, grouped-query k and v) the
weight gradient transposes ``g`` instead and computes ``dwᵀ = gᵀ x`` [N, K], then transposes that
float32 result through a 3-D view of K (:func:`_cols_t`; a plain 2-D transpose is folded into the
dot, giving a bf16 dot that neither YNN nor Eigen runs). In the layer scan's backward, ``x`` is a
slice of the saved stack, and XLA CPU fuses that slice with the transposed copy into a loop far
slower than either: 1.7 ms per layer for the down projection's [1024, 1024] bfloat16 ``x`` (8 × 128
tokens), against 0.24 ms for the same transpose alone. Measured on a 2-core Xeon with AMX, the
10M Llama's bf16 AdamW step (8 × 128, 8 steps per call): 165.7 → 156.9 ms per step (0.947×, range
0.937–0.958 over 7 interleaved rounds).

GPU and TPU take the same program; their dot emitters handle every layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

# checkpoint_name of the low-precision left operand, for remat policies that keep it
SAVE_NAME = "lensjax_mixed_lhs"


def _dot(a, b, contract_b: int):
    """a [..., K] · b (K on axis ``contract_b`` of the 2-D b), float32 result."""
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (contract_b,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _rows_t(x):
    """[..., K] -> [K, rows]: transposed as a 3-D array when x has two leading axes of size > 1
    (a copy that the dot keeps; see the module notes), else as a 2-D transpose."""
    if x.ndim >= 3 and x.shape[0] > 1 and x.size // (x.shape[0] * x.shape[-1]) > 1:
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        return jnp.transpose(x3, (2, 0, 1)).reshape(x.shape[-1], -1)
    return x.reshape(-1, x.shape[-1]).T


def _k_split(k: int) -> int:
    """The smallest factor > 1 of ``k`` (8 where it divides k), 0 for a prime ``k``."""
    if k % 8 == 0:
        return 8
    return next((f for f in range(2, int(k ** 0.5) + 1) if k % f == 0), 0)


def _cols_t(a, f: int):
    """[N, K] -> [K, N] as a 3-D transpose of [N, f, K/f], ``f`` a factor of K (a copy that XLA
    keeps; a 2-D transpose of a dot's result is folded into the dot; see the module notes)."""
    n, k = a.shape
    return a.reshape(n, f, k // f).transpose(1, 2, 0).reshape(k, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def matmul(x, w, dtype: str = "bfloat16", transpose_w: bool = False):
    """``x @ w`` (``x @ wᵀ`` with ``transpose_w``: ``w`` [N, K], a tied embedding table) with
    ``dtype`` operands and float32 accumulation in the forward and backward passes; the result
    has ``x``'s dtype (see the module notes)."""
    return _dot(x.astype(dtype), w.astype(dtype), int(transpose_w)).astype(x.dtype)


def _fwd(x, w, dtype, transpose_w):
    xl = checkpoint_name(x.astype(dtype), SAVE_NAME)
    wl = w.astype(dtype)
    # zero-size templates carry the primal dtypes through the residuals (dtypes are not arrays)
    return (_dot(xl, wl, int(transpose_w)).astype(x.dtype),
            (xl, wl, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype)))


def _bwd(dtype, transpose_w, res, g):
    xl, wl, xt, wt = res
    gl = g.astype(dtype)
    rows = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
    if transpose_w:  # w [N, K]: dx = g @ w, dw = gᵀ x, computed as [N, K] (no transpose after the
        # dot: XLA CPU 0.10 folds one into a bf16 dot's layout that neither YNN nor Eigen then runs)
        dx, dw = _dot(gl, wl, 0), _dot(_rows_t(gl), rows(xl), 0)
    elif gl.shape[-1] < xl.shape[-1] and (f := _k_split(xl.shape[-1])):  # dx = g @ wᵀ; g narrower
        # than x: dw = (gᵀ x)ᵀ, the smaller operand transposed (see the module notes)
        dx, dw = _dot(gl, wl, 1), _cols_t(_dot(_rows_t(gl), rows(xl), 0), f)
    else:  # dx = g @ wᵀ (both contract their last axis), dw = xᵀ g
        dx, dw = _dot(gl, wl, 1), _dot(_rows_t(xl), rows(gl), 0)
    return dx.astype(xt.dtype), dw.astype(wt.dtype)


matmul.defvjp(_fwd, _bwd)


# ----------------------------------------------------------------------- SVF, z-gradient only
def _svf_w(w, u, d, vt, dtype):
    """W′ = W + U diag(d) Vᵀ (one layer), the delta's product on ``dtype`` operands, in ``dtype``."""
    delta = _dot((u * d).astype(dtype), vt.astype(dtype), 0)
    return (w.astype(jnp.float32) + delta).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def svf_matmul(x, w, u, d, vt, dtype: str = "bfloat16"):
    """``x @ W′`` with ``W′ = W + U diag(d) Vᵀ`` (one layer: w [K, N], u [K, r], d [r], vt [r, N])
    in mixed precision, for SVF training, where only ``d`` (σ ⊙ (g(z) − 1)) is trained.

    The backward gives ``dx = g W′ᵀ`` and ``dd = Σ_rows (x U) ⊙ (g V)`` (the diagonal of
    ``Uᵀ (xᵀ g) V`` without forming ``xᵀ g``), each product on ``dtype`` operands with float32
    accumulation; **W, U and Vᵀ get zero cotangents** (they are frozen in SVF). Forming ``d``'s
    gradient this way needs no weight gradient, so none of XLA CPU's transposed copies of x (see
    the module notes) and no [K, N] gradient buffers."""
    return _dot(x.astype(dtype), _svf_w(w, u, d, vt, dtype), 0).astype(x.dtype)


def _svf_fwd(x, w, u, d, vt, dtype):
    xl = checkpoint_name(x.astype(dtype), SAVE_NAME)
    wp = checkpoint_name(_svf_w(w, u, d, vt, dtype), SAVE_NAME)
    return _dot(xl, wp, 0).astype(x.dtype), (xl, wp, u.astype(dtype), vt.astype(dtype),
                                              jnp.zeros((0,), x.dtype), jnp.zeros((0,), d.dtype))


def _svf_bwd(dtype, res, g):
    xl, wp, ul, vtl, xt, dt = res
    gl = g.astype(dtype)
    dx = _dot(gl, wp, 1)
    xu = _dot(xl, ul, 0)  # [..., r]
    gv = _dot(gl, vtl, 1)  # [..., r]
    dd = jnp.sum((xu * gv).reshape(-1, xu.shape[-1]), axis=0)
    return dx.astype(xt.dtype), None, None, dd.astype(dt.dtype), None


svf_matmul.defvjp(_svf_fwd, _svf_bwd)
