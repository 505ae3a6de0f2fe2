"""Busy seconds per stage of a pass over a dataset, to name its bottleneck (scripts/bench_scan.py prints them).

Stages (STAGES): decode (reading and decoding images), resize (to the model's input), collate (building a
batch), h2d (the copy to the device), forward (the truncated forward), stats (the statistics of every unit),
writes (handing per-image values to the cache writer, which includes the once-per-chunk copy to the host).

Work queued on a CUDA device is timed with CUDA events recorded on the stream that runs it (`device`), and
read once at the end (`totals`), so timing adds no synchronisation; host work with time.perf_counter.
DataLoader workers time their part of decode, resize and collate themselves and ship the seconds back with
each batch (`add`). Stages overlap (workers decode while the model runs; a copy stream overlaps the forward),
so the busy seconds add up to more than the wall time.
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, Iterator, List, Optional, Tuple

import torch

STAGES = ("decode", "resize", "collate", "h2d", "forward", "stats", "writes")


class StageClock:
    """Accumulates busy seconds per stage (module docstring)."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.seconds: Dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self._events: List[Tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def device_stage(self, name: str, device=None) -> Iterator[None]:
        """Time work queued on `device` (default the clock's): CUDA events on the current stream of a CUDA
        device, the host clock otherwise."""
        device = self.device if device is None else torch.device(device)
        if device.type != "cuda":
            with self.host_stage(name):
                yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._events.append((name, start, end))
        self._fold(finished_only=True)

    @contextlib.contextmanager
    def host_stage(self, name: str) -> Iterator[None]:
        """Time work done by this thread (time.perf_counter)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def add(self, seconds: Optional[Dict[str, float]]) -> None:
        """Add seconds measured elsewhere (a DataLoader worker's decode, resize and collate)."""
        for name, value in (seconds or {}).items():
            self.seconds[name] = self.seconds.get(name, 0.0) + float(value)

    def totals(self) -> Dict[str, float]:
        """Seconds per stage so far (waits for the device's queued work once, to read its events)."""
        if self._events:
            torch.cuda.synchronize(self.device)
            self._fold(finished_only=False)
        return dict(self.seconds)

    def _fold(self, finished_only: bool) -> None:
        while self._events and (not finished_only or self._events[0][2].query()):
            name, start, end = self._events.pop(0)
            self.seconds[name] += start.elapsed_time(end) / 1000.0


class _NoClock:
    """The clock of a pass nobody times: every stage is a no-op."""

    _none = contextlib.nullcontext()

    def device_stage(self, name: str, device=None):
        return self._none

    def host_stage(self, name: str):
        return self._none

    def add(self, seconds) -> None:
        pass


NO_CLOCK = _NoClock()
