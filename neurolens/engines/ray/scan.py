"""Scans on Ray Data: decode in CPU tasks, run the model in an actor pool, merge statistics on the driver.

    shards ─> map_batches(decode_shard: CPU tasks, one per shard, the same decoder and skip rules as the
              single-process scan) ─> map_batches(ModelActor: the model loaded once per actor, a GPU per actor
              where the cluster has GPUs; layer_forward + ScanStats.add per batch) ─> the driver merges each
              batch's statistics into its shard's, and a finished shard's into the total (ScanStats.merge)

Every item carries its global index (shard order, then member order) through the pipeline, and TopK's order
is total (value, then index), so the top-k indices and cells do not depend on the number of actors, on how
Ray cuts blocks and batches, or on the order shards finish; moments and the mean map are float64 sums that
differ from a single-process scan by rounding only.

Fault tolerance: actors are restarted by Ray (max_restarts) and their unfinished batches retried
(max_task_retries); the driver counts each item of a shard once (a batch delivered twice is dropped), so a
redone batch is never counted twice. A finished shard is a cache record (engines/shards.py), so a rerun after
a killed driver or Ctrl-C merges finished shards and scans only the others.

Memory: the driver holds the total statistics and those of the shards in flight (each O(units x k + C x H x
W)); actors hold the model and one batch. Neither grows with the number of images.

Ray is an optional dependency (`pip install neurolens[ray]`); nothing else in neurolens imports this module.
"""
from __future__ import annotations

import collections
import copy
import logging
import os
import pickle
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ...errors import NeurolensError
from ...models.build import weights_fingerprint
from ...activations.stats import ScanStats
from ..local import default_batch_size
from ...activations.forward import layer_forward
from ...datasets.decode import decode_item_with_image
from .shards import DEFAULT_SHARD_SIZE, DatasetPlan, PlannedShard, ShardStore

# With this set before Ray starts, a local Ray takes 127.0.0.1 as its node address and every server it starts
# (GCS, raylet, object manager, workers) listens on loopback only; otherwise they listen on all interfaces.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise NeurolensError("--engine ray needs Ray Data: pip install 'neurolens[ray]' "
                             "(or omit --engine to scan in this process)") from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """How a scan runs on Ray. address None starts a local Ray (loopback only) and stops it afterwards."""
    address: Optional[str] = None
    actors: int = 1                        # model actors (each loads the model once)
    batch_size: Optional[int] = None       # images per forward (default 64 with a GPU, 16 without)
    batches_per_call: int = 8              # forwards per actor call: one partial result per call to merge
    compact_every: int = 256               # finished shards per group record (engines.shards.ShardStore)
    gpus_per_actor: Optional[float] = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0            # CPUs reserved per actor; also its torch threads (at least 1)
    shard_size: int = DEFAULT_SHARD_SIZE   # items per shard when a folder or table is cut into slices
    local_cpus: Optional[int] = None       # CPUs of a local Ray (default: all)

    def check(self) -> None:
        if int(self.actors) < 1:
            raise NeurolensError(f"--actors must be at least 1, got {self.actors}")
        if self.batch_size is not None and int(self.batch_size) < 1:
            raise NeurolensError(f"--batch-size must be at least 1, got {self.batch_size}")
        if int(self.batches_per_call) < 1 or int(self.compact_every) < 1:
            raise NeurolensError("batches_per_call and compact_every must be at least 1")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise NeurolensError(f"--gpus-per-actor must be 0 or more, got {self.gpus_per_actor}")
        if self.cpus_per_actor < 0:
            raise NeurolensError(f"--cpus-per-actor must be 0 or more, got {self.cpus_per_actor}")


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


@dataclass
class RayScanOutcome:
    stats: ScanStats                  # merged over every shard
    chunks: List[str]                 # per-shard chunk record names (keep_per_image), in shard order
    resumed: List[int]                # offsets of the shards taken from an earlier run's records
    forwarded: int                    # images through the model in this run
    actor_peak_rss: int               # bytes, the largest peak RSS an actor reported
    actor_pids: List[int] = field(default_factory=list)
    labels: Optional[object] = None   # a fused sweep's fused.LabelTally over these shards
    records: List = field(default_factory=list)   # the shard and group records of these shards


# ------------------------------------------------------------------------------------------ session

@contextmanager
def ray_session(options: RayOptions) -> Iterator["RaySession"]:
    """Connects to `options.address`, or uses the Ray this process already started, or starts a local one
    on loopback; disconnects (and stops what it started) on the way out, also after an error or Ctrl-C."""
    options.check()
    local = options.address is None
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        if local:
            loopback_only(ray)
        if options.address:
            _check_reachable(options.address)
        try:
            if options.address:
                ray.init(address=options.address, log_to_driver=False, logging_level=logging.ERROR)
            else:
                ray.init(num_cpus=options.local_cpus, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.ERROR)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"at {options.address}" if options.address else "locally"
            raise NeurolensError(f"cannot start or reach Ray {where} ({str(exc).splitlines()[0]}); check "
                                 f"--ray-address, or omit it to start a local Ray") from None
        started = True
    logging.getLogger("ray.data").setLevel(logging.ERROR)   # neurolens reports progress itself
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    try:
        yield RaySession(ray, options)
    finally:
        if started:
            ray.shutdown()


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """One line now instead of Ray's minutes of retries when host:port does not answer ('auto' is Ray's)."""
    import socket
    text = address.split("://", 1)[-1]
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise NeurolensError(f"nothing answers at --ray-address {address} ({exc.strerror or exc}); start the "
                             f"cluster (ray start --head) or omit --ray-address to start a local Ray") from None


def loopback_only(ray=None):
    """Make the next local `ray.init` listen on 127.0.0.1 only (unless LOOPBACK_ENV says otherwise); returns
    the ray module. Ray reads LOOPBACK_ENV when it is imported (and its servers inherit it); when ray was
    imported before, the flag it was read into is set too (services.get_node_ip_address reads it per call)."""
    os.environ.setdefault(LOOPBACK_ENV, "0")
    ray = ray or _import_ray()
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    if os.environ[LOOPBACK_ENV] == "0" and getattr(constants, "ENABLE_RAY_CLUSTER", False):
        constants.ENABLE_RAY_CLUSTER = False
    return ray


def _unwrap(exc: BaseException) -> BaseException:
    """The NeurolensError a Ray task raised, if any, so the CLI prints its one line."""
    seen = set()
    current: Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, NeurolensError):
            return current
        seen.add(id(current))
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    return exc


class RaySession:
    def __init__(self, ray, options: RayOptions):
        self.ray, self.options = ray, options

    def map(self, fn: Callable, items: Sequence) -> Iterator:
        """fn over items in Ray tasks, results in order; a bounded number in flight."""
        remote = self.ray.remote(num_cpus=1, max_retries=3)(fn)
        window = max(2, 2 * int(self.ray.cluster_resources().get("CPU", 1)))
        pending: collections.deque = collections.deque()
        try:
            for item in items:
                pending.append(remote.remote(item))
                if len(pending) >= window:
                    yield self.ray.get(pending.popleft())
            while pending:
                yield self.ray.get(pending.popleft())
        except self.ray.exceptions.RayError as exc:
            raise _unwrap(exc) from None

    def gpus_per_actor(self) -> float:
        if self.options.gpus_per_actor is not None:
            return float(self.options.gpus_per_actor)
        return 1.0 if self.ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def scan(self, clip, spec, plan: DatasetPlan, store: ShardStore, *, top_k: int, precision: str = "fp32",
             keep_per_image: bool = False, device: str = "auto",
             progress: Optional[Callable[[int, int], None]] = None,
             report: Optional[Callable[[RayProgress], None]] = None, labels=None,
             shards: Optional[Sequence[PlannedShard]] = None, done_before: Tuple[int, int] = (0, 0)
             ) -> RayScanOutcome:
        """Scan every shard of `plan` (or of `shards`, a part of it) not finished by an earlier run; returns
        the merged statistics. labels: a fused sweep's fused.LabelPlan (its label sources and statistics
        are computed in the same pass); done_before: (items, shards) finished before this call, for the
        progress report."""
        from .fused import LabelMerger

        def empty() -> ScanStats:
            return ScanStats.empty(spec, top_k, "cpu")

        subset = list(plan.shards if shards is None else shards)
        extension = LabelMerger(labels, spec.channels) if labels is not None else None
        merger = _Merger(plan, subset, store, empty, keep_per_image, int(self.options.compact_every),
                         time.monotonic(), progress, report, extension, done_before)
        resumed = merger.resume()
        todo = [shard for shard in subset if shard.index not in merger.finished]
        for shard in [s for s in todo if s.count == 0]:
            merger.finish_empty(shard, spec.channels)
        todo = [shard for shard in todo if shard.count > 0]
        merger.announce()
        if todo:
            self._run(clip, spec, todo, merger, top_k, precision, keep_per_image, device, labels)
            merger.announce()
        unfinished = [s.name for s in todo if s.index not in merger.finished]
        if unfinished:
            raise NeurolensError(f"Ray returned no result for {len(unfinished)} shard(s) (e.g. {unfinished[0]}); "
                                 f"run the scan again: finished shards are kept")
        merger.total.skipped = merger.skip_list()
        chunks = [store.name(s) for s in subset] if keep_per_image else []
        return RayScanOutcome(stats=merger.total, chunks=chunks, resumed=resumed, forwarded=merger.forwarded,
                              actor_peak_rss=merger.actor_peak_rss, actor_pids=sorted(merger.actor_pids),
                              labels=merger.extra_total, records=list(merger.records))

    def _run(self, clip, spec, todo: List[PlannedShard], merger: "_Merger", top_k: int, precision: str,
             keep_per_image: bool, device: str, labels) -> None:
        ray = self.ray
        options = self.options
        gpus = self.gpus_per_actor()
        cpus = float(ray.cluster_resources().get("CPU", 0))
        if options.actors * options.cpus_per_actor > cpus - 1:
            raise NeurolensError(f"{options.actors} actor(s) x {options.cpus_per_actor:g} CPU leave no CPU of the "
                                 f"cluster's {cpus:g} for decoding; lower --actors or --cpus-per-actor (e.g. 0.5)")
        if device == "cuda" and gpus == 0:
            raise NeurolensError("--device cuda, but the Ray cluster has no GPU for the actors; use --device auto "
                                 "or cpu, or give --gpus-per-actor on a cluster with GPUs")
        batch_size = int(options.batch_size or default_batch_size(_device_kind(gpus)))
        visual = clip.model.visual if clip.device.type == "cpu" else copy.deepcopy(clip.model.visual).cpu()
        tower = image_tower(visual)
        model_ref = ray.put(tower)  # held here for the whole run: a restarted actor reads it again
        meta = {"name": clip.name, "pretrained": clip.pretrained, "image_size": clip.image_size,
                "mean": tuple(clip.mean), "std": tuple(clip.std), "fingerprint": clip.fingerprint,
                "tower_fingerprint": weights_fingerprint(tower)}
        rows = [{"shard": shard.index, "plan": pickle.dumps(shard)} for shard in todo]
        data = ray.data.from_items(rows, override_num_blocks=len(rows))
        rows_per_call = batch_size * int(options.batches_per_call)
        data = data.map_batches(_decode_shards, batch_size=1, num_cpus=1,
                                fn_kwargs={"image_size": clip.image_size, "batch_size": rows_per_call,
                                           "labels": labels})
        # An actor call covers several forwards so the driver merges one partial result per call, not per
        # forward (a merge of RN50x4's layer4 statistics costs ~15 ms of driver CPU).
        data = data.map_batches(
            _ModelActor, batch_size=rows_per_call, compute=ray.data.ActorPoolStrategy(size=int(options.actors)),
            num_gpus=gpus, num_cpus=float(options.cpus_per_actor),
            fn_constructor_kwargs={"model": model_ref, "meta": meta, "layer": spec.name,
                                   "device": device if gpus > 0 else "cpu",
                                   "threads": max(1, int(options.cpus_per_actor)), "top_k": int(top_k),
                                   "batch_size": batch_size,
                                   "precision": precision, "keep_per_image": keep_per_image, "labels": labels})
        # Ray Data's actor pools restart a dead actor (max_restarts=-1) and retry its unfinished batches
        # (max_task_retries=-1) by default; _Merger drops a batch delivered twice.
        try:
            for batch in data.iter_batches(batch_size=None, batch_format="numpy"):
                for shard, payload, pid, rss in zip(batch["shard"], batch["payload"], batch["pid"], batch["rss"]):
                    merger.add(int(shard), pickle.loads(payload), int(pid), int(rss))
        except ray.exceptions.RayError as exc:
            raise _unwrap(exc) from None
        finally:
            del model_ref


def image_tower(visual):
    """What the actors need of a CLIP model: its image tower, as `.visual` of a module (so the layer paths
    `visual.layer4.5...` resolve as on the whole model); the text tower never leaves the driver."""
    import torch
    tower = torch.nn.Module()
    tower.visual = visual
    return tower


def _device_kind(gpus: float):
    import torch
    return torch.device("cuda" if gpus > 0 else "cpu")


# ------------------------------------------------------------------------------------------ driver side

class _ShardInFlight:
    def __init__(self, shard: PlannedShard, stats: ScanStats, extra):
        self.shard, self.stats, self.extra = shard, stats, extra
        self.covered = np.zeros(shard.count, dtype=bool)
        self.maxima: List[Tuple[np.ndarray, np.ndarray]] = []
        self.forwarded = 0

    @property
    def complete(self) -> bool:
        return bool(self.covered.all())


class _Merger:
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


# ------------------------------------------------------------------------------------------ Ray side

def _decode_shards(batch: Dict[str, np.ndarray], image_size: int, batch_size: int, labels=None):
    """CPU task: the shard's items in order, decoded and preprocessed, in batches of `batch_size` rows; a bad
    item is a row with zero pixels and its reason (the actor counts it as skipped). With a fused sweep's
    labels, also each item's decode-side label scores (captions, columns, NudeNet; NaN for a bad item)."""
    for blob in batch["plan"]:
        shard: PlannedShard = pickle.loads(blob)
        dataset = shard.dataset()
        scores = labels.shard_scores(shard, dataset) if labels is not None else None
        for first in range(0, shard.count, batch_size):
            last = min(first + batch_size, shard.count)
            pixels = np.zeros((last - first, 3, image_size, image_size), dtype=np.uint8)
            reasons = []
            for row, item in enumerate(range(first, last)):
                array, reason, image = decode_item_with_image(dataset, item, image_size)
                if array is not None:
                    pixels[row] = array
                    if labels is not None and labels.needs_images:
                        labels.image_scores(scores, item, image)
                elif scores is not None:
                    scores[item] = np.nan
                reasons.append(reason)
            rows = {"shard": np.full(last - first, shard.index, dtype=np.int64),
                    "index": np.arange(shard.offset + first, shard.offset + last, dtype=np.int64),
                    "pixels": pixels, "reason": np.asarray(reasons, dtype=object)}
            if scores is not None:
                rows["scores"] = scores[first:last]
            yield rows


class _ModelActor:
    """Loads the model once; per call, one truncated forward per `batch_size` readable rows and, per shard
    among them, ScanStats.add; returns one partial result per shard in the call. With a fused sweep's labels
    the forward runs to the image embedding when a source needs it, and each shard's part carries its
    label results (fused.LabelPlan.actor_part)."""

    def __init__(self, model, meta: dict, layer: str, device: str, threads: int, top_k: int, batch_size: int,
                 precision: str, keep_per_image: bool, labels=None):
        import ray
        import torch
        from ...models import resolve_layer
        from ...models.build import LoadedClip, resolve_device
        torch.set_num_threads(threads)
        if isinstance(model, ray.ObjectRef):  # Ray Data passes constructor arguments as they are
            model = ray.get(model)
        if weights_fingerprint(model) != meta["tower_fingerprint"]:
            raise NeurolensError("the model an actor received differs from the driver's; run the scan again")
        torch_device = resolve_device(device)
        model = model.to(torch_device).eval()
        self.clip = LoadedClip(model=model, name=meta["name"], pretrained=meta["pretrained"], device=torch_device,
                               image_size=int(meta["image_size"]), mean=tuple(meta["mean"]), std=tuple(meta["std"]),
                               fingerprint=meta["fingerprint"], tokenizer=None)
        self.spec = resolve_layer(self.clip, layer)
        self.top_k, self.batch_size = top_k, batch_size
        if labels is not None and labels.edges is not None:   # arrays from Ray's object store are read-only
            labels = replace(labels, edges=np.array(labels.edges))
        self.precision, self.keep_per_image, self.labels = precision, keep_per_image, labels

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        import torch
        device = self.clip.device
        shards, index = np.asarray(batch["shard"]), np.asarray(batch["index"])
        reasons = np.asarray(batch["reason"], dtype=object)
        readable = np.flatnonzero(reasons == "")
        embeddings = self.labels is not None and self.labels.needs_embeddings
        stats = {int(s): ScanStats.empty(self.spec, self.top_k, device) for s in np.unique(shards)}
        kept: Dict[int, List[tuple]] = {s: [] for s in stats}     # (rows, values, embeddings) per forward
        for first in range(0, len(readable), self.batch_size):
            rows = readable[first:first + self.batch_size]
            images = torch.from_numpy(np.ascontiguousarray(batch["pixels"][rows])).to(device).float().div_(255.0)
            acts, emb = layer_forward(self.clip, self.spec, images, self.precision, embeddings=embeddings,
                                      pad_to=self.batch_size)
            for shard in np.unique(shards[rows]):
                mine = np.flatnonzero(shards[rows] == shard)
                picked = torch.as_tensor(mine, device=device)
                values = stats[int(shard)].add(acts[picked], torch.as_tensor(index[rows][mine], device=device))
                kept[int(shard)].append((rows[mine], values, emb[picked].cpu().numpy() if emb is not None else None))
        payloads = []
        for shard, part in stats.items():
            bad = (shards == shard) & (reasons != "")
            part.skipped = [(int(i), str(r)) for i, r in zip(index[bad], reasons[bad])]
            rows = np.concatenate([r for r, _, _ in kept[shard]]) if kept[shard] else np.zeros(0, np.int64)
            values = torch.cat([v for _, v, _ in kept[shard]]) if kept[shard] else \
                torch.zeros((0, self.spec.channels), device=device)
            payload = {"covered": index[shards == shard], "state": part.state_dict(), "forwarded": part.count,
                       "indices": index[rows] if self.keep_per_image else np.zeros(0, np.int64),
                       "maxima": values.cpu().numpy().astype(np.float16) if self.keep_per_image
                       else np.zeros((0, self.spec.channels), np.float16)}
            if self.labels is not None:
                emb = np.concatenate([e for _, _, e in kept[shard]]) if embeddings and kept[shard] else None
                payload["labels"] = self.labels.actor_part(values, emb, np.asarray(batch["scores"])[rows],
                                                           index[rows])
            payloads.append(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"shard": np.asarray(list(stats), dtype=np.int64), "payload": np.asarray(payloads, dtype=object),
                "pid": np.full(len(stats), os.getpid(), dtype=np.int64),
                "rss": np.full(len(stats), rss, dtype=np.int64)}
