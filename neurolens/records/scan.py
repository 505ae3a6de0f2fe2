"""The scan records: a finished scan, its per-image chunks and the checkpoint of a running scan.

One HDF5 file each (<fp> is the weights fingerprint's first 16 hex digits):
  scan/<fp>/<layer>/<key>.h5                the finished result (top-k, cells, moments, mean map, keys, skips);
                                            attrs name the layer, fingerprint, basis and the chunks
  scan-chunk/<fp>/<layer>/<key>-<first>.h5  per-image spatial max (n, units) of images from index <first> on
                                            (indices, maxima float32 and, with embeddings=True, embeddings);
                                            a Ray scan's shard chunks are <key>-s<first> (maxima float16)
  scan-checkpoint/<fp>/<layer>/<key>.h5     while a scan runs: statistics state (state/*), the next index to
                                            scan, the batch size and the chunks written so far per basis
  scan-checkpoint/<fp>/<layer>/<key>.lock  the lock of the one process that may write this key's records
                                            (`key_lock`; an empty file holding the writer's process id)
The key hashes the dataset identity, the preprocessing (input size, mean/std), precision, top-k and whether
embeddings were kept, for a basis other than the neurons (SAE features, neurolens.sae.basis) its id, and for a
decoder other than PIL (`--decode`) its name; the `decoder` attr names it (absent: pil). A feature record's
mean_map is the layer's (neuron-space) mean activation map. Everything here reads without a model: a record's
attrs hold its layer and fingerprint, so `result_from_record` needs only the cache.

One writer per key: neurolens.records.scan_lock.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import NeurolensError
from ..storage.cache import Cache, Record, read_attrs, settings_key
from .keys import NEURONS, as_basis, basis_id, basis_parts, decoder_parts

KIND = "scan"
CHUNK_KIND = "scan-chunk"
CHECKPOINT_KIND = "scan-checkpoint"
SCAN_VERSION = 1


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
    basis: str = NEURONS              # the units' basis id: "neurons" or an SAE basis (neurolens.sae.basis)
    decoder: str = "pil"              # the image decoder of the scan (neurolens.datasets.decode.DECODERS)
    _chunk_paths: List[Path] = field(default_factory=list, repr=False)
    _cache: Optional[Cache] = field(default=None, repr=False)
    _embeddings: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def chunks(self) -> List[Path]:
        """The chunk records holding the per-image values (per_image_max reads them)."""
        return list(self._chunk_paths)

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


# ------------------------------------------------------------------------------------------- keys, paths

def scan_key(clip, spec, dataset, top_k: int, precision: str, embeddings: bool, basis=None,
             decoder: str = "pil") -> str:
    """The key of a scan of `dataset` (anything with an `identity`: an ImageDataset or a shard plan); decoder:
    the resolved decoder (pil or torchvision)."""
    parts = ["scan", SCAN_VERSION, dataset.identity, spec.name, spec.hook_module, spec.capture, clip.image_size,
             list(clip.mean), list(clip.std), precision, int(top_k), bool(embeddings)]
    # neuron scans decoded by PIL keep the key they always had
    return settings_key(*parts, *basis_parts(basis), *decoder_parts(decoder))


def record_path(cache: Cache, fingerprint: str, layer: str, key: str) -> Path:
    return cache.path(KIND, fingerprint, layer, key)


def checkpoint_path(cache: Cache, fingerprint: str, layer: str, key: str) -> Path:
    return cache.path(CHECKPOINT_KIND, fingerprint, layer, key)


def chunk_path(cache: Cache, fingerprint: str, layer: str, name: str) -> Path:
    return cache.path(CHUNK_KIND, fingerprint, layer, name)


def chunk_name(key: str, first: int) -> str:
    """A single-process scan's chunk of the images from index `first` on."""
    return f"{key}-{int(first):010d}"


def chunk_paths(cache: Cache, record: Record) -> List[Path]:
    """The chunk records a scan record lists (its per-image values), where they are in `cache`."""
    fingerprint, layer = _owner(record)
    return [chunk_path(cache, fingerprint, layer, name) for name in record.attrs.get("chunks", [])]


def _owner(record: Record):
    """(fingerprint, layer) of a scan record: from its attrs (the folder name for the fingerprint when an attr
    is missing; the cache's folders use only its first 16 digits)."""
    attrs = record.attrs
    fingerprint = str(attrs.get("fingerprint") or (Path(record.path).parent.parent.name if record.path else ""))
    return fingerprint, str(attrs["layer"])


# ------------------------------------------------------------------------------------------- the result

def final_record(clip, spec, dataset, stats, top_k: int, precision: str, embeddings: bool,
                 chunks: Sequence[str], resumed_from: Sequence[int], basis=None, decoder: str = "pil") -> Record:
    """The finished record of the neurons, or with `basis` of that basis (its statistics stats.bases[basis.id]);
    the layer's mean map and the skips come from `stats` (a ScanStats) either way."""
    basis = as_basis(basis)
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
        "basis": basis_id(basis), "basis_info": basis.describe() if basis is not None else {"basis": NEURONS},
        "count": stats.count, "items": len(dataset), "skipped": len(skipped), "grid": list(stats.grid),
        "image_size": clip.image_size, "mean_rgb": list(clip.mean), "std_rgb": list(clip.std),
        "precision": precision, "decoder": decoder, "embeddings": bool(embeddings), "chunks": list(chunks),
        "resumed_from": list(resumed_from), "dataset": dataset.description, "dataset_identity": dataset.identity,
        "model": clip.name, "pretrained": clip.pretrained, "fingerprint": clip.fingerprint,
    }
    return Record(arrays=arrays, attrs=attrs)


def write_result(cache: Cache, key: str, record: Record) -> Path:
    """Write a finished record (final_record) under `key`, where its attrs' fingerprint and layer say, and
    remove the chunks of that key it does not list (left by a killed run). Returns its path."""
    fingerprint, layer = _owner(record)
    path = cache.write(record_path(cache, fingerprint, layer, key), record)
    remove_stale_chunks(cache, fingerprint, layer, key, record.attrs.get("chunks", []))
    return path


def read_result(cache: Cache, path: Path) -> Optional[ScanResult]:
    """The finished scan at `path`, or None when absent, unreadable or unfinished."""
    record = cache.read(path)
    return result_from_record(record, cache) if record is not None and record.attrs.get("complete") else None


def result_from_record(record: Optional[Record], cache: Cache) -> Optional[ScanResult]:
    if record is None:
        return None
    a, attrs = record.arrays, record.attrs
    keys = [str(k) for k in a["keys"]]
    skipped_indices = [int(i) for i in a.get("skipped_indices", [])]
    reasons = [str(r) for r in a.get("skipped_reasons", [])]
    return ScanResult(
        layer=attrs["layer"], channels=int(attrs["channels"]), top_k=int(attrs["top_k"]), count=int(attrs["count"]),
        skipped=len(skipped_indices), skipped_paths=[keys[i] for i in skipped_indices], skipped_reasons=reasons,
        keys=keys, captions=[str(c) for c in a["captions"]] if "captions" in a else None,
        top_values=a["top_values"], top_indices=a["top_indices"], top_cells=a["top_cells"],
        mean=a["mean"], var=a["var"], mean_map=a["mean_map"], grid=tuple(attrs["grid"]),
        image_size=int(attrs["image_size"]), precision=attrs["precision"], description=attrs.get("dataset", ""),
        path=record.path, cached=True, resumed_from=list(attrs.get("resumed_from", [])),
        has_embeddings=bool(attrs.get("embeddings")), basis=str(attrs.get("basis", NEURONS)),
        decoder=str(attrs.get("decoder", "pil")), _chunk_paths=chunk_paths(cache, record), _cache=cache)


def find_result(cache: Cache, clip, spec, dataset, top_k: int, precision: str, embeddings: bool = False,
                basis=None, need_chunks: bool = False, decoder: str = "pil") -> Optional[ScanResult]:
    """The cached finished scan with these settings, or None. A scan with embeddings also answers a request
    without them; need_chunks passes over records without per-image values (a Ray scan without them)."""
    for with_embeddings in ((True,) if embeddings else (False, True)):
        key = scan_key(clip, spec, dataset, top_k, precision, with_embeddings, basis, decoder)
        record = cache.read(record_path(cache, clip.fingerprint, spec.name, key))
        if record is None or not record.attrs.get("complete"):
            continue
        if need_chunks and not record.attrs.get("chunks"):
            continue
        result = result_from_record(record, cache)
        if result is not None:
            return result
    return None


def newest_scan_path(cache: Cache, fingerprint: str, layer: str, basis=None) -> Optional[Path]:
    """The record of the newest (by file time) finished scan of `layer` with these weights in the cache, of the
    neurons (basis None) or of `basis`'s units, or None. Only attrs are read."""
    wanted = basis_id(basis)
    best = None
    for path in cache.layer_records(KIND, fingerprint, layer):
        try:
            attrs = read_attrs(path)
        except (OSError, KeyError, ValueError):
            continue
        if not attrs.get("complete") or str(attrs.get("basis", NEURONS)) != wanted:
            continue
        if best is None or path.stat().st_mtime > best[0]:
            best = (path.stat().st_mtime, path)
    return None if best is None else best[1]


def newest_scan(cache: Cache, fingerprint: str, layer: str, basis=None) -> Optional[ScanResult]:
    """The newest finished scan of `layer` (newest_scan_path) as a ScanResult, or None."""
    path = newest_scan_path(cache, fingerprint, layer, basis)
    return None if path is None else result_from_record(cache.read(path), cache)


@dataclass(frozen=True)
class DatasetTop:
    """A unit's strongest dataset image in a scan: its spatial max (what the scan ranks by) and where it is from."""
    value: float                      # the unit's highest activation over the cells of its top-1 image
    index: int                        # that image's dataset index
    dataset: str                      # the scanned dataset's description
    images: int                       # images scanned
    record: Path                      # the scan record


def dataset_top1(cache: Cache, fingerprint: str, layer: str, unit: int, basis=None) -> Optional[DatasetTop]:
    """The unit's top-1 dataset activation in the newest finished scan of the layer (and basis) with these
    weights, or None when there is none or the unit has no image in it. Reads the record's top-k arrays only,
    no model: the visualize command and the notebook dashboard compare a visualization with it."""
    path = newest_scan_path(cache, fingerprint, layer, basis)
    record = None if path is None else cache.read(path, names=["top_values", "top_indices"])
    if record is None or not 0 <= int(unit) < len(record.arrays["top_values"]):
        return None
    value, index = float(record.arrays["top_values"][int(unit), 0]), int(record.arrays["top_indices"][int(unit), 0])
    if index < 0 or not np.isfinite(value):
        return None
    return DatasetTop(value=value, index=index, dataset=str(record.attrs.get("dataset", "")),
                      images=int(record.attrs.get("count", 0)), record=Path(path))


# ------------------------------------------------------------------------------------------- while it runs

@dataclass
class Checkpoint:
    """A running scan's checkpoint: where to continue and the chunks each basis has written so far."""
    state: Dict[str, np.ndarray]      # ScanStats.state_dict()
    next_index: int
    batch_size: int
    streams: Dict[str, List[str]]     # basis id ("neurons" or an SAE basis) -> chunk names
    resumed_from: List[int]


def write_chunk(cache: Cache, fingerprint: str, layer: str, name: str, indices: np.ndarray, maxima: np.ndarray,
                first: int, stop: int, embeddings: Optional[np.ndarray] = None) -> Path:
    """A chunk record: `maxima` (n, units) of the dataset items `indices`, from `first` up to `stop`."""
    arrays = {"indices": indices, "maxima": maxima}
    if embeddings is not None:
        arrays["embeddings"] = embeddings
    return cache.write(chunk_path(cache, fingerprint, layer, name),
                       Record(arrays=arrays, attrs={"first": int(first), "stop": int(stop)}))


def write_checkpoint(cache: Cache, fingerprint: str, layer: str, key: str, state: Dict[str, np.ndarray],
                     next_index: int, batch_size: int, streams: Dict[str, List[str]], resumed_from: Sequence[int],
                     total: int) -> Path:
    attrs = {"next_index": int(next_index), "batch_size": int(batch_size),
             "streams": {name: list(chunks) for name, chunks in streams.items()},
             "resumed_from": list(resumed_from), "total": int(total)}
    return cache.write(checkpoint_path(cache, fingerprint, layer, key),
                       Record(arrays={f"state/{k}": v for k, v in state.items()}, attrs=attrs))


def read_checkpoint(cache: Cache, fingerprint: str, layer: str, key: str) -> Optional[Checkpoint]:
    """The checkpoint of a scan with this key, or None when there is none, it is unreadable or a chunk it
    lists is missing (then the scan starts again)."""
    record = cache.read(checkpoint_path(cache, fingerprint, layer, key))
    if record is None:
        return None
    streams = record.attrs.get("streams")
    if streams is None:   # a checkpoint of a neuron-only scan written before bases existed
        streams = {NEURONS: list(record.attrs.get("chunks", []))}
    streams = {name: list(chunks) for name, chunks in streams.items()}
    if not all(cache.exists(chunk_path(cache, fingerprint, layer, c)) for chunks in streams.values() for c in chunks):
        return None
    state = {k[len("state/"):]: v for k, v in record.arrays.items() if k.startswith("state/")}
    return Checkpoint(state=state, next_index=int(record.attrs["next_index"]),
                      batch_size=int(record.attrs["batch_size"]), streams=streams,
                      resumed_from=list(record.attrs.get("resumed_from", [])))


def remove_checkpoint(cache: Cache, fingerprint: str, layer: str, key: str) -> None:
    cache.remove(checkpoint_path(cache, fingerprint, layer, key))


def remove_chunks(cache: Cache, fingerprint: str, layer: str, names: Sequence[str]) -> None:
    for name in names:
        cache.remove(chunk_path(cache, fingerprint, layer, name))


def remove_stale_chunks(cache: Cache, fingerprint: str, layer: str, key: str, keep: Sequence[str]) -> None:
    """Chunks (and temp files) of this key that are not in `keep` (the final record's list): left by a
    killed run."""
    folder = chunk_path(cache, fingerprint, layer, key).parent
    if not folder.is_dir():
        return
    wanted = {f"{name}.h5" for name in keep}
    for entry in folder.iterdir():
        name = entry.name
        ours = name.startswith(f"{key}-") or name.startswith(f".{key}-")
        if ours and name not in wanted:
            entry.unlink(missing_ok=True)
