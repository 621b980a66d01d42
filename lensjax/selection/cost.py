"""Compute accounting for model selection.

Fine-tuning FLOPs follow the usual 6·N·T rule (forward 2, backward 4 FLOPs per parameter per
token):

    FLOPs = 6 · tokens_per_sample · samples · parameters · epochs · runs

A selection that fine-tunes candidate i on every size of its ladder costs
``Σ_i Σ_{D in ladder} finetune_flops(P_i, D)``; "full fine-tuning" is the brute-force selection it
replaces: fine-tuning every candidate on the target size. ``cost_fraction`` is their ratio, so it
does not depend on tokens per sample or epochs (they cancel), and is 0 for methods that fine-tune
nothing (zero-shot, model size). When parameter counts are unknown every model counts as 1.
"""

from __future__ import annotations

import numpy as np

DEFAULT_TOKENS_PER_SAMPLE = 512


def finetune_flops(parameters, samples, *, tokens_per_sample=DEFAULT_TOKENS_PER_SAMPLE,
                   epochs: float = 1.0, runs: int = 1) -> float:
    """6 · tokens_per_sample · samples · parameters · epochs · runs."""
    return float(6.0 * tokens_per_sample * np.sum(np.asarray(samples, np.float64))
                 * np.asarray(parameters, np.float64) * epochs * runs)


def selection_cost(parameters, sizes_used, target_size, *, tokens_per_sample=DEFAULT_TOKENS_PER_SAMPLE,
                   epochs: float = 1.0) -> dict[str, float]:
    """FLOPs of fine-tuning every candidate on ``sizes_used`` vs on ``target_size``.

    ``parameters`` is [N] (NaN or None: 1 per model); returns flops, full_flops and cost_fraction.
    """
    p = np.atleast_1d(np.asarray(parameters if parameters is not None else np.nan, np.float64))
    total = float(np.sum(np.where(np.isfinite(p), p, 1.0)))
    used = finetune_flops(total, sizes_used, tokens_per_sample=tokens_per_sample, epochs=epochs)
    full = finetune_flops(total, [target_size], tokens_per_sample=tokens_per_sample, epochs=epochs)
    return {"flops": used, "full_flops": full, "cost_fraction": used / full if full else float("nan")}
