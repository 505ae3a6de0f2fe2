"""Scans on Ray Data: decode in CPU tasks, run the model in an actor pool, merge statistics on the driver.

    shards ─> map_batches(decode_shards: CPU tasks, one per shard, the same decoder and skip rules as the
              single-process scan) ─> map_batches(ModelActor: the model loaded once per actor, a GPU per actor
              where the cluster has GPUs; layer_forward + ScanStats.add per batch) ─> the driver merges each
              batch's statistics into its shard's, and a finished shard's into the total (ScanStats.merge)

This module is the driver's side: RayOptions, the session (connect to or start Ray, loopback only when local)
and RaySession.scan, which builds the Ray Data pipeline; the tasks and the actor are in workers.py, the
driver's merge of their results in merge.py, the cache records of finished shards in shards.py.

Every item carries its global index (shard order, then member order) through the pipeline, and TopK's order
is total (value, then index), so the top-k indices and cells do not depend on the number of actors, on how
Ray cuts blocks and batches, or on the order shards finish; moments and the mean map are float64 sums that
differ from a single-process scan by rounding only.

Fault tolerance: actors are restarted by Ray (max_restarts) and their unfinished batches retried
(max_task_retries); the driver counts each item of a shard once (a batch delivered twice is dropped), so a
redone batch is never counted twice. A finished shard is a cache record (engines/ray/shards.py), so a rerun
after a killed driver or Ctrl-C merges finished shards and scans only the others.

Memory: the driver holds the total statistics and those of the shards in flight (each O(units x k + C x H x
W)); actors hold the model and one batch. Neither grows with the number of images.

Ray is an optional dependency (`pip install neurolens[ray]`): it is imported inside the functions that need
it, so the modules of engines/ray import without it; only the Ray pipelines (pipelines.scan.run_ray_scan,
the fused sweep) use them.
"""
from __future__ import annotations

import collections
import copy
import logging
import os
import pickle
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

from ...activations.stats import ScanStats
from ...errors import NeurolensError
from ...models.build import weights_fingerprint
from ..local import default_batch_size
from .fused import LabelMerger
from .merge import RayProgress, ShardMerger
from .shards import DEFAULT_SHARD_SIZE, DatasetPlan, PlannedShard
from ...records.shards import ShardStore
from .workers import ModelActor, decode_shards

# With this set before Ray starts, a local Ray takes 127.0.0.1 as its node address and every server it starts
# (GCS, raylet, object manager, workers) listens on loopback only; otherwise they listen on all interfaces.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def import_ray():
    try:
        import ray  # lazy: optional dependency (neurolens[ray])
        import ray.data  # noqa: F401  (lazy: optional dependency)
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
    compact_every: int = 256               # finished shards per group record (engines.ray.shards.ShardStore)
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
class RayScanOutcome:
    stats: ScanStats                  # merged over every shard
    chunks: List[str]                 # per-shard chunk record names (keep_per_image), in shard order
    resumed: List[int]                # offsets of the shards taken from an earlier run's records
    forwarded: int                    # images through the model in this run
    actor_peak_rss: int               # bytes, the largest peak RSS an actor reported
    actor_pids: List[int] = field(default_factory=list)
    labels: Optional[object] = None   # a fused sweep's fused.LabelTally over these shards
    records: List = field(default_factory=list)   # the shard and group records of these shards


@contextmanager
def ray_session(options: RayOptions) -> Iterator["RaySession"]:
    """Connects to `options.address`, or uses the Ray this process already started, or starts a local one
    on loopback; disconnects (and stops what it started) on the way out, also after an error or Ctrl-C."""
    options.check()
    local = options.address is None
    ray = import_ray()
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
    ray = ray or import_ray()
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    if os.environ[LOOPBACK_ENV] == "0" and getattr(constants, "ENABLE_RAY_CLUSTER", False):
        constants.ENABLE_RAY_CLUSTER = False
    return ray


def unwrap_error(exc: BaseException) -> BaseException:
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
            raise unwrap_error(exc) from None

    def gpus_per_actor(self) -> float:
        if self.options.gpus_per_actor is not None:
            return float(self.options.gpus_per_actor)
        return 1.0 if self.ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def actor_device(self, device: str = "auto") -> str:
        """The device type the model actors run on ("cuda" or "cpu"), for `device` (auto, cpu or cuda)."""
        return "cuda" if self.gpus_per_actor() > 0 and device != "cpu" else "cpu"

    def scan(self, clip, spec, plan: DatasetPlan, store: ShardStore, *, top_k: int, precision: str = "fp32",
             keep_per_image: bool = False, device: str = "auto", decoder: str = "pil",
             progress: Optional[Callable[[int, int], None]] = None,
             report: Optional[Callable[[RayProgress], None]] = None, labels=None,
             shards: Optional[Sequence[PlannedShard]] = None, done_before: Tuple[int, int] = (0, 0)
             ) -> RayScanOutcome:
        """Scan every shard of `plan` (or of `shards`, a part of it) not finished by an earlier run; returns
        the merged statistics. labels: a fused sweep's fused.LabelPlan (its label sources and statistics
        are computed in the same pass); done_before: (items, shards) finished before this call, for the
        progress report; decoder: the resolved image decoder (pil or torchvision: decode tasks leave JPEGs to the
        actors, which decode them in batches on their device)."""
        def empty() -> ScanStats:
            return ScanStats.empty(spec, top_k, "cpu")

        subset = list(plan.shards if shards is None else shards)
        extension = LabelMerger(labels, spec.channels) if labels is not None else None
        merger = ShardMerger(plan, subset, store, empty, keep_per_image, int(self.options.compact_every),
                             time.monotonic(), progress, report, extension, done_before)
        resumed = merger.resume()
        todo = [shard for shard in subset if shard.index not in merger.finished]
        for shard in [s for s in todo if s.count == 0]:
            merger.finish_empty(shard, spec.channels)
        todo = [shard for shard in todo if shard.count > 0]
        merger.announce()
        if todo:
            self._run(clip, spec, todo, merger, top_k, precision, keep_per_image, device, labels, decoder)
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

    def _run(self, clip, spec, todo: List[PlannedShard], merger: ShardMerger, top_k: int, precision: str,
             keep_per_image: bool, device: str, labels, decoder: str) -> None:
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
        data = data.map_batches(decode_shards, batch_size=1, num_cpus=1,
                                fn_kwargs={"image_size": clip.image_size, "batch_size": rows_per_call,
                                           "labels": labels, "decoder": decoder})
        # An actor call covers several forwards so the driver merges one partial result per call, not per
        # forward (a merge of RN50x4's layer4 statistics costs ~15 ms of driver CPU).
        data = data.map_batches(
            ModelActor, batch_size=rows_per_call, compute=ray.data.ActorPoolStrategy(size=int(options.actors)),
            num_gpus=gpus, num_cpus=float(options.cpus_per_actor),
            fn_constructor_kwargs={"model": model_ref, "meta": meta, "layer": spec.name,
                                   "device": device if gpus > 0 else "cpu",
                                   "threads": max(1, int(options.cpus_per_actor)), "top_k": int(top_k),
                                   "batch_size": batch_size,
                                   "precision": precision, "keep_per_image": keep_per_image, "labels": labels})
        # Ray Data's actor pools restart a dead actor (max_restarts=-1) and retry its unfinished batches
        # (max_task_retries=-1) by default; ShardMerger drops a batch delivered twice.
        try:
            for batch in data.iter_batches(batch_size=None, batch_format="numpy"):
                for shard, payload, pid, rss in zip(batch["shard"], batch["payload"], batch["pid"], batch["rss"]):
                    merger.add(int(shard), pickle.loads(payload), int(pid), int(rss))
        except ray.exceptions.RayError as exc:
            raise unwrap_error(exc) from None
        finally:
            del model_ref


def image_tower(visual):
    """What the actors need of a CLIP model: its image tower, as `.visual` of a module (so the layer paths
    `visual.layer4.5...` resolve as on the whole model); the text tower never leaves the driver."""
    tower = torch.nn.Module()
    tower.visual = visual
    return tower


def _device_kind(gpus: float):
    return torch.device("cuda" if gpus > 0 else "cpu")
