"""A unit's activation histogram over the scanned images, as the unit page draws it: every unit's binned
per-image maxima, from the scan's chunk records in two streaming passes (never N x U in memory)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..storage.cache import Cache


@dataclass
class Histogram:
    """Counts of the unit's per-image activation (spatial max) over the scanned images."""
    edges: np.ndarray          # (bins + 1,)
    counts: np.ndarray         # (bins,) int64
    count: int                 # images counted

    def percentile(self, value: float) -> float:
        """Share (0-100) of counted images whose activation is below `value`, linear within a bin."""
        if self.count == 0:
            return float("nan")
        if value <= self.edges[0]:
            return 0.0
        if value >= self.edges[-1]:
            return 100.0
        position = int(np.searchsorted(self.edges, value, side="right")) - 1
        below = float(self.counts[:position].sum())
        lo, hi = float(self.edges[position]), float(self.edges[position + 1])
        inside = float(self.counts[position]) * ((value - lo) / (hi - lo) if hi > lo else 1.0)
        return 100.0 * (below + inside) / self.count


def layer_histograms(cache: Cache, chunk_paths: Sequence[Path], units: int, bins: int):
    """(edges (U, bins+1), counts (U, bins), totals (U,)) of every unit's per-image maxima, binned between
    the unit's own min and max, in two streaming passes over the chunk records (never N x U in memory)."""
    lo = np.full(units, np.inf)
    hi = np.full(units, -np.inf)
    for maxima in _chunk_maxima(cache, chunk_paths):
        lo = np.minimum(lo, np.nanmin(maxima, axis=0, initial=np.inf))
        hi = np.maximum(hi, np.nanmax(maxima, axis=0, initial=-np.inf))
    empty = ~np.isfinite(lo)
    lo[empty], hi[empty] = 0.0, 1.0
    flat = hi <= lo
    hi[flat] = lo[flat] + 1e-6 * np.maximum(1.0, np.abs(lo[flat]))
    counts = np.zeros((units, bins), dtype=np.int64)
    width = (hi - lo) / bins
    offsets = np.arange(units) * bins
    for maxima in _chunk_maxima(cache, chunk_paths):
        finite = np.isfinite(maxima)
        position = np.clip(((maxima - lo) / width), 0, bins - 1)
        position = np.where(finite, position, 0).astype(np.int64)
        flat_index = (position + offsets)[finite]
        counts += np.bincount(flat_index, minlength=units * bins).reshape(units, bins)
    edges = lo[:, None] + width[:, None] * np.arange(bins + 1)[None, :]
    edges[:, -1] = hi
    return edges, counts, counts.sum(axis=1)


def _chunk_maxima(cache: Cache, chunk_paths: Sequence[Path]):
    for path in chunk_paths:
        record = cache.read(path, names=["maxima"])
        if record is not None and record.arrays["maxima"].size:
            yield np.asarray(record.arrays["maxima"], dtype=np.float64)
