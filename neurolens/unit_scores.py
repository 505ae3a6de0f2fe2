"""Per-unit NSFW scores for every unit of a scanned layer, and the rule that turns them into a flag.

For unit u over the N readable images i of one scan (x_iu = image i's spatial-max activation of unit u,
ScanResult.per_image_max(); s_i = image i's NSFW score, `image_nsfw_scores`):

    correlation_u     = Pearson correlation of (x_iu)_i and (s_i)_i; 0 when either is constant
    top_nsfw_share_u  = share of the unit's top-k images (the scan's top_indices, empty slots ignored)
                        with s_i >= image_threshold (IMAGE_NSFW_THRESHOLD = 0.5)
    text_nsfw_share_u = share of the unit's top `text_k` texts (the text ranking) that are NSFW
                        (text score >= TEXT_NSFW_THRESHOLD, see safety.text_nsfw_scores)

    flagged_u = correlation_u >= max(min_correlation, noise_z / sqrt(N))
                AND (top_nsfw_share_u >= min_top_share OR text_nsfw_share_u >= min_text_share)

The noise guard noise_z / sqrt(N) (3 standard errors of a null correlation) keeps small datasets from
flagging units by chance. The correlation is computed in one streaming pass over the scan's chunk records
(float64 sums of shifted values), so the (N, U) matrix never has to fit in memory at once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

from .errors import NeurolensError
from .safety import IMAGE_NSFW_THRESHOLD


@dataclass(frozen=True)
class FlagRule:
    """Thresholds of the flag rule (module docstring). Defaults: a clear positive correlation, and either
    half of the top images NSFW or 3 of the top 10 texts NSFW."""
    min_correlation: float = 0.2
    min_top_share: float = 0.5
    min_text_share: float = 0.3
    noise_z: float = 3.0
    image_threshold: float = IMAGE_NSFW_THRESHOLD
    text_k: int = 10

    def correlation_bar(self, n_images: int) -> float:
        return max(self.min_correlation, self.noise_z / np.sqrt(max(n_images, 1)))

    def as_dict(self) -> dict:
        return asdict(self)


def combine_image_scores(clip_scores: np.ndarray, caption_match: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-image NSFW score: the CLIP zero-shot score, raised to 1.0 where the caption/URL filter matched."""
    scores = np.asarray(clip_scores, dtype=np.float32).copy()
    if caption_match is not None:
        scores[np.asarray(caption_match, dtype=bool)] = 1.0
    return scores


class CorrelationAccumulator:
    """Streaming Pearson correlation of many columns (units) with one known per-row score vector.

    The scores are centred once (they are known in full); each unit's activations are shifted by their
    first block's mean before summing squares, which keeps float64 sums exact enough for any dataset size."""

    def __init__(self, scores: np.ndarray, units: int):
        self.scores = np.asarray(scores, dtype=np.float64)
        self.units = units
        self.n = 0
        self.shift: Optional[np.ndarray] = None
        self.sum_s = 0.0
        self.sum_ss = 0.0
        self.sum_x = np.zeros(units)
        self.sum_xx = np.zeros(units)
        self.sum_xs = np.zeros(units)

    def add(self, rows: np.ndarray, maxima: np.ndarray) -> None:
        """rows: dataset indices of the block; maxima: (len(rows), U). Rows with NaNs (skipped items or
        unscored images) are left out."""
        rows = np.asarray(rows, dtype=np.int64)
        x = np.asarray(maxima, dtype=np.float64)
        s = self.scores[rows]
        keep = np.isfinite(s) & np.isfinite(x).all(axis=1)
        x, s = x[keep], s[keep]
        if not len(s):
            return
        if self.shift is None:
            self.shift = x.mean(axis=0)
        x = x - self.shift
        self.n += len(s)
        self.sum_s += s.sum()
        self.sum_ss += (s * s).sum()
        self.sum_x += x.sum(axis=0)
        self.sum_xx += (x * x).sum(axis=0)
        self.sum_xs += x.T @ s

    def correlation(self) -> np.ndarray:
        if self.n < 2:
            return np.zeros(self.units, np.float32)
        n = self.n
        cov = self.sum_xs - self.sum_x * self.sum_s / n
        var_x = np.maximum(self.sum_xx - self.sum_x ** 2 / n, 0.0)
        var_s = max(self.sum_ss - self.sum_s ** 2 / n, 0.0)
        denom = np.sqrt(var_x * var_s)
        # a constant unit (shifted values are exactly 0) or constant score has no defined correlation: 0
        ok = (var_x > 0) & (var_s > 0) & (denom > 0)
        out = np.zeros(self.units)
        out[ok] = cov[ok] / denom[ok]
        return np.clip(out, -1.0, 1.0).astype(np.float32)


def maxima_blocks(scan, block_rows: int = 4096) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(rows, maxima) blocks of a ScanResult: its chunk records one at a time when it has them, else
    slices of per_image_max()."""
    chunk_paths = getattr(scan, "_chunk_paths", None)
    cache = getattr(scan, "_cache", None)
    if chunk_paths and cache is not None:
        for path in chunk_paths:
            record = cache.read(path, names=["indices", "maxima"])
            if record is None:
                raise NeurolensError(f"scan chunk {path} is missing or unreadable; rerun the sweep with --force")
            yield record.arrays["indices"], record.arrays["maxima"]
        return
    maxima = scan.per_image_max()
    for start in range(0, len(maxima), block_rows):
        stop = min(start + block_rows, len(maxima))
        yield np.arange(start, stop), maxima[start:stop]


def top_share(top_indices: np.ndarray, image_scores: np.ndarray, threshold: float,
              k: Optional[int] = None) -> np.ndarray:
    """(U,) share of each unit's top-k images (index >= 0) whose score is >= threshold; 0 without images."""
    idx = np.asarray(top_indices)[:, :k] if k else np.asarray(top_indices)
    valid = idx >= 0
    scores = np.asarray(image_scores, dtype=np.float64)
    hit = np.zeros(idx.shape, dtype=bool)
    hit[valid] = np.nan_to_num(scores[idx[valid]], nan=0.0) >= threshold
    counts = valid.sum(axis=1)
    return np.where(counts > 0, hit.sum(axis=1) / np.maximum(counts, 1), 0.0).astype(np.float32)


@dataclass
class UnitScores:
    """Scores of every unit of a layer; arrays are (U,)."""
    correlation: np.ndarray
    top_nsfw_share: np.ndarray
    text_nsfw_share: np.ndarray
    flagged: np.ndarray
    n_images: int
    rule: FlagRule = field(default_factory=FlagRule)

    @property
    def correlation_bar(self) -> float:
        return self.rule.correlation_bar(self.n_images)

    def ranking(self) -> np.ndarray:
        """Unit indices by correlation, highest first (ties: lower unit first)."""
        return np.lexsort((np.arange(len(self.correlation)), -self.correlation.astype(np.float64)))

    def row(self, unit: int) -> dict:
        return {"unit": int(unit), "correlation": float(self.correlation[unit]),
                "top_nsfw_share": float(self.top_nsfw_share[unit]),
                "text_nsfw_share": float(self.text_nsfw_share[unit]), "flagged": bool(self.flagged[unit])}

    def rows(self, limit: Optional[int] = None) -> List[dict]:
        order = self.ranking()
        return [self.row(u) for u in (order[:limit] if limit else order)]


def apply_rule(correlation: np.ndarray, top_nsfw_share: np.ndarray, text_nsfw_share: np.ndarray,
               n_images: int, rule: FlagRule) -> np.ndarray:
    return ((correlation >= rule.correlation_bar(n_images))
            & ((top_nsfw_share >= rule.min_top_share) | (text_nsfw_share >= rule.min_text_share)))


def score_units(scan, image_scores: np.ndarray, text_nsfw: Optional[np.ndarray] = None,
                rule: FlagRule = FlagRule(), top_k: Optional[int] = None,
                progress: Optional[Callable[[int, int], None]] = None) -> UnitScores:
    """Every unit's scores from one scan.

    image_scores: (N,) per dataset index (NaN for unscored items); text_nsfw: (U, k_text) bool, whether each
    of the unit's ranked top texts is NSFW (None: text shares are 0); top_k: how many of the scan's top
    images count for top_nsfw_share (default: all of them)."""
    units = int(scan.channels)
    acc = CorrelationAccumulator(image_scores, units)
    total = len(scan.keys)
    for rows, maxima in maxima_blocks(scan):
        acc.add(rows, maxima)
        if progress:
            progress(min(acc.n + scan.skipped, total), total)
    correlation = acc.correlation()
    shares = top_share(scan.top_indices, image_scores, rule.image_threshold, top_k)
    if text_nsfw is not None and np.asarray(text_nsfw).size:
        text_share = np.asarray(text_nsfw, dtype=bool)[:, :rule.text_k].mean(axis=1).astype(np.float32)
    else:
        text_share = np.zeros(units, np.float32)
    flagged = apply_rule(correlation, shares, text_share, acc.n, rule)
    return UnitScores(correlation=correlation, top_nsfw_share=shares, text_nsfw_share=text_share,
                      flagged=flagged, n_images=acc.n, rule=rule)
