"""A dataset cut into shards for a distributed scan, and the cache records that make such a scan resumable.

Every item keeps the global index it has in the single-process dataset (`open_dataset`): shard order, then
member order. A tar dataset is planned shard by shard (each shard listed on its own, possibly by many workers
at once), so the driver never holds every item's reading instructions; folders and tables are opened once
and cut into slices of `shard_size` items. The plan's identity is the dataset identity `open_dataset` gives,
so a distributed scan is cached under the same key as the single-process one.

Cache records (besides the scan's own):
  dataset-listing/tar/shards/<key>.h5       one tar shard's keys, captions and identity parts; the key hashes
                                            the shard's path, size and mtime (and its img2dataset parquet's),
                                            so a rerun, or a scan of another layer, does not list it again
  scan-shard/<fp>/<layer>/<scan key>-s<first index>.h5
                                            a finished shard's partial statistics (ScanStats state); a rerun
                                            merges it instead of scanning the shard again
  scan-chunk/<fp>/<layer>/<scan key>-s<first index>.h5
                                            with keep_per_image: the shard's per-image maxima as float16
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..datasets import (IdentityHash, ImageDataset, ShardListing, list_tar_shard, open_dataset, tar_description,
                        tar_shards)
from ..errors import DatasetError, NeurolensError
from ..scan import ScanStats
from ..store import Cache, Record, settings_key

LISTING_VERSION = 1
DEFAULT_SHARD_SIZE = 10_000  # items per shard when a folder or table is cut into slices

Mapper = Callable[[Callable, Sequence], Iterable]  # like builtins.map(fn, items), results in order


@dataclass(frozen=True)
class PlannedShard:
    """One unit of work: a tar shard, or a slice of a folder or table."""
    index: int
    name: str
    offset: int        # global index of its first item
    count: int         # items (bad ones included)
    identity: str      # hash of what it holds
    source: object     # ('tar', path), or the slice as an ImageDataset: what a worker reads

    def dataset(self) -> ImageDataset:
        """The shard's items as a dataset (item i is global item offset + i), read where the worker runs."""
        if isinstance(self.source, ImageDataset):
            return self.source
        listing = list_tar_shard(self.source[1])
        if len(listing) != self.count:
            raise DatasetError(f"tar shard {self.name} changed during the scan ({self.count} items when planned, "
                               f"{len(listing)} now); run the scan again")
        return listing.dataset()


@dataclass
class DatasetPlan:
    identity: str                     # equals open_dataset(source).identity
    description: str
    total: int
    shards: List[PlannedShard]
    _listing_paths: List[Path] = field(default_factory=list, repr=False)   # tar plans
    _dataset: Optional[ImageDataset] = field(default=None, repr=False)     # slice plans
    _cache: Optional[Cache] = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.total

    def keys_and_captions(self) -> Tuple[List[str], Optional[List[str]]]:
        """Every item's key and caption, in global order (what the finished scan record lists)."""
        if self._dataset is not None:
            return list(self._dataset.keys), self._dataset.captions
        keys: List[str] = []
        captions: List[str] = []
        for path in self._listing_paths:
            record = self._cache.read(path, names=["keys", "captions"])
            if record is None:
                raise NeurolensError(f"dataset listing {path} vanished during the scan; run the scan again")
            keys += [str(k) for k in record.arrays["keys"]]
            captions += [str(c) for c in record.arrays["captions"]]
        return keys, captions

    def dataset_view(self) -> ImageDataset:
        """A dataset with this plan's keys, captions, identity and description (no reading instructions)."""
        keys, captions = self.keys_and_captions()
        return ImageDataset(keys=keys, identity=self.identity, description=self.description, captions=captions)


def plan_dataset(source, cache: Cache, shard_size: int = DEFAULT_SHARD_SIZE, mapper: Mapper = map,
                 image_column: str = "image", caption_column: str = "caption") -> DatasetPlan:
    """Cut `source` (a path or pattern, or an ImageDataset already opened) into shards. Tar shards are listed
    with `mapper` (Ray tasks in the Ray engine), each listing cached; other sources are opened here."""
    if int(shard_size) < 1:
        raise NeurolensError(f"--shard-size must be at least 1, got {shard_size}")
    shards = tar_shards(str(source)) if source is not None and not isinstance(source, ImageDataset) else None
    if shards is None:
        dataset = source if isinstance(source, ImageDataset) else open_dataset(source, image_column, caption_column)
        return _slice_plan(dataset, int(shard_size))
    return _tar_plan(shards, str(source), cache, mapper)


def _slice_plan(dataset: ImageDataset, shard_size: int) -> DatasetPlan:
    planned = []
    for number, first in enumerate(range(0, len(dataset), shard_size)):
        part = dataset.slice(first, min(first + shard_size, len(dataset)))
        planned.append(PlannedShard(index=number, name=part.description, offset=first, count=len(part),
                                    identity=part.identity, source=part))
    return DatasetPlan(identity=dataset.identity, description=dataset.description, total=len(dataset),
                       shards=planned, _dataset=dataset)


def _listing_path(cache: Cache, shard: str) -> Path:
    def stat(path: str):
        try:
            info = os.stat(path)
            return [info.st_size, info.st_mtime_ns]
        except OSError:
            return None
    sidecar = str(Path(shard).with_suffix(".parquet"))
    key = settings_key("listing", LISTING_VERSION, shard, stat(shard), stat(sidecar))
    return cache.path("dataset-listing", "tar", "shards", key)


def _tar_plan(shards: List[str], source: str, cache: Cache, mapper: Mapper) -> DatasetPlan:
    paths = [_listing_path(cache, shard) for shard in shards]
    todo = {shard for shard, path in zip(shards, paths) if not cache.exists(path)}
    fresh: Iterator[ShardListing] = iter(mapper(list_tar_shard, [shard for shard in shards if shard in todo]))
    identity = IdentityHash(["tar"])
    planned: List[PlannedShard] = []
    offset = 0
    for number, (shard, path) in enumerate(zip(shards, paths)):
        record = cache.read(path) if shard not in todo else None
        if record is None:
            listing = next(fresh) if shard in todo else list_tar_shard(shard)
            record = Record(arrays={"keys": np.asarray(listing.keys, dtype=object),
                                    "captions": np.asarray(listing.captions, dtype=object),
                                    "parts": np.asarray(listing.parts, dtype=object)},
                            attrs={"shard": shard, "count": len(listing)})
            cache.write(path, record)
        parts = [str(p) for p in record.arrays["parts"]]
        count = int(record.attrs["count"])
        identity.update(parts)
        planned.append(PlannedShard(index=number, name=shard, offset=offset, count=count,
                                    identity=IdentityHash([shard, *parts]).hexdigest(), source=("tar", shard)))
        offset += count
    if offset == 0:
        raise DatasetError(f"no image members found in the tar shards of {source}")
    return DatasetPlan(identity=identity.hexdigest(), description=tar_description(shards, source, offset),
                       total=offset, shards=planned, _listing_paths=paths, _cache=cache)


# ------------------------------------------------------------------------------------- shard records

class ShardStore:
    """Finished shards of one scan (one scan key): their partial statistics and, with keep_per_image, their
    per-image maxima as float16 chunks that ScanResult.per_image_max() reads like any scan chunk."""

    def __init__(self, cache: Cache, fingerprint: str, layer: str, key: str):
        self.cache, self.fingerprint, self.layer, self.key = cache, fingerprint, layer, key

    def name(self, shard: PlannedShard) -> str:
        # 's' keeps these apart from a single-process scan's chunks of the same key (named <key>-<first index>)
        return f"{self.key}-s{shard.offset:010d}"

    def path(self, shard: PlannedShard) -> Path:
        return self.cache.path("scan-shard", self.fingerprint, self.layer, self.name(shard))

    def chunk_path(self, shard: PlannedShard) -> Path:
        return self.cache.path("scan-chunk", self.fingerprint, self.layer, self.name(shard))

    def load(self, shard: PlannedShard, empty: Callable[[], ScanStats], per_image: bool) -> Optional[ScanStats]:
        """The shard's statistics when it was finished by an earlier run with the same contents, else None."""
        record = self.cache.read(self.path(shard))
        if record is None:
            return None
        attrs = record.attrs
        if attrs.get("shard_identity") != shard.identity or int(attrs.get("count", -1)) != shard.count:
            return None
        if per_image and not (attrs.get("per_image") and self.cache.exists(self.chunk_path(shard))):
            return None
        stats = empty()
        stats.load_state_dict({k[len("state/"):]: v for k, v in record.arrays.items() if k.startswith("state/")})
        return stats

    def save(self, shard: PlannedShard, stats: ScanStats, per_image: Optional[Tuple[np.ndarray, np.ndarray]],
             forwarded: int) -> None:
        """Write the chunk first, then the shard record that vouches for it (a kill between the two leaves a
        chunk without a record: the shard is redone and the chunk rewritten)."""
        if per_image is not None:
            indices, maxima = per_image
            order = np.argsort(indices, kind="stable")
            self.cache.write(self.chunk_path(shard), Record(
                arrays={"indices": indices[order].astype(np.int64), "maxima": maxima[order].astype(np.float16)},
                attrs={"first": shard.offset, "stop": shard.offset + shard.count}))
        arrays = {f"state/{k}": v for k, v in stats.state_dict().items()}
        self.cache.write(self.path(shard), Record(arrays=arrays, attrs={
            "shard": shard.name, "shard_identity": shard.identity, "offset": shard.offset, "count": shard.count,
            "per_image": per_image is not None, "forwarded": int(forwarded)}))

    def skipped(self, shards: Sequence[PlannedShard]) -> List[Tuple[int, str]]:
        """(index, reason) of every skipped item of these finished shards, in shard order."""
        found: List[Tuple[int, str]] = []
        for shard in shards:
            record = self.cache.read(self.path(shard), names=["state/skipped/indices", "state/skipped/reasons"])
            if record is None:
                raise NeurolensError(f"shard record {self.path(shard)} vanished during the scan; run the scan again")
            indices = record.arrays["state/skipped/indices"]
            reasons = record.arrays["state/skipped/reasons"]
            found += [(int(i), str(r)) for i, r in zip(indices, reasons)]
        return found

    def remove_records(self, shards: Sequence[PlannedShard]) -> None:
        """Once the scan's own record is written the shard records are redundant (chunks stay: it lists them)."""
        for shard in shards:
            self.cache.remove(self.path(shard))
