"""Opening a dataset by what the user names (a folder, tar shards, a parquet/CSV table, or the built-in
scikit-image samples), and again from the keys a cache record stores."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import skimage

from ..errors import DatasetError
from .builtin import BUILTIN_DESCRIPTIONS, builtin_names
from .decode import max_image_bytes
from .folder import folder_dataset, list_images
from .table import table_dataset
from .tar import member_table, tar_dataset, tar_shards
from .types import IMAGE_EXTENSIONS, TABLE_EXTENSIONS, ImageDataset, identity_of


def open_dataset(source: Optional[str] = None, image_column: str = "image", caption_column: str = "caption") -> ImageDataset:
    """A dataset from a folder, tar shard(s) (a .tar path, a glob, or `shard-{000..009}.tar`), a parquet/CSV
    file with an image-path column, or None (or 'builtin') for the built-in scikit-image samples."""
    max_image_bytes()               # a malformed $NEUROLENS_MAX_IMAGE_BYTES is one line now, not a skip per item
    if source is None or str(source) == "builtin":
        return _builtin_dataset()
    text = str(source)
    path = Path(text).expanduser()
    lower = text.lower()
    if lower.endswith(TABLE_EXTENSIONS):
        if not path.is_file():
            raise DatasetError(f"dataset table {text} does not exist; give a parquet/CSV file, a folder of images or tar shards")
        return table_dataset(path, image_column, caption_column)
    shards = tar_shards(text)
    if shards is not None:
        return tar_dataset(shards, text)
    if path.is_dir():
        files = list_images(path)
        if files:
            return folder_dataset(path, files)
        raise DatasetError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) or .tar shards found under {text}")
    if path.is_file() and lower.endswith(IMAGE_EXTENSIONS):
        return folder_dataset(path.parent, [path])
    raise DatasetError(f"dataset {text} does not exist or is not a folder, .tar shard or parquet/CSV table; "
                       f"omit --dataset to use the built-in sample images")


def _builtin_dataset() -> ImageDataset:
    names = builtin_names()
    return ImageDataset(
        keys=[f"builtin:{name}" for name in names],
        identity=identity_of(["builtin", skimage.__version__, *names]),
        description=f"built-in scikit-image samples ({len(names)} images)",
        captions=[BUILTIN_DESCRIPTIONS[name] for name in names],
        _sources=[("builtin", name) for name in names],
    )


def dataset_from_keys(keys: Sequence[str], description: str = "") -> ImageDataset:
    """The items a cache record names by key (a scan's `keys`), readable again without the original
    --dataset argument: `builtin:<name>`, `<shard>.tar:<member>`, or a file path. An item whose file or
    member has gone raises BadImage when loaded, like any bad item."""
    keys = [str(k) for k in keys]
    members: dict = {}
    sources: List[Tuple] = []
    for key in keys:
        if key.startswith("builtin:"):
            sources.append(("builtin", key[len("builtin:"):]))
            continue
        shard, sep, member = key.partition(".tar:")
        if sep and os.path.isfile(shard + ".tar"):
            shard += ".tar"
            if shard not in members:
                members[shard] = member_table(shard)
            offset, size = members[shard].get(member, (0, -1))
            sources.append(("tar", shard, offset, size) if size >= 0 else ("file", key))
            continue
        sources.append(("file", key))
    return ImageDataset(keys=keys, identity=identity_of(["keys"] + keys),
                        description=description or f"{len(keys)} items", captions=None, _sources=sources)
