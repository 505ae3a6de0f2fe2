"""The streaming scan: one forward per batch, truncated right after the layer, updates the statistics of
ALL units of that layer at once. Images are decoded in DataLoader workers (overlapped with the model);
a bad item is caught inside the worker and reported back with its reason, never raised.

Per image and unit the activation is the spatial max of the unit's map (Microscope's dataset samples),
and the (row, col) of that max is kept for the crop. Batches are fixed index ranges [start + j*bs, ...),
so a scan resumed from any batch boundary, or split into shards and merged, gives the same result. Every
forward runs on batch_size rows (padded when bad items or the end leave fewer), so an image's values do not
depend on which images share its batch (see activations.forward.layer_forward): another engine that forwards
the same batch size (engines/ray/) gets the same values. The statistics are activations.stats.ScanStats.
No disk I/O here: `on_batch` hands each batch's per-image values to the caller (pipelines/scan.py).

The input pipeline (`image_batches`, also what SAE training and top maps read images with):
- decode workers prepare each item (datasets.decode.prepare_item): with `--decode pil` decoded and resized by
  PIL; with `--decode torchvision` a JPEG's bytes are left to the batched decoder (engines.decode), which runs
  in the worker on the CPU, or in this process on a CUDA device (batched nvJPEG);
- on a CUDA device batches come in pinned host memory (pin_memory) and are copied with non_blocking copies on
  a side stream one batch ahead, so the next batch's transfer (and GPU decode) overlaps the current forward;
- nothing waits for the device per batch: per-image values stay on the device in BatchOutput, and the caller
  copies them to the host once per chunk (pipelines/scan.py).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..types import PRECISIONS
from ..activations.forward import layer_forward
from ..activations.stats import BatchOutput, ScanStats
from ..datasets.decode import Prepared, prepare_item, resolve_decoder
from ..datasets.types import ImageDataset
from ..errors import NeurolensError
from ..types import LayerSpec
from .decode import assemble
from .timing import NO_CLOCK, StageClock


def default_workers() -> int:
    return min(2, os.cpu_count() or 1)


def default_batch_size(device: torch.device) -> int:
    return 64 if device.type == "cuda" else 16


# ---------------------------------------------------------------------------------------------- decoding

@dataclass
class LoadedBatch:
    """One batch of a pass: items [start, stop) (or the index list given), the readable ones' pixels, the
    skipped ones with their reasons. image_batches yields it with `pixels` and `index` on the device."""
    start: int
    stop: int
    indices: List[int]                       # the readable items, in order
    pixels: Optional[torch.Tensor]           # uint8 (b, 3, S, S); None when nothing was readable
    index: Optional[torch.Tensor]            # int64 (b,): `indices` as a tensor (copied with the pixels)
    skipped: List[Tuple[int, str]]
    seconds: Dict[str, float] = field(default_factory=dict)   # the decode worker's busy seconds per stage
    pending: Optional[List[Prepared]] = None  # JPEGs (and PIL arrays) still to be put together on the device
    ready: Optional[object] = None           # the CUDA event after which pixels and index are on the device

    def pin_memory(self) -> "LoadedBatch":
        """DataLoader(pin_memory=True) calls this: page-locked host memory makes the copy asynchronous."""
        if self.pixels is not None:
            self.pixels, self.index = self.pixels.pin_memory(), self.index.pin_memory()
        return self


class _Items(torch.utils.data.Dataset):
    """Item i -> datasets.decode.Prepared. Runs in DataLoader workers."""

    def __init__(self, dataset: ImageDataset, size: int, decoder: str):
        self.dataset, self.size, self.decoder = dataset, size, decoder

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Prepared:
        return prepare_item(self.dataset, index, self.size, self.decoder)


class _Ranges(torch.utils.data.Sampler):
    """Batches of consecutive indices [start + j*bs, ...) up to stop, in order."""

    def __init__(self, start: int, stop: int, batch_size: int):
        self.start, self.stop, self.batch_size = start, stop, batch_size

    def __iter__(self):
        for first in range(self.start, self.stop, self.batch_size):
            yield list(range(first, min(first + self.batch_size, self.stop)))

    def __len__(self) -> int:
        return max(0, -(-(self.stop - self.start) // self.batch_size))


class _Collate:
    """Prepared items -> LoadedBatch, in the worker: put together here (on the CPU), or left `pending` for the
    main process to decode on its CUDA device."""

    def __init__(self, size: int, here: bool):
        self.size, self.here = size, here

    def __call__(self, items: Sequence[Prepared]) -> LoadedBatch:
        started = time.perf_counter()
        seconds = {"decode": sum(item.decode_s for item in items), "resize": sum(item.resize_s for item in items)}
        first, stop = items[0].index, items[-1].index + 1
        if not self.here:
            seconds["collate"] = time.perf_counter() - started
            return LoadedBatch(first, stop, [], None, None, [], seconds, pending=list(items))
        clock = StageClock("cpu")        # the batched decoder's decode and resize, and PIL's fallbacks
        built = assemble(items, self.size, "cpu", clock)
        index = torch.as_tensor(built.indices, dtype=torch.int64) if built.pixels is not None else None
        inner = clock.seconds["decode"] + clock.seconds["resize"]
        seconds = {"decode": seconds["decode"] + clock.seconds["decode"],
                   "resize": seconds["resize"] + clock.seconds["resize"],
                   "collate": time.perf_counter() - started - inner}
        return LoadedBatch(first, stop, built.indices, built.pixels, index, built.skipped, seconds)


class _DeviceFeed:
    """Moves batches to the device one batch ahead (module docstring); on the CPU it hands them on as they are."""

    def __init__(self, device: torch.device, size: int, clock):
        self.device, self.size, self.clock = device, size, clock
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, batch: LoadedBatch) -> LoadedBatch:
        """Start the batch's copy (or GPU decode) on the side stream."""
        if self.stream is None:
            return batch
        with torch.cuda.stream(self.stream):
            if batch.pending is not None:
                built = assemble(batch.pending, self.size, self.device, self.clock)
                batch.indices, batch.pixels, batch.pending = built.indices, built.pixels, None
                batch.skipped = built.skipped
                batch.index = torch.as_tensor(built.indices, dtype=torch.int64).to(self.device, non_blocking=True) \
                    if built.pixels is not None else None
            elif batch.pixels is not None:
                with self.clock.device_stage("h2d", self.device):
                    batch.pixels = batch.pixels.to(self.device, non_blocking=True)
                    batch.index = batch.index.to(self.device, non_blocking=True)
            batch.ready = torch.cuda.Event()
            batch.ready.record(self.stream)
        return batch

    def finish(self, batch: LoadedBatch) -> LoadedBatch:
        """Make the compute stream wait for the batch's copy (no wait on the host)."""
        if self.stream is not None and batch.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(batch.ready)
            for tensor in (batch.pixels, batch.index):
                if tensor is not None:
                    tensor.record_stream(current)
        return batch


def image_batches(dataset: ImageDataset, size: int, index_batches, workers: int, decoder: str = "pil",
                  device="cpu", clock=NO_CLOCK):
    """LoadedBatch per list of indices in `index_batches` (consecutive ranges, or e.g. a shuffled order), in
    that order, decoded by `workers` DataLoader processes (0: this process) with `decoder` ("auto", "pil" or
    "torchvision", datasets.decode.resolve_decoder), pixels and indices on `device`. clock: engines.timing."""
    device = torch.device(device)
    decoder = resolve_decoder(decoder, device)
    on_device = device.type == "cuda" and decoder == "torchvision"
    loader = torch.utils.data.DataLoader(
        _Items(dataset, size, decoder), batch_sampler=index_batches, num_workers=workers,
        collate_fn=_Collate(size, here=not on_device), pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers > 0 else None)
    feed = _DeviceFeed(device, size, clock)
    waiting = None
    for batch in loader:
        clock.add(batch.seconds)
        batch = feed.start(batch)
        if feed.stream is None:
            yield batch
            continue
        if waiting is not None:
            yield feed.finish(waiting)
        waiting = batch
    if waiting is not None:
        yield feed.finish(waiting)


def batches(dataset: ImageDataset, size: int, start: int, stop: int, batch_size: int, workers: int,
            decoder: str = "pil", device="cpu", clock=NO_CLOCK):
    """image_batches over the consecutive ranges [start + j*batch_size, ...) up to stop."""
    yield from image_batches(dataset, size, _Ranges(start, stop, batch_size), workers, decoder, device, clock)


# ---------------------------------------------------------------------------------------------- the scan

def scan_range(clip, spec: LayerSpec, dataset: ImageDataset, start: int = 0, stop: Optional[int] = None, *,
               top_k: int = 32, batch_size: Optional[int] = None, workers: Optional[int] = None,
               precision: str = "fp32", embeddings: bool = False, stats: Optional[ScanStats] = None,
               on_batch: Optional[Callable[[BatchOutput], None]] = None,
               progress: Optional[Callable[[int, int], None]] = None, bases: Sequence = (),
               decoder: str = "auto", clock=NO_CLOCK) -> ScanStats:
    """Scan dataset items [start, stop) into `stats` (new if None) and return it.

    `start` must be a batch boundary of the full scan (a multiple of batch_size) for a resumed scan to
    batch exactly like an uninterrupted one; any range works for shards (merge them with ScanStats.merge).

    bases: other bases of the layer scanned in the same pass, objects with `id`, `units` and
    `activations(acts (B,C,H,W)) -> (B,units,H,W)` (SAE features: neurolens.sae.basis); each gets its
    statistics in stats.bases[id] and its per-image maxima in BatchOutput.basis_maxima[id].
    decoder: "auto", "pil" or "torchvision" (datasets.decode.resolve_decoder); clock: an engines.timing.StageClock
    to time the stages."""
    if precision not in PRECISIONS:
        raise NeurolensError(f"unknown precision {precision!r}; use fp32 or bf16")
    stop = len(dataset) if stop is None else min(stop, len(dataset))
    batch_size = int(batch_size or default_batch_size(clip.device))
    workers = default_workers() if workers is None else int(workers)
    device = clip.device
    stats = stats if stats is not None else ScanStats.empty(spec, top_k, device)
    for basis in bases:
        if basis.id not in stats.bases:
            stats.bases[basis.id] = ScanStats.empty(spec, top_k, device, units=basis.units)
    if progress:
        progress(start, len(dataset))
    for batch in batches(dataset, clip.image_size, start, stop, batch_size, workers, decoder, device, clock):
        stats.skipped.extend(batch.skipped)
        maxima = torch.zeros((0, spec.channels), device=device)
        basis_maxima = {basis.id: torch.zeros((0, basis.units), device=device) for basis in bases}
        emb = torch.zeros((0, 0), device=device) if embeddings else None
        if batch.pixels is not None:
            with clock.device_stage("forward"):
                images = batch.pixels.float().div_(255.0)
                acts, emb = layer_forward(clip, spec, images, precision, embeddings, pad_to=batch_size)
            with clock.device_stage("stats"):
                maxima = stats.add(acts, batch.index)
                for basis in bases:
                    with torch.no_grad():
                        basis_maxima[basis.id] = stats.bases[basis.id].add(basis.activations(acts), batch.index)
        if on_batch:
            with clock.host_stage("writes"):
                on_batch(BatchOutput(batch.start, batch.stop, np.asarray(batch.indices, np.int64), maxima, emb,
                                     batch.skipped, basis_maxima))
        if progress:
            progress(batch.stop, len(dataset))
    return stats


def scan_shard(clip, spec: LayerSpec, dataset: ImageDataset, start: int, stop: int, **options) -> ScanStats:
    """One shard of a scan (items [start, stop)); merge shards with `ScanStats.merge`."""
    return scan_range(clip, spec, dataset, start, stop, **options)
