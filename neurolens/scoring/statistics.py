"""Per-unit statistics of activations against a binary image label, as MERGEABLE accumulators.

Every accumulator has `add(values, labels)`, `merge(other)`, `state_dict()`, `load_state_dict(state)` and
`result()`, in the style of neurolens.activations.stats: a sweep can be split into shards (Ray workers, SAE feature
blocks, resumed runs) whose accumulators are merged, and the result does not depend on how rows were split
or ordered. `values` is (B, U) (one row per image, one column per unit: e.g. each image's spatial-max
activation), `labels` is (B,) (>= 0.5 positive, < 0.5 negative, NaN unknown). Rows with an unknown label
or any non-finite value are left out (skipped images have NaN rows). numpy arrays or torch tensors are
accepted; state_dict gives numpy arrays (for the HDF5 cache).

Definitions, for one unit with n1 positive and n0 negative rows (n = n1 + n0):

    AUC = U / (n1 n0)                    U = #{(i pos, j neg): x_i > x_j} + 0.5 #{x_i == x_j}
                                         (the Mann-Whitney U of the positives; ROC AUC, ties counted half)
    p   = 2 * (1 - Phi(z))               z = (|U - n1 n0 / 2| - 0.5) / sigma,
                                         sigma^2 = n1 n0 / 12 * ((n + 1) - T / (n (n - 1))),
                                         T = sum over groups of tied values of (t^3 - t)
                                         (normal approximation with tie and continuity correction: what
                                         scipy.stats.mannwhitneyu(method="asymptotic") computes); p = 1
                                         when sigma = 0 (every value tied)
    q   = Benjamini-Hochberg adjusted p over the units (`bh_qvalues`, = scipy's false_discovery_control)
    r   = Pearson correlation of x with the label (0/1, or any real score) (`Correlation`)

AUC and p are NaN when a class is empty. Two AUC accumulators:

- `ExactAUC` keeps every row (n x U float32, `ExactAUC.bytes_needed`) and ranks each unit's column: exact.
- `BinnedAUC` keeps two histograms per unit over fixed bin edges (U x (2E+1) counts, independent of n):
  for edges e_1 <= ... <= e_E a value falls in the open interval between two edges or, when it equals an
  edge, in that edge's own "point" bin, so exact ties at an edge (a ReLU's zeros) stay exact ties. Pairs
  in the same interval bin count half; the error against the exact AUC is at most half the largest share of
  negatives (or positives) in one interval bin: about 1 / (2 E) with quantile edges (`quantile_edges`).
  Shards merge only with the same edges (compute them once from a sample and hand them to every shard).

`UnitLabelStats` bundles a Correlation and one AUC accumulator, and its result has auc, p, q, correlation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Union

import numpy as np
import torch
from scipy.special import ndtr

from .flags import UnitStatsResult
from .ranks import rank_block

ArrayLike = Union[np.ndarray, torch.Tensor]
DEFAULT_BINS = 1024                   # interval bins of BinnedAUC's quantile edges
RANK_BLOCK_BYTES = 128 * 2 ** 20      # ExactAUC.result ranks units in blocks of about this much workspace


# ------------------------------------------------------------------------------------------ helpers

def _tensor(values: ArrayLike, dtype: torch.dtype, device) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(values), dtype=dtype, device=device)


def _rows(values: ArrayLike, labels: ArrayLike, units: int, device):
    """(values (b, U) float32, positive (b,) bool) of the rows with a known label and finite values."""
    x = _tensor(values, torch.float32, device)
    if x.ndim == 1:
        x = x.view(-1, 1)
    y = _tensor(labels, torch.float64, device).view(-1)
    if x.shape[0] != y.shape[0] or x.shape[1] != units:
        raise ValueError(f"values {tuple(x.shape)} and labels {tuple(y.shape)} do not match {units} units")
    keep = torch.isfinite(y) & torch.isfinite(x).all(dim=1)
    if not bool(keep.all()):
        x, y = x[keep], y[keep]
    return x, y >= 0.5


@dataclass
class AUCResult:
    """auc, p: (U,) float64 (NaN where a class is empty); n_pos, n_neg: rows counted."""
    auc: np.ndarray
    p: np.ndarray
    n_pos: int
    n_neg: int
    method: str                       # "exact" | "binned"


def mann_whitney_p(u_stat: np.ndarray, n_pos: int, n_neg: int, tie_term: np.ndarray) -> np.ndarray:
    """Two-sided p of the Mann-Whitney U (normal approximation, tie and continuity correction).

    u_stat: (U,) U of the positives; tie_term: (U,) sum of t^3 - t over tied groups."""
    u_stat = np.asarray(u_stat, dtype=np.float64)
    n = n_pos + n_neg
    if n_pos == 0 or n_neg == 0:
        return np.full(u_stat.shape, np.nan)
    variance = n_pos * n_neg / 12.0 * ((n + 1) - np.asarray(tie_term, dtype=np.float64) / (n * (n - 1)))
    sigma = np.sqrt(np.maximum(variance, 0.0))
    deviation = np.abs(u_stat - n_pos * n_neg / 2.0) - 0.5
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(sigma > 0, deviation / np.where(sigma > 0, sigma, 1.0), 0.0)
    return np.clip(2.0 * ndtr(-z), 0.0, 1.0)


def bh_qvalues(p: ArrayLike) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) of the finite entries of p; NaN stays NaN.

    q_(i) = min over j >= i of m p_(j) / j (p sorted ascending, m = number of finite p), capped at 1:
    flagging every unit with q <= alpha controls the false discovery rate at alpha."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = len(finite)
    if not m:
        return q
    order = finite[np.argsort(p[finite], kind="mergesort")]
    scaled = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q


def binned_u_statistic(pos: np.ndarray, neg: np.ndarray):
    """(U of the positives, tie term), each (U,), from positive and negative counts (U, 2E + 1) over BinnedAUC's
    bins: pairs in one bin count half; point bins hold exactly tied values, interval bins count as distinct."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    below = np.cumsum(neg, axis=1) - neg
    u_stat = (pos * (below + 0.5 * neg)).sum(axis=1)
    size = pos[:, 1::2] + neg[:, 1::2]
    return u_stat, (size ** 3 - size).sum(axis=1)


def bin_counts(columns: np.ndarray, edges: np.ndarray, repeated: Optional[np.ndarray] = None) -> np.ndarray:
    """(U, 2E + 1) counts of the values columns (U, m) in BinnedAUC's bins of edges (U, E): one sort per unit,
    then a binary search of the edges in the sorted values (the bins of `BinnedAUC.bins_of`, several times
    faster on a CPU). A repeated edge's values are counted once, in the first copy's point bin."""
    ordered = np.sort(columns, axis=1)
    units, m = ordered.shape
    out = np.empty((units, 2 * edges.shape[1] + 1), dtype=np.int64)
    for u in range(units):
        below = np.searchsorted(ordered[u], edges[u], side="left")      # values < e_i
        not_above = np.searchsorted(ordered[u], edges[u], side="right")  # values <= e_i
        out[u, 1::2] = not_above - below                                # == e_i
        out[u, 0] = below[0]                                            # < e_0
        out[u, 2:-1:2] = below[1:] - not_above[:-1]                     # between e_(i-1) and e_i
        out[u, -1] = m - not_above[-1]                                  # > e_last
    repeated = edges[:, 1:] == edges[:, :-1] if repeated is None else repeated
    if repeated.any():
        out[:, 2:-1:2][repeated] = 0
        out[:, 3::2][repeated] = 0
    return out


def quantile_edges(sample: ArrayLike, bins: int = DEFAULT_BINS) -> np.ndarray:
    """(U, bins + 1) float32 edges for BinnedAUC: per unit, the 0, 1/bins, ..., 1 quantiles of a sample of
    rows (m, U) (non-finite rows ignored). Values outside the sample's range fall in the two open end bins."""
    x = np.asarray(sample, dtype=np.float32)
    if x.ndim != 2 or not len(x):
        raise ValueError("quantile_edges needs a (rows, units) sample with at least one row")
    x = x[np.isfinite(x).all(axis=1)]
    if not len(x):
        raise ValueError("quantile_edges: no finite row in the sample")
    ordered = np.sort(np.ascontiguousarray(x.T), axis=1)               # (U, m)
    m = ordered.shape[1]
    # the inverted-CDF quantiles: sample values themselves, so exact ties (a ReLU's zeros) stay ties
    at = np.clip(np.ceil(np.linspace(0.0, 1.0, int(bins) + 1) * m).astype(np.int64) - 1, 0, m - 1)
    return np.ascontiguousarray(ordered[:, at], dtype=np.float32)


# --------------------------------------------------------------------------------------- correlation

class Correlation:
    """Per unit, the Pearson correlation of values (B, U) with a per-row score (B,) (a 0/1 label or any real
    score). Chan et al.'s pairwise update of means and co-moments in float64: exact to rounding whatever the
    offset of the values, and mergeable. 0 where either side is constant."""

    def __init__(self, units: int, device: torch.device | str = "cpu"):
        self.units = int(units)
        self.device = torch.device(device)
        self.count = 0
        self.mean_x = torch.zeros(self.units, dtype=torch.float64, device=self.device)
        self.m2_x = torch.zeros_like(self.mean_x)
        self.co = torch.zeros_like(self.mean_x)           # sum (x - mean_x)(s - mean_s)
        self.mean_s = 0.0
        self.m2_s = 0.0

    def add(self, values: ArrayLike, scores: ArrayLike) -> None:
        x = _tensor(values, torch.float64, self.device)
        if x.ndim == 1:
            x = x.view(-1, 1)
        s = _tensor(scores, torch.float64, self.device).view(-1)
        keep = torch.isfinite(s) & torch.isfinite(x).all(dim=1)
        x, s = x[keep], s[keep]
        count = int(s.shape[0])
        if not count:
            return
        mean_x, mean_s = x.mean(0), float(s.mean())
        dx, ds = x - mean_x, s - mean_s
        self._combine(count, mean_x, (dx * dx).sum(0), dx.t() @ ds, mean_s, float((ds * ds).sum()))

    def merge(self, other: "Correlation") -> None:
        if other.units != self.units:
            raise ValueError("cannot merge Correlation of different unit counts")
        if other.count:
            d = self.device
            self._combine(other.count, other.mean_x.to(d), other.m2_x.to(d), other.co.to(d), other.mean_s,
                          other.m2_s)

    def _combine(self, count, mean_x, m2_x, co, mean_s, m2_s) -> None:
        total = self.count + count
        weight = self.count * count / total
        delta_x, delta_s = mean_x - self.mean_x, mean_s - self.mean_s
        self.m2_x = self.m2_x + m2_x + delta_x * delta_x * weight
        self.co = self.co + co + delta_x * delta_s * weight
        self.m2_s = self.m2_s + m2_s + delta_s * delta_s * weight
        self.mean_x = self.mean_x + delta_x * (count / total)
        self.mean_s = self.mean_s + delta_s * (count / total)
        self.count = total

    def result(self) -> np.ndarray:
        """(U,) float32 correlations."""
        out = np.zeros(self.units, np.float64)
        if self.count < 2 or self.m2_s <= 0:
            return out.astype(np.float32)
        m2_x, co = self.m2_x.cpu().numpy(), self.co.cpu().numpy()
        ok = m2_x > 0
        out[ok] = co[ok] / np.sqrt(m2_x[ok] * self.m2_s)
        return np.clip(out, -1.0, 1.0).astype(np.float32)

    def state_dict(self) -> Dict[str, np.ndarray]:
        return {"count": np.asarray(self.count, np.int64), "mean_x": self.mean_x.cpu().numpy(),
                "m2_x": self.m2_x.cpu().numpy(), "co": self.co.cpu().numpy(),
                "mean_s": np.asarray(self.mean_s), "m2_s": np.asarray(self.m2_s)}

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        self.count = int(np.asarray(state["count"]))
        for name in ("mean_x", "m2_x", "co"):
            setattr(self, name, torch.as_tensor(np.asarray(state[name], np.float64), device=self.device))
        self.mean_s, self.m2_s = float(np.asarray(state["mean_s"])), float(np.asarray(state["m2_s"]))
        self.units = int(self.mean_x.shape[0])


# ------------------------------------------------------------------------------------------ exact AUC

class ExactAUC:
    """Exact AUC and Mann-Whitney p per unit: keeps every counted row (float32) and ranks each column in
    result(). Memory: `bytes_needed(rows, units)`; merge concatenates rows."""

    def __init__(self, units: int, device: torch.device | str = "cpu"):
        self.units = int(units)
        self.device = torch.device(device)
        self._values = []
        self._labels = []

    @staticmethod
    def bytes_needed(rows: int, units: int) -> int:
        """Memory the kept rows take (result() adds a bounded workspace, RANK_BLOCK_BYTES)."""
        return int(rows) * (int(units) * 4 + 1)

    @property
    def count(self) -> int:
        return sum(int(v.shape[0]) for v in self._values)

    def add(self, values: ArrayLike, labels: ArrayLike) -> None:
        x, positive = _rows(values, labels, self.units, self.device)
        if x.shape[0]:
            self._values.append(x.clone())        # never a view of the caller's buffer
            self._labels.append(positive)

    def merge(self, other: "ExactAUC") -> None:
        if other.units != self.units:
            raise ValueError("cannot merge ExactAUC of different unit counts")
        self._values += [v.to(self.device) for v in other._values]
        self._labels += [y.to(self.device) for y in other._labels]

    def _all(self):
        if not self._values:
            return (torch.zeros((0, self.units), dtype=torch.float32, device=self.device),
                    torch.zeros(0, dtype=torch.bool, device=self.device))
        if len(self._values) > 1:     # compact once: later calls and merges reuse one block
            self._values, self._labels = [torch.cat(self._values)], [torch.cat(self._labels)]
        return self._values[0], self._labels[0]

    def result(self) -> AUCResult:
        x, positive = self._all()
        n_pos, n = int(positive.sum()), int(x.shape[0])
        n_neg = n - n_pos
        if n_pos == 0 or n_neg == 0:
            nan = np.full(self.units, np.nan)
            return AUCResult(nan, nan.copy(), n_pos, n_neg, "exact")
        values = x.cpu().numpy()
        is_pos = positive.cpu().numpy()
        u_stat = np.empty(self.units)
        ties = np.empty(self.units)
        block = max(1, RANK_BLOCK_BYTES // max(1, n * 16))       # about 4 float32 copies of a block
        for start in range(0, self.units, block):
            stop = min(self.units, start + block)
            u_stat[start:stop], ties[start:stop] = rank_block(values[:, start:stop], is_pos)
        return AUCResult(u_stat / (n_pos * n_neg), mann_whitney_p(u_stat, n_pos, n_neg, ties), n_pos, n_neg,
                         "exact")

    def state_dict(self) -> Dict[str, np.ndarray]:
        x, positive = self._all()
        return {"values": x.cpu().numpy(), "labels": positive.cpu().numpy()}

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        values = torch.as_tensor(np.asarray(state["values"], np.float32), device=self.device)
        self.units = int(values.shape[1])
        self._values = [values]
        self._labels = [torch.as_tensor(np.asarray(state["labels"], bool), device=self.device)]


# ----------------------------------------------------------------------------------------- binned AUC

class BinnedAUC:
    """Streaming AUC and Mann-Whitney p per unit from positive and negative histograms over fixed edges
    (module docstring). Memory: U x (2E + 1) x 2 int64 counts, whatever the number of rows."""

    def __init__(self, edges: ArrayLike, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        edges = _tensor(edges, torch.float32, self.device)
        if edges.ndim != 2 or edges.shape[1] < 1:
            raise ValueError("BinnedAUC needs edges of shape (units, E >= 1)")
        if bool((edges[:, 1:] < edges[:, :-1]).any()) or not bool(torch.isfinite(edges).all()):
            raise ValueError("BinnedAUC edges must be finite and non-decreasing per unit")
        self.edges = edges.contiguous()
        self._edges_np = self.edges.cpu().numpy()
        self._repeated = self._edges_np[:, 1:] == self._edges_np[:, :-1]
        self.units, self.n_edges = int(edges.shape[0]), int(edges.shape[1])
        self.n_bins = 2 * self.n_edges + 1
        self.pos = torch.zeros((self.units, self.n_bins), dtype=torch.int64, device=self.device)
        self.neg = torch.zeros_like(self.pos)

    @classmethod
    def from_sample(cls, sample: ArrayLike, bins: int = DEFAULT_BINS, device: torch.device | str = "cpu"
                    ) -> "BinnedAUC":
        return cls(quantile_edges(sample, bins), device=device)

    def bins_of(self, x: torch.Tensor) -> torch.Tensor:
        """(U, b) bin index of the values x (b, U): 2i for the interval below edge i, 2i + 1 for edge i."""
        values = x.t().contiguous()
        index = torch.searchsorted(self.edges, values)                    # edges[i-1] < v <= edges[i]
        at_edge = self.edges.gather(1, index.clamp(max=self.n_edges - 1)) == values
        return 2 * index + (at_edge & (index < self.n_edges)).to(torch.int64)

    def add(self, values: ArrayLike, labels: ArrayLike) -> None:
        x, positive = _rows(values, labels, self.units, self.device)
        if not x.shape[0]:
            return
        columns = np.ascontiguousarray(x.cpu().numpy().T)                 # (U, b)
        is_pos = positive.cpu().numpy()
        for mask, hist in ((is_pos, self.pos), (~is_pos, self.neg)):
            if mask.any():
                hist += torch.as_tensor(self.counts(columns[:, mask]), device=self.device)

    def counts(self, columns: np.ndarray) -> np.ndarray:
        """(U, 2E + 1) bin counts of the values columns (U, m) (`bin_counts`)."""
        return bin_counts(columns, self._edges_np, self._repeated)

    def merge(self, other: "BinnedAUC") -> None:
        if other.edges.shape != self.edges.shape or not torch.equal(other.edges.to(self.device), self.edges):
            raise ValueError("cannot merge BinnedAUC with different edges; give every shard the same edges")
        self.pos += other.pos.to(self.device)
        self.neg += other.neg.to(self.device)

    @property
    def count(self) -> int:
        return int(self.pos[0].sum() + self.neg[0].sum()) if self.units else 0

    def result(self) -> AUCResult:
        pos, neg = self.pos.to(torch.float64), self.neg.to(torch.float64)
        n_pos = int(self.pos[0].sum()) if self.units else 0
        n_neg = int(self.neg[0].sum()) if self.units else 0
        if n_pos == 0 or n_neg == 0:
            nan = np.full(self.units, np.nan)
            return AUCResult(nan, nan.copy(), n_pos, n_neg, "binned")
        u_stat, tie_term = binned_u_statistic(pos.cpu().numpy(), neg.cpu().numpy())
        return AUCResult(u_stat / (n_pos * n_neg), mann_whitney_p(u_stat, n_pos, n_neg, tie_term), n_pos, n_neg,
                         "binned")

    def state_dict(self) -> Dict[str, np.ndarray]:
        return {"edges": self.edges.cpu().numpy(), "pos": self.pos.cpu().numpy(), "neg": self.neg.cpu().numpy()}

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        self.__init__(state["edges"], device=self.device)
        self.pos = torch.as_tensor(np.asarray(state["pos"], np.int64), device=self.device)
        self.neg = torch.as_tensor(np.asarray(state["neg"], np.int64), device=self.device)


# ------------------------------------------------------------------------------------------- bundle


class UnitLabelStats:
    """A Correlation and an AUC accumulator (exact, or binned when `edges` are given) fed together."""

    def __init__(self, units: int, edges: Optional[ArrayLike] = None, device: torch.device | str = "cpu"):
        self.units = int(units)
        self.correlation = Correlation(units, device)
        self.auc = ExactAUC(units, device) if edges is None else BinnedAUC(edges, device)

    @property
    def method(self) -> str:
        return "exact" if isinstance(self.auc, ExactAUC) else "binned"

    def add(self, values: ArrayLike, labels: ArrayLike) -> None:
        self.correlation.add(values, labels)
        self.auc.add(values, labels)

    def merge(self, other: "UnitLabelStats") -> None:
        self.correlation.merge(other.correlation)
        self.auc.merge(other.auc)

    def result(self) -> UnitStatsResult:
        auc = self.auc.result()
        return UnitStatsResult(auc=auc.auc, p=auc.p, q=bh_qvalues(auc.p), correlation=self.correlation.result(),
                               n_pos=auc.n_pos, n_neg=auc.n_neg, method=auc.method)

    def state_dict(self) -> Dict[str, np.ndarray]:
        state = {f"correlation.{k}": v for k, v in self.correlation.state_dict().items()}
        state.update({f"auc.{k}": v for k, v in self.auc.state_dict().items()})
        return state

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        self.correlation.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()
                                          if k.startswith("correlation.")})
        auc_state = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("auc.")}
        self.auc = BinnedAUC(auc_state["edges"], self.auc.device) if "edges" in auc_state \
            else ExactAUC(self.units, self.auc.device)
        self.auc.load_state_dict(auc_state)
