"""Image datasets: a folder of images, webdataset-style tar shards, a parquet/CSV table of image paths,
or the built-in scikit-image set. Every dataset is a list of keys with a stable identity (for cache keys)
and a `load(i)` that returns an RGB PIL image or raises `BadImage` with the reason.

Loading never trusts the file: zero-byte, truncated and non-image files, decompression bombs and vanished
paths raise BadImage (the scan skips and counts them); CMYK, 16-bit, palette, grayscale and alpha images are
readable and are converted to RGB (alpha composited on white).
"""
from __future__ import annotations

import csv
import glob
import hashlib
import io
import os
import re
import struct
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTENSIONS = (".txt", ".caption", ".json")
TABLE_EXTENSIONS = (".parquet", ".pq", ".csv", ".tsv")
# Images with more pixels than this are refused as decompression bombs (PIL's own default, 89.5 MP,
# a 9459 x 9459 image); PIL's warning at that size and its error at twice it both count as a bad item.
MAX_IMAGE_PIXELS = 89_478_485
BACKGROUND = (255, 255, 255)  # transparent pixels become white


class BadImage(Exception):
    """One dataset item that cannot be used; the message is the reason shown in the skip list."""


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
        return ImageDataset(keys=self.keys[first:last], identity=_identity([self.identity, first, last]),
                            description=description or f"items {first}..{last - 1} of {self.description}",
                            captions=self.captions[first:last] if self.captions is not None else None,
                            _sources=self._sources[first:last])

    def read_bytes(self, i: int) -> bytes:
        source = self._sources[i]
        kind = source[0]
        if kind == "skip":
            raise BadImage(source[1])
        try:
            if kind == "file":
                with open(source[1], "rb") as handle:
                    return handle.read()
            if kind == "tar":
                _, shard, offset, size = source
                with open(shard, "rb") as handle:
                    handle.seek(offset)
                    data = handle.read(size)
                if len(data) != size:
                    raise BadImage("tar member is cut short")
                return data
        except IsADirectoryError:
            raise BadImage("is a directory") from None
        except FileNotFoundError:
            raise BadImage("file not found (vanished or broken link)") from None
        except PermissionError:
            raise BadImage("permission denied") from None
        except OSError as exc:
            raise BadImage(f"cannot read ({exc.strerror or exc})") from None
        raise BadImage(f"item kind {kind} has no bytes")

    def load(self, i: int) -> Image.Image:
        """Item i as an RGB PIL image (fully decoded); raises BadImage with the reason."""
        source = self._sources[i]
        if source[0] == "builtin":
            from .builtin import builtin_image
            return builtin_image(source[1]).copy()
        return decode_image(self.read_bytes(i))


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> RGB PIL image, or BadImage saying why not."""
    if not data:
        raise BadImage("zero-byte file")
    with warnings.catch_warnings():
        # PIL warns (instead of failing) between MAX_IMAGE_PIXELS and twice that: refuse those too
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise BadImage(f"decompression bomb ({image.width}x{image.height} pixels)")
            image.load()
        except BadImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadImage(f"decompression bomb (over {MAX_IMAGE_PIXELS} pixels)") from None
        except Image.UnidentifiedImageError:
            raise BadImage("not an image (unidentified format)") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
            text = str(exc) or type(exc).__name__
            if "truncated" in text:
                text = "truncated image"
            raise BadImage(f"corrupt image ({text})") from None
        except MemoryError:
            raise BadImage("image too large to decode") from None
    try:
        return to_rgb(image)
    except (OSError, ValueError) as exc:
        raise BadImage(f"cannot convert {image.mode} to RGB ({exc})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: 16/32-bit scaled to 8 bits, palette and alpha composited on white, CMYK converted."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        if mode == "F":
            top = max(1.0, float(array.max(initial=0)))
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "1":
        return image.convert("L").convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------- preprocessing

def preprocess(image: Image.Image, size: int) -> Image.Image:
    """CLIP's preprocessing before normalization: resize the shortest side to `size` (bicubic), centre crop."""
    width, height = image.size
    if width <= height:
        new_w, new_h = size, max(size, int(size * height / width))
    else:
        new_w, new_h = max(size, int(size * width / height)), size
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    left = int(round((new_w - size) / 2.0))
    top = int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def preprocess_array(image: Image.Image, size: int) -> np.ndarray:
    """preprocess() as a uint8 (3, size, size) array (what DataLoader workers send back: 4x less than float)."""
    return np.ascontiguousarray(np.asarray(preprocess(image, size), dtype=np.uint8).transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------- opening

def open_dataset(source: Optional[str] = None, image_column: str = "image", caption_column: str = "caption") -> ImageDataset:
    """A dataset from a folder, tar shard(s) (a .tar path, a glob, or `shard-{000..009}.tar`), a parquet/CSV
    file with an image-path column, or None (or 'builtin') for the built-in scikit-image samples."""
    if source is None or str(source) == "builtin":
        return _builtin_dataset()
    text = str(source)
    path = Path(text).expanduser()
    lower = text.lower()
    if lower.endswith(TABLE_EXTENSIONS):
        if not path.is_file():
            raise DatasetError(f"dataset table {text} does not exist; give a parquet/CSV file, a folder of images or tar shards")
        return _table_dataset(path, image_column, caption_column)
    shards = tar_shards(text)
    if shards is not None:
        return _tar_dataset(shards, text)
    if path.is_dir():
        files = _list_images(path)
        if files:
            return _folder_dataset(path, files)
        raise DatasetError(f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) or .tar shards found under {text}")
    if path.is_file() and lower.endswith(IMAGE_EXTENSIONS):
        return _folder_dataset(path.parent, [path])
    raise DatasetError(f"dataset {text} does not exist or is not a folder, .tar shard or parquet/CSV table; "
                       f"omit --dataset to use the built-in sample images")


def tar_shards(source: str) -> Optional[List[str]]:
    """The sorted shard paths when `source` names tar shards (a .tar path, a glob or `{000..009}` pattern, or a
    folder with no images but .tar files under it, such as img2dataset's output); None for other sources."""
    text = str(source)
    if text.lower().endswith(".tar") or any(ch in text for ch in "*?[{"):
        shards = _expand_shards(text)
        if not shards:
            raise DatasetError(f"no tar shard matches {text}; give existing .tar files, a folder of images or a table")
        return shards
    path = Path(text).expanduser()
    if path.is_dir() and not _has_image(path):
        shards = sorted(str(p) for p in path.rglob("*.tar") if p.is_file())
        return shards or None
    return None


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


def _identity(parts: Sequence[object]) -> str:
    return IdentityHash(parts).hexdigest()


def _stat(path: str) -> Tuple[int, int]:
    """(size, mtime_ns) for the identity; (-1, -1) for a path that cannot be stat'ed (it is skipped later)."""
    try:
        info = os.stat(path)
        return (info.st_size if not os.path.isdir(path) else -2, info.st_mtime_ns)
    except OSError:
        return (-1, -1)


def _builtin_dataset() -> ImageDataset:
    from .builtin import BUILTIN_DESCRIPTIONS, builtin_names
    import skimage
    names = builtin_names()
    return ImageDataset(
        keys=[f"builtin:{name}" for name in names],
        identity=_identity(["builtin", skimage.__version__, *names]),
        description=f"built-in scikit-image samples ({len(names)} images)",
        captions=[BUILTIN_DESCRIPTIONS[name] for name in names],
        _sources=[("builtin", name) for name in names],
    )


def _list_images(root: Path) -> List[Path]:
    """Every entry under root whose name has an image extension, in a stable order.

    Entries that are not readable files (a directory named x.jpg, a broken link) are listed too: they are
    bad items, skipped and counted by the scan, not silently ignored."""
    found: List[Path] = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        names = [n for n in files + dirs if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
        found.extend(Path(folder) / n for n in sorted(names))
    return sorted(set(found), key=lambda p: str(p))


def _has_image(root: Path) -> bool:
    """Whether _list_images(root) would list anything (stops at the first entry)."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS) for n in files + dirs):
            return True
    return False


def _folder_dataset(root: Path, files: List[Path]) -> ImageDataset:
    keys = [str(p.resolve()) if not p.is_symlink() else str(p.absolute()) for p in files]
    stats = [_stat(k) for k in keys]
    return ImageDataset(
        keys=keys,
        identity=_identity(["folder"] + [f"{k}|{s}|{m}" for k, (s, m) in zip(keys, stats)]),
        description=f"folder {root} ({len(keys)} images)",
        captions=None,
        _sources=[("file", k) for k in keys],
    )


def _table_dataset(path: Path, image_column: str, caption_column: str) -> ImageDataset:
    columns, rows = _read_table(path)
    if image_column not in columns:
        raise DatasetError(f"{path} has no column {image_column!r} (columns: {', '.join(columns) or 'none'}); "
                           f"name the image-path column with --image-column")
    images = rows[image_column]
    captions = rows.get(caption_column)
    base = path.resolve().parent
    keys = []
    for value in images:
        text = "" if value is None else str(value)
        candidate = Path(text).expanduser()
        keys.append(str(candidate if candidate.is_absolute() else (base / candidate)) if text else "")
    stats = [_stat(k) if k else (-1, -1) for k in keys]
    if not keys:
        raise DatasetError(f"{path} has no rows; give a table with one image path per row")
    return ImageDataset(
        keys=keys,
        identity=_identity(["table", str(path.resolve()), image_column] + [f"{k}|{s}|{m}" for k, (s, m) in zip(keys, stats)]),
        description=f"table {path} ({len(keys)} images, column {image_column!r})",
        captions=[("" if c is None else str(c)) for c in captions] if captions is not None else None,
        table=str(path.resolve()),
        _sources=[("file", k) for k in keys],
    )


def _read_table(path: Path) -> Tuple[List[str], dict]:
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(str(path))
        except Exception as exc:
            raise DatasetError(f"{path} is not a readable parquet file ({exc}); check the file") from None
        return table.column_names, {name: table.column(name).to_pylist() for name in table.column_names}
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            rows = list(reader)
            columns = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path} is not a readable CSV file ({exc}); check the file") from None
    return columns, {name: [row.get(name) for row in rows] for name in columns}


def dataset_column(dataset: ImageDataset, name: str) -> List[object]:
    """The values of column `name` for every item of `dataset` (None where an item has none): a column of a
    parquet/CSV table, or a field of the samples' .json members in tar shards (LAION's webdataset shards
    carry e.g. `NSFW` there). Raises DatasetError when no item has it."""
    if dataset.table:
        columns, rows = _read_table(Path(dataset.table))
        if name not in columns:
            raise DatasetError(f"{dataset.table} has no column {name!r} (columns: {', '.join(columns) or 'none'}); "
                               f"name an existing column in --labels column:NAME")
        return list(rows[name])
    tar_items = [source for source in dataset._sources if source and source[0] == "tar"]
    # img2dataset rows whose download failed have no member (their value is None: they are skipped anyway)
    failed = [source for source in dataset._sources if source and source[0] == "skip"]
    if tar_items and len(tar_items) + len(failed) == len(dataset.keys):
        values = _tar_json_field(dataset.keys, name)
        if any(v is not None for v in values):
            return values
        raise DatasetError(f"no sample of {dataset.description} has a {name!r} field in its .json member; "
                           f"name an existing field in --labels column:NAME")
    raise DatasetError(f"{dataset.description} has no columns; --labels column:NAME needs a parquet/CSV table or "
                       f"tar shards with .json members")


def _tar_json_field(keys: Sequence[str], name: str) -> List[object]:
    import json
    wanted = {key: i for i, key in enumerate(keys)}
    values: List[object] = [None] * len(keys)
    for shard in dict.fromkeys(key.rsplit(":", 1)[0] for key in keys):
        try:
            with tarfile.open(shard, "r:") as archive:
                for group in _sample_groups(archive).values():
                    image = next((m for m in group if m.name.lower().endswith(IMAGE_EXTENSIONS)), None)
                    meta = next((m for m in group if m.name.lower().endswith(".json") and m.size < 1_000_000), None)
                    index = wanted.get(f"{shard}:{image.name}") if image is not None else None
                    if index is None or meta is None:
                        continue
                    handle = archive.extractfile(meta)
                    try:
                        record = json.loads(handle.read()) if handle else {}
                    except ValueError:
                        continue
                    if isinstance(record, dict):
                        values[index] = record.get(name)
        except (tarfile.TarError, OSError) as exc:
            raise DatasetError(f"tar shard {shard} cannot be read ({exc}); remove or repair it") from None
    return values


_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def _expand_shards(pattern: str) -> List[str]:
    """webdataset-style `shard-{000..009}.tar` ranges and shell globs, sorted."""
    patterns = [pattern]
    while any(_BRACES.search(p) for p in patterns):
        expanded = []
        for p in patterns:
            match = _BRACES.search(p)
            if not match:
                expanded.append(p)
                continue
            lo, hi = match.group(1), match.group(2)
            width = len(lo)
            for number in range(int(lo), int(hi) + 1):
                expanded.append(p[:match.start()] + str(number).zfill(width) + p[match.end():])
        patterns = expanded
    found: List[str] = []
    for p in patterns:
        p = os.path.expanduser(p)
        found.extend(sorted(glob.glob(p)) if any(ch in p for ch in "*?[") else ([p] if os.path.isfile(p) else []))
    return sorted(dict.fromkeys(str(Path(f).resolve()) for f in found))


@dataclass
class ShardListing:
    """The items of one tar shard in order: what a worker needs to read them (keys, captions, sources) and the
    parts the dataset identity hashes. Concatenated in shard order they are the tar dataset."""
    shard: str
    keys: List[str]
    captions: List[str]
    sources: List[Tuple]
    parts: List[str]

    def __len__(self) -> int:
        return len(self.keys)

    def dataset(self) -> ImageDataset:
        """This shard alone as a dataset (item i = the shard's item i)."""
        return ImageDataset(keys=self.keys, identity=_identity(self.parts), captions=self.captions,
                            description=f"tar shard {self.shard} ({len(self.keys)} items)", _sources=self.sources)


def list_tar_shard(shard: str) -> ShardListing:
    """The samples of one webdataset shard: members sharing a basename up to the first dot form one sample; its
    image member is the item, and a .txt/.caption member (or .json 'caption') is its caption.

    With an img2dataset parquet beside the shard (`00000.parquet` with `key` and `status` columns) the items
    are the parquet's rows in order: a `success` row is its tar sample, any other status is an item skipped
    with that status as the reason (img2dataset writes no member for it); tar samples the parquet does not
    list follow, in member order."""
    try:
        with tarfile.open(shard, "r:") as archive:
            samples = []  # (stem, image member, caption) in member order
            for stem, group in _sample_groups(archive).items():
                image = next((m for m in group if m.name.lower().endswith(IMAGE_EXTENSIONS)), None)
                if image is not None:
                    samples.append((stem, image, _tar_caption(archive, group)))
    except (tarfile.TarError, OSError) as exc:
        raise DatasetError(f"tar shard {shard} cannot be read ({exc}); remove or repair it") from None
    listing = ShardListing(shard, [], [], [], [])

    def add_sample(image: tarfile.TarInfo, caption: str) -> None:
        listing.keys.append(f"{shard}:{image.name}")
        listing.sources.append(("tar", shard, image.offset_data, image.size))
        listing.parts.append(f"{shard}:{image.name}|{image.size}")
        listing.captions.append(caption)

    rows = _img2dataset_rows(shard)
    if rows is None:
        for _, image, caption in samples:
            add_sample(image, caption)
        return listing
    by_key = {os.path.basename(stem): (image, caption) for stem, image, caption in samples}
    listed = set()
    for key, status, error, row_caption in rows:
        if status == "success" and key in by_key and key not in listed:
            listed.add(key)
            add_sample(*by_key[key])
            continue
        reason = (f"img2dataset status {status}" + (f": {error}" if error else "")) if status != "success" \
            else f"listed as success in {Path(shard).with_suffix('.parquet').name} but not in the shard"
        listing.keys.append(f"{shard}:{key}")
        listing.sources.append(("skip", reason))
        listing.parts.append(f"{shard}:{key}|{status}")
        listing.captions.append(row_caption)
    for stem, image, caption in samples:
        if os.path.basename(stem) not in listed:
            add_sample(image, caption)
    return listing


def _img2dataset_rows(shard: str) -> Optional[List[Tuple[str, str, str, str]]]:
    """(key, status, error message, caption) per row of the img2dataset parquet beside `shard`, or None when
    there is none (a parquet without key/status columns is not img2dataset's and is ignored)."""
    path = Path(shard).with_suffix(".parquet")
    if not path.is_file():
        return None
    import pyarrow.parquet as pq
    try:
        names = pq.read_schema(str(path)).names
        if "key" not in names or "status" not in names:
            return None
        wanted = [c for c in ("key", "status", "error_message", "caption") if c in names]
        table = pq.read_table(str(path), columns=wanted).to_pydict()
    except Exception as exc:
        raise DatasetError(f"img2dataset parquet {path} cannot be read ({exc}); remove or repair it") from None
    count = len(table["key"])
    column = lambda name: table.get(name) or [None] * count  # noqa: E731
    return [("" if k is None else str(k), "" if s is None else str(s), "" if e is None else str(e),
             "" if c is None else str(c))
            for k, s, e, c in zip(table["key"], table["status"], column("error_message"), column("caption"))]


def tar_description(shards: Sequence[str], source: str, items: int) -> str:
    return f"{len(shards)} tar shard(s) {source} ({items} images)"


def _tar_dataset(shards: List[str], source: str) -> ImageDataset:
    keys: List[str] = []
    sources: List[Tuple] = []
    captions: List[str] = []
    identity = IdentityHash(["tar"])
    for shard in shards:
        listing = list_tar_shard(shard)
        keys += listing.keys
        sources += listing.sources
        captions += listing.captions
        identity.update(listing.parts)
    if not keys:
        raise DatasetError(f"no image members found in the tar shards of {source}")
    return ImageDataset(keys=keys, identity=identity.hexdigest(), captions=captions,
                        description=tar_description(shards, source, len(keys)), _sources=sources)


def _sample_groups(archive: tarfile.TarFile) -> dict:
    """{stem: [members]}: the files of a webdataset shard grouped by their basename up to the first dot."""
    groups: dict = {}
    for member in archive.getmembers():
        if member.isfile():
            folder, base = os.path.split(member.name)
            groups.setdefault(os.path.join(folder, base.split(".", 1)[0]), []).append(member)
    return groups


def _tar_caption(archive: tarfile.TarFile, group: list) -> str:
    import json
    for member in group:
        lower = member.name.lower()
        if lower.endswith((".txt", ".caption")) and member.size < 1_000_000:
            handle = archive.extractfile(member)
            return handle.read().decode("utf-8", "replace").strip() if handle else ""
        if lower.endswith(".json") and member.size < 1_000_000:
            handle = archive.extractfile(member)
            try:
                value = json.loads(handle.read()) if handle else {}
            except ValueError:
                continue
            if isinstance(value, dict) and isinstance(value.get("caption"), str):
                return value["caption"]
    return ""


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
                try:
                    with tarfile.open(shard, "r:") as archive:
                        members[shard] = {m.name: (m.offset_data, m.size) for m in archive.getmembers() if m.isfile()}
                except (tarfile.TarError, OSError):
                    members[shard] = {}
            offset, size = members[shard].get(member, (0, -1))
            sources.append(("tar", shard, offset, size) if size >= 0 else ("file", key))
            continue
        sources.append(("file", key))
    return ImageDataset(keys=keys, identity=_identity(["keys"] + keys), description=description or f"{len(keys)} items",
                        captions=None, _sources=sources)
