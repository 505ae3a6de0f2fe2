"""Per-unit statistics of activations against MANY binary image labels at once (one per concept), as ONE
mergeable accumulator: the sweep is its one-label case, a concept audit its many-label case.

`MultiLabelStats(units, labels)` has `add(values, labels)`, `merge`, `state_dict`, `load_state_dict` and
`result()` like the accumulators of neurolens.scoring.statistics. `values` is (B, U) (each image's
spatial-max activation per unit), `labels` is (B, K) (one column per concept: >= 0.5 positive, < 0.5
negative, NaN unknown; a (B,) vector is one concept). A row with a non-finite value is left out for every
concept (skipped images have NaN rows); a row whose label is unknown is left out for that concept only.

For unit u and concept k over the rows known for k (n1 positive, n0 negative, n = n1 + n0):

    auc    U / (n1 n0), U = #{(i pos, j neg): x_i > x_j} + 0.5 #{x_i == x_j}       (Mann-Whitney U)
    p      two-sided Mann-Whitney p (scoring.statistics.mann_whitney_p: normal approximation, tie and
           continuity correction)
    q      Benjamini-Hochberg q of p over the units, within each concept (scoring.statistics.bh_qvalues)
    auprc  average precision: the mean over the positives i of precision(x_i), where precision(t) =
           #{pos: x >= t} / #{x >= t} (tied values share one threshold, as sklearn's average_precision_score);
           its chance level is the prevalence n1 / n
    r      Pearson correlation of x with the label (0 where either is constant)

The exact path keeps every row (n x U float32 + n x K int8 label codes, `bytes_needed`) and, in result(), ranks each
unit's column ONCE: from the one sort, every concept's U (the midrank sum of its positives), tie term and
average precision follow by counting (rows known for a concept but not for all are counted with one cumulative
sum over the same order). The binned path (`edges` given, from scoring.statistics.quantile_edges) keeps, per
unit, counts over the bins of scoring.statistics.BinnedAUC: one histogram of all rows plus one of each concept's
positives (and of its unknown rows when it has any), so (1 + K) x U x (2E + 1) int64 whatever the number of
rows. Its AUC and p are BinnedAUC's (error at most about 1 / (2E)); its AUPRC treats each bin as one tied
value (an estimate). The correlation streams in float64 (Chan's pairwise update) on both paths.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import torch

from .flags import UnitStatsResult, exact_bytes
from .statistics import RANK_BLOCK_BYTES, bh_qvalues, bin_counts, binned_u_statistic, mann_whitney_p

# ------------------------------------------------------------------------------------------- the result


@dataclass
class MultiLabelResult:
    """Every unit's statistics against every label; arrays are (K, U), counts (K,)."""
    auc: np.ndarray
    auprc: np.ndarray
    p: np.ndarray
    q: np.ndarray
    correlation: np.ndarray
    n_pos: np.ndarray
    n_neg: np.ndarray
    method: str                           # "exact" | "binned"

    @property
    def prevalence(self) -> np.ndarray:
        """(K,) n1 / (n1 + n0): the AUPRC of a unit that knows nothing (NaN without labelled rows)."""
        total = self.n_pos + self.n_neg
        return np.where(total > 0, self.n_pos / np.maximum(total, 1), np.nan)

    def label(self, k: int) -> UnitStatsResult:
        """One label's statistics, as the sweep reads them."""
        return UnitStatsResult(auc=self.auc[k], p=self.p[k], q=self.q[k], correlation=self.correlation[k],
                               n_pos=int(self.n_pos[k]), n_neg=int(self.n_neg[k]), method=self.method,
                               auprc=self.auprc[k])


# ------------------------------------------------------------------------------------------- helpers

def _as_rows(values, labels, units: int, count: int):
    """(values (b, U) float32, labels (b, K) float32) of the rows whose values are all finite."""
    x, y = (np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v, dtype=np.float32)
            for v in (values, labels))
    x, y = (v.reshape(-1, 1) if v.ndim == 1 else v for v in (x, y))
    if x.shape[0] != y.shape[0] or x.shape[1] != units or y.shape[1] != count:
        raise ValueError(f"values {x.shape} and labels {y.shape} do not match {units} units and {count} labels")
    keep = np.isfinite(x).all(axis=1)
    return (x, y) if keep.all() else (x[keep], y[keep])


def _mask_groups(known: np.ndarray) -> List[np.ndarray]:
    """Labels (columns of known (b, K)) grouped by identical known rows: a list of column-index arrays."""
    groups: Dict[bytes, List[int]] = {}
    for k in range(known.shape[1]):
        groups.setdefault(known[:, k].tobytes(), []).append(k)
    return [np.asarray(g) for g in groups.values()]


class _Correlations:
    """Per label and unit, Pearson correlation sums over that label's known rows (Chan et al.'s update in
    float64, as scoring.statistics.Correlation); labels with the same known rows share the centred values."""

    def __init__(self, units: int, count: int):
        self.units, self.k = int(units), int(count)
        self.count = np.zeros(self.k, np.int64)
        self.mean_x = np.zeros((self.k, self.units))
        self.m2_x = np.zeros((self.k, self.units))
        self.co = np.zeros((self.k, self.units))
        self.mean_s = np.zeros(self.k)
        self.m2_s = np.zeros(self.k)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        known = np.isfinite(y)
        for group in _mask_groups(known):
            rows = known[:, group[0]]
            count = int(rows.sum())
            if not count:
                continue
            xs = x[rows].astype(np.float64) if not rows.all() else x.astype(np.float64)
            s = y[rows][:, group].astype(np.float64)
            mean_x, mean_s = xs.mean(0), s.mean(0)
            dx, ds = xs - mean_x, s - mean_s
            m2_x = np.einsum("ij,ij->j", dx, dx)
            self._combine(group, count, mean_x, m2_x, (ds.T @ dx), mean_s, (ds * ds).sum(0))

    def _combine(self, group, count, mean_x, m2_x, co, mean_s, m2_s) -> None:
        before = self.count[group].astype(np.float64)
        total = before + count
        weight = (before * count / total)[:, None]
        delta_x = mean_x[None, :] - self.mean_x[group]
        delta_s = mean_s - self.mean_s[group]
        self.m2_x[group] += m2_x[None, :] + delta_x * delta_x * weight
        self.co[group] += co + delta_x * delta_s[:, None] * weight
        self.m2_s[group] += m2_s + delta_s * delta_s * weight[:, 0]
        self.mean_x[group] += delta_x * (count / total)[:, None]
        self.mean_s[group] += delta_s * (count / total)
        self.count[group] = total.astype(np.int64)

    def merge(self, other: "_Correlations") -> None:
        for k in np.flatnonzero(other.count):
            self._combine(np.array([k]), int(other.count[k]), other.mean_x[k], other.m2_x[k], other.co[k:k + 1],
                          other.mean_s[k:k + 1], other.m2_s[k:k + 1])

    def result(self) -> np.ndarray:
        out = np.zeros((self.k, self.units))
        ok = (self.count[:, None] >= 2) & (self.m2_s[:, None] > 0) & (self.m2_x > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = self.co / np.sqrt(self.m2_x * self.m2_s[:, None])
        out[ok] = r[ok]
        return np.clip(out, -1.0, 1.0).astype(np.float32)

    NAMES = ("count", "mean_x", "m2_x", "co", "mean_s", "m2_s")

    def state_dict(self) -> Dict[str, np.ndarray]:
        return {name: np.asarray(getattr(self, name)) for name in self.NAMES}

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        for name in self.NAMES:
            setattr(self, name, np.array(state[name], dtype=np.int64 if name == "count" else np.float64))
        self.k, self.units = self.mean_x.shape


# ------------------------------------------------------------------------------------------- exact path

def _sorted_order(columns: np.ndarray):
    """(order, sorted) of each row of columns (b, n) float32 without NaN: argsort by one sort of 64-bit keys,
    the value's bits made monotone (high half) and the position (low half): several times faster than
    np.argsort on columns with many ties (a ReLU's zeros). Equal values (-0.0 == 0.0 too) get equal keys."""
    b, n = columns.shape
    bits = (columns + np.float32(0.0)).view(np.uint32)                  # + 0.0 turns -0.0 into 0.0
    flip = (bits.view(np.int32) >> 31).view(np.uint32) | np.uint32(0x80000000)
    keys = np.empty((b, n), dtype=np.uint64)
    halves = keys.view(np.uint32).reshape(b, n, 2)
    low, high = (0, 1) if np.little_endian else (1, 0)
    np.bitwise_xor(bits, flip, out=halves[..., high])
    halves[..., low] = np.arange(n, dtype=np.uint32)
    keys.sort(axis=1)
    return halves[..., low].astype(np.intp), np.ascontiguousarray(halves[..., high])


def _runs(ordered: np.ndarray):
    """For sorted rows (b, n): each position's run of equal values as (start, end + 1) positions (int32),
    and per row the tie term, the sum over runs of t^3 - t."""
    b, n = ordered.shape
    start = np.ones((b, n), dtype=bool)
    np.not_equal(ordered[:, 1:], ordered[:, :-1], out=start[:, 1:])
    flat = start.ravel()
    starts = np.flatnonzero(flat)
    length = np.diff(starts, append=b * n).astype(np.int32)
    run = np.cumsum(flat, dtype=np.int32)
    run -= 1
    first = starts.astype(np.int32)[run].reshape(b, n)
    first -= (np.arange(b, dtype=np.int32) * n)[:, None]
    tied = length > 1
    t = length[tied].astype(np.float64)
    ties = np.bincount(starts[tied] // n, weights=t * t * t - t, minlength=b)
    return first, first + length[run].reshape(b, n), ties


def _run_starts(keys: np.ndarray) -> np.ndarray:
    """For sorted rows (b, m): the position where each position's run of equal values starts."""
    b, m = keys.shape
    start = np.ones((b, m), dtype=bool)
    np.not_equal(keys[:, 1:], keys[:, :-1], out=start[:, 1:])
    flat = start.ravel()
    run = np.cumsum(flat, dtype=np.int64) - 1
    return (np.flatnonzero(flat)[run].reshape(b, m) - (np.arange(b) * m)[:, None])


def _rank_block(columns: np.ndarray, codes: np.ndarray, groups: List[np.ndarray]):
    """(U statistic, tie term, average precision), each (K, b), of the columns (b, n) against label codes
    (n, K) (1 positive, 0 negative, -1 unknown): one sort per unit, then counting per group of labels with the
    same known rows."""
    b, n = columns.shape
    k = codes.shape[1]
    u_stat, ties, ap = np.zeros((k, b)), np.zeros((k, b)), np.full((k, b), np.nan)
    order, ordered = _sorted_order(columns)
    first, after, all_ties = _runs(ordered)
    for group in groups:
        known = codes[:, group[0]] >= 0
        size = int(known.sum())
        if known.all():                     # among all rows: `first` rows are below, `after` at most as high
            below_sorted, upto_sorted, tie_term = first, after, all_ties
        else:                               # among the known rows: one cumulative sum over the same order
            counted = np.cumsum(known[order], axis=1, dtype=np.int32)
            below_sorted = np.where(first > 0, np.take_along_axis(counted, np.maximum(first - 1, 0), axis=1), 0)
            upto_sorted = np.take_along_axis(counted, after - 1, axis=1)
            run_start = np.ones((b, n), dtype=bool)
            np.not_equal(first[:, 1:], first[:, :-1], out=run_start[:, 1:])
            tied = np.where(run_start, upto_sorted - below_sorted, 0).astype(np.float64)
            tie_term = (tied * tied * tied - tied).sum(axis=1)
        below = np.empty((b, n), dtype=np.int32)
        upto = np.empty((b, n), dtype=np.int32)
        np.put_along_axis(below, order, below_sorted, axis=1)
        np.put_along_axis(upto, order, upto_sorted, axis=1)
        for label in group:
            positive = np.flatnonzero(codes[:, label] == 1)
            n1 = len(positive)
            ties[label] = tie_term
            if not n1:
                continue
            # the positives' midranks among the known rows: (below + 1 + upto) / 2
            keys = below[:, positive]
            twice_ranks = keys.sum(axis=1, dtype=np.int64) + upto[:, positive].sum(axis=1, dtype=np.int64) + n1
            u_stat[label] = twice_ranks / 2.0 - n1 * (n1 + 1) / 2.0
            # precision at each positive: #positives >= x over #known >= x; `below` orders known rows exactly
            keys.sort(axis=1)
            ap[label] = ((n1 - _run_starts(keys)) / (size - keys)).mean(axis=1)
    return u_stat, ties, ap


class _ExactRows:
    """Every counted row: its values (float32) and label codes (int8: 1 positive, 0 negative, -1 unknown),
    ranked per unit in statistics()."""

    def __init__(self, units: int, count: int):
        self.units, self.k = int(units), int(count)
        self.values: List[np.ndarray] = []
        self.codes: List[np.ndarray] = []

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        if len(x):
            self.values.append(np.array(x, dtype=np.float32))      # a copy: never the caller's buffer
            self.codes.append(np.where(np.isfinite(y), (y >= 0.5).astype(np.int8), np.int8(-1)).astype(np.int8))

    def merge(self, other: "_ExactRows") -> None:
        self.values += other.values
        self.codes += other.codes

    def all(self):
        if len(self.values) != 1:      # compact once: later calls and merges reuse one block
            self.values = [np.concatenate(self.values) if self.values else np.zeros((0, self.units), np.float32)]
            self.codes = [np.concatenate(self.codes) if self.codes else np.zeros((0, self.k), np.int8)]
        return self.values[0], self.codes[0]

    def counts(self):
        codes = self.all()[1]
        return (codes == 1).sum(axis=0), (codes == 0).sum(axis=0)

    def statistics(self):
        x, codes = self.all()
        n = len(x)
        u_stat, ties, ap = np.zeros((self.k, self.units)), np.zeros((self.k, self.units)), \
            np.full((self.k, self.units), np.nan)
        groups = _mask_groups(codes >= 0)
        block = max(1, RANK_BLOCK_BYTES // max(1, n * 48))        # about 48 bytes of workspace per value
        for start in range(0, self.units if n else 0, block):
            stop = min(self.units, start + block)
            columns = np.ascontiguousarray(x[:, start:stop].T)
            u_stat[:, start:stop], ties[:, start:stop], ap[:, start:stop] = _rank_block(columns, codes, groups)
        return u_stat, ties, ap

    def state_dict(self) -> Dict[str, np.ndarray]:
        x, codes = self.all()
        return {"values": x, "codes": codes}

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        self.values = [np.asarray(state["values"], np.float32)]
        self.codes = [np.asarray(state["codes"], np.int8)]
        self.units, self.k = self.values[0].shape[1], self.codes[0].shape[1]


# ------------------------------------------------------------------------------------------- binned path

class _BinnedCounts:
    """Per unit, counts over BinnedAUC's bins: all rows, each label's positives and its unknown rows."""

    def __init__(self, edges, count: int):
        edges = np.ascontiguousarray(np.asarray(edges, dtype=np.float32))
        if edges.ndim != 2 or edges.shape[1] < 1:
            raise ValueError("binned statistics need edges of shape (units, E >= 1)")
        if (edges[:, 1:] < edges[:, :-1]).any() or not np.isfinite(edges).all():
            raise ValueError("binned edges must be finite and non-decreasing per unit")
        self.edges, self.k = edges, int(count)
        self.repeated = edges[:, 1:] == edges[:, :-1]
        self.units, self.n_edges = edges.shape
        self.n_bins = 2 * self.n_edges + 1
        self.total = np.zeros((self.units, self.n_bins), np.int64)
        self.pos = np.zeros((self.k, self.units, self.n_bins), np.int64)
        self.unknown: Dict[int, np.ndarray] = {}

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        if not len(x):
            return
        columns = np.ascontiguousarray(x.T)                                  # (U, b)
        self.total += bin_counts(columns, self.edges, self.repeated)
        wanted = [(k, rows, unknown) for k in range(self.k)
                  for rows, unknown in ((y[:, k] >= 0.5, False), (~np.isfinite(y[:, k]), True)) if rows.any()]
        flat = self._flat_bins(columns) if len(wanted) > 2 else None
        for k, rows, unknown in wanted:
            if flat is None:                          # a label or two: sort their rows, as BinnedAUC does
                found = bin_counts(columns[:, rows], self.edges, self.repeated)
            else:                                     # many: each value's bin once, then one count per label
                found = np.bincount(flat[:, rows].ravel(), minlength=self.units * self.n_bins).reshape(self.units, -1)
            if not unknown:
                self.pos[k] += found
            else:
                self.unknown[k] = self.unknown[k] + found if k in self.unknown else found

    def _flat_bins(self, columns: np.ndarray) -> np.ndarray:
        """(U, b) each value's bin (those of bin_counts: 2i below edge i, 2i + 1 at edge i), offset by its unit's
        first bin, for one bincount over all units."""
        edges, values = torch.from_numpy(self.edges), torch.from_numpy(columns)
        index = torch.searchsorted(edges, values)                            # edges[i-1] < v <= edges[i]
        at_edge = edges.gather(1, index.clamp(max=self.n_edges - 1)) == values
        flat = (2 * index + (at_edge & (index < self.n_edges)).to(torch.int64)).numpy()
        return flat + (np.arange(self.units, dtype=np.int64) * self.n_bins)[:, None]

    def merge(self, other: "_BinnedCounts") -> None:
        if other.edges.shape != self.edges.shape or not np.array_equal(other.edges, self.edges):
            raise ValueError("cannot merge binned statistics with different edges; give every shard the same edges")
        self.total += other.total
        self.pos += other.pos
        for k, counted in other.unknown.items():
            self.unknown[k] = self.unknown[k] + counted if k in self.unknown else counted.copy()

    def negatives(self, k: int) -> np.ndarray:
        neg = self.total - self.pos[k]
        return neg - self.unknown[k] if k in self.unknown else neg

    def counts(self):
        pos = self.pos[:, 0].sum(axis=1) if self.units else np.zeros(self.k, np.int64)
        neg = np.array([self.negatives(k)[0].sum() if self.units else 0 for k in range(self.k)], np.int64)
        return pos, neg

    def statistics(self):
        u_stat, ties, ap = np.zeros((self.k, self.units)), np.zeros((self.k, self.units)), \
            np.full((self.k, self.units), np.nan)
        for k in range(self.k):
            pos, neg = self.pos[k].astype(np.float64), self.negatives(k).astype(np.float64)
            u_stat[k], ties[k] = binned_u_statistic(pos, neg)
            n1 = pos[0].sum() if self.units else 0
            if n1:                                # each bin as one tied value, thresholds from the top down
                above_pos = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1]
                above_all = above_pos + np.cumsum(neg[:, ::-1], axis=1)[:, ::-1]
                with np.errstate(divide="ignore", invalid="ignore"):
                    precision = np.where(above_all > 0, above_pos / np.maximum(above_all, 1), 0.0)
                ap[k] = (pos * precision).sum(axis=1) / n1
        return u_stat, ties, ap

    def state_dict(self) -> Dict[str, np.ndarray]:
        state = {"edges": self.edges, "total": self.total, "pos": self.pos}
        state.update({f"unknown/{k}": v for k, v in self.unknown.items()})
        return state

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        self.__init__(state["edges"], np.asarray(state["pos"]).shape[0])
        self.total, self.pos = np.array(state["total"], np.int64), np.array(state["pos"], np.int64)
        self.unknown = {int(name.split("/", 1)[1]): np.array(v, np.int64) for name, v in state.items()
                        if name.startswith("unknown/")}


# ------------------------------------------------------------------------------------------- the accumulator

class MultiLabelStats:
    """Correlation, AUC, p and AUPRC of every unit against K labels (module docstring): exact, or binned
    when `edges` (U, E) are given. add / merge / state_dict / load_state_dict / result."""

    def __init__(self, units: int, labels: int = 1, edges=None):
        self.units, self.k = int(units), int(labels)
        self.correlation = _Correlations(self.units, self.k)
        self.ranks = _ExactRows(self.units, self.k) if edges is None else _BinnedCounts(edges, self.k)
        if edges is not None and self.ranks.units != self.units:
            raise ValueError(f"edges are for {self.ranks.units} units, not {self.units}")

    @property
    def method(self) -> str:
        return "exact" if isinstance(self.ranks, _ExactRows) else "binned"

    @staticmethod
    def bytes_needed(rows: int, units: int, labels: int = 1) -> int:
        """Memory the exact path's kept rows take (result() adds a bounded workspace, RANK_BLOCK_BYTES); for one
        label, ExactAUC's."""
        return exact_bytes(rows, units, labels)

    def add(self, values, labels) -> None:
        x, y = _as_rows(values, labels, self.units, self.k)
        if len(x):
            self.correlation.add(x, y)
            self.ranks.add(x, y)

    def merge(self, other: "MultiLabelStats") -> None:
        if (other.units, other.k, other.method) != (self.units, self.k, self.method):
            raise ValueError("cannot merge statistics of different units, labels or method")
        self.correlation.merge(other.correlation)
        self.ranks.merge(other.ranks)

    def result(self) -> MultiLabelResult:
        n_pos, n_neg = self.ranks.counts()
        u_stat, ties, ap = self.ranks.statistics()
        auc, p = np.full((self.k, self.units), np.nan), np.full((self.k, self.units), np.nan)
        q = np.full((self.k, self.units), np.nan)
        for k in range(self.k):
            n1, n0 = int(n_pos[k]), int(n_neg[k])
            if n1 and n0:
                auc[k] = u_stat[k] / (n1 * n0)
                p[k] = mann_whitney_p(u_stat[k], n1, n0, ties[k])
                q[k] = bh_qvalues(p[k])
            else:
                ap[k] = np.nan
        return MultiLabelResult(auc=auc, auprc=ap, p=p, q=q, correlation=self.correlation.result(),
                                n_pos=np.asarray(n_pos, np.int64), n_neg=np.asarray(n_neg, np.int64),
                                method=self.method)

    def state_dict(self) -> Dict[str, np.ndarray]:
        state = {f"correlation.{k}": v for k, v in self.correlation.state_dict().items()}
        state.update({f"ranks.{k}": v for k, v in self.ranks.state_dict().items()})
        return state

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        self.correlation.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()
                                          if k.startswith("correlation.")})
        ranks = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("ranks.")}
        self.ranks = _BinnedCounts(ranks["edges"], self.k) if "edges" in ranks else _ExactRows(self.units, self.k)
        self.ranks.load_state_dict(ranks)
        self.units, self.k = self.correlation.units, self.correlation.k

