"""The HDF5 cache: a folder of small HDF5 records, each written whole or not at all.

Every record is one .h5 file, built in memory and written by neurolens.storage.files (a temporary name, fsync,
os.replace), so a crash or kill -9 mid-write never damages a record that was there before, a reader never
sees a half-written one, and a full disk ends the command with one line instead of a crash. Keys hash
everything a result depends on (model fingerprint, layer, settings), so the same request reads the cache
instead of recomputing. numpy/h5py only: no torch here.

Layout (under the cache root, default outputs/cache or $NEUROLENS_CACHE):
    <kind>/<model fingerprint[:16]>/<layer>/<key>.h5

A record from someone else's cache is data, never a pointer (`open_record`, docs/security.md): a file that is
not a regular file (a symbolic link, a FIFO, a device), a dataset stored in another file (HDF5 external storage),
a virtual dataset, an external or user-defined link, a dataset declaring more than MAX_EXPANSION times the
bytes it stores, and a record whose datasets declare more than MAX_RECORD_BYTES (default 8 GiB in all,
$NEUROLENS_MAX_RECORD_BYTES) are refused before any data is read. A refused record reads as missing (one warning
line on stderr names it, once per process).
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import h5py
import numpy as np

from . import files
from .limits import describe, env_size

SCHEMA_VERSION = 1
DEFAULT_CACHE = Path("outputs") / "cache"
# The most array data one record may declare (shape x item size of all its datasets, before reading them):
# far above any record neurolens writes (a scan chunk is at most 32 MB, an 8x SAE's top-k maps of RN50x4 about
# 210 MB, a 500k-entry vocabulary's embeddings 2 GB) and far below what would exhaust a machine's memory.
MAX_RECORD_BYTES = 8 * 2 ** 30
MAX_RECORD_BYTES_ENV = "NEUROLENS_MAX_RECORD_BYTES"
# Deflate (gzip, the only filter neurolens writes with) expands data at most 1032-fold, so a dataset declaring
# more than this many times the bytes it stores (and over 1 MiB) was not written by neurolens: a small forged
# file cannot make a reader allocate gigabytes, whatever the limit above is set to.
MAX_EXPANSION = 1100


def default_cache_root() -> Path:
    return Path(os.environ.get("NEUROLENS_CACHE") or DEFAULT_CACHE)


def settings_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (dataclasses as dicts)."""
    text = json.dumps(parts, sort_keys=True, default=_jsonable, separators=(",", ":"))
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot hash {type(value).__name__}")


@dataclass
class Record:
    """A cache record: named arrays (nested names use '/') and JSON-able attributes."""
    arrays: Dict[str, np.ndarray] = field(default_factory=dict)
    attrs: Dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None


def safe_segment(text: str) -> str:
    """`text` as one file-name segment: letters, digits, - _ . kept, anything else _ (never empty)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(text)) or "_"


class Cache:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_root()

    def path(self, kind: str, fingerprint: str, layer: str, key: str) -> Path:
        return self.root / safe_segment(kind) / fingerprint[:16] / safe_segment(layer) / f"{safe_segment(key)}.h5"

    def folder(self, kind: str, fingerprint: str, layer: str) -> Path:
        """The folder of one kind's records (or non-HDF5 artifacts, e.g. SAEs) of one model and layer."""
        return self.root / safe_segment(kind) / fingerprint[:16] / safe_segment(layer)

    def layer_records(self, kind: str, fingerprint: str, layer: str) -> List[Path]:
        """Every record of `kind` of one model and layer, sorted by name (temporary files of a write skipped)."""
        folder = self.folder(kind, fingerprint, layer)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.glob("*.h5") if not p.name.startswith(".") and p.is_file())

    def layers_of(self, kind: str) -> List[Tuple[str, str]]:
        """(fingerprint[:16], layer folder name) of every model and layer with a folder of `kind`, sorted."""
        base = self.root / safe_segment(kind)
        if not base.is_dir():
            return []
        return [(fp.name, layer.name) for fp in sorted(p for p in base.iterdir() if p.is_dir())
                for layer in sorted(p for p in fp.iterdir() if p.is_dir())]

    def exists(self, path: Path) -> bool:
        return Path(path).is_file()

    def write(self, path: Path, record: Record) -> Path:
        """Write the record whole or not at all (module docstring). A full or read-only disk raises
        files.WriteError (one line naming the path, exit 2 in the CLI) and leaves no partial file."""
        path = Path(path)
        files.write_bytes(path, record_bytes(record), files.CACHE_OPTION)
        record.path = path
        return path

    def read(self, path: Path, names: Optional[list] = None) -> Optional[Record]:
        """The record at `path`, or None when absent, unreadable or of another schema (then it is recomputed)."""
        path = Path(path)
        try:
            with open_record(path) as handle:
                if int(handle.attrs.get("schema_version", -1)) != SCHEMA_VERSION:
                    return None
                attrs = json.loads(handle.attrs["attrs_json"])
                arrays = {name: _read_array(handle[name]) for name in (names or _dataset_names(handle))}
        except (OSError, KeyError, ValueError, TypeError):
            return None
        except MemoryError:
            warn_refused(path, "it does not fit in memory")
            return None
        if not isinstance(attrs, dict):
            return None
        return Record(arrays=arrays, attrs=attrs, path=path)

    def remove(self, path: Path) -> None:
        Path(path).unlink(missing_ok=True)

    def records(self, kind: Optional[str] = None) -> Iterator[Path]:
        base = self.root / kind if kind else self.root
        if base.is_dir():
            yield from sorted(p for p in base.rglob("*.h5") if not p.name.startswith("."))


def record_bytes(record: Record) -> bytes:
    """The record as the bytes of an HDF5 file, built in memory (h5py's core driver without a backing
    store). h5py therefore never writes to the disk itself: a full or failing disk only ever meets
    files.write_bytes, which cleans up and reports it, instead of failing inside HDF5's own cache (which
    used to end the process with a segmentation fault)."""
    name = f"neurolens-record-{uuid.uuid4().hex}.h5"   # never touches the disk; unique per open file
    with h5py.File(name, "w", driver="core", backing_store=False) as handle:
        handle.attrs["schema_version"] = SCHEMA_VERSION
        handle.attrs["written_at"] = time.time()
        handle.attrs["attrs_json"] = json.dumps(record.attrs, default=_jsonable)
        for array_name, array in record.arrays.items():
            _write_array(handle, array_name, array)
        handle.flush()
        return bytes(handle.id.get_file_image())


def _write_array(handle: h5py.File, name: str, array: Any) -> None:
    array = np.asarray(array)
    if array.dtype.kind in ("U", "O"):
        handle.create_dataset(name, data=np.asarray(array, dtype=object).astype(str).astype(object),
                              dtype=h5py.string_dtype())
    elif array.size > 4096:
        handle.create_dataset(name, data=array, compression="gzip", compression_opts=1)
    else:
        handle.create_dataset(name, data=array)


def _read_array(dataset: h5py.Dataset) -> np.ndarray:
    if h5py.check_string_dtype(dataset.dtype) is not None:
        return np.asarray(dataset.asstr()[()], dtype=object)
    return dataset[()]


def _dataset_names(handle: h5py.File) -> list:
    names: list = []
    handle.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


class RefusedRecord(OSError):
    """A record file that is not plain data (module docstring): read as missing, never opened further."""


def max_record_bytes() -> int:
    """The limit on a record's declared array data: $NEUROLENS_MAX_RECORD_BYTES (neurolens.storage.limits) or
    MAX_RECORD_BYTES."""
    return env_size(MAX_RECORD_BYTES_ENV, MAX_RECORD_BYTES)


_warned: set = set()
_warned_lock = threading.Lock()


def warn_refused(path: Path, reason: str) -> None:
    """One line on stderr naming a refused record, once per path and process."""
    with _warned_lock:
        if str(path) in _warned:
            return
        _warned.add(str(path))
    sys.stderr.write(f"warning: ignoring cache record {path}: {reason}; it is treated as missing "
                     f"(see docs/security.md)\n")
    sys.stderr.flush()


@contextmanager
def open_record(path: Path) -> Iterator[h5py.File]:
    """The record file at `path`, open for reading: the ONE place neurolens opens an HDF5 file it reads (every
    reader goes through here, so how a file is opened, and what is refused, is decided once).

    Records are immutable once renamed into place, so no HDF5 file lock is taken (a lock can fail on read-only
    or network filesystems, which would make every read look like a miss). Raises OSError when the file is
    missing or not HDF5, and RefusedRecord (an OSError, after one warning line) when it is not plain data: not a
    regular file, data kept outside the file (external storage, virtual datasets, external links), a forged
    size (MAX_EXPANSION), or more declared array data than max_record_bytes() (module docstring)."""
    path = Path(path)
    info = os.lstat(path)                       # FileNotFoundError when missing: a miss, no warning
    if not stat.S_ISREG(info.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
        _refuse(path, f"it is {what} (neurolens writes records as regular files)")
    with h5py.File(path, "r", locking=False) as handle:
        reason = _hostile(handle, max_record_bytes())
        if reason:
            _refuse(path, reason)
        yield handle


def _refuse(path: Path, reason: str) -> None:
    warn_refused(path, reason)
    raise RefusedRecord(f"{path}: {reason}")


def _hostile(handle: h5py.File, limit: int) -> Optional[str]:
    """Why the open record file is not plain data, or None. Visits every link (none is followed out of the file)
    and every object reachable by hard links, with h5py's low-level API (the high-level one costs ~10x more
    per dataset); no dataset's bytes are read."""
    links: list = []
    handle.id.links.visit(lambda name, info: links.append((name, info.type))
                          if info.type not in (h5py.h5l.TYPE_HARD, h5py.h5l.TYPE_SOFT) else None, info=True)
    if links:
        name, kind = links[0]
        what = "an external link" if kind == h5py.h5l.TYPE_EXTERNAL else "a user-defined link"
        return f"/{name.decode(errors='replace')} is {what} (to data outside the file)"
    datasets: list = []
    h5py.h5o.visit(handle.id, lambda name, info: datasets.append(name)
                   if info.type == h5py.h5o.TYPE_DATASET else None, info=True)
    declared = 0
    for name in datasets:
        where = "/" + name.decode(errors="replace")
        dataset = h5py.h5d.open(handle.id, name)
        plist = dataset.get_create_plist()
        if plist.get_layout() == h5py.h5d.VIRTUAL:
            return f"{where} is a virtual dataset (its data lives in other files)"
        if plist.get_external_count() > 0:
            return f"{where} keeps its data in an external file"
        size = int(np.prod([int(n) for n in (dataset.shape or ())], dtype=object)) * int(dataset.get_type().get_size())
        stored = int(dataset.get_storage_size())
        if size > 2 ** 20 and size > MAX_EXPANSION * stored:
            return (f"{where} declares {describe(size)} but stores {describe(stored)}, more than compression "
                    f"can expand (a forged size)")
        declared += size
        if declared > limit:
            return (f"its datasets declare {describe(declared)}, over the {describe(limit)} limit (set "
                    f"{MAX_RECORD_BYTES_ENV} to read larger records you trust)")
    return None


def read_attrs(path: Path) -> Mapping[str, Any]:
    """A record's attributes without its arrays (raises OSError, KeyError or ValueError when unreadable)."""
    with open_record(path) as handle:
        attrs = json.loads(handle.attrs["attrs_json"])
    if not isinstance(attrs, dict):
        raise ValueError(f"{path}: attrs_json is not a JSON object")
    return attrs


def written_at(path: Path) -> float:
    """When the record was written (its `written_at` attribute, seconds since the epoch), 0.0 when unreadable."""
    try:
        with open_record(path) as handle:
            return float(handle.attrs.get("written_at", 0.0))
    except (OSError, ValueError, TypeError):
        return 0.0
