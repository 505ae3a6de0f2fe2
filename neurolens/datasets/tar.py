"""webdataset-style tar shards as a dataset: shard names (paths, globs, `{000..009}` ranges, img2dataset's
output folders), the listing of one shard (members grouped into samples, captions, img2dataset's parquet of
failed downloads), and the .json fields of its samples."""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import DatasetError
from .folder import has_image
from .types import IMAGE_EXTENSIONS, IdentityHash, ImageDataset, identity_of


def tar_shards(source: str) -> Optional[List[str]]:
    """The sorted shard paths when `source` names tar shards (a .tar path, a glob or `{000..009}` pattern, or a
    folder with no images but .tar files under it, such as img2dataset's output); None for other sources."""
    text = str(source)
    if text.lower().endswith(".tar") or any(ch in text for ch in "*?[{"):
        shards = expand_shards(text)
        if not shards:
            raise DatasetError(f"no tar shard matches {text}; give existing .tar files, a folder of images or a table")
        return shards
    path = Path(text).expanduser()
    if path.is_dir() and not has_image(path):
        shards = sorted(str(p) for p in path.rglob("*.tar") if p.is_file())
        return shards or None
    return None


_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")
def expand_shards(pattern: str) -> List[str]:
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
        # regular files only (isfile follows links): a FIFO or device named x.tar is never opened
        found.extend(sorted(f for f in glob.glob(p) if os.path.isfile(f)) if any(ch in p for ch in "*?[")
                     else ([p] if os.path.isfile(p) else []))
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
        return ImageDataset(keys=self.keys, identity=identity_of(self.parts), captions=self.captions,
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
    import pyarrow.parquet as pq  # lazy: only parquet needs it; keeps import neurolens 0.1-0.5 s lighter
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


def tar_dataset(shards: List[str], source: str) -> ImageDataset:
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


def tar_json_field(keys: Sequence[str], name: str) -> List[object]:
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




def member_table(shard: str) -> Dict[str, Tuple[int, int]]:
    """{member name: (data offset, size)} of a shard's files; {} for a shard that cannot be read (its items
    then fail as bad items when loaded)."""
    try:
        with tarfile.open(shard, "r:") as archive:
            return {m.name: (m.offset_data, m.size) for m in archive.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError):
        return {}
