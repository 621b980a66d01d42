"""lensjax.programs: compiled programs give back their memory mappings when released.

XLA's CPU JIT maps each kernel's sections apart, so every live program holds hundreds of the
65,530 mappings Linux allows a process by default; counted here from ``/proc/self/maps``.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lensjax import programs


def _count() -> int:
    with open("/proc/self/maps", "rb") as fh:
        return sum(1 for _ in fh)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/self/maps")
def test_release_gives_back_the_mappings_of_compiled_programs():
    @jax.jit
    def f(x):  # a few kernels per program: a dot, reductions, elementwise ops that do not fuse
        y = jnp.tanh(x @ x.T)
        return jnp.cumsum(y, 0)[-1] * jnp.cos(x).mean() + jnp.sort(x[:, 0])

    programs.release()
    base = _count()
    xs = [np.linspace(-1, 1, 8 * (i + 2), dtype=np.float32).reshape(i + 2, 8) for i in range(20)]
    ref = [np.asarray(f(x)) for x in xs]  # 20 shapes: 20 programs, kept by f
    grown = _count() - base
    assert grown >= 3 * 20, grown  # at least one mapping per section of one kernel per program
    programs.release()
    assert f._cache_size() == 0
    assert _count() - base <= 0.2 * grown, (grown, _count() - base)
    np.testing.assert_array_equal(np.asarray(f(xs[3])), ref[3])  # still usable: compiles again


def test_release_if_crowded_reads_the_count_and_the_limit(tmp_path, monkeypatch):
    maps, limit = tmp_path / "maps", tmp_path / "max_map_count"
    maps.write_text("7f00-7f01 r-xp 00000000 00:00 0\n" * 60)
    limit.write_text("100\n")
    monkeypatch.setattr(programs, "MAPS_PATH", str(maps))
    monkeypatch.setattr(programs, "LIMIT_PATH", str(limit))
    released, logs = [], []
    monkeypatch.setattr(programs, "release", lambda: released.append(1))
    assert programs.mappings() == (60, 100)
    assert not programs.release_if_crowded(0.75, log=logs.append) and not released and not logs
    assert programs.release_if_crowded(0.5, log=logs.append) and released == [1]
    assert logs == ["released compiled programs: 60 memory mappings of 100 allowed, 60 after"]
    limit.write_text("a lot\n")  # unreadable: nothing is known, nothing is released
    assert programs.mappings() is None and not programs.release_if_crowded(0.1)
    monkeypatch.setattr(programs, "LIMIT_PATH", str(tmp_path / "absent"))
    assert programs.mappings() is None and not programs.release_if_crowded(0.1) and released == [1]
    for bad in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match="fraction"):
            programs.release_if_crowded(bad)
