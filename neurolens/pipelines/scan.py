"""Cache-or-compute dataset scans, resumable after Ctrl-C or kill -9.

Cache records (one HDF5 file each, written atomically by Cache.write):
  scan/<fp>/<layer>/<key>.h5              the finished result (top-k, cells, moments, mean map, keys, skips)
  scan-chunk/<fp>/<layer>/<key>-<first>.h5  per-image spatial max (n, units) float32 of images from index
                                          <first> on (and their embeddings with embeddings=True)
  scan-checkpoint/<fp>/<layer>/<key>.h5   while a scan runs: statistics state, the next index to scan and
                                          the chunks written so far; removed when the result is written
The key hashes the dataset identity, the preprocessing (input size, mean/std), precision, top-k and
whether embeddings were kept. A checkpoint is written only after the chunks it lists, so a kill at any
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

from ..datasets import ImageDataset, open_dataset
from ..errors import DatasetError, NeurolensError
from ..models import resolve_layer
from ..scan import BatchOutput, PRECISIONS, ScanStats, default_batch_size, default_workers, scan_range
from ..store import Cache, Record, settings_key

SCAN_VERSION = 1
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
        return {"images": self.count, "skipped": self.skipped, "skipped_paths": list(self.skipped_paths)}


def scan_key(clip, spec, dataset: ImageDataset, top_k: int, precision: str, embeddings: bool) -> str:
    return settings_key("scan", SCAN_VERSION, dataset.identity, spec.name, spec.hook_module, spec.capture,
                        clip.image_size, list(clip.mean), list(clip.std), precision, int(top_k), bool(embeddings))


def _as_cache(cache: Union[Cache, str, os.PathLike, None]) -> Cache:
    return cache if isinstance(cache, Cache) else Cache(cache)


def find_scan(clip, layer: str, dataset: Union[ImageDataset, str, None] = None, top_k: int = 32,
              precision: str = "fp32", cache=None, embeddings: bool = False) -> Optional[ScanResult]:
    """The cached finished scan, or None. A scan with embeddings also answers a request without them."""
    spec = resolve_layer(clip, layer)
    dataset = dataset if isinstance(dataset, ImageDataset) else open_dataset(dataset)
    cache = _as_cache(cache)
    for with_embeddings in ((True,) if embeddings else (False, True)):
        key = scan_key(clip, spec, dataset, top_k, precision, with_embeddings)
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
             checkpoint_every: Optional[int] = None) -> ScanResult:
    """Scan `dataset` (an ImageDataset, a path, or None for the built-in images) through `layer`, all units,
    or read the finished scan from the cache. An interrupted scan resumes from its last checkpoint.

    checkpoint_every: write a resume checkpoint every N batches (default: at most every 5 s)."""
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
    if not force:
        found = find_scan(clip, spec.name, dataset, top_k, precision, cache, embeddings)
        if found is not None:
            if progress:
                progress(len(dataset), len(dataset))
            return found
    key = scan_key(clip, spec, dataset, top_k, precision, embeddings)
    final_path = cache.path("scan", clip.fingerprint, spec.name, key)
    checkpoint_path = cache.path("scan-checkpoint", clip.fingerprint, spec.name, key)
    batch_size = int(batch_size or default_batch_size(clip.device))
    workers = default_workers() if workers is None else int(workers)

    stats = ScanStats.empty(spec, top_k, clip.device)
    start, chunks, resumed_from = 0, [], []
    if force:
        cache.remove(checkpoint_path)
    else:
        checkpoint = cache.read(checkpoint_path)
        # a checkpoint fixes the batch boundaries, so resuming keeps its batch size (results stay identical)
        if checkpoint is not None and all(cache.exists(cache.path("scan-chunk", clip.fingerprint, spec.name, c))
                        for c in checkpoint.attrs.get("chunks", [])):
            state = {k[len("state/"):]: v for k, v in checkpoint.arrays.items() if k.startswith("state/")}
            stats.load_state_dict(state)
            start = int(checkpoint.attrs["next_index"])
            batch_size = int(checkpoint.attrs["batch_size"])
            chunks = list(checkpoint.attrs.get("chunks", []))
            resumed_from = list(checkpoint.attrs.get("resumed_from", [])) + [start]

    writer = _ChunkWriter(cache, clip, spec, key, dataset, stats, checkpoint_path, batch_size, chunks,
                          resumed_from, checkpoint_every)
    scan_range(clip, spec, dataset, start, None, top_k=top_k, batch_size=batch_size, workers=workers,
               precision=precision, embeddings=embeddings, stats=stats, on_batch=writer.on_batch, progress=progress)
    writer.flush(len(dataset), checkpoint=False)

    if stats.count == 0:
        for name in writer.chunks:
            cache.remove(cache.path("scan-chunk", clip.fingerprint, spec.name, name))
        cache.remove(checkpoint_path)
        example = f" (e.g. {dataset.keys[stats.skipped[0][0]]}: {stats.skipped[0][1]})" if stats.skipped else ""
        raise DatasetError(f"no readable image in {dataset.description}: all {len(dataset)} items were skipped"
                           f"{example}; give a dataset with at least one valid image")

    record = _final_record(clip, spec, dataset, stats, top_k, precision, embeddings, writer.chunks, resumed_from)
    cache.write(final_path, record)
    cache.remove(checkpoint_path)
    _remove_stale_chunks(cache, clip, spec, key, writer.chunks)
    result = _result_from_record(cache.read(final_path), cache, clip, spec)
    result.cached = False
    return result


def run_ray_scan(clip, layer: str, dataset=None, top_k: int = 32, cache=None, force: bool = False,
                 precision: str = "fp32", keep_per_image: bool = False, ray=None, device: str = "auto",
                 image_column: str = "image", caption_column: str = "caption",
                 progress: Optional[Callable[[int, int], None]] = None, report: Optional[Callable] = None
                 ) -> ScanResult:
    """The scan of run_scan on Ray Data (neurolens.engines.ray_scan): the same result (top-k indices and cells
    exactly, statistics to rounding) in the same cache record, resumable shard by shard.

    dataset: a path or pattern (tar shards are then listed by Ray tasks, never all in this process), or an
    ImageDataset. ray: engines.ray_scan.RayOptions (address, actors, batch size, GPUs per actor, ...).
    keep_per_image: also store every image's per-unit maxima, float16, one chunk per shard (the scan record's
    per_image_max() reads them); without it the record has no per-image values.
    report(RayProgress) gets images/s, shards done/total, items skipped and the ETA while it runs."""
    if precision not in PRECISIONS:
        raise NeurolensError(f"unknown precision {precision!r}; use fp32 or bf16")
    if int(top_k) < 1:
        raise NeurolensError(f"--top-k must be at least 1, got {top_k}")
    from ..engines.ray_scan import RayOptions, ray_session
    from ..engines.shards import ShardStore, plan_dataset
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


class _ChunkWriter:
    """Buffers per-image maxima and writes a chunk record, then a checkpoint, at every checkpoint step."""

    def __init__(self, cache: Cache, clip, spec, key: str, dataset: ImageDataset, stats: ScanStats,
                 checkpoint_path: Path, batch_size: int, chunks: List[str], resumed_from: List[int],
                 checkpoint_every: Optional[int]):
        self.cache, self.clip, self.spec, self.key = cache, clip, spec, key
        self.dataset, self.stats, self.checkpoint_path = dataset, stats, checkpoint_path
        self.batch_size, self.chunks, self.resumed_from = batch_size, chunks, resumed_from
        self.checkpoint_every = checkpoint_every
        self.buffer: List[BatchOutput] = []
        self.buffer_bytes = 0
        self.last_time = time.monotonic()

    def on_batch(self, batch: BatchOutput) -> None:
        self.buffer.append(batch)
        self.buffer_bytes += batch.maxima.nbytes + (batch.embeddings.nbytes if batch.embeddings is not None else 0)
        if self.checkpoint_every:
            due = len(self.buffer) >= self.checkpoint_every
        else:
            due = time.monotonic() - self.last_time >= CHECKPOINT_SECONDS
        if due or self.buffer_bytes >= CHUNK_MAX_BYTES:
            self.flush(batch.stop, checkpoint=True)

    def flush(self, next_index: int, checkpoint: bool) -> None:
        if self.buffer:
            first = self.buffer[0].start
            name = f"{self.key}-{first:010d}"
            arrays = {"indices": np.concatenate([b.indices for b in self.buffer]),
                      "maxima": np.concatenate([b.maxima for b in self.buffer]).astype(np.float32)}
            embs = [b.embeddings for b in self.buffer if b.embeddings is not None and len(b.embeddings)]
            if any(b.embeddings is not None for b in self.buffer):
                arrays["embeddings"] = np.concatenate(embs).astype(np.float32) if embs else np.zeros((0, 0), np.float32)
            self.cache.write(self.cache.path("scan-chunk", self.clip.fingerprint, self.spec.name, name),
                             Record(arrays=arrays, attrs={"first": first, "stop": self.buffer[-1].stop}))
            if name not in self.chunks:
                self.chunks.append(name)
            self.buffer, self.buffer_bytes = [], 0
        if checkpoint:
            state = {f"state/{k}": v for k, v in self.stats.state_dict().items()}
            attrs = {"next_index": int(next_index), "batch_size": self.batch_size, "chunks": list(self.chunks),
                     "resumed_from": list(self.resumed_from), "total": len(self.dataset)}
            self.cache.write(self.checkpoint_path, Record(arrays=state, attrs=attrs))
        self.last_time = time.monotonic()


def _final_record(clip, spec, dataset: ImageDataset, stats: ScanStats, top_k: int, precision: str,
                  embeddings: bool, chunks: Sequence[str], resumed_from: Sequence[int]) -> Record:
    skipped = sorted(stats.skipped)
    arrays = {
        "top_values": stats.topk.values.cpu().numpy().astype(np.float32),
        "top_indices": stats.topk.indices.cpu().numpy().astype(np.int64),
        "top_cells": stats.cells_rc(),
        "mean": stats.moments.mean.cpu().numpy(),
        "var": stats.moments.variance.cpu().numpy(),
        "m2": stats.moments.m2.cpu().numpy(),
        "mean_map": stats.mean_map.mean.cpu().numpy().astype(np.float32),
        "keys": np.asarray(dataset.keys, dtype=object),
        "skipped_indices": np.asarray([i for i, _ in skipped], dtype=np.int64),
    }
    if skipped:
        arrays["skipped_reasons"] = np.asarray([r for _, r in skipped], dtype=object)
    if dataset.captions is not None:
        arrays["captions"] = np.asarray(dataset.captions, dtype=object)
    attrs = {
        "complete": True, "layer": spec.name, "channels": spec.channels, "top_k": int(top_k),
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
        has_embeddings=bool(attrs.get("embeddings")), _chunk_paths=chunk_paths, _cache=cache)


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
