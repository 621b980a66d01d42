"""The measured loss curves on disk: a curves CSV (the shipped format) and a JSON sidecar of
each measurement's steps, learning rate and protocol, safe for several writing processes."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from pathlib import Path

import numpy as np

from lensjax.io import atomic_write
from lensjax.selection.curves import Curves, read_curves


class CurvesStore:
    """Measured losses, written atomically as a curves CSV (the shipped format) plus a JSON
    sidecar with the steps t and learning rate η of each measurement.

    Several processes may record into the same files (candidates run as concurrent jobs): each
    :meth:`record` holds an exclusive ``flock`` on ``<csv>.lock``, re-reads what the others
    wrote, adds its cell and rewrites both files, so no measurement is lost."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.meta_path = self.path.with_name(self.path.name + ".meta.json")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._read()

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read(self):
        self.loss: dict[str, dict[int, float]] = {}
        self.meta: dict[str, dict] = {}
        if self.path.exists():
            c = read_curves(self.path)
            for i, m in enumerate(c.models):
                self.loss[m] = {int(s): float(v) for s, v in zip(c.sizes, c.loss[i]) if np.isfinite(v)}
            if self.meta_path.exists():
                self.meta = json.loads(self.meta_path.read_text())

    def has(self, model: str, size: int) -> bool:
        return size in self.loss.get(model, {})

    def record(self, model: str, size: int, loss: float, *, steps: int, lr: float, params: int | None = None,
               family: str | None = None, tokens_per_sample: float | None = None, **extra):
        """One measurement; ``extra`` (steps planned, development evaluations, samples seen, the
        protocol) goes into the ``.meta.json`` cell as it is."""
        with self._locked():
            self._read()  # what other processes recorded meanwhile
            self.loss.setdefault(model, {})[int(size)] = float(loss)
            m = self.meta.setdefault(model, {"sizes": {}})
            m["sizes"][str(int(size))] = {"steps": int(steps), "lr": float(lr)} | extra
            if params is not None:
                m["params"] = int(params)
            if family is not None:
                m["family"] = family
            if tokens_per_sample is not None:
                m["tokens_per_sample"] = float(tokens_per_sample)
            self.write()

    def write(self):
        sizes = sorted({s for v in self.loss.values() for s in v})
        rows = [["config name", *map(str, sizes), "size", "family"]]
        for m, v in self.loss.items():
            meta = self.meta.get(m, {})
            rows.append([m, *[repr(v[s]) if s in v else "" for s in sizes], str(meta.get("params", "")),
                         meta.get("family", "")])
        buf = io.StringIO()
        csv.writer(buf).writerows(rows)
        atomic_write(self.path, buf.getvalue(), newline="")
        atomic_write(self.meta_path, json.dumps(self.meta, indent=1))

    def curves(self) -> Curves:
        return read_curves(self.path)

    def steps(self, model: str, size: int) -> int:
        """Optimiser steps t of the measurement (the early-stopping step when it stopped early)."""
        try:
            return int(self.meta[model]["sizes"][str(int(size))]["steps"])
        except KeyError:
            raise KeyError(f"{self.meta_path}: no steps recorded for {model!r} at size {int(size)}; the curves "
                           "CSV and its .meta.json disagree (delete both to re-measure)") from None

    def cell(self, model: str, size: int) -> dict:
        return dict(self.meta.get(model, {}).get("sizes", {}).get(str(int(size)), {}))
