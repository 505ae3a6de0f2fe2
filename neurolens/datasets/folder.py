"""A folder of images as a dataset: every file under it with an image extension, in a stable order."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List

from .types import IMAGE_EXTENSIONS, ImageDataset, file_stat, identity_of


def list_images(root: Path) -> List[Path]:
    """Every entry under root whose name has an image extension, in a stable order.

    Entries that are not readable files (a directory named x.jpg, a broken link) are listed too: they are
    bad items, skipped and counted by the scan, not silently ignored."""
    found: List[Path] = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        names = [n for n in files + dirs if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
        found.extend(Path(folder) / n for n in sorted(names))
    return sorted(set(found), key=lambda p: str(p))


def has_image(root: Path) -> bool:
    """Whether list_images(root) would list anything (stops at the first entry)."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS) for n in files + dirs):
            return True
    return False


def folder_dataset(root: Path, files: List[Path]) -> ImageDataset:
    keys = [str(p.resolve()) if not p.is_symlink() else str(p.absolute()) for p in files]
    stats = [file_stat(k) for k in keys]
    return ImageDataset(
        keys=keys,
        identity=identity_of(["folder"] + [f"{k}|{s}|{m}" for k, (s, m) in zip(keys, stats)]),
        description=f"folder {root} ({len(keys)} images)",
        captions=None,
        _sources=[("file", k) for k in keys],
    )


