"""Per-unit NSFW scores for every unit of a scanned layer, and the rule that turns them into a flag.

For unit u over the images i of one scan with a known label y_i (1 positive, 0 negative: the combined
label of neurolens.labels.reliability; unknown and skipped images are left out), with x_iu image i's
spatial-max activation of unit u (ScanResult.per_image_max()):

    auc_u          ROC AUC of x_u, positives against negatives (Mann-Whitney U / (n1 n0), ties half)
    p_u            two-sided Mann-Whitney p (normal approximation, tie and continuity correction)
    q_u            Benjamini-Hochberg q-value of p_u across all units of the layer
    correlation_u  Pearson correlation of x_u with y
    top_nsfw_share_u   share of the unit's top-k images (the scan's top_indices) labelled positive, over
                       those with a known label (evidence)
    text_nsfw_share_u  share of the unit's top `text_k` texts that are NSFW (evidence); NaN (no evidence, never
                       a share) when the unit has no ranked texts or every one of them has |cosine| <
                       NO_TEXT_EVIDENCE (its direction in the embedding space is zero: the order is arbitrary)

    flagged_u   = q_u <= max_q AND auc_u >= min_auc                     (defaults 0.01 and 0.8)
    text_flag_u = text_nsfw_share_u >= min_text_share                   (default 0.3; never `flagged`;
                                                                          False without text evidence)

(definitions of AUC, p and q: neurolens.scoring.statistics). Units are ranked by AUC, highest first. The
statistics stream over the scan's chunk records (`label_statistics`, one pass for any number of labels: the
concept audit's, whose one-label case is the sweep's): exact AUC when the kept rows fit `memory` bytes
(MultiLabelStats.bytes_needed), else the binned estimate (BinnedAUC's bins, edges from a sample of rows).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np

from ..errors import NeurolensError
from .flags import DEFAULT_AUC_MEMORY, FlagRule, UnitScores, UnitStatsResult, apply_rule, auc_method
from .multilabel import MultiLabelResult, MultiLabelStats
from .statistics import DEFAULT_BINS, quantile_edges

EDGE_SAMPLE_ROWS = 8192                 # rows sampled for the binned path's quantile edges
NO_TEXT_EVIDENCE = 1e-6                 # top texts whose |cosine| are all below this are no text evidence



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


def sample_maxima(scan, rows: int = EDGE_SAMPLE_ROWS) -> np.ndarray:
    """About `rows` rows of per-image maxima spread over the whole scan (evenly spaced chunk records, or
    evenly spaced rows), for the binned path's edges."""
    chunk_paths = list(getattr(scan, "_chunk_paths", None) or [])
    cache = getattr(scan, "_cache", None)
    if chunk_paths and cache is not None:
        picked, taken = [], 0
        per_chunk = max(1, len(scan.keys) // max(1, len(chunk_paths)))
        wanted = min(len(chunk_paths), max(1, -(-rows // per_chunk)))
        for i in np.unique(np.linspace(0, len(chunk_paths) - 1, wanted).round().astype(int)):
            record = cache.read(chunk_paths[i], names=["maxima"])
            if record is None:
                raise NeurolensError(f"scan chunk {chunk_paths[i]} is missing or unreadable; rerun with --force")
            picked.append(record.arrays["maxima"])
            taken += len(picked[-1])
        sample = np.concatenate(picked) if picked else np.zeros((0, scan.channels), np.float32)
    else:
        maxima = scan.per_image_max()
        sample = maxima[np.unique(np.linspace(0, len(maxima) - 1, min(rows, len(maxima))).round().astype(int))]
    sample = sample[np.isfinite(sample).all(axis=1)]
    if not len(sample):
        raise NeurolensError("the scan has no readable image; check the dataset")
    return sample


def top_share(top_indices: np.ndarray, labels: np.ndarray, k: Optional[int] = None) -> np.ndarray:
    """(U,) share of each unit's top-k images (index >= 0) labelled positive (>= 0.5), over those with a
    known label; 0 when none is known."""
    idx = np.asarray(top_indices)[:, :k] if k else np.asarray(top_indices)
    valid = idx >= 0
    labels = np.asarray(labels, dtype=np.float64)
    values = np.full(idx.shape, np.nan)
    values[valid] = labels[idx[valid]]
    known = np.isfinite(values)
    hits = (np.nan_to_num(values, nan=0.0) >= 0.5) & known
    counts = known.sum(axis=1)
    return np.where(counts > 0, hits.sum(axis=1) / np.maximum(counts, 1), 0.0).astype(np.float32)



def text_shares(text_nsfw: Optional[np.ndarray], units: int, rule: FlagRule,
                text_scores: Optional[np.ndarray] = None) -> np.ndarray:
    """(U,) share of each unit's top `rule.text_k` texts marked NSFW; NaN where the unit has no text evidence:
    no texts (text_nsfw None or empty) or, with text_scores (U, k) given, every one of its top texts'
    |cosine| below NO_TEXT_EVIDENCE."""
    if text_nsfw is None or not np.asarray(text_nsfw).size:
        return np.full(units, np.nan, np.float32)
    shares = np.asarray(text_nsfw, dtype=bool)[:, :rule.text_k].mean(axis=1).astype(np.float32)
    if text_scores is not None:
        scores = np.abs(np.nan_to_num(np.asarray(text_scores, dtype=np.float64)[:, :rule.text_k], nan=0.0))
        shares[~(scores >= NO_TEXT_EVIDENCE).any(axis=1)] = np.nan
    return shares



def label_statistics(scan, labels: np.ndarray, memory: int = DEFAULT_AUC_MEMORY, bins: int = DEFAULT_BINS,
                     progress: Optional[Callable[[int, int], None]] = None) -> MultiLabelResult:
    """Every unit of the scan against every label column of `labels` (N, K) (1, 0, NaN unknown), in ONE
    stream over the scan's chunk records (scoring.multilabel.MultiLabelStats): exact when the rows fit
    `memory` bytes, else binned with edges from a sample of the scan (no N x U matrix kept)."""
    labels = np.asarray(labels, dtype=np.float64)
    labels = labels.reshape(-1, 1) if labels.ndim == 1 else labels
    units = int(scan.channels)
    edges = None
    if auc_method(len(labels), units, memory, labels.shape[1]) != "exact":
        edges = quantile_edges(sample_maxima(scan), bins)
    stats = MultiLabelStats(units, labels.shape[1], edges=edges)
    total, done = len(labels), 0
    for rows, maxima in maxima_blocks(scan):
        rows = np.asarray(rows, dtype=np.int64)
        stats.add(maxima, labels[rows])
        done += len(rows)
        if progress:
            progress(min(done + scan.skipped, total), total)
    return stats.result()


def unit_statistics(scan, labels: np.ndarray, memory: int = DEFAULT_AUC_MEMORY, bins: int = DEFAULT_BINS,
                    progress: Optional[Callable[[int, int], None]] = None) -> UnitStatsResult:
    """neurolens.scoring.flags.UnitStatsResult of every unit of the scan against the per-image labels (N,): the
    one-label case of label_statistics."""
    return label_statistics(scan, np.asarray(labels).reshape(-1, 1), memory, bins, progress).label(0)


def score_units(scan, labels: np.ndarray, text_nsfw: Optional[np.ndarray] = None, rule: FlagRule = FlagRule(),
                top_k: Optional[int] = None, progress: Optional[Callable[[int, int], None]] = None,
                memory: int = DEFAULT_AUC_MEMORY, bins: int = DEFAULT_BINS, sources: Sequence[str] = (),
                statistics=None, text_scores: Optional[np.ndarray] = None) -> UnitScores:
    """Every unit's scores from one scan and the per-image labels (N,) (1, 0, NaN unknown).

    text_nsfw: (U, k_text) bool, whether each of the unit's ranked top texts is NSFW, text_scores (U, k_text)
    their cosines (None: no text evidence, the shares are NaN; all cosines ~0: that unit's share is NaN); top_k: how many of the scan's top images count for top_nsfw_share (default: all);
    statistics: the units' unit_stats.UnitStatsResult when already computed (a fused sweep on Ray
    accumulates it during its scan; the scan then need not keep per-image values)."""
    units = int(scan.channels)
    result = statistics if statistics is not None else unit_statistics(scan, labels, memory, bins, progress)
    text_share = text_shares(text_nsfw, units, rule, text_scores)
    return UnitScores(auc=result.auc, p=result.p, q=result.q, correlation=result.correlation,
                      top_nsfw_share=top_share(scan.top_indices, labels, top_k), text_nsfw_share=text_share,
                      flagged=apply_rule(result.auc, result.q, rule),
                      text_flag=np.nan_to_num(text_share, nan=-1.0) >= rule.min_text_share,
                      n_pos=result.n_pos, n_neg=result.n_neg,
                      rule=rule, method=result.method, sources=tuple(sources))
