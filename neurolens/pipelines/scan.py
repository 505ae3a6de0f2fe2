"""Cache-or-compute dataset scans, resumable after Ctrl-C or kill -9.

Cache records (one HDF5 file each, written atomically by Cache.write):
  scan/<fp>/<layer>/<key>.h5              the finished result (top-k, cells, moments, mean map, keys, skips)
  scan-chunk/<fp>/<layer>/<key>-<first>.h5  per-image spatial max (n, units) float32 of images from index
                                          <first> on (and their embeddings with embeddings=True)
  scan-checkpoint/<fp>/<layer>/<key>.h5   while a scan runs: statistics state, the next index to scan and
                                          the chunks written so far; removed when the result is written
The key hashes the dataset identity, the preprocessing (input size, mean/std), precision, top-k and
whether embeddings were kept, and for a basis other than the neurons (SAE features, neurolens.sae.basis) its
id. A scan with a basis computes the neurons' and the basis's statistics in the same pass (the basis is applied
to the captured activations) and writes a record, and chunks, for each of them that is not cached yet; a
feature record's mean_map is the layer's (neuron-space) mean activation map. A checkpoint is written only after the chunks it lists, so a kill at any
moment leaves a consistent checkpoint; a rerun continues from its batch boundary and gives exactly the
result of an uninterrupted scan (same batches, same order of float operations).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import numpy as np

from ..datasets.types import ImageDataset
from ..datasets.open import open_dataset
from ..errors import DatasetError, NeurolensError
from ..models import resolve_layer
from ..activations.stats import BatchOutput, ScanStats
from ..activations.forward import PRECISIONS
from ..engines.local import default_batch_size, default_workers, scan_range
from ..storage.cache import Cache, Record, settings_key

SCAN_VERSION = 1
NEURONS = "neurons"
CHECKPOINT_SECONDS = 5.0         # without checkpoint_every: a checkpoint at most every 5 s of scanning
CHUNK_MAX_BYTES = 32 * 2 ** 20   # per-image maxima are flushed to a chunk record before the buffer passes this


@dataclass
class ScanResult:
    """A finished scan of one layer over one dataset (see the contract in HELPER_COMMON / README)."""
    layer: str
    channels: int
    top_k: int
    count: int                        # images scanned (readable)
    skipped: int
    skipped_paths: List[str]
    skipped_reasons: List[str]
    keys: List[str]
    captions: Optional[List[str]]
    top_values: np.ndarray            # (U, k) float32, descending; -inf for empty slots
    top_indices: np.ndarray           # (U, k) int64 dataset index, -1 = empty
    top_cells: np.ndarray             # (U, k, 2) int32 (row, col) of the spatial max, -1 = empty
    mean: np.ndarray                  # (U,) float64 mean of the per-image spatial max
    var: np.ndarray                   # (U,) float64 population variance of it
    mean_map: np.ndarray              # (C, H, W) float32 mean activation map over the dataset
    grid: tuple                       # (H, W) of the layer's map
    image_size: int
    precision: str
    description: str = ""
    path: Optional[Path] = None
    cached: bool = False
    resumed_from: List[int] = field(default_factory=list)
    has_embeddings: bool = False
    basis: str = "neurons"            # the units' basis id: "neurons" or an SAE basis (neurolens.sae.basis)
    _chunk_paths: List[Path] = field(default_factory=list, repr=False)
    _cache: Optional[Cache] = field(default=None, repr=False)
    _embeddings: Optional[np.ndarray] = field(default=None, repr=False)

    def per_image_max(self) -> np.ndarray:
        """(N, U) float32: each image's spatial max per unit, read from the chunk records.
        Rows of skipped items are NaN."""
        return self._read_chunks("maxima", self.channels)

    @property
    def embeddings(self) -> Optional[np.ndarray]:
        """(N, D) float32 L2-normalized image embeddings (scans with embeddings=True; else None).
        Rows of skipped items are NaN."""
        if not self.has_embeddings:
            return None
        if self._embeddings is None:
            self._embeddings = self._read_chunks("embeddings", None)
        return self._embeddings

    @property
    def valid(self) -> np.ndarray:
        """(N,) bool: True for images that were scanned, False for skipped items."""
        mask = np.ones(len(self.keys), dtype=bool)
        index = {key: i for i, key in enumerate(self.keys)}
        for path in self.skipped_paths:
            if path in index:
                mask[index[path]] = False
        return mask

    def _read_chunks(self, name: str, width: Optional[int]) -> np.ndarray:
        out = None
        for path in self._chunk_paths:
            record = self._cache.read(path) if self._cache else None
            if record is None:
                raise NeurolensError(f"scan chunk {path} is missing or unreadable; rerun the scan with --force")
            rows = record.arrays["indices"]
            values = record.arrays[name]
            if out is None:
                out = np.full((len(self.keys), width or values.shape[1]), np.nan, dtype=np.float32)
            if len(rows):
                out[rows] = values
        if out is None:
            out = np.full((len(self.keys), width or 0), np.nan, dtype=np.float32)
        return out

    def summary(self) -> dict:
        """The `scan --json` document."""
        summary = {"images": self.count, "skipped": self.skipped, "skipped_paths": list(self.skipped_paths)}
        if self.basis != NEURONS:
            summary.update(basis=self.basis, units=self.channels)
        return summary


def _basis_id(basis) -> str:
    return NEURONS if basis is None else basis.id


def scan_key(clip, spec, dataset: ImageDataset, top_k: int, precision: str, embeddings: bool, basis=None) -> str:
    parts = ["scan", SCAN_VERSION, dataset.identity, spec.name, spec.hook_module, spec.capture, clip.image_size,
             list(clip.mean), list(clip.std), precision, int(top_k), bool(embeddings)]
    if _basis_id(basis) != NEURONS:   # neuron scans keep the key they always had
        parts.append(_basis_id(basis))
    return settings_key(*parts)


def _as_basis(basis):
    """None for the neurons (or a neuron basis), else the basis object."""
    return None if basis is None or getattr(basis, "id", NEURONS) == NEURONS else basis


def _as_cache(cache: Union[Cache, str, os.PathLike, None]) -> Cache:
    return cache if isinstance(cache, Cache) else Cache(cache)


def find_scan(clip, layer: str, dataset: Union[ImageDataset, str, None] = None, top_k: int = 32,
              precision: str = "fp32", cache=None, embeddings: bool = False, basis=None) -> Optional[ScanResult]:
    """The cached finished scan, or None. A scan with embeddings also answers a request without them.
    basis: None for the neurons, or a basis of the layer (neurolens.sae.load_basis) for its units."""
    spec = resolve_layer(clip, layer)
    dataset = dataset if isinstance(dataset, ImageDataset) else open_dataset(dataset)
    cache = _as_cache(cache)
    basis = _as_basis(basis)
    for with_embeddings in ((True,) if embeddings else (False, True)):
        key = scan_key(clip, spec, dataset, top_k, precision, with_embeddings, basis)
        record = cache.read(cache.path("scan", clip.fingerprint, spec.name, key))
        if record is not None and record.attrs.get("complete"):
            result = _result_from_record(record, cache, clip, spec)
            if result is not None:
                return result
    return None


def run_scan(clip, layer: str, dataset: Union[ImageDataset, str, None] = None, top_k: int = 32,
             batch_size: Optional[int] = None, workers: Optional[int] = None, cache=None, force: bool = False,
             embeddings: bool = False, precision: str = "fp32",
             progress: Optional[Callable[[int, int], None]] = None,
             checkpoint_every: Optional[int] = None, basis=None) -> ScanResult:
    """Scan `dataset` (an ImageDataset, a path, or None for the built-in images) through `layer`, all units,
    or read the finished scan from the cache. An interrupted scan resumes from its last checkpoint.

    checkpoint_every: write a resume checkpoint every N batches (default: at most every 5 s).
    basis: None for the neurons; a basis of the layer (neurolens.sae.load_basis, e.g. SAE features) to scan
    its units, together with the neurons in the same pass. Returns the result of the requested basis."""
    if precision not in PRECISIONS:
        raise NeurolensError(f"unknown precision {precision!r}; use fp32 or bf16")
    if int(top_k) < 1:
        raise NeurolensError(f"--top-k must be at least 1, got {top_k}")
    if batch_size is not None and int(batch_size) < 1:
        raise NeurolensError(f"--batch-size must be at least 1, got {batch_size}")
    if workers is not None and int(workers) < 0:
        raise NeurolensError(f"--workers must be 0 or more, got {workers}")
    spec = resolve_layer(clip, layer)
    dataset = dataset if isinstance(dataset, ImageDataset) else open_dataset(dataset)
    cache = _as_cache(cache)
    basis = _as_basis(basis)
    if not force:
        found = find_scan(clip, spec.name, dataset, top_k, precision, cache, embeddings, basis)
        if found is not None:
            if progress:
                progress(len(dataset), len(dataset))
            return found
    key = scan_key(clip, spec, dataset, top_k, precision, embeddings, basis)
    final_path = cache.path("scan", clip.fingerprint, spec.name, key)
    checkpoint_path = cache.path("scan-checkpoint", clip.fingerprint, spec.name, key)
    batch_size = int(batch_size or default_batch_size(clip.device))
    workers = default_workers() if workers is None else int(workers)
    # the neurons come with every pass; their record is (re)written unless a basis scan finds it cached
    neuron_key = scan_key(clip, spec, dataset, top_k, precision, embeddings)
    write_neurons = basis is None or force or \
        find_scan(clip, spec.name, dataset, top_k, precision, cache, embeddings) is None
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
        cache.remove(checkpoint_path)
    else:
        checkpoint = cache.read(checkpoint_path)
        saved_streams = _checkpoint_streams(checkpoint)
        # a checkpoint fixes the batch boundaries, so resuming keeps its batch size (results stay identical)
        if checkpoint is not None and set(saved_streams) == set(streams) and all(
                cache.exists(cache.path("scan-chunk", clip.fingerprint, spec.name, c))
                for chunks in saved_streams.values() for c in chunks):
            state = {k[len("state/"):]: v for k, v in checkpoint.arrays.items() if k.startswith("state/")}
            stats.load_state_dict(state)
            start = int(checkpoint.attrs["next_index"])
            batch_size = int(checkpoint.attrs["batch_size"])
            for name, chunks in saved_streams.items():
                streams[name].chunks = list(chunks)
            resumed_from = list(checkpoint.attrs.get("resumed_from", [])) + [start]

    writer = _ChunkWriter(cache, clip, spec, dataset, stats, checkpoint_path, batch_size, streams,
                          resumed_from, checkpoint_every)
    scan_range(clip, spec, dataset, start, None, top_k=top_k, batch_size=batch_size, workers=workers,
               precision=precision, embeddings=embeddings, stats=stats, on_batch=writer.on_batch, progress=progress,
               bases=bases)
    writer.flush(len(dataset), checkpoint=False)

    if stats.count == 0:
        for stream in streams.values():
            for name in stream.chunks:
                cache.remove(cache.path("scan-chunk", clip.fingerprint, spec.name, name))
        cache.remove(checkpoint_path)
        example = f" (e.g. {dataset.keys[stats.skipped[0][0]]}: {stats.skipped[0][1]})" if stats.skipped else ""
        raise DatasetError(f"no readable image in {dataset.description}: all {len(dataset)} items were skipped"
                           f"{example}; give a dataset with at least one valid image")

    for name, stream in streams.items():
        record = _final_record(clip, spec, dataset, stats, top_k, precision, embeddings, stream.chunks,
                               resumed_from, None if name == NEURONS else basis)
        cache.write(cache.path("scan", clip.fingerprint, spec.name, stream.key), record)
        _remove_stale_chunks(cache, clip, spec, stream.key, stream.chunks)
    cache.remove(checkpoint_path)
    result = _result_from_record(cache.read(final_path), cache, clip, spec)
    result.cached = False
    return result


def run_ray_scan(clip, layer: str, dataset=None, top_k: int = 32, cache=None, force: bool = False,
                 precision: str = "fp32", keep_per_image: bool = False, ray=None, device: str = "auto",
                 image_column: str = "image", caption_column: str = "caption",
                 progress: Optional[Callable[[int, int], None]] = None, report: Optional[Callable] = None
                 ) -> ScanResult:
    """The scan of run_scan on Ray Data (neurolens.engines.ray.session): the same result (top-k indices and cells
    exactly, statistics to rounding) in the same cache record, resumable shard by shard.

    dataset: a path or pattern (tar shards are then listed by Ray tasks, never all in this process), or an
    ImageDataset. ray: engines.ray.session.RayOptions (address, actors, batch size, GPUs per actor, ...).
    keep_per_image: also store every image's per-unit maxima, float16, one chunk per shard (the scan record's
    per_image_max() reads them); without it the record has no per-image values.
    report(RayProgress) gets images/s, shards done/total, items skipped and the ETA while it runs."""
    if precision not in PRECISIONS:
        raise NeurolensError(f"unknown precision {precision!r}; use fp32 or bf16")
    if int(top_k) < 1:
        raise NeurolensError(f"--top-k must be at least 1, got {top_k}")
    from ..engines.ray.session import RayOptions, ray_session
    from ..engines.ray.shards import ShardStore, plan_dataset
    spec = resolve_layer(clip, layer)
    cache = _as_cache(cache)
    options = ray if ray is not None else RayOptions()
    with ray_session(options) as session:
        plan = plan_dataset(dataset, cache, options.shard_size, session.map, image_column, caption_column)
        if not force:
            found = _cached_scan(cache, clip, spec, plan, top_k, precision, need_chunks=keep_per_image)
            if found is not None:
                if progress:
                    progress(len(plan), len(plan))
                return found
        key = scan_key(clip, spec, plan, top_k, precision, False)
        store = ShardStore(cache, clip.fingerprint, spec.name, key)
        if force:
            store.remove_records()
        outcome = session.scan(clip, spec, plan, store, top_k=top_k, precision=precision,
                               keep_per_image=keep_per_image, device=device, progress=progress, report=report)
    result = write_ray_scan(cache, clip, spec, plan, key, outcome.stats, top_k, precision, outcome.chunks,
                            outcome.resumed, {"per_image": bool(keep_per_image), "forwarded": int(outcome.forwarded),
                                              "actors": int(options.actors),
                                              "actor_peak_rss": int(outcome.actor_peak_rss)})
    store.remove_records()
    return result


def write_ray_scan(cache: Cache, clip, spec, plan, key: str, stats: ScanStats, top_k: int, precision: str,
                   chunks: Sequence[str], resumed: Sequence[int], attrs: dict) -> ScanResult:
    """The scan record of a Ray scan (the record every scan writes, plus `engine: ray` and `attrs`), or the
    one-line error when no item was readable."""
    if stats.count == 0:
        _remove_stale_chunks(cache, clip, spec, key, [])
        example = f" (e.g. item {stats.skipped[0][0]}: {stats.skipped[0][1]})" if stats.skipped else ""
        raise DatasetError(f"no readable image in {plan.description}: all {len(plan)} items were skipped"
                           f"{example}; give a dataset with at least one valid image")
    record = _final_record(clip, spec, plan.dataset_view(), stats, top_k, precision, False, chunks, resumed)
    record.attrs.update({"engine": "ray", "shards": len(plan.shards), **attrs})
    final_path = cache.path("scan", clip.fingerprint, spec.name, key)
    cache.write(final_path, record)
    _remove_stale_chunks(cache, clip, spec, key, chunks)
    result = _result_from_record(cache.read(final_path), cache, clip, spec)
    result.cached = False
    return result


def _cached_scan(cache: Cache, clip, spec, dataset, top_k: int, precision: str, need_chunks: bool
                 ) -> Optional[ScanResult]:
    """find_scan for a dataset given by identity (an ImageDataset or a plan); need_chunks passes over records
    without per-image values."""
    for with_embeddings in (False, True):
        key = scan_key(clip, spec, dataset, top_k, precision, with_embeddings)
        record = cache.read(cache.path("scan", clip.fingerprint, spec.name, key))
        if record is not None and record.attrs.get("complete"):
            if need_chunks and not record.attrs.get("chunks"):
                continue
            result = _result_from_record(record, cache, clip, spec)
            if result is not None:
                return result
    return None


@dataclass
class _Stream:
    """One basis's records during a scan: its cache key and the chunk records written so far."""
    name: str                    # "neurons" or the basis id
    key: str
    chunks: List[str] = field(default_factory=list)


def _checkpoint_streams(checkpoint: Optional[Record]) -> dict:
    if checkpoint is None:
        return {}
    streams = checkpoint.attrs.get("streams")
    if streams is None:   # a checkpoint of a neuron-only scan written before bases existed
        return {NEURONS: list(checkpoint.attrs.get("chunks", []))}
    return {name: list(chunks) for name, chunks in streams.items()}


class _ChunkWriter:
    """Buffers per-image maxima and writes a chunk record per stream (basis), then a checkpoint, at every
    checkpoint step."""

    def __init__(self, cache: Cache, clip, spec, dataset: ImageDataset, stats: ScanStats,
                 checkpoint_path: Path, batch_size: int, streams: dict, resumed_from: List[int],
                 checkpoint_every: Optional[int]):
        self.cache, self.clip, self.spec = cache, clip, spec
        self.dataset, self.stats, self.checkpoint_path = dataset, stats, checkpoint_path
        self.batch_size, self.streams, self.resumed_from = batch_size, streams, resumed_from
        self.checkpoint_every = checkpoint_every
        self.buffer: List[BatchOutput] = []
        self.buffer_bytes = 0
        self.last_time = time.monotonic()

    def on_batch(self, batch: BatchOutput) -> None:
        self.buffer.append(batch)
        self.buffer_bytes += batch.maxima.nbytes + sum(m.nbytes for m in batch.basis_maxima.values()) + \
            (batch.embeddings.nbytes if batch.embeddings is not None else 0)
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
            with_embeddings = any(b.embeddings is not None for b in self.buffer)
            for stream in self.streams.values():
                name = f"{stream.key}-{first:010d}"
                maxima = [b.maxima if stream.name == NEURONS else b.basis_maxima[stream.name] for b in self.buffer]
                arrays = {"indices": indices, "maxima": np.concatenate(maxima).astype(np.float32)}
                if with_embeddings:
                    arrays["embeddings"] = np.concatenate(embs).astype(np.float32) if embs else np.zeros((0, 0), np.float32)
                self.cache.write(self.cache.path("scan-chunk", self.clip.fingerprint, self.spec.name, name),
                                 Record(arrays=arrays, attrs={"first": first, "stop": self.buffer[-1].stop}))
                if name not in stream.chunks:
                    stream.chunks.append(name)
            self.buffer, self.buffer_bytes = [], 0
        if checkpoint:
            state = {f"state/{k}": v for k, v in self.stats.state_dict().items()}
            streams = {name: list(stream.chunks) for name, stream in self.streams.items()}
            attrs = {"next_index": int(next_index), "batch_size": self.batch_size, "streams": streams,
                     "resumed_from": list(self.resumed_from), "total": len(self.dataset)}
            self.cache.write(self.checkpoint_path, Record(arrays=state, attrs=attrs))
        self.last_time = time.monotonic()


def _final_record(clip, spec, dataset: ImageDataset, stats: ScanStats, top_k: int, precision: str,
                  embeddings: bool, chunks: Sequence[str], resumed_from: Sequence[int], basis=None) -> Record:
    """The record of the neurons, or with `basis` of that basis (its statistics stats.bases[basis.id]); the
    layer's mean map and the skips come from `stats` either way."""
    unit_stats = stats if basis is None else stats.bases[basis.id]
    skipped = sorted(stats.skipped)
    arrays = {
        "top_values": unit_stats.topk.values.cpu().numpy().astype(np.float32),
        "top_indices": unit_stats.topk.indices.cpu().numpy().astype(np.int64),
        "top_cells": unit_stats.cells_rc(),
        "mean": unit_stats.moments.mean.cpu().numpy(),
        "var": unit_stats.moments.variance.cpu().numpy(),
        "m2": unit_stats.moments.m2.cpu().numpy(),
        "mean_map": stats.mean_map.mean.cpu().numpy().astype(np.float32),
        "keys": np.asarray(dataset.keys, dtype=object),
        "skipped_indices": np.asarray([i for i, _ in skipped], dtype=np.int64),
    }
    if skipped:
        arrays["skipped_reasons"] = np.asarray([r for _, r in skipped], dtype=object)
    if dataset.captions is not None:
        arrays["captions"] = np.asarray(dataset.captions, dtype=object)
    attrs = {
        "complete": True, "layer": spec.name, "channels": unit_stats.topk.units, "top_k": int(top_k),
        "basis": _basis_id(basis), "basis_info": basis.describe() if basis is not None else {"basis": NEURONS},
        "count": stats.count, "items": len(dataset), "skipped": len(skipped), "grid": list(stats.grid),
        "image_size": clip.image_size, "mean_rgb": list(clip.mean), "std_rgb": list(clip.std),
        "precision": precision, "embeddings": bool(embeddings), "chunks": list(chunks),
        "resumed_from": list(resumed_from), "dataset": dataset.description, "dataset_identity": dataset.identity,
        "model": clip.name, "pretrained": clip.pretrained, "fingerprint": clip.fingerprint,
    }
    return Record(arrays=arrays, attrs=attrs)


def _result_from_record(record: Optional[Record], cache: Cache, clip, spec) -> Optional[ScanResult]:
    if record is None:
        return None
    a, attrs = record.arrays, record.attrs
    keys = [str(k) for k in a["keys"]]
    skipped_indices = [int(i) for i in a.get("skipped_indices", [])]
    reasons = [str(r) for r in a.get("skipped_reasons", [])]
    chunk_paths = [cache.path("scan-chunk", clip.fingerprint, spec.name, name) for name in attrs.get("chunks", [])]
    return ScanResult(
        layer=attrs["layer"], channels=int(attrs["channels"]), top_k=int(attrs["top_k"]), count=int(attrs["count"]),
        skipped=len(skipped_indices), skipped_paths=[keys[i] for i in skipped_indices], skipped_reasons=reasons,
        keys=keys, captions=[str(c) for c in a["captions"]] if "captions" in a else None,
        top_values=a["top_values"], top_indices=a["top_indices"], top_cells=a["top_cells"],
        mean=a["mean"], var=a["var"], mean_map=a["mean_map"], grid=tuple(attrs["grid"]),
        image_size=int(attrs["image_size"]), precision=attrs["precision"], description=attrs.get("dataset", ""),
        path=record.path, cached=True, resumed_from=list(attrs.get("resumed_from", [])),
        has_embeddings=bool(attrs.get("embeddings")), basis=str(attrs.get("basis", NEURONS)),
        _chunk_paths=chunk_paths, _cache=cache)


def _remove_stale_chunks(cache: Cache, clip, spec, key: str, keep: Sequence[str]) -> None:
    """Chunks (and temp files) of this key that the final record does not list: left by a killed run."""
    folder = cache.path("scan-chunk", clip.fingerprint, spec.name, key).parent
    if not folder.is_dir():
        return
    wanted = {f"{name}.h5" for name in keep}
    for entry in folder.iterdir():
        name = entry.name
        ours = name.startswith(f"{key}-") or name.startswith(f".{key}-")
        if ours and name not in wanted:
            entry.unlink(missing_ok=True)
