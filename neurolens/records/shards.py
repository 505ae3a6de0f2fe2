"""The records of a distributed (Ray) scan: tar-shard listings, and finished shards' partial statistics.

One HDF5 file each (<fp> is the weights fingerprint's first 16 hex digits):
  dataset-listing/tar/shards/<key>.h5       one tar shard's keys, captions and identity parts (attrs: shard,
                                            count); the key hashes the shard's path, size and mtime (and its
                                            img2dataset parquet's), so a rerun, or a scan of another layer,
                                            does not list it again
  scan-shard/<fp>/<layer>/<scan key>-s<first index>.h5
                                            a finished shard's partial statistics (ScanStats state, state/*),
                                            and a scan extension's arrays (extra/*); a rerun merges it instead
                                            of scanning the shard again
  scan-shard/<fp>/<layer>/<scan key>-c<number>.h5
                                            a group of finished shards merged into one record
  scan-chunk/<fp>/<layer>/<scan key>-s<first index>.h5
                                            with keep_per_image: the shard's per-image maxima as float16
                                            (a scan chunk, neurolens.records.scan)
A shard here is anything with index, name, offset (global index of its first item), count and identity
(neurolens.engines.ray.shards.PlannedShard); statistics anything with state_dict / load_state_dict
(neurolens.activations.stats.ScanStats).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import NeurolensError
from ..storage.cache import Cache, Record, settings_key
from .scan import chunk_path, write_chunk

KIND = "scan-shard"
LISTING_KIND = "dataset-listing"
LISTING_VERSION = 1

Shard = Any          # neurolens.engines.ray.shards.PlannedShard (not imported: the engine imports this module)
ScanStats = Any      # neurolens.activations.stats.ScanStats


# ------------------------------------------------------------------------------------- tar shard listings

def listing_path(cache: Cache, shard: str) -> Path:
    """Where the listing of the tar shard at path `shard` is kept (keyed by its size and mtime)."""
    def stat(path: str):
        try:
            info = os.stat(path)
            return [info.st_size, info.st_mtime_ns]
        except OSError:
            return None
    sidecar = str(Path(shard).with_suffix(".parquet"))
    key = settings_key("listing", LISTING_VERSION, shard, stat(shard), stat(sidecar))
    return cache.path(LISTING_KIND, "tar", "shards", key)


def write_listing(cache: Cache, path: Path, shard: str, keys: Sequence[str], captions: Sequence[str],
                  parts: Sequence[str]) -> Record:
    record = Record(arrays={"keys": np.asarray(keys, dtype=object), "captions": np.asarray(captions, dtype=object),
                            "parts": np.asarray(parts, dtype=object)},
                    attrs={"shard": shard, "count": len(keys)})
    cache.write(path, record)
    return record


def read_listing(cache: Cache, path: Path) -> Optional[Tuple[List[str], int]]:
    """(identity parts, item count) of a cached listing, or None when it is absent or unreadable."""
    record = cache.read(path, names=["parts"])
    if record is None:
        return None
    return [str(p) for p in record.arrays["parts"]], int(record.attrs["count"])


def listing_keys_and_captions(cache: Cache, path: Path) -> Tuple[List[str], List[str]]:
    """Every item's key and caption of a cached listing (NeurolensError when it vanished)."""
    record = cache.read(path, names=["keys", "captions"])
    if record is None:
        raise NeurolensError(f"dataset listing {path} vanished during the scan; run the scan again")
    return [str(k) for k in record.arrays["keys"]], [str(c) for c in record.arrays["captions"]]


# ------------------------------------------------------------------------------------- shard records


@dataclass
class FinishedGroup:
    """Shards an earlier run finished: their merged statistics (skip list included) and the record."""
    stats: ScanStats
    shards: List[Shard]
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

    def name(self, shard: Shard) -> str:
        # 's' keeps these apart from a single-process scan's chunks of the same key (named <key>-<first index>)
        return f"{self.key}-s{shard.offset:010d}"

    def path(self, shard) -> Path:
        return self.cache.path(KIND, self.fingerprint, self.layer, self.name(shard))

    def group_path(self, number: int) -> Path:
        return self.cache.path(KIND, self.fingerprint, self.layer, f"{self.key}-c{number:06d}")

    def chunk_path(self, shard) -> Path:
        return chunk_path(self.cache, self.fingerprint, self.layer, self.name(shard))

    def _records(self, kind: str) -> List[Path]:
        folder = self.cache.folder(KIND, self.fingerprint, self.layer)
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

    def finished(self, shards: Sequence[Shard], empty: Callable[[], ScanStats], per_image: bool
                 ) -> List["FinishedGroup"]:
        """What earlier runs finished, for every group record and shard record that matches these shards'
        contents. Records that match nothing (other contents, or no per-image values where they are asked
        for) are deleted, as is a shard record whose shard a group also holds (a run killed between writing
        a group and deleting its shards)."""
        by_offset = {shard.offset: shard for shard in shards}

        def matching(offset, identity, count) -> Optional[Shard]:
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

    def save(self, shard: Shard, stats: ScanStats, per_image: Optional[Tuple[np.ndarray, np.ndarray]],
             forwarded: int, extra: Optional[Dict[str, np.ndarray]] = None) -> None:
        """Write the chunk first, then the shard record that vouches for it (a kill between the two leaves a
        chunk without a record: the shard is redone and the chunk rewritten)."""
        if per_image is not None:
            indices, maxima = per_image
            order = np.argsort(indices, kind="stable")
            write_chunk(self.cache, self.fingerprint, self.layer, self.name(shard), indices[order].astype(np.int64),
                        maxima[order].astype(np.float16), shard.offset, shard.offset + shard.count)
        self.cache.write(self.path(shard), Record(arrays=self._arrays(stats, extra), attrs={
            "shard": shard.name, "shard_identity": shard.identity, "offset": shard.offset, "count": shard.count,
            "per_image": per_image is not None, "forwarded": int(forwarded), "extra_identity": self.extra_identity}))

    def save_group(self, number: int, stats: ScanStats, shards: Sequence[Shard], per_image: bool,
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
