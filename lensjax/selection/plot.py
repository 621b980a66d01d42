"""Plot measured loss curves and the fitted laws (matplotlib is an optional extra)."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lensjax.io import atomic_write  # noqa: E402
from lensjax.selection.curves import Curves  # noqa: E402
from lensjax.selection.selectors import Selection  # noqa: E402


def plot_selection(curves: Curves, sel: Selection, path: str | os.PathLike, cols: int = 5) -> None:
    """One log–log panel per model: measured points (in budget filled, beyond hollow), the fitted
    law (for law methods; for ``ensemble`` its long-range law, dotted) out to the target, the
    prediction at the target with its interval (when the selection has a bootstrap), and the
    budget line."""
    n = len(curves.models)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    pr = sel.protocol
    pos = curves.sizes > 0
    grid = np.geomspace(max(curves.sizes[pos].min(), 1.0) / 2, pr.target_size * 1.2, 200)
    fitted = sel.fit.predict(grid) if sel.fit is not None and not sel.fit.law.uses_extra else None
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        y = curves.loss[i, pos]
        x = curves.sizes[pos]
        inb = x <= pr.budget_size
        ax.loglog(x[inb], y[inb], "o", ms=3, color="C0")
        ax.loglog(x[~inb], y[~inb], "o", ms=3, mfc="none", color="C0")
        if fitted is not None:
            ax.loglog(grid, fitted[i], ":" if sel.method == "ensemble" else "-", color="C1", lw=1)
        if sel.predicts_loss:
            ax.loglog([pr.target_size], [sel.predicted[i]], "x", color="C3")
        if sel.interval is not None:
            ax.plot([pr.target_size] * 2, sel.interval[i], "-", color="C3", lw=1)
        ax.axvline(pr.budget_size, color="gray", ls="--", lw=0.8)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(curves.models[i], fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(f"{sel.method}, budget {pr.budget_size:,.0f} (dashed), target {pr.target_size:,.0f} (x)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=120, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    atomic_write(path, buf.getvalue())
