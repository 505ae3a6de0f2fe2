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
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ...datasets.types import IdentityHash, ImageDataset
from ...datasets.tar import ShardListing, list_tar_shard, tar_description, tar_shards
from ...datasets.open import open_dataset
from ...errors import DatasetError, NeurolensError
from ...activations.stats import ScanStats
from ...storage.cache import Cache, Record, settings_key

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

    @property
    def dataset(self) -> Optional[ImageDataset]:
        """The opened dataset of a folder or table plan (None for tar shards, never opened whole)."""
        return self._dataset

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

@dataclass
class FinishedGroup:
    """Shards an earlier run finished: their merged statistics (skip list included) and the record."""
    stats: ScanStats
    shards: List[PlannedShard]
    path: Path
    is_group: bool
    extra: Dict[str, np.ndarray] = field(default_factory=dict)   # what a scan extension stored beside them


class ShardStore:
    """Finished shards of one scan (one scan key): their partial statistics and, with keep_per_image, their
    per-image maxima as float16 chunks that ScanResult.per_image_max() reads like any scan chunk.

    A finished shard is first a record of its own (`<key>-s<first index>`); every `compact_every` finished
    shards are merged into one group record (`<key>-c<number>`, listing the shards it holds) and their own
    records deleted, so a run over tens of thousands of shards keeps hundreds of records, not tens of
    thousands (RN50x4 image_block_4_5: about 3 MB each)."""

    def __init__(self, cache: Cache, fingerprint: str, layer: str, key: str, extra_identity: str = ""):
        self.cache, self.fingerprint, self.layer, self.key = cache, fingerprint, layer, key
        # records hold `extra/*` arrays of a scan extension (a fused sweep's labels); this names what they
        # depend on, and records made for another one are not reused
        self.extra_identity = extra_identity

    def name(self, shard: PlannedShard) -> str:
        # 's' keeps these apart from a single-process scan's chunks of the same key (named <key>-<first index>)
        return f"{self.key}-s{shard.offset:010d}"

    def path(self, shard: PlannedShard) -> Path:
        return self.cache.path("scan-shard", self.fingerprint, self.layer, self.name(shard))

    def group_path(self, number: int) -> Path:
        return self.cache.path("scan-shard", self.fingerprint, self.layer, f"{self.key}-c{number:06d}")

    def chunk_path(self, shard: PlannedShard) -> Path:
        return self.cache.path("scan-chunk", self.fingerprint, self.layer, self.name(shard))

    def _records(self, kind: str) -> List[Path]:
        folder = self.path(PlannedShard(0, "", 0, 0, "", None)).parent
        return sorted(folder.glob(f"{self.key}-{kind}*.h5")) if folder.is_dir() else []

    def next_group(self) -> int:
        numbers = [int(p.stem.rsplit("-c", 1)[1]) for p in self._records("c")]
        return max(numbers, default=-1) + 1

    @staticmethod
    def _state(record: Record, prefix: str = "state/") -> dict:
        return {k[len(prefix):]: v for k, v in record.arrays.items() if k.startswith(prefix)}

    def _arrays(self, stats: ScanStats, extra: Optional[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
        arrays = {f"state/{k}": v for k, v in stats.state_dict().items()}
        arrays.update({f"extra/{k}": v for k, v in (extra or {}).items()})
        return arrays

    def finished(self, shards: Sequence[PlannedShard], empty: Callable[[], ScanStats], per_image: bool
                 ) -> List["FinishedGroup"]:
        """What earlier runs finished, for every group record and shard record that matches these shards'
        contents. Records that match nothing (other contents, or no per-image values where they are asked
        for) are deleted, as is a shard record whose shard a group also holds (a run killed between writing
        a group and deleting its shards)."""
        by_offset = {shard.offset: shard for shard in shards}

        def matching(offset, identity, count) -> Optional[PlannedShard]:
            shard = by_offset.get(int(offset))
            if shard is None or shard.identity != identity or shard.count != int(count):
                return None
            if per_image and not self.cache.exists(self.chunk_path(shard)):
                return None
            return shard

        found: List[FinishedGroup] = []
        covered: set = set()
        for path in self._records("c"):
            record = self.cache.read(path)
            members = []
            if record is not None and (record.attrs.get("per_image") or not per_image) and \
                    record.attrs.get("extra_identity", "") == self.extra_identity:
                attrs = record.attrs
                members = [matching(o, i, c) for o, i, c in zip(attrs["offsets"], attrs["identities"],
                                                                 attrs["counts"])]
            if not members or any(m is None or m.offset in covered for m in members):
                self.cache.remove(path)
                continue
            stats = empty()
            stats.load_state_dict(self._state(record))
            found.append(FinishedGroup(stats, members, path, True, self._state(record, "extra/")))
            covered.update(m.offset for m in members)
        for shard in shards:
            path = self.path(shard)
            if shard.offset in covered:
                self.cache.remove(path)
                continue
            record = self.cache.read(path)
            if record is None:
                continue
            attrs = record.attrs
            stale = (per_image and not attrs.get("per_image")) or attrs.get("extra_identity", "") != self.extra_identity
            if stale or matching(attrs.get("offset", -1), attrs.get("shard_identity"),
                                 attrs.get("count", -1)) is not shard:
                self.cache.remove(path)
                continue
            stats = empty()
            stats.load_state_dict(self._state(record))
            found.append(FinishedGroup(stats, [shard], path, False, self._state(record, "extra/")))
        return found

    def save(self, shard: PlannedShard, stats: ScanStats, per_image: Optional[Tuple[np.ndarray, np.ndarray]],
             forwarded: int, extra: Optional[Dict[str, np.ndarray]] = None) -> None:
        """Write the chunk first, then the shard record that vouches for it (a kill between the two leaves a
        chunk without a record: the shard is redone and the chunk rewritten)."""
        if per_image is not None:
            indices, maxima = per_image
            order = np.argsort(indices, kind="stable")
            self.cache.write(self.chunk_path(shard), Record(
                arrays={"indices": indices[order].astype(np.int64), "maxima": maxima[order].astype(np.float16)},
                attrs={"first": shard.offset, "stop": shard.offset + shard.count}))
        self.cache.write(self.path(shard), Record(arrays=self._arrays(stats, extra), attrs={
            "shard": shard.name, "shard_identity": shard.identity, "offset": shard.offset, "count": shard.count,
            "per_image": per_image is not None, "forwarded": int(forwarded), "extra_identity": self.extra_identity}))

    def save_group(self, number: int, stats: ScanStats, shards: Sequence[PlannedShard], per_image: bool,
                   extra: Optional[Dict[str, np.ndarray]] = None) -> Path:
        """One record for these finished shards (stats: their merged statistics, skip list included); then
        their own records go. Returns the group record's path."""
        path = self.cache.write(self.group_path(number), Record(arrays=self._arrays(stats, extra), attrs={
            "offsets": [s.offset for s in shards], "identities": [s.identity for s in shards],
            "counts": [s.count for s in shards], "per_image": bool(per_image),
            "extra_identity": self.extra_identity}))
        for shard in shards:
            self.cache.remove(self.path(shard))
        return path

    def skipped(self, paths: Sequence[Path]) -> List[Tuple[int, str]]:
        """(index, reason) of every skipped item in these shard and group records, by index."""
        found: List[Tuple[int, str]] = []
        for path in paths:
            record = self.cache.read(path, names=["state/skipped/indices", "state/skipped/reasons"])
            if record is None:
                raise NeurolensError(f"shard record {path} is unreadable; run the scan again")
            found += [(int(i), str(r)) for i, r in zip(record.arrays["state/skipped/indices"],
                                                         record.arrays["state/skipped/reasons"])]
        return sorted(found)

    def extras(self, paths: Sequence[Path]) -> List[Dict[str, np.ndarray]]:
        """The `extra/*` arrays of these records (a scan extension reads its per-image rows back at the end)."""
        found = []
        for path in paths:
            record = self.cache.read(path)
            if record is None:
                raise NeurolensError(f"shard record {path} is unreadable; run the scan again")
            found.append(self._state(record, "extra/"))
        return found

    def remove_records(self) -> None:
        """Once the scan's own record is written the shard and group records are redundant (chunks stay: the
        scan record lists them)."""
        for path in self._records("c") + self._records("s"):
            self.cache.remove(path)
