"""Open-vocabulary caption evidence of every unit: the caption words and two-word phrases most enriched in the
unit's top images, each CHOSEN on one half of the images and SCORED on the other, held-out half (numpy and
scipy.sparse only: no model).

Tokens and n-grams (scoring.captions): a caption's words (lower-cased runs of letters and digits), and its
n-grams: every word that is not a stopword and every pair of adjacent words neither of which is one ("red
circles", not "on the"). An n-gram counts once per caption (presence), so a caption that repeats a word does
not weigh more.

Halves. The scanned images with a non-empty caption are split by a seeded permutation (HALF_SEED) into half A
(the first ceil(n/2) of the permutation) and half B (the rest). Half A chooses, half B scores.

Top images. A unit's top images in a half are the `top_k` images OF THAT HALF with the highest activation of
the unit (its spatial max, the scan's per-image maxima), ties broken by the lower dataset index; the *rest* of
the half are its other captioned images. They are found in one stream over the scan's chunk records (`merge_top`
per block, pipelines.describe.top_by_half: no N x U matrix), so the streaming path of large scans gets the
exact top images, not a sample.

Log-odds with an informative Dirichlet prior (Monroe, Colaresi & Quinn 2008, "Fightin' Words", eq. 22). In
one half, for n-gram w and unit u:

    y_w  captions of u's top images that contain w      n = sum over w of y_w
    r_w  captions of the rest of the half containing w   m = sum over w of r_w
    f_w  w's share of all n-gram occurrences of the captioned images (both halves: captions only, no
         activation, so nothing of the held-out half's evidence)
    a_w = PRIOR * n * f_w,  b_w = PRIOR * m * f_w      each group's prior: PRIOR times its own size
    delta_w = log((y_w + a_w) / (n + PRIOR n - y_w - a_w)) - log((r_w + b_w) / (m + PRIOR m - r_w - b_w))
    var_w   = 1 / (y_w + a_w) + 1 / (r_w + b_w)          z_w = delta_w / sqrt(var_w)

delta is the log odds ratio of w in the top images against the rest, each shrunk towards w's frequency in the
captions (a rare n-gram seen once has a large variance and a small z). Monroe et al. give both groups one prior
a0 f_w; with groups as unequal as k top images and the rest of a half, that prior weighs far more in the small
group and gives an n-gram seen in neither group a positive log-odds (log((m + a0) / (n + a0))). Scaling each
group's prior by its own size keeps such an n-gram at 0. Chosen on half A: the n-grams with
y_w >= MIN_TOP_COUNT and z_w >= SELECT_Z, highest z first, at most `ngrams` per unit. Scored on half B (held
out from choosing them): y_w / k (`top_share`: k the unit's top images there), r_w / (rest images)
(`base_share`), delta (`log_odds`), its 95 % interval delta +- 1.96 sqrt(var) (`ci_low`, `ci_high`) and z. Only
the held-out numbers are evidence: a chosen n-gram whose held-out interval includes 0 did not replicate.

"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import sparse

from .captions import caption_ngrams
from .intervals import Z95


PRIOR = 1.0                  # each group's prior weighs PRIOR times the group's own n-gram occurrences
MIN_TOP_COUNT = 2            # an n-gram is chosen only when at least this many top captions (half A) hold it
SELECT_Z = 1.96              # ... and its half-A z-score reaches this
HALF_SEED = 0
@dataclass
class NgramTable:
    """Which captions hold which n-grams: `matrix` (N, V) CSR, 1 where caption i holds n-gram j (only n-grams
    held by at least `min_captions` captions are kept); `vocabulary` the n-grams, `captioned` (N,) bool."""
    vocabulary: List[str]
    matrix: sparse.csr_matrix
    captioned: np.ndarray

    @classmethod
    def of(cls, captions: Sequence[Optional[str]], min_captions: int = MIN_TOP_COUNT) -> "NgramTable":
        index: Dict[str, int] = {}
        rows, cols = [], []
        captioned = np.zeros(len(captions), dtype=bool)
        for i, caption in enumerate(captions):
            grams = caption_ngrams(caption)
            captioned[i] = bool(str(caption or "").strip())
            for gram in grams:
                rows.append(i)
                cols.append(index.setdefault(gram, len(index)))
        matrix = sparse.csr_matrix((np.ones(len(rows), np.int32), (rows, cols)), shape=(len(captions), len(index)))
        counts = np.asarray(matrix.sum(axis=0)).ravel()
        kept = np.flatnonzero(counts >= min_captions)
        vocabulary = list(index)
        return cls([vocabulary[j] for j in kept], matrix[:, kept].tocsr(), captioned)


def halves(eligible: np.ndarray, seed: int = HALF_SEED) -> np.ndarray:
    """(N,) int8: 0 for half A, 1 for half B, -1 for images in neither (not eligible)."""
    where = np.flatnonzero(eligible)
    order = np.random.default_rng([seed, 31337]).permutation(where)
    out = np.full(len(eligible), -1, dtype=np.int8)
    out[order[:(len(order) + 1) // 2]] = 0
    out[order[(len(order) + 1) // 2:]] = 1
    return out


def merge_top(values: np.ndarray, indices: np.ndarray, rows: np.ndarray, maxima: np.ndarray, k: int):
    """The running top-k (U, k) merged with a block's candidates that can enter (value >= the k-th)."""
    units = values.shape[0]
    threshold = values[:, -1]
    finite = np.isfinite(maxima)
    enter = finite & (maxima >= threshold[None, :])
    r, u = np.nonzero(enter)
    unit = np.concatenate([np.repeat(np.arange(units), k), u])
    value = np.concatenate([values.ravel(), maxima[r, u]])
    index = np.concatenate([indices.ravel(), rows[r]])
    tie = np.where(index < 0, np.iinfo(np.int64).max, index)          # empty slots sort last
    order = np.lexsort((tie, -value, unit))
    unit, value, index = unit[order], value[order], index[order]
    rank = np.arange(len(unit)) - np.searchsorted(unit, unit, side="left")
    keep = rank < k
    out_v = np.full((units, k), -np.inf)
    out_i = np.full((units, k), -1, dtype=np.int64)
    out_v[unit[keep], rank[keep]] = value[keep]
    out_i[unit[keep], rank[keep]] = index[keep]
    return out_v, out_i


def log_odds(y, n, r, m, frequency, prior: float = PRIOR):
    """(delta, variance, z) of the module docstring's formula, elementwise (frequency: f_w)."""
    y, n, r, m, f = (np.asarray(v, dtype=np.float64) for v in (y, n, r, m, frequency))
    a, b = np.maximum(prior * n * f, 1e-12), np.maximum(prior * m * f, 1e-12)
    top = (y + a) / np.maximum(n * (1 + prior) - y - a, 1e-12)
    rest = (r + b) / np.maximum(m * (1 + prior) - r - b, 1e-12)
    delta = np.log(top) - np.log(rest)
    variance = 1.0 / (y + a) + 1.0 / (r + b)
    return delta, variance, delta / np.sqrt(variance)


@dataclass
class HalfCounts:
    """One half's n-gram counts: per unit its top images' counts (sparse (U, V)) and the half's totals."""
    top: sparse.csr_matrix           # y (U, V)
    top_images: np.ndarray           # k_u (U,): the unit's top images in the half
    column: np.ndarray               # c_w (V,): the half's captions holding w
    images: int                      # captioned images in the half

    @property
    def n(self) -> np.ndarray:
        return np.asarray(self.top.sum(axis=1)).ravel()

    @property
    def total(self) -> float:
        return float(self.column.sum())


def half_counts(table: NgramTable, half: np.ndarray, h: int, top: np.ndarray) -> HalfCounts:
    """HalfCounts of half h for the units' top images `top` (U, k) (dataset indices, -1 empty)."""
    units, k = top.shape
    valid = top >= 0
    rows = np.repeat(np.arange(units), k)[valid.ravel()]
    chooser = sparse.csr_matrix((np.ones(len(rows), np.int32), (rows, top.ravel()[valid.ravel()])),
                                shape=(units, table.matrix.shape[0]))
    in_half = (half == h).astype(np.float64)
    return HalfCounts(top=(chooser @ table.matrix).tocsr(), top_images=valid.sum(axis=1),
                      column=np.asarray(table.matrix.T @ in_half).ravel().astype(np.float64),
                      images=int((half == h).sum()))


@dataclass
class CaptionEvidence:
    """Every unit's chosen n-grams (module docstring); arrays are (U, m), slots without an n-gram are -1 / NaN."""
    ngrams: List[str]                # the n-grams that some unit's description names
    index: np.ndarray                # (U, m) int32 into ngrams
    selection_z: np.ndarray          # z on half A (chose it)
    top_hits: np.ndarray             # held-out (half B): top captions holding it
    top_images: np.ndarray           # (U,) int32: the unit's top images in half B
    base_hits: np.ndarray            # held-out: rest captions holding it
    base_images: np.ndarray          # (U,) int32: the rest of half B
    log_odds: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    z: np.ndarray
    info: dict = field(default_factory=dict)


def caption_evidence(table: NgramTable, half: np.ndarray, top: np.ndarray, ngrams: int = 5,
                     prior: float = PRIOR) -> CaptionEvidence:
    """Choose each unit's n-grams on half A and score them on half B. top: (2, U, k) from top_by_half."""
    units = top.shape[1]
    a, b = half_counts(table, half, 0, top[0]), half_counts(table, half, 1, top[1])
    pooled = a.column + b.column
    frequency = pooled / max(float(pooled.sum()), 1.0)
    chosen = _choose(a, frequency, ngrams, prior)            # (U, m) column ids, -1 empty; and their z
    columns, selection_z = chosen
    valid = columns >= 0
    u = np.repeat(np.arange(units), ngrams).reshape(units, ngrams)
    y = np.zeros((units, ngrams))
    y[valid] = np.asarray(b.top[u[valid], columns[valid]]).ravel()
    c = np.zeros((units, ngrams))
    c[valid] = b.column[columns[valid]]
    n = np.broadcast_to(b.n[:, None], (units, ngrams)).astype(np.float64)
    f = np.zeros((units, ngrams))
    f[valid] = frequency[columns[valid]]
    delta, variance, z = log_odds(y, n, c - y, b.total - n, f, prior)
    spread = Z95 * np.sqrt(variance)
    used = np.unique(columns[valid])
    remap = np.full(len(table.vocabulary), -1, dtype=np.int32)
    remap[used] = np.arange(len(used), dtype=np.int32)

    def masked(values, fill=np.nan):
        return np.where(valid, values, fill).astype(np.float32)
    rest = (b.images - b.top_images).astype(np.int32)
    return CaptionEvidence(
        ngrams=[table.vocabulary[j] for j in used], index=np.where(valid, remap[np.maximum(columns, 0)], -1),
        selection_z=masked(selection_z), top_hits=np.where(valid, y, -1).astype(np.int32),
        top_images=b.top_images.astype(np.int32), base_hits=np.where(valid, c - y, -1).astype(np.int32),
        base_images=rest, log_odds=masked(delta), ci_low=masked(delta - spread), ci_high=masked(delta + spread),
        z=masked(z), info={"half_a_images": a.images, "half_b_images": b.images, "vocabulary": len(table.vocabulary)})


def _choose(counts: HalfCounts, frequency: np.ndarray, m: int, prior: float) -> Tuple[np.ndarray, np.ndarray]:
    """(U, m) column ids of each unit's chosen n-grams (-1 empty), best z first, and their z."""
    coo = counts.top.tocoo()
    units = counts.top.shape[0]
    u, w, y = coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data.astype(np.float64)
    n = counts.n[u]
    _, _, z = log_odds(y, n, counts.column[w] - y, counts.total - n, frequency[w], prior)
    ok = (y >= MIN_TOP_COUNT) & (z >= SELECT_Z)
    u, w, z = u[ok], w[ok], z[ok]
    order = np.lexsort((w, -z, u))
    u, w, z = u[order], w[order], z[order]
    rank = np.arange(len(u)) - np.searchsorted(u, u, side="left")
    keep = rank < m
    columns = np.full((units, m), -1, dtype=np.int64)
    scores = np.full((units, m), np.nan)
    columns[u[keep], rank[keep]] = w[keep]
    scores[u[keep], rank[keep]] = z[keep]
    return columns, scores
