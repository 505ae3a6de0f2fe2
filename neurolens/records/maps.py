"""The top-maps record: the activation maps of every unit's top-k images, one record per scan record (a feature
scan is a record of its own), named after it:

    top-maps/<fp>/<layer>/<scan record name>.h5
        maps (U, k, H, W) float32   (NaN where the slot is empty or the image can no longer be read)
        attrs: scan_record, layer, basis, grid, top_k, images (the union's size), unreadable, mismatched
               (slots whose map maximum differs from the scan's top value: the file changed since the scan),
               model, pretrained, fingerprint
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..storage.cache import Cache, Record
from .keys import basis_id

KIND = "top-maps"


@dataclass
class TopMaps:
    maps: np.ndarray          # (U, k, H, W) float32
    path: Path
    images: int               # distinct images run
    unreadable: int
    mismatched: int
    cached: bool


def top_maps_path(cache: Cache, fingerprint: str, layer: str, scan_path: Path) -> Path:
    """Where the activation maps of a scan's top-k images are stored: one record per scan record."""
    return cache.path(KIND, fingerprint, layer, Path(scan_path).stem)


def read_top_maps(cache: Cache, path: Path, shape: Sequence[int]) -> Optional[TopMaps]:
    """The maps at `path` when they fit a scan whose top_indices have `shape` (units, k), else None."""
    record = cache.read(path)
    if record is None or record.arrays["maps"].shape[:2] != tuple(shape):
        return None
    attrs = record.attrs
    return TopMaps(record.arrays["maps"], path, int(attrs["images"]), int(attrs["unreadable"]),
                   int(attrs["mismatched"]), cached=True)


def read_maps_array(cache: Cache, path: Path, shape: Sequence[int]) -> Optional[np.ndarray]:
    """Only the (U, k, H, W) maps at `path` (nothing else read), when they fit top_indices of `shape`."""
    record = cache.read(path, names=["maps"])
    if record is None or record.arrays["maps"].shape[:2] != tuple(shape):
        return None
    return record.arrays["maps"]


def write_top_maps(cache: Cache, path: Path, maps: np.ndarray, clip, layer: str, scan_path: Path, basis,
                   images: int, unreadable: int, mismatched: int) -> TopMaps:
    units, k, height, width = maps.shape
    attrs = {"scan_record": Path(scan_path).name, "layer": layer, "basis": basis_id(basis),
             "grid": [int(height), int(width)], "top_k": int(k),
             "images": int(images), "unreadable": int(unreadable), "mismatched": int(mismatched),
             "model": clip.name, "pretrained": clip.pretrained, "fingerprint": clip.fingerprint}
    cache.write(path, Record(arrays={"maps": maps}, attrs=attrs))
    return TopMaps(maps, path, int(images), int(unreadable), int(mismatched), cached=False)
