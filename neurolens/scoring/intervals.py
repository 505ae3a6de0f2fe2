"""Confidence intervals of shares (numpy only): the Wilson score interval of `find`'s caption share."""
from __future__ import annotations

from typing import Tuple

import numpy as np

Z95 = 1.959963984540054          # the standard normal's 97.5 % quantile: a two-sided 95 % interval


def wilson_interval(hits, n, z: float = Z95) -> Tuple[np.ndarray, np.ndarray]:
    """The Wilson score interval of the share hits / n (elementwise; NaN where n is 0):
    (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)."""
    hits, n = np.asarray(hits, dtype=np.float64), np.asarray(n, dtype=np.float64)
    safe = np.maximum(n, 1.0)
    p = np.clip(np.where(n > 0, hits / safe, 0.0), 0.0, 1.0)
    centre = p + z * z / (2 * safe)
    spread = z * np.sqrt(p * (1 - p) / safe + z * z / (4 * safe * safe))
    low, high = (centre - spread) / (1 + z * z / safe), (centre + spread) / (1 + z * z / safe)
    empty = n <= 0
    return np.where(empty, np.nan, np.clip(low, 0, 1)), np.where(empty, np.nan, np.clip(high, 0, 1))
