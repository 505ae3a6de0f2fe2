"""A dataset cut into shards for a distributed scan.

Every item keeps the global index it has in the single-process dataset (`open_dataset`): shard order, then
member order. A tar dataset is planned shard by shard (each shard listed on its own, possibly by many workers
at once), so the driver never holds every item's reading instructions; folders and tables are opened once
and cut into slices of `shard_size` items. The plan's identity is the dataset identity `open_dataset` gives,
so a distributed scan is cached under the same key as the single-process one.

The shard listings and the finished shards' records that make such a scan resumable are read and written
by neurolens.records.shards.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

from ...datasets.types import IdentityHash, ImageDataset
from ...datasets.tar import ShardListing, list_tar_shard, tar_description, tar_shards
from ...datasets.open import open_dataset
from ...errors import DatasetError, NeurolensError
from ...records.shards import listing_keys_and_captions, listing_path, read_listing, write_listing
from ...storage.cache import Cache

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
            more_keys, more_captions = listing_keys_and_captions(self._cache, path)
            keys += more_keys
            captions += more_captions
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


def _tar_plan(shards: List[str], source: str, cache: Cache, mapper: Mapper) -> DatasetPlan:
    paths = [listing_path(cache, shard) for shard in shards]
    todo = {shard for shard, path in zip(shards, paths) if not cache.exists(path)}
    fresh: Iterator[ShardListing] = iter(mapper(list_tar_shard, [shard for shard in shards if shard in todo]))
    identity = IdentityHash(["tar"])
    planned: List[PlannedShard] = []
    offset = 0
    for number, (shard, path) in enumerate(zip(shards, paths)):
        found = read_listing(cache, path) if shard not in todo else None
        if found is None:
            listing = next(fresh) if shard in todo else list_tar_shard(shard)
            write_listing(cache, path, shard, listing.keys, listing.captions, listing.parts)
            found = [str(p) for p in listing.parts], len(listing)
        parts, count = found
        identity.update(parts)
        planned.append(PlannedShard(index=number, name=shard, offset=offset, count=count,
                                    identity=IdentityHash([shard, *parts]).hexdigest(), source=("tar", shard)))
        offset += count
    if offset == 0:
        raise DatasetError(f"no image members found in the tar shards of {source}")
    return DatasetPlan(identity=identity.hexdigest(), description=tar_description(shards, source, offset),
                       total=offset, shards=planned, _listing_paths=paths, _cache=cache)
