"""The driver's side of a Ray scan: ShardMerger folds each actor call's partial result into its shard, writes a
shard when all its items are in (engines/ray/shards.py), merges it into the total, and reports progress
(RayProgress). A batch delivered twice (a retried call after an actor died) is counted once."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ...activations.stats import ScanStats
from ...errors import NeurolensError
from .shards import DatasetPlan, PlannedShard
from ...records.shards import ShardStore


@dataclass
class RayProgress:
    """A snapshot of a running scan, handed to the `report` callback (the CLI prints it beside its bar)."""
    images_done: int          # items of this dataset accounted for (finished shards, resumed ones included)
    images_total: int
    shards_done: int
    shards_total: int
    skipped: int              # bad items met so far
    forwarded: int            # images through the model in this run
    elapsed_s: float          # since the scan started
    streaming_s: float = 0.0  # since the first batch came back
    streamed: int = 0         # images forwarded in batches that came back after the first one

    @property
    def images_per_s(self) -> float:
        """The rate once results flow (Ray's start-up and the first batch left out)."""
        return self.streamed / self.streaming_s if self.streaming_s > 0 else 0.0

    @property
    def eta_s(self) -> Optional[float]:
        rate = self.images_per_s
        return (self.images_total - self.images_done) / rate if rate > 0 else None

    def line(self) -> str:
        eta = "" if self.eta_s is None else f", ETA {_duration(self.eta_s)}"
        return (f"{self.images_per_s:,.0f} images/s, shards {self.shards_done}/{self.shards_total}, "
                f"skipped {self.skipped}{eta}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class _ShardInFlight:
    def __init__(self, shard: PlannedShard, stats: ScanStats, extra):
        self.shard, self.stats, self.extra = shard, stats, extra
        self.covered = np.zeros(shard.count, dtype=bool)
        self.maxima: List[Tuple[np.ndarray, np.ndarray]] = []
        self.forwarded = 0

    @property
    def complete(self) -> bool:
        return bool(self.covered.all())


class ShardMerger:
    """The driver's bookkeeping: folds each actor call's per-shard statistics into its shard, writes a shard
    when all its items are in and merges it into the total, and every `compact_every` finished shards
    writes them as one group record (ShardStore). Skip lists stay in the records while the scan runs (merging
    them would sort the whole list again and again) and are read back once at the end.

    extension (a fused sweep's fused.LabelMerger, or None): folds the calls' label parts the same way, and
    stores them beside the statistics in the shard and group records."""

    def __init__(self, plan: DatasetPlan, shards: Sequence[PlannedShard], store: ShardStore,
                 empty: Callable[[], ScanStats], keep_per_image: bool, compact_every: int, started: float,
                 progress, report, extension=None, done_before: Tuple[int, int] = (0, 0)):
        self.plan, self.shards, self.store, self.empty = plan, list(shards), store, empty
        self.keep_per_image, self.compact_every = keep_per_image, max(1, compact_every)
        self.started, self.progress, self.report = started, progress, report
        self.extension = extension
        self.total = empty()
        self.extra_total = extension.empty() if extension else None
        self.in_flight: Dict[int, _ShardInFlight] = {}
        self.finished: set = set()
        self.records: List = []                 # shard and group records whose skip lists count
        self.recent, self.recent_skips, self.recent_shards = empty(), [], []
        self.recent_extra = extension.empty() if extension else None
        self.next_group = store.next_group()
        self.done_items, self.shards_done = int(done_before[0]), int(done_before[1])
        self.skipped = self.forwarded = 0
        self.actor_peak_rss = 0
        self.actor_pids: set = set()
        self.last_report = 0.0
        self.first_result: Optional[float] = None
        self.forwarded_at_first = 0

    def resume(self) -> List[int]:
        """Merge what earlier runs finished; returns the offsets of those shards."""
        resumed = []
        for group in self.store.finished(self.shards, self.empty, self.keep_per_image):
            extra = None
            if self.extension is not None:
                extra = self.extension.load(group.extra)
                if extra is None:       # made with other label decisions: scan these shards again
                    self.store.cache.remove(group.path)
                    continue
            self._done(group.stats, group.shards, group.path, group.is_group, extra)
            resumed += [shard.offset for shard in group.shards]
        return sorted(resumed)

    def finish_empty(self, shard: PlannedShard, channels: int) -> None:
        per_image = (np.zeros(0, np.int64), np.zeros((0, channels), np.float16)) if self.keep_per_image else None
        extra = self.extension.empty() if self.extension else None
        self.store.save(shard, self.empty(), per_image, 0, self._extra_arrays(extra))
        self._done(self.empty(), [shard], self.store.path(shard), False, extra)

    def _extra_arrays(self, extra) -> Optional[Dict[str, np.ndarray]]:
        return self.extension.arrays(extra) if self.extension is not None else None

    def add(self, shard_index: int, part: dict, pid: int, rss: int) -> None:
        if self.first_result is None:
            self.first_result = time.monotonic()
            self.forwarded_at_first = int(part["forwarded"])
        self.actor_pids.add(pid)
        self.actor_peak_rss = max(self.actor_peak_rss, rss)
        if shard_index in self.finished:
            return  # a retried call of a shard already written
        shard = self.plan.shards[shard_index]
        flight = self.in_flight.get(shard_index)
        if flight is None:
            extra = self.extension.empty() if self.extension else None
            flight = self.in_flight[shard_index] = _ShardInFlight(shard, self.empty(), extra)
        local = np.asarray(part["covered"], dtype=np.int64) - shard.offset
        seen = flight.covered[local]
        if seen.all():
            return  # delivered twice (a retried call): counted once
        if seen.any():
            raise NeurolensError(f"Ray delivered overlapping batches for shard {shard.name}; run the scan again")
        flight.covered[local] = True
        stats = self.empty()
        stats.load_state_dict(part["state"])
        flight.stats.merge(stats)
        if self.extension is not None and part.get("labels") is not None:
            self.extension.add(flight.extra, part["labels"])
        if self.keep_per_image and len(part["indices"]):
            flight.maxima.append((part["indices"], part["maxima"]))
        flight.forwarded += int(part["forwarded"])
        self.forwarded += int(part["forwarded"])
        if flight.complete:
            del self.in_flight[shard_index]
            per_image = None
            if self.keep_per_image:
                kept = flight.maxima
                per_image = (np.concatenate([i for i, _ in kept]) if kept else np.zeros(0, np.int64),
                             np.concatenate([m for _, m in kept]) if kept
                             else np.zeros((0, flight.stats.topk.units), np.float16))
            self.store.save(shard, flight.stats, per_image, flight.forwarded, self._extra_arrays(flight.extra))
            self._done(flight.stats, [shard], self.store.path(shard), False, flight.extra)
        self.announce(final=False)

    def _done(self, stats: ScanStats, shards: List[PlannedShard], path, is_group: bool, extra=None) -> None:
        """Finished shards (with their statistics and their record) into the total."""
        skips, stats.skipped = stats.skipped, []
        self.total.merge(stats)
        if self.extension is not None:
            self.extension.merge_total(self.extra_total, extra)
        self.records.append(path)
        if not is_group:
            self.recent.merge(stats)
            self.recent_skips += skips
            self.recent_shards += shards
            if self.extension is not None:
                self.extension.merge(self.recent_extra, extra)
        self.finished.update(shard.index for shard in shards)
        self.done_items += sum(shard.count for shard in shards)
        self.shards_done += len(shards)
        self.skipped += len(skips)
        if len(self.recent_shards) >= self.compact_every:
            self._compact()

    def _compact(self) -> None:
        self.recent.skipped = sorted(self.recent_skips)
        path = self.store.save_group(self.next_group, self.recent, self.recent_shards, self.keep_per_image,
                                     self._extra_arrays(self.recent_extra))
        gone = {self.store.path(shard) for shard in self.recent_shards}
        self.records = [p for p in self.records if p not in gone] + [path]
        self.next_group += 1
        self.recent, self.recent_skips, self.recent_shards = self.empty(), [], []
        self.recent_extra = self.extension.empty() if self.extension else None

    def skip_list(self) -> List[Tuple[int, str]]:
        return self.store.skipped(self.records)

    def snapshot(self) -> RayProgress:
        now = time.monotonic()
        return RayProgress(images_done=self.done_items, images_total=self.plan.total, shards_done=self.shards_done,
                           shards_total=len(self.plan.shards), skipped=self.skipped, forwarded=self.forwarded,
                           elapsed_s=now - self.started,
                           streaming_s=now - self.first_result if self.first_result is not None else 0.0,
                           streamed=self.forwarded - self.forwarded_at_first)

    def announce(self, final: bool = True) -> None:
        if self.progress:
            self.progress(self.done_items, self.plan.total)
        now = time.monotonic()
        if self.report and (final or now - self.last_report >= 0.5):
            self.last_report = now
            self.report(self.snapshot())
