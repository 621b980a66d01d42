"""Gram taps: the exact empirical NTK of a batched model without per-sample gradients of it.

For ``F(θ) = Σ_i f_i(θ)`` over a batch whose samples do not interact (no batch statistics, no
attention across rows), the cotangent of F at an activation of sample i is ``∂f_i/∂(that
activation)``: one ordinary batched backward pass carries every sample's cotangents. A parameter
used at a single site (a dense weight, a norm scale, an embedding table) then has the per-sample
gradient of that site's local vector-Jacobian product, and its block of ``K = J Jᵀ`` is the Gram
``K_W[i, j] = ⟨∂f_i/∂W, ∂f_j/∂W⟩`` of those local products.

A tap is the site's op with one more input, ``acc`` [n, n] (zeros, n = the batch's leading axis),
whose cotangent is *defined* as that Gram; the parameter itself gets a zero cotangent. The
gradient of F with respect to every ``acc`` is then one block of K per tapped parameter, and
their sum is the tapped part of K. Per-sample gradients exist one site at a time (n × |W| floats
at most), the rows of J are never stacked or concatenated, and no Python loop runs over samples.

Each tap picks the cheaper of two exact routes by FLOPs at trace time (n samples of T positions):

* per-sample gradients: ``G_i = x_iᵀ g_i`` [n, d_in, d_out] then ``G Gᵀ``: 2·n·T·d_in·d_out +
  2·n²·d_in·d_out;
* token Grams: ``K[i, j] = Σ_{t,s} (x_it·x_js)(g_it·g_js)``: 2·(nT)²·(d_in + d_out), better when
  T² is small against the weight (and for embeddings, whose dense per-sample gradient is V × d).

Every tap assumes the samples are the leading axis of the activation it sees; the caller must
only tap parameters used at exactly one site (a tied embedding is used twice: leave it untapped).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _gram(a):
    """[n, ...] -> [n, n] float32 Gram of the flattened rows."""
    a = a.reshape(a.shape[0], -1)
    return jnp.matmul(a, a.T, preferred_element_type=F32)


def _token_gram(xs, gs):
    """Σ_{t,s} (x_it·x_js)(g_it·g_js) for xs [n, T, a], gs [n, T, b] -> [n, n], one sample's row
    block at a time (memory T·nT, not (nT)²)."""
    n, T = xs.shape[:2]
    xa, ga = xs.reshape(n * T, -1), gs.reshape(n * T, -1)

    def row(args):
        xi, gi = args  # [T, a], [T, b]
        s = jnp.matmul(xi, xa.T, preferred_element_type=F32) * jnp.matmul(gi, ga.T, preferred_element_type=F32)
        return jnp.sum(s.reshape(T, n, T), axis=(0, 2))

    return jax.lax.map(row, (xs, gs))


def _rows(n, per_row, limit=4 << 20):
    """The largest divisor R of n with R · per_row floats within ``limit`` (at least 1)."""
    return max([r for r in range(1, n + 1) if n % r == 0 and r * per_row <= limit] or [1])


def _slicing(n, din, dout, big=32 << 20):
    """(sliced axis "d" | "e", slice count) for the per-sample weight gradients [n, d_in, d_out].

    One piece when n·|W| floats fit in 32 MiB. Otherwise pieces of at most 128 MiB (at least 2;
    power-of-two counts that divide the axis, the other axis if this one won't split, e.g. an
    odd vocabulary). Measured in the whole exact NTK of the 10M Llama (n = T = 64, 2-core Xeon,
    interleaved rounds): 2 pieces for an MLP matrix's 64 MiB and 4 for the head's 512 MiB took
    0.95-0.96x the time of 4 and 8. Standalone, one matrix's product and Gram had favoured 4
    pieces (42 against 45-93 ms), but there every call faults its fresh product buffer in; inside
    the program the pieces reuse memory already touched, and fewer, larger per-sample products
    run closer to Eigen's peak.
    The sliced axis is d_in where d_in < d_out ≤ 4·d_in (an MLP's up projections), else d_out (its
    down projection, a vocabulary head): each piece is then computed as [n, slice, other axis]
    with the slice on the left of the dot, the layout Eigen ran fastest (10M Llama, n = 64: down
    46 -> 36 ms, a 256 x 8192 head 266 -> 214 ms, up 36 ms either way)."""
    total = 4 * n * din * dout
    if total <= big:
        return "d", 1
    prefer = ("d", din) if din < dout <= 4 * din else ("e", dout)
    best = None
    for axis, m in (prefer, ("e", dout) if prefer[0] == "d" else ("d", din)):  # the other axis if m won't split
        nb = 2
        while total / nb > 4 * big and m % (2 * nb) == 0:
            nb *= 2
        if m % nb:
            continue
        if total / nb <= 4 * big:
            return axis, nb
        best = (axis, nb) if best is None or nb > best[1] else best
    return best or ("d", 1)


def _matmul2d(x, w, f32):
    lead = x.shape[:-1]
    y = jnp.matmul(x.reshape(-1, x.shape[-1]), w, preferred_element_type=F32 if f32 else None)
    return y.reshape(*lead, w.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def matmul(x, w, acc, f32_out=False):
    """``x @ w`` (x [n, ..., d_in], w [d_in, d_out]); the cotangent of ``acc`` is w's Gram."""
    del acc
    return _matmul2d(x, w, f32_out)


def _matmul_fwd(x, w, acc, f32_out):
    return _matmul2d(x, w, f32_out), (x, w)


def plan(n: int, T: int, din: int, dout: int) -> tuple[str, str, int]:
    """How a dense tap computes its block of K for n samples of T positions and a [d_in, d_out]
    weight: ``("per_sample", axis, pieces)`` (per-sample gradients in ``pieces`` slices along d_in
    "d" or d_out "e", each Gram-reduced: :func:`_slicing`) or ``("token", "", 1)`` (token Grams),
    whichever costs fewer FLOPs (module notes)."""
    per_sample = 2.0 * n * T * din * dout + 2.0 * n * n * din * dout
    token = 2.0 * (n * T) ** 2 * (din + dout)
    if per_sample <= token:
        return ("per_sample", *_slicing(n, din, dout))
    return ("token", "", 1)


def _matmul_bwd(f32_out, res, g):
    x, w = res
    n, din, dout = x.shape[0], w.shape[0], w.shape[1]
    xs, gs = x.reshape(n, -1, din), g.reshape(n, -1, dout).astype(x.dtype)
    T = xs.shape[1]
    route, axis, nb = plan(n, T, din, dout)
    if route == "per_sample":
        if nb == 1:
            K = _gram(jnp.einsum("ntd,nte->nde", xs, gs, preferred_element_type=F32))
        else:  # G in slices, each Gram-reduced at once (measured 94 -> 64 ms on 64 x [256, 1024])
            sl, other, eq = (xs, gs, "ntd,nte->nde") if axis == "d" else (gs, xs, "nte,ntd->ned")

            def body(k, b):
                return k + _gram(jnp.einsum(eq, b, other, preferred_element_type=F32)), None

            m = sl.shape[-1]
            blocks = sl.reshape(n, T, nb, m // nb).transpose(2, 0, 1, 3)
            K = jax.lax.scan(body, jnp.zeros((n, n), F32), blocks)[0]
    else:
        K = _token_gram(xs, gs)
    dx = _matmul2d(gs, w.T, False).reshape(x.shape).astype(x.dtype)
    return dx, None, K


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@jax.custom_vjp
def add(y, b, acc):
    """``y + b`` (a bias over y's last axis); the cotangent of ``acc`` is b's Gram."""
    del acc
    return y + b


def _add_fwd(y, b, acc):
    return y + b, None


def _add_bwd(_, g):
    n = g.shape[0]
    return g, None, _gram(jnp.sum(g.reshape(n, -1, g.shape[-1]).astype(F32), axis=1))


add.defvjp(_add_fwd, _add_bwd)


@jax.custom_vjp
def scale(y, s, acc):
    """``s * y`` (a scale over y's last axis); the cotangent of ``acc`` is s's Gram."""
    del acc
    return s * y


def _scale_fwd(y, s, acc):
    return s * y, (y, s)


def _scale_bwd(res, g):
    y, s = res
    n = g.shape[0]
    gs = (g * y).astype(F32).reshape(n, -1, g.shape[-1])
    return (g * s).astype(y.dtype), None, _gram(jnp.sum(gs, axis=1))


scale.defvjp(_scale_fwd, _scale_bwd)


@jax.custom_vjp
def take(table, ids, acc):
    """``table[ids]`` (ids [n, ...] int); the cotangent of ``acc`` is the table's Gram."""
    del acc
    return jnp.take(table, ids, axis=0)


def _take_fwd(table, ids, acc):
    return jnp.take(table, ids, axis=0), (ids, table.shape[0])


def _take_bwd(res, g):
    ids, V = res
    n, d = g.shape[0], g.shape[-1]
    ids2, gs = ids.reshape(n, -1), g.reshape(n, -1, d).astype(F32)
    T = ids2.shape[1]
    if (n * T) ** 2 * d <= n * V * d * (1 + 2 * n):
        # token Grams masked by id equality: K[i, j] = Σ_{t,s} [ids_it = ids_js] g_it·g_js, for R
        # samples' rows at a time (R·T × nT floats of at most 16 MiB)
        flat_ids, flat_g = ids2.reshape(-1), gs.reshape(n * T, d)
        R = _rows(n, T * n * T)

        def rows(args):
            ii, gi = args  # [R, T], [R, T, d]
            s = jnp.matmul(gi.reshape(R * T, d), flat_g.T, preferred_element_type=F32)
            s = s * (ii.reshape(R * T, 1) == flat_ids[None, :])
            return jnp.sum(s.reshape(R, T, n, T), axis=(1, 3))

        K = jax.lax.map(rows, (ids2.reshape(n // R, R, T), gs.reshape(n // R, R, T, d))).reshape(n, n)
    else:  # dense per-sample table gradients
        G = jax.vmap(lambda i, gi: jnp.zeros((V, d), F32).at[i].add(gi))(ids2, gs)
        K = _gram(G)
    return None, None, K


take.defvjp(_take_fwd, _take_bwd)
