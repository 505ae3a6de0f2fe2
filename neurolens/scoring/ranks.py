"""Exact ranks of columns of values against a 0/1 label, in numpy alone (no torch: light modules such as the
reliability check import it): the Mann-Whitney U of the positives and the tie term of each column
(`rank_block`, what scoring.statistics.ExactAUC ranks with), and the AUC of one score column (`column_auc`)."""
from __future__ import annotations

import numpy as np


def rank_block(x: np.ndarray, positive: np.ndarray):
    """(U of the positives, tie term) of each column of x (n, b), from value sorts only (no argsort):
    U = sum over positives of (#negatives below + half the negatives equal), by binary search of each
    sorted positive column in the sorted negative column; the tie term from the runs of equal values in
    the sorted full column."""
    columns = np.ascontiguousarray(x.T)                             # (b, n): sorts along contiguous rows
    b, n = columns.shape
    negatives = np.sort(columns[:, ~positive], axis=1)
    positives = np.sort(columns[:, positive], axis=1)
    u_stat = np.empty(b)
    for j in range(b):
        below = np.searchsorted(negatives[j], positives[j], side="left")
        not_above = np.searchsorted(negatives[j], positives[j], side="right")
        u_stat[j] = 0.5 * (below.sum(dtype=np.float64) + not_above.sum(dtype=np.float64))
    ordered = np.sort(columns, axis=1)
    tie_term = np.zeros(b)
    equal = np.zeros((b, n + 1), dtype=np.int8)                     # 1 where a value equals the one before
    equal[:, 1:n] = ordered[:, 1:] == ordered[:, :-1]
    if equal.any():
        change = np.diff(equal, axis=1)                             # +1 where a run of equals starts, -1 ends
        first, last = np.flatnonzero(change == 1), np.flatnonzero(change == -1)
        size = (last - first + 1).astype(np.float64)                # a run of r equal steps: r + 1 tied values
        tie_term = np.bincount(first // n, weights=size ** 3 - size, minlength=b)
    return u_stat, tie_term


def column_auc(scores, labels) -> float:
    """ROC AUC (U / (n1 n0), ties half) of one column of scores (as float32) against a label (>= 0.5 positive,
    < 0.5 negative, NaN unknown), over the rows where both are finite; NaN without both classes. The same rows
    and arithmetic as scoring.statistics.ExactAUC with one unit."""
    x = np.asarray(scores, dtype=np.float32).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    keep = np.isfinite(y) & np.isfinite(x)
    x, positive = x[keep], y[keep] >= 0.5
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    u_stat, _ = rank_block(x.reshape(-1, 1), positive)
    return float(u_stat[0] / (n_pos * n_neg))
