"""Loss-curve tables: reading, validating and the embedded default data.

The format is the one of the Rectified-scaling-law benchmark (``lensjax/data/flan.csv``): a first
column with the model id, then one column per data size (``0`` is the zero-shot loss, then ``200``,
``400``, ...), then optional ``size`` (parameter count) and ``family``. A blank cell is a missing
measurement. Anything else that is not a positive finite number is an error naming its row and
column: nothing is silently replaced.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from importlib import resources
from pathlib import Path

import numpy as np

EMBEDDED = ("flan", "gigaword")


class CurvesError(ValueError):
    """A curves file or table that cannot be used as it is."""


@dataclasses.dataclass(frozen=True)
class Curves:
    """A table of fine-tuning losses: ``loss[i, j]`` for model ``models[i]`` at ``sizes[j]``."""

    models: tuple[str, ...]
    sizes: np.ndarray  # [M] float64, strictly increasing, 0 allowed (zero-shot)
    loss: np.ndarray  # [N, M] float64, NaN where missing
    params: np.ndarray | None = None  # [N] parameter counts
    family: tuple[str, ...] | None = None
    name: str = "curves"

    def __post_init__(self):
        n, m = len(self.models), len(self.sizes)
        if n == 0:
            raise CurvesError(f"{self.name}: no models")
        if self.loss.shape != (n, m):
            raise CurvesError(f"{self.name}: loss table is {self.loss.shape}, expected {(n, m)}")
        dup = sorted({x for x in self.models if self.models.count(x) > 1})
        if dup:
            raise CurvesError(f"{self.name}: duplicate model ids {dup}")
        if np.any(np.diff(self.sizes) <= 0) or np.any(self.sizes < 0):
            raise CurvesError(f"{self.name}: data sizes must be distinct, >= 0 and increasing")

    def column(self, size: float) -> np.ndarray | None:
        """Losses at ``size`` ([N], NaN where missing), or None if there is no such column."""
        j = np.flatnonzero(self.sizes == size)
        return self.loss[:, j[0]] if j.size else None

    def subset(self, rows) -> "Curves":
        rows = list(rows)
        return dataclasses.replace(
            self,
            models=tuple(self.models[i] for i in rows),
            loss=self.loss[rows],
            params=None if self.params is None else self.params[rows],
            family=None if self.family is None else tuple(self.family[i] for i in rows),
        )


def _parse_number(cell: str, where: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise CurvesError(f"{where}: {cell!r} is not a number") from None
    if not math.isfinite(value):
        raise CurvesError(f"{where}: {cell!r} is not finite (leave the cell blank for a missing value)")
    return value


def read_curves(path: str | os.PathLike, name: str | None = None) -> Curves:
    """Read a curves CSV; errors name the file, row (1-based, header = row 1) and column."""
    path = Path(path)
    if not path.is_file():
        raise CurvesError(f"curves file not found: {path}")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    return parse_rows(rows, name=name or path.stem, source=str(path))


def parse_rows(rows: list[list[str]], name: str = "curves", source: str = "curves") -> Curves:
    rows = [r for r in rows if any(c.strip() for c in r)]
    if len(rows) < 2:
        raise CurvesError(f"{source}: needs a header row and at least one model row")
    header = [h.strip() for h in rows[0]]
    size_cols, sizes, params_col, family_col = [], [], None, None
    for j, h in enumerate(header[1:], start=1):
        if h == "size":
            params_col = j
        elif h == "family":
            family_col = j
        else:
            try:
                s = float(h)
            except ValueError:
                raise CurvesError(
                    f"{source}: column {j + 1} header {h!r} is neither a data size, 'size' nor 'family'"
                ) from None
            if not math.isfinite(s) or s < 0 or s != int(s):
                raise CurvesError(f"{source}: column header {h!r} is not a whole data size >= 0")
            size_cols.append(j)
            sizes.append(s)
    if not size_cols:
        raise CurvesError(f"{source}: no data-size columns (headers like 0, 200, 400, ...)")
    if len(set(sizes)) != len(sizes):
        raise CurvesError(f"{source}: duplicate data-size columns")
    order = np.argsort(sizes)
    models, loss, params, family = [], [], [], []
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise CurvesError(f"{source}: row {i} has {len(row)} cells, the header has {len(header)}")
        model = row[0].strip()
        if not model:
            raise CurvesError(f"{source}: row {i} has no model id")
        if model in models:
            raise CurvesError(f"{source}: duplicate model id {model!r} (row {i})")
        models.append(model)
        vals = []
        for j in size_cols:
            cell = row[j].strip()
            where = f"{source}: row {i} ({model}), column {header[j]!r}"
            if cell == "":
                vals.append(np.nan)
                continue
            v = _parse_number(cell, where)
            if v <= 0:
                raise CurvesError(f"{where}: loss {cell!r} must be > 0")
            vals.append(v)
        loss.append(vals)
        if params_col is not None:
            cell = row[params_col].strip()
            where = f"{source}: row {i} ({model}), column 'size'"
            params.append(np.nan if cell == "" else _parse_number(cell, where))
            if cell != "" and params[-1] <= 0:
                raise CurvesError(f"{where}: parameter count {cell!r} must be > 0")
        if family_col is not None:
            family.append(row[family_col].strip())
    return Curves(
        models=tuple(models),
        sizes=np.asarray(sizes, np.float64)[order],
        loss=np.asarray(loss, np.float64)[:, order],
        params=np.asarray(params, np.float64) if params_col is not None else None,
        family=tuple(family) if family_col is not None else None,
        name=name,
    )


def embedded_path(name: str = "flan") -> Path:
    if name not in EMBEDDED:
        raise CurvesError(f"unknown embedded curves {name!r}; choose one of {EMBEDDED}")
    return Path(str(resources.files("lensjax.data").joinpath(f"{name}.csv")))


def load_embedded(name: str = "flan") -> Curves:
    """The shipped curves of Lin et al. (2024): ``flan`` or ``gigaword`` (Apache-2.0)."""
    return read_curves(embedded_path(name), name=name)
