"""Compiled programs and the process's memory mappings: release them before the kernel's limit.

XLA's CPU backend loads every compiled program's kernels with its own JIT, one memory mapping per
code, read-only and writable section of each kernel's object. A program holds them for as long as
something keeps it alive: the jitted function that compiled it, and JAX's caches. They add up:
measured with jaxlib 0.10.2 on x86-64, the AdamW train step of a 2-layer Llama added 462 mappings
(472 at LLVM -O0), and fine-tuning and evaluating one small candidate at two ladder sizes about
1,200. Linux caps a process at ``vm.max_map_count`` mappings (65,530 by default); past it,
``mmap`` fails inside XLA's compiler and the process aborts ("LLVM ERROR: Unable to allocate
section memory!") or dies of a segmentation fault, with no Python exception to catch. Compiling
the same train step over and over while keeping each result reached the limit after 130 programs
(64,970 mappings), then aborted. One test worker of lensjax's suite reached 62,942 mappings in a
run that passed; once the suite had 489–490 tests, a worker died of a segmentation fault while
compiling, late in the run, in 4 of 12 runs.

Candidates of a model selection rarely share a program (each architecture and size compiles its
own), so :func:`lensjax.selection.pipeline.run` calls :func:`release_if_crowded` after each
candidate: once the process holds more than half of its limit, every compiled program is released
(:func:`release`); the next call of each recompiles it (or reads JAX's persistent compilation
cache where one is set). In a loop of your own over many models, call :func:`release` (or
:func:`release_if_crowded`) between them, or raise the limit (``sysctl vm.max_map_count=262144``,
as many distributions now do).
"""

from __future__ import annotations

import gc

MAPS_PATH = "/proc/self/maps"
LIMIT_PATH = "/proc/sys/vm/max_map_count"


def mappings() -> tuple[int, int] | None:
    """``(count, limit)``: this process's memory mappings (``MAPS_PATH``) and the kernel's cap on
    them (``LIMIT_PATH``); None where the system does not say (not Linux, or ``/proc``
    unreadable)."""
    try:
        with open(LIMIT_PATH) as fh:
            limit = int(fh.read().strip())
        with open(MAPS_PATH, "rb") as fh:
            count = sum(1 for _ in fh)
    except (OSError, ValueError):
        return None
    return count, limit


def release() -> None:
    """Release every compiled program of this process: JAX's caches (:func:`jax.clear_caches`,
    which empties the executables of every jitted function, lensjax's and the caller's) and then
    whatever only the garbage collector frees. The functions stay usable; their next call compiles
    again."""
    import jax

    jax.clear_caches()
    gc.collect()


def release_if_crowded(fraction: float = 0.5, log=None) -> bool:
    """:func:`release` when the process holds more than ``fraction`` of its memory-mapping limit;
    returns whether it did. ``log(msg)`` gets one line when it does. Where the count is
    unknown (see :func:`mappings`) it does nothing."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], not {fraction!r}")
    seen = mappings()
    if seen is None or seen[0] <= fraction * seen[1]:
        return False
    release()
    if log is not None:
        after = mappings()
        log(f"released compiled programs: {seen[0]} memory mappings of {seen[1]} allowed"
            + (f", {after[0]} after" if after is not None else ""))
    return True
