"""The labels of a fused sweep on Ray (`sweep --engine ray`): each image's label-source scores computed in the
same pass as the scan, and the per-unit label statistics merged like the scan's, so that no N x units matrix
is ever stored.

    decode tasks   captions and dataset-column matches (labels.sources.captions_source / column_source, per
                   shard), NudeNet on the decoded image (labels.nudenet.image_scores, as the in-process sweep)
    model actors   the zero-shot score from the image embedding (the forward then runs to the embedding);
                   once the sources are decided, each image's combined label (labels.reliability.combine)
                   and, per shard, the units' statistics: unit_stats.Correlation sums and binned AUC counts
    driver         merges them per shard (cache records, resumable) and over the dataset (UnitLabelStats)

The reliability check and the doubt thresholds (labels.reliability) need every source's scores over many
images, and the binned AUC needs its edges before the first count: a fused sweep scans its first shards
(`warmup` images) first, keeping their per-image maxima (bounded: warmup x units), decides the sources, the
doubt thresholds and the edges on them (check_reliability, doubt_threshold, quantile_edges), then scans the
rest with those decisions. When the warm-up covers the whole dataset the AUC is exact and every decision is
the in-process sweep's; beyond it the decisions are those of the first images (the in-process sweep takes
them on all images) and the AUC is binned (`bins` edges: error about 1 / (2 bins) against the exact AUC).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ...errors import DatasetError, NeurolensError
from ...labels import nudenet, zero_shot as safety
from ...labels.prompts import IMAGE_NSFW_THRESHOLD
from ...labels.reliability import LabelSet, check_reliability, combine, doubt_threshold
from ...labels.sources import captions_source, column_source
from ...labels.spec import LabelSource, LabelSpec
from ...records.shards import ShardStore
from ...scoring.statistics import BinnedAUC, Correlation, UnitLabelStats, quantile_edges
from ...storage.cache import settings_key

FUSED_BINS = 128          # binned-AUC edges of a fused sweep: per-call counts stay small to ship
YES_NO_THRESHOLD = 0.5    # captions and column sources score 0/1 (or a column's own number): positive at 0.5


@dataclass(frozen=True)
class LabelPlan:
    """Which sources a fused sweep computes and, once decided, how they combine. Shipped to every task."""
    specs: Tuple[LabelSpec, ...]
    terms: Tuple[str, ...] = ()
    caption_mode: str = "word"
    prompt_embeddings: Optional[np.ndarray] = None   # (m + n, D) unsafe then safe prompts (zero-shot)
    unsafe_count: int = 0
    slice_scores: Optional[np.ndarray] = None        # (N, S) captions/column scores of a folder or table
    kept: Tuple[bool, ...] = ()                       # decided: per source, kept by the reliability check
    doubt: Tuple[Tuple[str, float], ...] = ()         # decided: model source -> doubt threshold
    edges: Optional[np.ndarray] = None               # decided: (U, E) binned-AUC edges; None: exact

    @property
    def names(self) -> List[str]:
        return [spec.name for spec in self.specs]

    @property
    def decided(self) -> bool:
        return bool(self.kept)

    @property
    def needs_images(self) -> bool:
        return any(spec.kind == "nudenet" for spec in self.specs)

    @property
    def needs_embeddings(self) -> bool:
        return any(spec.kind == "zero-shot" for spec in self.specs)

    def thresholds(self) -> List[float]:
        by_kind = {"captions": YES_NO_THRESHOLD, "column": YES_NO_THRESHOLD, "nudenet": nudenet.FIRE_THRESHOLD,
                   "zero-shot": IMAGE_NSFW_THRESHOLD}
        return [by_kind[spec.kind] for spec in self.specs]

    # ------------------------------------------------------------------------------ decode tasks

    def shard_scores(self, shard, dataset) -> np.ndarray:
        """(items, S) float32: the captions and column sources of one shard's items (NaN elsewhere)."""
        scores = np.full((shard.count, len(self.specs)), np.nan, dtype=np.float32)
        for column, spec in enumerate(self.specs):
            if spec.kind not in ("captions", "column"):
                continue
            if self.slice_scores is not None:
                scores[:, column] = self.slice_scores[shard.offset:shard.offset + shard.count, column]
            elif spec.kind == "captions":
                captions = dataset.captions if self.caption_mode != "off" else None
                scores[:, column] = captions_source(spec, dataset.keys, captions, list(self.terms),
                                                    self.caption_mode).scores
            else:
                try:
                    scores[:, column] = column_source(spec, dataset).scores
                except DatasetError:
                    pass  # no item of this shard has the field: unknown here (an error only if none has it)
        return scores

    def image_scores(self, scores: np.ndarray, row: int, image) -> None:
        """Fill the sources that look at the decoded image (NudeNet) for one readable item."""
        for column, spec in enumerate(self.specs):
            if spec.kind == "nudenet":
                scores[row, column] = nudenet.image_scores([image])[0]

    # ------------------------------------------------------------------------------ model actors

    def model_scores(self, scores: np.ndarray, embeddings: np.ndarray) -> None:
        """Fill the zero-shot sources from L2-normalized image embeddings (rows of `scores`)."""
        for column, spec in enumerate(self.specs):
            if spec.kind == "zero-shot":
                scores[:, column] = safety.zero_shot_scores(embeddings, self.prompt_embeddings, self.unsafe_count)

    def sources(self, scores: np.ndarray) -> List[LabelSource]:
        """The sources over these rows' scores (n, S), as labels.sources builds them."""
        thresholds = self.thresholds()
        return [LabelSource(spec, np.ascontiguousarray(scores[:, column], dtype=np.float32), thresholds[column])
                for column, spec in enumerate(self.specs)]

    def combined(self, scores: np.ndarray) -> np.ndarray:
        """(n,) the decided combined label of these rows (1, 0, NaN)."""
        kept = [source for source, keep in zip(self.sources(scores), self.kept) if keep]
        return combine(kept, len(scores), doubt=dict(self.doubt))

    def actor_part(self, values, embeddings: Optional[np.ndarray], scores: np.ndarray, indices: np.ndarray) -> dict:
        """What an actor call returns for one shard's readable rows: their scores and, during the warm-up,
        their maxima; once decided, their labels, the correlation state and the binned-AUC counts."""
        scores = np.array(scores, dtype=np.float32)
        if embeddings is not None and len(scores):
            self.model_scores(scores, embeddings)
        part = {"indices": np.asarray(indices, np.int64), "scores": scores}
        if not self.decided:
            part["maxima"] = values.cpu().numpy().astype(np.float32)
            return part
        labels = self.combined(scores)
        correlation = Correlation(values.shape[1], values.device)
        correlation.add(values, labels)
        counts = BinnedAUC(self.edges, values.device)
        counts.add(values, labels)
        # counts of one call fit 16 bits (a call has at most batch_size x batches_per_call rows)
        part.update(labels=labels, correlation=correlation.state_dict(),
                    pos=counts.pos.cpu().numpy().astype(np.uint16), neg=counts.neg.cpu().numpy().astype(np.uint16))
        return part


# ---------------------------------------------------------------------------------------- driver side

@dataclass
class LabelTally:
    """A shard's (or a group's, or the dataset's) label results: per-image scores and labels of its readable
    items, and either the warm-up maxima or the decided per-unit accumulators."""
    indices: List[np.ndarray] = field(default_factory=list)
    scores: List[np.ndarray] = field(default_factory=list)
    labels: List[np.ndarray] = field(default_factory=list)
    maxima: List[np.ndarray] = field(default_factory=list)
    correlation: Optional[object] = None   # unit_stats.Correlation
    counts: Optional[object] = None        # unit_stats.BinnedAUC


class LabelMerger:
    """How the Ray engine's driver folds actor parts into LabelTally objects and stores them in shard
    records (the engine calls these without knowing what they hold)."""

    def __init__(self, plan: LabelPlan, units: int):
        self.plan, self.units = plan, int(units)

    def empty(self) -> LabelTally:
        tally = LabelTally()
        if self.plan.decided and self.plan.edges is not None:
            tally.correlation, tally.counts = Correlation(self.units), BinnedAUC(self.plan.edges)
        return tally

    def add(self, tally: LabelTally, part: dict) -> None:
        tally.indices.append(np.asarray(part["indices"], np.int64))
        tally.scores.append(np.asarray(part["scores"], np.float32))
        if "maxima" in part:
            tally.maxima.append(np.asarray(part["maxima"], np.float32))
        if "labels" in part:
            tally.labels.append(np.asarray(part["labels"], np.float32))
            other = Correlation(self.units)
            other.load_state_dict(part["correlation"])
            tally.correlation.merge(other)
            tally.counts.pos += torch.as_tensor(part["pos"].astype(np.int64))
            tally.counts.neg += torch.as_tensor(part["neg"].astype(np.int64))

    def merge(self, tally: LabelTally, other: LabelTally) -> None:
        tally.indices += other.indices
        tally.scores += other.scores
        tally.labels += other.labels
        tally.maxima += other.maxima
        if other.correlation is not None:
            tally.correlation.merge(other.correlation)
            tally.counts.merge(other.counts)

    def arrays(self, tally: LabelTally) -> Dict[str, np.ndarray]:
        out = {"indices": _cat(tally.indices, (0,), np.int64),
               "scores": _cat(tally.scores, (0, len(self.plan.specs)), np.float32)}
        if self.plan.decided:
            out["labels"] = _cat(tally.labels, (0,), np.float32)
        else:
            out["maxima"] = _cat(tally.maxima, (0, self.units), np.float32)
        if tally.correlation is not None:
            out.update({f"correlation/{k}": v for k, v in tally.correlation.state_dict().items()})
            out.update({"counts/pos": tally.counts.pos.numpy(), "counts/neg": tally.counts.neg.numpy()})
        return out

    def load(self, arrays: Dict[str, np.ndarray]) -> Optional[LabelTally]:
        """The tally of a stored record, or None when it was made with other decisions."""
        if self.plan.decided != ("labels" in arrays):
            return None
        tally = self.empty()
        tally.indices, tally.scores = [np.asarray(arrays["indices"])], [np.asarray(arrays["scores"])]
        if "maxima" in arrays:
            tally.maxima = [np.asarray(arrays["maxima"])]
        if "labels" in arrays:
            tally.labels = [np.asarray(arrays["labels"])]
        if tally.correlation is not None:
            if "counts/pos" not in arrays:
                return None
            tally.correlation.load_state_dict({k.split("/", 1)[1]: v for k, v in arrays.items()
                                               if k.startswith("correlation/")})
            tally.counts.pos = torch.as_tensor(np.asarray(arrays["counts/pos"], np.int64))
            tally.counts.neg = torch.as_tensor(np.asarray(arrays["counts/neg"], np.int64))
        return tally

    def merge_total(self, total: LabelTally, other: LabelTally) -> None:
        """Into the dataset's tally: everything during the warm-up (the decisions need it, bounded by the
        warm-up size); afterwards the accumulators only (the per-image rows stay in the shard records and
        are read back once, at the end)."""
        if not self.plan.decided:
            self.merge(total, other)
        elif other.correlation is not None:
            total.correlation.merge(other.correlation)
            total.counts.merge(other.counts)

    def identity(self) -> str:
        """What the stored tallies depend on beyond the scan: the sources and the decisions."""
        edges = None if self.plan.edges is None else \
            hashlib.sha1(np.ascontiguousarray(self.plan.edges, dtype=np.float32).tobytes()).hexdigest()
        return settings_key("labels", self.plan.names, self.plan.terms, self.plan.caption_mode, self.plan.kept,
                            self.plan.doubt, edges)


def _cat(parts: Sequence[np.ndarray], empty_shape: tuple, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(empty_shape, dtype)


# ------------------------------------------------------------------------------------------ decisions

def decide(plan: LabelPlan, warmup: LabelTally, min_agreement: float, notes: Sequence[str], exact: bool,
           bins: int = FUSED_BINS):
    """The sources kept, the doubt thresholds and the AUC edges, from the warm-up's scores and maxima.
    Returns (the decided plan, the LabelSet over the warm-up images)."""
    scores = _cat(warmup.scores, (0, len(plan.specs)), np.float32)
    if not len(scores):
        raise DatasetError("no readable image in the first shards of the dataset; check the dataset")
    label_set = check_reliability(plan.sources(scores), min_agreement, list(notes))
    kept = tuple(label_set.agreements[name].kept for name in plan.names)
    chosen = [s for s, keep in zip(label_set.sources, kept) if keep]
    positive = np.zeros(len(scores), dtype=bool)
    for source in chosen:
        if source.spec.independent:
            positive |= source.labels == 1
    doubt = tuple((s.name, float(doubt_threshold(s, positive))) for s in chosen if not s.spec.independent) \
        if any(s.spec.independent for s in chosen) else ()
    edges = None if exact else quantile_edges(_cat(warmup.maxima, (0, 0), np.float32), bins)
    return replace(plan, kept=kept, doubt=doubt, edges=edges), label_set


def unit_statistics(plan: LabelPlan, units: int, warmup: LabelTally, rest: Optional[LabelTally]):
    """unit_stats.UnitLabelStats over every image: the warm-up's rows with their decided labels, plus the
    rest's accumulators (exact when there is no rest)."""
    stats = UnitLabelStats(units, edges=plan.edges)
    maxima = _cat(warmup.maxima, (0, units), np.float32)
    if len(maxima):
        stats.add(maxima, plan.combined(_cat(warmup.scores, (0, len(plan.specs)), np.float32)))
    if rest is not None and rest.correlation is not None:
        stats.correlation.merge(rest.correlation)
        stats.auc.merge(rest.counts)
    return stats


def full_arrays(plan: LabelPlan, total: int, tallies: Sequence[LabelTally]) -> Tuple[np.ndarray, np.ndarray]:
    """(S, N) every source's score and (N,) the combined label of every item (NaN: skipped or unknown)."""
    scores = np.full((len(plan.specs), total), np.nan, dtype=np.float32)
    labels = np.full(total, np.nan, dtype=np.float32)
    for tally in tallies:
        if not tally.indices:
            continue
        rows = np.concatenate(tally.indices)
        values = np.concatenate(tally.scores)
        scores[:, rows] = values.T
        labels[rows] = np.concatenate(tally.labels) if tally.labels else plan.combined(values)
    return scores, labels


def check_columns(plan: LabelPlan, scores: np.ndarray, description: str) -> None:
    """A named column that no item has is an error, as in the in-process sweep."""
    for column, spec in enumerate(plan.specs):
        if spec.kind == "column" and not np.isfinite(scores[column]).any():
            raise NeurolensError(f"no item of {description} has a {spec.column!r} column or .json field; name an "
                                 f"existing one in --labels column:NAME")


# ------------------------------------------------------------------------------------------ the pass

@dataclass
class FusedOutcome:
    """A fused sweep's pass: the scan's statistics and every label result."""
    stats: object                 # scan.ScanStats over every shard
    resumed: List[int]            # offsets of shards taken from an earlier run
    forwarded: int
    actor_peak_rss: int
    label_set: object             # labels.reliability.LabelSet over every image (agreements: the warm-up's)
    statistics: object            # unit_stats.UnitStatsResult over every image
    counts: Optional[Tuple[np.ndarray, np.ndarray]]   # the binned AUC's positive and negative counts
    warmup_images: int            # items of the warm-up shards
    stores: List[object] = field(default_factory=list)

    def remove_records(self) -> None:
        for store in self.stores:
            store.remove_records()


def fused_pass(session, clip, spec, plan, cache, key: str, labels: LabelPlan, *, top_k: int,
               min_agreement: float, notes: Sequence[str], warmup: int, bins: int = FUSED_BINS,
               device: str = "auto", progress=None, report=None, decoder: str = "pil") -> FusedOutcome:
    """Scan `plan` on Ray computing the label sources and the units' label statistics in the same pass:
    first the shards that hold the first `warmup` items (their per-image maxima kept), then, with the
    sources, doubt thresholds and AUC edges decided on them, the rest. Both parts are resumable by shard."""
    warm, items = [], 0
    for shard in plan.shards:
        if items >= warmup and warm:
            break
        warm.append(shard)
        items += shard.count
    rest = plan.shards[len(warm):]
    units = int(spec.channels)
    store_warm = ShardStore(cache, clip.fingerprint, spec.name, f"{key}-w", LabelMerger(labels, units).identity())
    first = session.scan(clip, spec, plan, store_warm, top_k=top_k, device=device, progress=progress,
                         report=report, labels=labels, shards=warm, decoder=decoder)
    decided, warm_set = decide(labels, first.labels, min_agreement, notes, exact=not rest, bins=bins)
    merger = LabelMerger(decided, units)
    stores, stats, resumed, forwarded, rss, later = [store_warm], first.stats, first.resumed, first.forwarded, \
        first.actor_peak_rss, None
    tallies = [first.labels]
    if rest:
        store_rest = ShardStore(cache, clip.fingerprint, spec.name, f"{key}-r", merger.identity())
        second = session.scan(clip, spec, plan, store_rest, top_k=top_k, device=device, progress=progress,
                              report=report, labels=decided, shards=rest, done_before=(items, len(warm)),
                              decoder=decoder)
        stats.merge(second.stats)
        resumed, forwarded = resumed + second.resumed, forwarded + second.forwarded
        rss, later = max(rss, second.actor_peak_rss), second.labels
        tallies += [merger.load(arrays) for arrays in store_rest.extras(second.records)]
        stores.append(store_rest)
    scores, combined = full_arrays(decided, plan.total, tallies)
    check_columns(decided, scores, plan.description)
    extra_notes = [] if not rest else [f"label agreement and doubt thresholds decided on the first {items} items"]
    label_set = LabelSet(sources=decided.sources(scores.T), agreements=warm_set.agreements,
                         pairwise=warm_set.pairwise, labels=combined, min_agreement=float(min_agreement),
                         notes=list(warm_set.notes) + extra_notes)
    accumulated = unit_statistics(decided, units, first.labels, later)
    counts = None if decided.edges is None else (accumulated.auc.pos.numpy(), accumulated.auc.neg.numpy())
    return FusedOutcome(stats=stats, resumed=sorted(resumed), forwarded=forwarded, actor_peak_rss=rss,
                        label_set=label_set, statistics=accumulated.result(), counts=counts, warmup_images=items,
                        stores=stores)
