"""What every dataset is: a list of keys with a stable identity (for cache keys) and a `load(i)` that returns
an RGB PIL image or raises `BadImage` with the reason. The kinds of source (folder, table, tar shards, the
built-in samples) are made in folder.py, table.py, tar.py and open.py; reading and decoding in decode.py.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from PIL import Image

from .builtin import builtin_image
from .decode import decode_image, read_item_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTENSIONS = (".txt", ".caption", ".json")
TABLE_EXTENSIONS = (".parquet", ".pq", ".csv", ".tsv")


@dataclass
class ImageDataset:
    """A list of image items. `keys[i]` names item i: a path, `shard.tar:member`, or `builtin:name`."""
    keys: List[str]
    identity: str
    description: str
    captions: Optional[List[str]] = None
    table: Optional[str] = None          # the parquet/CSV file of a table dataset (other columns: labels)
    # how to read each item: ('file', path) | ('tar', shard, offset, size) | ('builtin', name)
    # | ('skip', reason): an item known to be unusable before reading it (an img2dataset row whose download failed)
    _sources: List[Tuple] = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    def slice(self, first: int, last: int, description: str = "") -> "ImageDataset":
        """Items [first, last) as a dataset of their own (item i is item first + i of this one)."""
        return ImageDataset(keys=self.keys[first:last], identity=identity_of([self.identity, first, last]),
                            description=description or f"items {first}..{last - 1} of {self.description}",
                            captions=self.captions[first:last] if self.captions is not None else None,
                            _sources=self._sources[first:last])

    def read_bytes(self, i: int) -> bytes:
        return read_item_bytes(self._sources[i])

    def encoded(self, i: int) -> Optional[bytes]:
        """Item i's encoded bytes (read_bytes: BadImage with the reason), or None for an item that has none (the
        built-in samples, which are arrays)."""
        return None if self._sources[i][0] == "builtin" else self.read_bytes(i)

    def load(self, i: int) -> Image.Image:
        """Item i as an RGB PIL image (fully decoded); raises BadImage with the reason."""
        source = self._sources[i]
        if source[0] == "builtin":
            return builtin_image(source[1]).copy()
        return decode_image(self.read_bytes(i))


class IdentityHash:
    """A dataset identity built part by part (so a caller can feed one shard's parts at a time)."""

    def __init__(self, parts: Sequence[object] = ()):
        self._digest = hashlib.sha1()
        self.update(parts)

    def update(self, parts: Sequence[object]) -> None:
        for part in parts:
            self._digest.update(repr(part).encode())
            self._digest.update(b"\0")

    def hexdigest(self) -> str:
        return self._digest.hexdigest()[:20]


def identity_of(parts: Sequence[object]) -> str:
    """The identity of a dataset made of `parts` (IdentityHash in one go)."""
    return IdentityHash(parts).hexdigest()


def file_stat(path: str) -> Tuple[int, int]:
    """(size, mtime_ns) for the identity; (-1, -1) for a path that cannot be stat'ed (it is skipped later)."""
    try:
        info = os.stat(path)
        return (info.st_size if not os.path.isdir(path) else -2, info.st_mtime_ns)
    except OSError:
        return (-1, -1)
