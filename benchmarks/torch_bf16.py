"""Whether the PyTorch bfloat16 baselines (``torch.autocast`` bf16, HF models in bf16) can run here.

On a CPU without bfloat16 units (no AVX512-BF16 or AMX on x86, no BF16 on Arm) PyTorch's CPU
bfloat16 matmul falls back to a slow path: on a 2-core AMD EPYC (Zen 3, AVX2 only) a 1024³ bf16
product ran at 0.8 GFLOP/s against 68 in float32, so one autocast AdamW step of the 10M Llama took
18.3 s (float32 eager 0.68 s) and the bf16 forward of a 124M model several minutes. Those rows
would keep ``run_all.py --quick`` far past its 15 minutes while measuring nothing a user on such a
CPU would run; and issue 14 counts bf16 only "where the CPU has it". lensjax's own bf16 programs
still run there (XLA converts the dots; 76 GFLOP/s on the same CPU) and keep their rows.

So the benchmarks that time a PyTorch bf16 baseline take ``--torch-bf16 {auto,on,off}``: ``auto``
(the default) times one small bf16 and float32 product in PyTorch and runs the baseline only when
bf16 reaches a quarter of float32's rate (a CPU with bf16 units runs it at 1-10x float32); the
probe's numbers go into the benchmark's JSON with the reason for a skip. ``--smoke`` runs always
(tiny shapes: the code path is what is tested)."""

from __future__ import annotations

import time

MIN_RATIO = 0.25  # bf16 / float32 matmul rate below which the PyTorch bf16 baselines are skipped


def add_argument(ap) -> None:
    ap.add_argument("--torch-bf16", choices=("auto", "on", "off"), default="auto",
                    help="time the PyTorch bfloat16 baselines: auto (default) only where PyTorch's bf16 matmul "
                         f"runs at >= {MIN_RATIO} of its float32 rate on this CPU (see benchmarks/torch_bf16.py)")


def probe(n: int = 256, repeats: int = 5) -> dict:
    """PyTorch's GFLOP/s for an n³ matmul in float32 and bfloat16 (median of ``repeats``)."""
    import torch

    out = {}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
        a @ b
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            ts.append(time.perf_counter() - t0)
        ts.sort()
        out[f"{name}_gflop_s"] = 2 * n**3 / max(ts[len(ts) // 2], 1e-9) / 1e9
    out["ratio"] = out["bfloat16_gflop_s"] / out["float32_gflop_s"]
    return out


def decide(mode: str, smoke: bool = False) -> dict:
    """``{"run": bool, "reason": str | None, "probe": dict | None}`` for ``--torch-bf16 mode``."""
    if mode == "off":
        return {"run": False, "reason": "skipped: --torch-bf16 off", "probe": None}
    if mode == "on" or smoke:
        return {"run": True, "reason": None, "probe": None}
    p = probe()
    if p["ratio"] >= MIN_RATIO:
        return {"run": True, "reason": None, "probe": p}
    return {"run": False, "probe": p,
            "reason": (f"skipped: PyTorch's bf16 matmul runs at {p['bfloat16_gflop_s']:.1f} GFLOP/s on this CPU against "
                       f"{p['float32_gflop_s']:.1f} in float32 (no bf16 units; --torch-bf16 on runs it anyway)")}
