"""Hostile dataset items for the tests (issue 20, docs/security.md): a FIFO watchdog, a 1 x 20,000 image and a
folder of good images beside a FIFO, /dev/zero behind a link and an oversize file. Synthetic data only."""
from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import numpy as np
from PIL import Image

from scan_data import write_images


class FifoWatchdog:
    """Unblocks a reader stuck opening `fifo` (opens its write end after `seconds`) and records that it had
    to: an in-process timeout for code that would otherwise hang the test forever."""

    def __init__(self, fifo: Path, seconds: float = 20.0):
        self.fifo, self.fired, self._stop = fifo, False, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(seconds,), daemon=True)
        self._thread.start()

    def _run(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            return
        self.fired = True
        fd = os.open(self.fifo, os.O_WRONLY)      # the stuck reader then reads end-of-file
        os.close(fd)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def tall_png(width: int = 1, height: int = 20_000, fmt: str = "PNG") -> bytes:
    """A width x height noise image (default 1 x 20,000), as PNG or (fmt="JPEG") a baseline JPEG."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def hostile_folder(folder: Path) -> dict:
    """3 good images, a FIFO named a.jpg, /dev/zero behind a symlink named b.jpg, and an oversize c.png."""
    folder.mkdir(parents=True)
    write_images(folder, 3, start_seed=40, size=(72, 64))
    os.mkfifo(folder / "a.jpg")
    os.symlink("/dev/zero", folder / "b.jpg")
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(folder / "c.png")   # ~120 KB
    return {"a.jpg": "FIFO", "b.jpg": "character device", "c.png": "too large"}
