"""Process settings that must exist before the process starts: glibc's transparent huge pages.

XLA's CPU runtime takes fresh memory from ``malloc`` for every execution's buffers (the scanned
layers' stacked activations, the logits, the gradients): a 10M-parameter AdamW step at 8 × 128
tokens maps ≈ 428 MB and takes ≈ 104k page faults per step, 4 KiB at a time. With glibc's tunable
``glibc.malloc.hugetlb=1`` (glibc ≥ 2.35) malloc asks the kernel for transparent huge pages
(``madvise(MADV_HUGEPAGE)``) on the memory it maps, so those faults come 2 MiB at a time. Measured
on a 2-core AMD EPYC (Zen 4), four interleaved A/B pairs of runs: the AdamW step 0.559–0.645 s →
0.482–0.544 s (−14 to −17%), PyTorch eager in the same setting unchanged (0.38–0.44 s both
ways), peak RSS of ``bench_ntk.py --quick`` 4.67 → 4.79 GB. Numerics are unchanged (the same
programs run on the same bytes).

The effect depends on the host: on an earlier host (137–178 GFLOP/s) one same-session
pair had gone the other way (exact NTK 4.48 → 5.00 s, AdamW step 0.745 → 0.836 s; with THP
``defrag=madvise`` a huge-page fault may compact memory first). So it is opt-in:
``LENSJAX_HUGE_PAGES=1`` makes :func:`reexec_with_huge_pages` restart the current command with the
tunable added (``os.execve``: same interpreter, arguments and the rest of the environment), since
glibc reads tunables only when a process starts, where it would take effect and is not set yet:
Linux with glibc ≥ 2.35, THP not ``never`` in ``/sys/kernel/mm/transparent_hugepage/enabled``,
and no ``malloc.hugetlb`` in ``GLIBC_TUNABLES`` already. The ``lensjax`` command and the
benchmark and experiment scripts call it first thing; importing lensjax never does. In your own
program, start Python with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` for the same effect.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_env(environ: dict | None = None, *, thp_path: str = THP_PATH) -> dict | None:
    """The environment to restart with, or None where huge pages are not asked for
    (``LENSJAX_HUGE_PAGES=1``), the tunable is set already, or it would do nothing here."""
    env = dict(os.environ if environ is None else environ)
    if env.get("LENSJAX_HUGE_PAGES", "0") != "1" or "malloc.hugetlb" in env.get("GLIBC_TUNABLES", ""):
        return None
    if not sys.platform.startswith("linux"):
        return None
    lib, version = platform.libc_ver()
    try:
        if lib != "glibc" or tuple(int(x) for x in version.split(".")[:2]) < (2, 35):
            return None
        with open(thp_path) as fh:
            if "[never]" in fh.read():
                return None
    except (OSError, ValueError):
        return None
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), TUNABLE) if t)
    return env


def reexec_with_huge_pages() -> None:
    """Restart this process with :data:`TUNABLE` when :func:`huge_pages_env` says so; otherwise
    return at once. Call it before any work (nothing of this process survives the restart)."""
    env = huge_pages_env()
    if env is None:
        return
    argv = [sys.executable, *sys.orig_argv[1:]]  # with the interpreter's own options (-m, -X, ...)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
