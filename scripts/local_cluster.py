"""Run one command as N JAX processes on this machine (a local stand-in for a cluster).

    python scripts/local_cluster.py -n 2 --devices-per-process 4 -- python my_job.py --flag

Each process gets ``LENSJAX_COORDINATOR=127.0.0.1:<free port>``, ``LENSJAX_NUM_PROCESSES``,
``LENSJAX_PROCESS_ID`` (read by ``lensjax.parallel.initialize``), ``JAX_PLATFORMS=cpu`` and
``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``. Process 0's output goes to this
terminal; the others' to ``<log-dir>/process-<i>.log`` (printed if that process fails). The
launcher exits non-zero as soon as any process fails, stopping the rest, and stops all of them
after ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs):
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def launch(command: list[str], n: int, devices_per_process: int, timeout: float, log_dir: Path) -> int:
    if n < 1 or devices_per_process < 1:
        raise SystemExit("need -n >= 1 and --devices-per-process >= 1")
    if not command:
        raise SystemExit("no command given (put it after --)")
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for i in range(n):
        env = dict(os.environ, LENSJAX_COORDINATOR=f"127.0.0.1:{port}", LENSJAX_NUM_PROCESSES=str(n),
                   LENSJAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu")
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
        if i == 0:
            out = None
        else:
            out = open(log_dir / f"process-{i}.log", "w")
            logs.append(out)
        procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                      start_new_session=True))
    rc, failed = 0, None
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs):
            bad = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if bad:
                failed, rc = bad[0], procs[bad[0]].returncode
                break
            if time.time() > deadline:
                failed, rc = -1, 124
                break
            time.sleep(0.1)
        else:
            bad = [i for i, p in enumerate(procs) if p.returncode != 0]
            if bad:
                failed, rc = bad[0], procs[bad[0]].returncode
    finally:
        _stop(procs)
        for f in logs:
            f.close()
    if failed == -1:
        print(f"local_cluster: stopped all {n} processes after the {timeout:.0f} s timeout", file=sys.stderr)
    elif failed is not None:
        print(f"local_cluster: process {failed} of {n} exited with {rc}; stopped the others", file=sys.stderr)
        if failed > 0:
            print((log_dir / f"process-{failed}.log").read_text()[-4000:], file=sys.stderr)
    return rc


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        k = argv.index("--")
        argv, command = argv[:k], argv[k + 1:]
    else:
        command = []
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--processes", type=int, default=2)
    ap.add_argument("--devices-per-process", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before every process is stopped")
    ap.add_argument("--log-dir", default=None, help="logs of processes 1..N-1 (default: a temporary folder)")
    args = ap.parse_args(argv)
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="lensjax-cluster-"))
    return launch(command, args.processes, args.devices_per_process, args.timeout, log_dir)


if __name__ == "__main__":
    sys.exit(main())
