"""The write lock of a scan key (neurolens.records.scan).

One writer per key: a scan computes (writes chunks, checkpoints, the record, and removes stale chunks of its
key) only while it holds `key_lock` on its keys, an exclusive POSIX lock (fcntl.lockf) on the `.lock` file
beside the checkpoint. A second scan of the same key waits for it (wait=True, `scan --wait`) or stops with one
line (exit 2); either way it never deletes the first one's files. The kernel releases the lock when its process
ends, even by kill -9, so a killed run's lock is recovered by the next run with nothing to clean up (the lock
file stays; it is not a record). A POSIX lock, not flock: a flock is shared with forked children (DataLoader
workers), which would keep a killed scan's key locked until they noticed; a POSIX lock belongs to the process
alone. Threads of one process are kept apart by a lock per path. Reading a finished record takes no lock, so
read-only caches stay readable. Where fcntl does not exist (Windows) only threads are kept apart.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

from ..errors import NeurolensError
from ..storage.cache import Cache
from ..storage.files import CACHE_OPTION, ensure_folder, write_error
from .scan import checkpoint_path

try:
    import fcntl
except ImportError:          # Windows: no POSIX locks (module docstring)
    fcntl = None

class ScanBusy(NeurolensError):
    """Another process holds the lock of a scan key (module docstring)."""


_held: Dict[str, list] = {}            # lock path -> [file descriptor, depth] while this process holds it
_threads: Dict[str, threading.RLock] = {}   # lock path -> the lock keeping this process's threads apart
_held_guard = threading.Lock()


def lock_path(cache: Cache, fingerprint: str, layer: str, key: str) -> Path:
    return checkpoint_path(cache, fingerprint, layer, key).with_suffix(".lock")


@contextmanager
def key_lock(cache: Cache, fingerprint: str, layer: str, keys: Sequence[str], wait: bool = False) -> Iterator[None]:
    """Hold the write lock of every key in `keys` (module docstring), in a fixed order. wait=False: raise
    ScanBusy (one line) when another process (or thread) holds one; wait=True: block until it is released.
    Re-entrant within a thread."""
    taken: List[str] = []
    try:
        for path in sorted({str(lock_path(cache, fingerprint, layer, key)) for key in keys}):
            _acquire(Path(path), wait)
            taken.append(path)
        yield
    finally:
        for path in reversed(taken):
            _release(path)


def _busy(path: Path, fd: Optional[int] = None) -> ScanBusy:
    owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() if fd is not None else str(os.getpid())
    return ScanBusy(f"another scan of this layer, dataset and settings is running"
                    f"{f' (process {owner})' if owner.isdigit() else ''} and writes the same cache records (lock "
                    f"{path}); pass --wait to wait for it, or run this command again when it has finished (it "
                    f"then reads the finished scan)")


def _acquire(path: Path, wait: bool) -> None:
    with _held_guard:
        threads = _threads.setdefault(str(path), threading.RLock())
    if not threads.acquire(blocking=wait):
        raise _busy(path)
    try:
        with _held_guard:
            if str(path) in _held:              # this thread holds it already (the RLock let it in)
                _held[str(path)][1] += 1
                return
        fd = -1
        if fcntl is not None:
            ensure_folder(path.parent, CACHE_OPTION)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as exc:
                raise write_error(path, exc, CACHE_OPTION) from None
            try:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:             # EAGAIN / EACCES: another process holds it
                    if not wait:
                        raise _busy(path, fd) from None
                    fcntl.lockf(fd, fcntl.LOCK_EX)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            except BaseException:
                os.close(fd)                # this descriptor holds no lock of ours: closing it drops nothing
                raise
        with _held_guard:
            _held[str(path)] = [fd, 1]
    except BaseException:
        threads.release()
        raise


def _release(path: str) -> None:
    with _held_guard:
        entry = _held[path]
        entry[1] -= 1
        last = entry[1] == 0
        if last:
            del _held[path]
    if last and entry[0] >= 0:
        os.close(entry[0])          # closing the descriptor releases the POSIX lock
    _threads[path].release()
