import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The SciPy baselines live in benchmarks/ (not part of the installed package).
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # test helpers (tiny_hf.py) under importlib import mode


def pytest_configure(config):
    """The tests' programs are compiled with LLVM at optimisation level 0
    (``--xla_backend_optimization_level=0`` appended to ``XLA_FLAGS``, unless the user set a
    level): the suite's tiny models spend most of their time compiling, and the same HLO compiled
    at O0 ran the suite about 20% faster on 2 cores (test_svf_train + test_models_encdec 105 ->
    85 s, the four heaviest slow tests 216 -> 174 s; the parity tolerances hold). The
    benchmarks and the library's users run at XLA's default level; run_all.py records XLA_FLAGS.
    Tests that start their own processes with another XLA_FLAGS run at the default.

    One JAX persistent compilation cache per test run, shared by the xdist workers and the
    scripts the tests start (they inherit the environment): many tests compile the same programs
    for tiny models of equal shapes in different processes (measured on 2 cores: 180 -> 162 s
    for test_models_encdec + test_svf_train from an empty cache). A user's own cache setting wins;
    the directory is removed at the end of the run."""
    import os
    import tempfile

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()
    if os.environ.get("PYTEST_XDIST_WORKER") or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    path = tempfile.mkdtemp(prefix="lensjax-test-jax-cache-")
    config._lensjax_jax_cache = path
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config):
    import shutil

    path = getattr(config, "_lensjax_jax_cache", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _release_programs_when_crowded():
    """After each test module, once the worker holds a quarter of Linux's memory-mapping limit,
    every compiled program is released (``lensjax.programs``): each holds hundreds of mappings
    for its JIT-loaded kernels, and a worker that kept all of them reached 62,942 of the default
    65,530 (2 workers, 490 tests); past the limit XLA's compiler dies of a segmentation fault.
    Released after every module instead, the peak was 16,539 and the run 20-40 s slower
    (recompiled or re-read programs); a quarter keeps that to a few releases per worker."""
    yield
    from lensjax import programs

    programs.release_if_crowded(0.25)


def pytest_collection_modifyitems(config, items):
    """Slow tests that share no module- or session-scoped fixture run first (their order kept).

    The two xdist workers take tests in collection order; when one of the long script and
    subprocess tests (run_all --smoke: 300 s on a 2-core EPYC) started late, the other worker
    sat idle at the end of the run (13% of both cores' time over a 25.7-min .ci/run,
    2026-12-07). Started first, they overlap with the short tests instead. Tests that share a
    module fixture keep their place, so no fixture is built more often than before."""

    def shares_fixture(item):
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {}) or {}
        return any(d[-1].scope in ("module", "package", "session") and d[-1].baseid  # ours, not pytest's own
                   and not d[-1].argname.startswith("_") for d in defs.values() if d)

    first = [it for it in items if it.get_closest_marker("slow") and not shares_fixture(it)]
    if first:
        chosen = set(map(id, first))
        items[:] = first + [it for it in items if id(it) not in chosen]
