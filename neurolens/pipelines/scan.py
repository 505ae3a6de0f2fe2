"""Cache-or-compute dataset scans, resumable after Ctrl-C or kill -9.

The records (the finished scan, per-image chunks, the checkpoint of a running scan) are read and written by
neurolens.records.scan; the checkpoint is removed when the result is written. A scan with a basis computes
the neurons' and the basis's statistics in the same pass (the basis is applied to the captured activations)
and writes a record, and chunks, for each of them that is not cached yet. A checkpoint is written only after
the chunks it lists, so a kill at any moment leaves a consistent checkpoint; a rerun continues from its batch
boundary and gives exactly the result of an uninterrupted scan (same batches, same order of float operations).
A scan computes only while it holds the write lock of its keys (neurolens.records.scan_lock.key_lock): a second
scan of the same key waits (wait=True) or stops with one line, and then reads the first one's result.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch

from ..types import PRECISIONS
from ..activations.stats import BatchOutput, ScanStats
from ..datasets.decode import resolve_decoder
from ..datasets.open import open_dataset
from ..datasets.types import ImageDataset
from ..engines.local import default_batch_size, default_workers, scan_range
from ..engines.timing import NO_CLOCK
from ..engines.ray.session import RayOptions, ray_session
from ..engines.ray.shards import plan_dataset
from ..errors import DatasetError, NeurolensError
from ..models.layer_table import resolve_layer
from ..records import scan as scan_records
from ..records.keys import NEURONS, as_basis, as_cache
from ..records.scan import ScanResult, scan_key
from ..records.scan_lock import key_lock
from ..records.shards import ShardStore
from ..storage.cache import Cache
from .scan_find import check_scan_options, find_scan

CHECKPOINT_SECONDS = 5.0         # without checkpoint_every: a checkpoint at most every 5 s of scanning
CHUNK_MAX_BYTES = 32 * 2 ** 20   # per-image maxima are flushed to a chunk record before the buffer passes this


def run_scan(clip, layer: str, dataset: Union[ImageDataset, str, None] = None, top_k: int = 32,
             batch_size: Optional[int] = None, workers: Optional[int] = None, cache=None, force: bool = False,
             embeddings: bool = False, precision: str = "fp32",
             progress: Optional[Callable[[int, int], None]] = None,
             checkpoint_every: Optional[int] = None, basis=None, wait: bool = False, decoder: str = "auto",
             clock=NO_CLOCK) -> ScanResult:
    """Scan `dataset` (an ImageDataset, a path, or None for the built-in images) through `layer`, all units,
    or read the finished scan from the cache. An interrupted scan resumes from its last checkpoint.

    checkpoint_every: write a resume checkpoint every N batches (default: at most every 5 s).
    basis: None for the neurons; a basis of the layer (neurolens.sae.basis.load_basis, e.g. SAE features) to scan
    its units, together with the neurons in the same pass. Returns the result of the requested basis.
    wait: when another process scans the same key, wait for it and read its result (default: ScanBusy, one
    line, exit 2 in the CLI).
    decoder: "auto" (torchvision on a CUDA device, else pil), "pil" or "torchvision" (docs/scan.md: --decode);
    the decoder used is in the record (ScanResult.decoder) and, unless pil, in its key.
    clock: an engines.timing.StageClock that gets the busy seconds of each stage (scripts/bench_scan.py)."""
    check_scan_options(precision, top_k, batch_size, workers)
    spec = resolve_layer(clip, layer)
    dataset = dataset if isinstance(dataset, ImageDataset) else open_dataset(dataset)
    cache = as_cache(cache)
    basis = as_basis(basis)
    decoder = resolve_decoder(decoder, clip.device_type)
    if not force:
        found = find_scan(clip, spec.name, dataset, top_k, precision, cache, embeddings, basis, decoder)
        if found is not None:
            if progress:
                progress(len(dataset), len(dataset))
            return found
    key = scan_key(clip, spec, dataset, top_k, precision, embeddings, basis, decoder)
    neuron_key = scan_key(clip, spec, dataset, top_k, precision, embeddings, decoder=decoder)
    with key_lock(cache, clip.fingerprint, spec.name, [key, neuron_key], wait=wait):
        if not force:     # another run may have finished this scan while we waited for its lock
            found = find_scan(clip, spec.name, dataset, top_k, precision, cache, embeddings, basis, decoder)
            if found is not None:
                if progress:
                    progress(len(dataset), len(dataset))
                return found
        return _scan_locked(clip, spec, dataset, top_k, batch_size, workers, cache, force, embeddings, precision,
                            progress, checkpoint_every, basis, key, neuron_key, decoder, clock)


def _scan_locked(clip, spec, dataset: ImageDataset, top_k: int, batch_size: Optional[int], workers: Optional[int],
                 cache: Cache, force: bool, embeddings: bool, precision: str, progress, checkpoint_every,
                 basis, key: str, neuron_key: str, decoder: str, clock) -> ScanResult:
    """run_scan's pass, with the write lock of `key` (and the neurons' `neuron_key`) held."""
    fingerprint, layer = clip.fingerprint, spec.name
    batch_size = int(batch_size or default_batch_size(clip.device))
    workers = default_workers() if workers is None else int(workers)
    # the neurons come with every pass; their record is (re)written unless a basis scan finds it cached
    write_neurons = basis is None or force or \
        find_scan(clip, spec.name, dataset, top_k, precision, cache, embeddings, decoder=decoder) is None
    streams = {}
    if write_neurons:
        streams[NEURONS] = _Stream(NEURONS, neuron_key)
    if basis is not None:
        streams[basis.id] = _Stream(basis.id, key)

    stats = ScanStats.empty(spec, top_k, clip.device)
    bases = [basis] if basis is not None else []
    for extra in bases:
        stats.bases[extra.id] = ScanStats.empty(spec, top_k, clip.device, units=extra.units)
    start, resumed_from = 0, []
    if force:
        scan_records.remove_checkpoint(cache, fingerprint, layer, key)
    else:
        checkpoint = scan_records.read_checkpoint(cache, fingerprint, layer, key)
        # a checkpoint fixes the batch boundaries, so resuming keeps its batch size (results stay identical)
        if checkpoint is not None and set(checkpoint.streams) == set(streams):
            stats.load_state_dict(checkpoint.state)
            start = checkpoint.next_index
            batch_size = checkpoint.batch_size
            for name, chunks in checkpoint.streams.items():
                streams[name].chunks = list(chunks)
            resumed_from = checkpoint.resumed_from + [start]

    writer = _ChunkWriter(cache, fingerprint, layer, key, len(dataset), stats, batch_size, streams, resumed_from,
                          checkpoint_every)
    scan_range(clip, spec, dataset, start, None, top_k=top_k, batch_size=batch_size, workers=workers,
               precision=precision, embeddings=embeddings, stats=stats, on_batch=writer.on_batch, progress=progress,
               bases=bases, decoder=decoder, clock=clock)
    with clock.host_stage("writes"):
        writer.flush(len(dataset), checkpoint=False)

    if stats.count == 0:
        for stream in streams.values():
            scan_records.remove_chunks(cache, fingerprint, layer, stream.chunks)
        scan_records.remove_checkpoint(cache, fingerprint, layer, key)
        example = f" (e.g. {dataset.keys[stats.skipped[0][0]]}: {stats.skipped[0][1]})" if stats.skipped else ""
        raise DatasetError(f"no readable image in {dataset.description}: all {len(dataset)} items were skipped"
                           f"{example}; give a dataset with at least one valid image")

    for name, stream in streams.items():
        record = scan_records.final_record(clip, spec, dataset, stats, top_k, precision, embeddings, stream.chunks,
                                           resumed_from, None if name == NEURONS else basis, decoder)
        scan_records.write_result(cache, stream.key, record)
    scan_records.remove_checkpoint(cache, fingerprint, layer, key)
    result = scan_records.read_result(cache, scan_records.record_path(cache, fingerprint, layer, key))
    result.cached = False
    return result


def run_ray_scan(clip, layer: str, dataset=None, top_k: int = 32, cache=None, force: bool = False,
                 precision: str = "fp32", keep_per_image: bool = False, ray=None, device: str = "auto",
                 image_column: str = "image", caption_column: str = "caption",
                 progress: Optional[Callable[[int, int], None]] = None, report: Optional[Callable] = None,
                 wait: bool = False, decoder: str = "auto") -> ScanResult:
    """The scan of run_scan on Ray Data (neurolens.engines.ray.session): the same result (top-k indices and cells
    exactly, statistics to rounding) in the same cache record, resumable shard by shard.

    dataset: a path or pattern (tar shards are then listed by Ray tasks, never all in this process), or an
    ImageDataset. ray: engines.ray.session.RayOptions (address, actors, batch size, GPUs per actor, ...).
    keep_per_image: also store every image's per-unit maxima, float16, one chunk per shard (the scan record's
    per_image_max() reads them); without it the record has no per-image values.
    report(RayProgress) gets images/s, shards done/total, items skipped and the ETA while it runs.
    wait: as run_scan's (the same key lock: a Ray scan and a local scan of one key never run at once).
    decoder: as run_scan's, for the actors' device (auto: torchvision when they have GPUs)."""
    if precision not in PRECISIONS:
        raise NeurolensError(f"unknown precision {precision!r}; use fp32 or bf16")
    if int(top_k) < 1:
        raise NeurolensError(f"--top-k must be at least 1, got {top_k}")
    spec = resolve_layer(clip, layer)
    cache = as_cache(cache)
    options = ray if ray is not None else RayOptions()
    with ray_session(options) as session:
        plan = plan_dataset(dataset, cache, options.shard_size, session.map, image_column, caption_column)
        decoder = resolve_decoder(decoder, session.actor_device(device))
        if not force:
            found = scan_records.find_result(cache, clip, spec, plan, top_k, precision, need_chunks=keep_per_image,
                                             decoder=decoder)
            if found is not None:
                if progress:
                    progress(len(plan), len(plan))
                return found
        key = scan_key(clip, spec, plan, top_k, precision, False, decoder=decoder)
        with key_lock(cache, clip.fingerprint, spec.name, [key], wait=wait):
            if not force:
                found = scan_records.find_result(cache, clip, spec, plan, top_k, precision, need_chunks=keep_per_image,
                                                 decoder=decoder)
                if found is not None:
                    return found
            store = ShardStore(cache, clip.fingerprint, spec.name, key)
            if force:
                store.remove_records()
            outcome = session.scan(clip, spec, plan, store, top_k=top_k, precision=precision,
                                   keep_per_image=keep_per_image, device=device, progress=progress, report=report,
                                   decoder=decoder)
            result = write_ray_scan(cache, clip, spec, plan, key, outcome.stats, top_k, precision, outcome.chunks,
                                    outcome.resumed, {"per_image": bool(keep_per_image),
                                                      "forwarded": int(outcome.forwarded),
                                                      "actors": int(options.actors),
                                                      "actor_peak_rss": int(outcome.actor_peak_rss)}, decoder)
            store.remove_records()
    return result


def write_ray_scan(cache: Cache, clip, spec, plan, key: str, stats: ScanStats, top_k: int, precision: str,
                   chunks: Sequence[str], resumed: Sequence[int], attrs: dict, decoder: str = "pil") -> ScanResult:
    """The scan record of a Ray scan (the record every scan writes, plus `engine: ray` and `attrs`), or the
    one-line error when no item was readable. Written under the key's lock (waiting for a local scan of the
    same key to finish), since writing it removes the key's chunks that it does not list."""
    with key_lock(cache, clip.fingerprint, spec.name, [key], wait=True):
        if stats.count == 0:
            scan_records.remove_stale_chunks(cache, clip.fingerprint, spec.name, key, [])
            example = f" (e.g. item {stats.skipped[0][0]}: {stats.skipped[0][1]})" if stats.skipped else ""
            raise DatasetError(f"no readable image in {plan.description}: all {len(plan)} items were skipped"
                               f"{example}; give a dataset with at least one valid image")
        record = scan_records.final_record(clip, spec, plan.dataset_view(), stats, top_k, precision, False, chunks,
                                           resumed, decoder=decoder)
        record.attrs.update({"engine": "ray", "shards": len(plan.shards), **attrs})
        result = scan_records.read_result(cache, scan_records.write_result(cache, key, record))
    result.cached = False
    return result


@dataclass
class _Stream:
    """One basis's records during a scan: its cache key and the chunk records written so far."""
    name: str                    # "neurons" or the basis id
    key: str
    chunks: List[str] = field(default_factory=list)


class _ChunkWriter:
    """Buffers per-image maxima (and embeddings) and writes a chunk record per stream (basis), then a checkpoint,
    at every checkpoint step. The buffered values stay on the scan's device until then: one copy to the host per
    chunk, never one per batch (BatchOutput)."""

    def __init__(self, cache: Cache, fingerprint: str, layer: str, key: str, total: int, stats: ScanStats,
                 batch_size: int, streams: dict, resumed_from: List[int], checkpoint_every: Optional[int]):
        self.cache, self.fingerprint, self.layer, self.key = cache, fingerprint, layer, key
        self.total, self.stats = total, stats
        self.batch_size, self.streams, self.resumed_from = batch_size, streams, resumed_from
        self.checkpoint_every = checkpoint_every
        self.buffer: List[BatchOutput] = []
        self.buffer_bytes = 0
        self.last_time = time.monotonic()

    def on_batch(self, batch: BatchOutput) -> None:
        self.buffer.append(batch)
        values = [batch.maxima, *batch.basis_maxima.values()] + ([batch.embeddings] if batch.embeddings is not None
                                                                 else [])
        self.buffer_bytes += sum(t.numel() * t.element_size() for t in values)
        if self.checkpoint_every:
            due = len(self.buffer) >= self.checkpoint_every
        else:
            due = time.monotonic() - self.last_time >= CHECKPOINT_SECONDS
        if due or self.buffer_bytes >= CHUNK_MAX_BYTES:
            self.flush(batch.stop, checkpoint=True)

    def flush(self, next_index: int, checkpoint: bool) -> None:
        if self.buffer:
            first = self.buffer[0].start
            indices = np.concatenate([b.indices for b in self.buffer])
            embs = [b.embeddings for b in self.buffer if b.embeddings is not None and len(b.embeddings)]
            embeddings = None
            if any(b.embeddings is not None for b in self.buffer):
                embeddings = _host(embs) if embs else np.zeros((0, 0), np.float32)
            for stream in self.streams.values():
                name = scan_records.chunk_name(stream.key, first)
                maxima = [b.maxima if stream.name == NEURONS else b.basis_maxima[stream.name] for b in self.buffer]
                scan_records.write_chunk(self.cache, self.fingerprint, self.layer, name, indices, _host(maxima),
                                         first, self.buffer[-1].stop, embeddings)
                if name not in stream.chunks:
                    stream.chunks.append(name)
            self.buffer, self.buffer_bytes = [], 0
        if checkpoint:
            scan_records.write_checkpoint(self.cache, self.fingerprint, self.layer, self.key, self.stats.state_dict(),
                                          next_index, self.batch_size,
                                          {name: stream.chunks for name, stream in self.streams.items()},
                                          self.resumed_from, self.total)
        self.last_time = time.monotonic()


def _host(parts: List[torch.Tensor]) -> np.ndarray:
    """Device tensors of one chunk, concatenated and copied to the host in one copy, as float32."""
    return torch.cat(parts).float().cpu().numpy()
