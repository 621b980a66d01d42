"""kernels/cem.py against a NumPy float64 elite refit, bounds, the kept best member, tie-breaks,
convergence on a known optimum, and vmap over independent searches."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lensjax.kernels import cem


def test_update_matches_numpy_elites():
    rng = np.random.default_rng(0)
    P, D, E = 16, 5, 4
    pop = rng.uniform(0, 1, (P, D))
    fit = rng.integers(0, 4, P).astype(np.float64)  # many ties
    tie = rng.normal(size=P)
    st = cem.init(np.full(D, 0.5), 0.3, jax.random.key(0))
    new = cem.update(st, jnp.asarray(pop, jnp.float32), jnp.asarray(fit), jnp.asarray(tie), n_elites=E)
    order = sorted(range(P), key=lambda i: (-fit[i], -tie[i], i))  # lexicographic, as documented
    el = pop[order[:E]]
    np.testing.assert_allclose(np.asarray(new.mean), el.mean(0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new.std), el.std(0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new.best), pop[order[0]], rtol=1e-6)
    assert float(new.best_fitness) == fit[order[0]] and int(new.generation) == 1
    # smoothing and the std floor
    sm = cem.update(st, jnp.asarray(pop, jnp.float32), jnp.asarray(fit), jnp.asarray(tie), n_elites=E,
                    smoothing=0.25, std_floor=0.2)
    np.testing.assert_allclose(np.asarray(sm.mean), 0.75 * el.mean(0) + 0.25 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sm.std), np.maximum(0.75 * el.std(0, ddof=1) + 0.25 * 0.3, 0.2), rtol=1e-5)


def test_nan_fitness_ranks_last_and_bad_elites_refused():
    f = jnp.asarray([np.nan, 0.1, 0.5, np.nan])
    assert list(np.asarray(cem.rank(f))) == [2, 1, 0, 3]
    st = cem.init(jnp.zeros(2), 1.0, jax.random.key(0))
    with pytest.raises(ValueError, match="n_elites"):
        cem.update(st, jnp.zeros((4, 2)), jnp.zeros(4), n_elites=5)
    with pytest.raises(ValueError, match="bounds"):
        cem.init(jnp.zeros(2), 1.0, jax.random.key(0), bounds="box")


@pytest.mark.parametrize("bounds", ["clamp", "sigmoid"])
def test_sample_keeps_best_and_bounds(bounds):
    st = cem.init(jnp.full(3, 0.5), 2.0, jax.random.key(1), lo=0.0, hi=1.0, bounds=bounds)
    st = st._replace(best=jnp.asarray([0.1, 0.2, 0.3]) if bounds == "clamp" else jnp.asarray([-1.0, 0.0, 1.0]))
    pop, st2 = cem.sample(st, 64, lo=0.0, hi=1.0, bounds=bounds)
    chex.assert_shape(pop, (64, 3))
    np.testing.assert_array_equal(np.asarray(pop[0]), np.asarray(st.best))
    vals = np.asarray(cem.decode(pop, lo=0.0, hi=1.0, bounds=bounds))
    assert vals.min() >= 0.0 and vals.max() <= 1.0
    if bounds == "clamp":  # a wide std puts many members on the bounds
        assert (vals == 0.0).any() and (vals == 1.0).any()
    assert not np.array_equal(jax.random.key_data(st2.key), jax.random.key_data(st.key))
    pop_b, _ = cem.sample(st, 64, lo=0.0, hi=1.0, bounds=bounds)  # seeded: same state, same members
    np.testing.assert_array_equal(np.asarray(pop), np.asarray(pop_b))


def test_sigmoid_init_maps_the_mean():
    st = cem.init(jnp.asarray([0.25, 0.5]), 0.1, jax.random.key(0), lo=0.0, hi=2.0, bounds="sigmoid")
    np.testing.assert_allclose(np.asarray(cem.decode(st.mean, lo=0.0, hi=2.0, bounds="sigmoid")), [0.25, 0.5], rtol=1e-5)


def _quadratic(target):
    def fit(vals):
        return -jnp.sum((vals - target) ** 2, -1), jnp.zeros(vals.shape[0])
    return fit


@pytest.mark.parametrize("bounds", ["clamp", "sigmoid"])
def test_search_finds_a_known_optimum(bounds):
    target = jnp.asarray([0.2, 0.7, 0.9, 0.4])
    st = cem.init(jnp.full(4, 0.5), 0.5 if bounds == "clamp" else 1.5, jax.random.key(3), bounds=bounds)
    final, hist = jax.jit(lambda s: cem.search(_quadratic(target), s, generations=40, pop_size=32, n_elites=6,
                                               bounds=bounds))(st)
    best = np.asarray(cem.decode(final.best, bounds=bounds))
    assert np.abs(best - np.asarray(target)).max() < 0.05
    bf = np.asarray(hist["best_fitness"])
    assert np.all(np.diff(bf) >= -1e-7)  # member 0 re-evaluates the best: never worse (deterministic fitness)


def test_vmap_runs_independent_searches():
    targets = jnp.asarray([[0.1, 0.9], [0.5, 0.5], [0.8, 0.3]])
    keys = jax.random.split(jax.random.key(0), 3)

    def one(target, key):
        st = cem.init(jnp.full(2, 0.5), 0.5, key)
        return cem.search(_quadratic(target), st, generations=25, pop_size=16, n_elites=4)[0].best

    together = np.asarray(jax.jit(jax.vmap(one))(targets, keys))
    for i in range(3):
        np.testing.assert_allclose(together[i], np.asarray(one(targets[i], keys[i])), rtol=1e-5, atol=1e-6)
        assert np.abs(together[i] - np.asarray(targets[i])).max() < 0.05
