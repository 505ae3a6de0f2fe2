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
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..activations.forward import PRECISIONS, layer_forward
from ..activations.stats import BatchOutput, ScanStats
from ..datasets.decode import decode_item
from ..datasets.types import ImageDataset
from ..errors import NeurolensError
from ..types import LayerSpec


def default_workers() -> int:
    return min(2, os.cpu_count() or 1)


def default_batch_size(device: torch.device) -> int:
    return 64 if device.type == "cuda" else 16


# ---------------------------------------------------------------------------------------------- decoding

class _Decoded(torch.utils.data.Dataset):
    """Item i -> (i, uint8 (3,S,S) array or None, reason). Runs in DataLoader workers."""

    def __init__(self, dataset: ImageDataset, size: int):
        self.dataset, self.size = dataset, size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return (index, *decode_item(self.dataset, index, self.size))


class _Ranges(torch.utils.data.Sampler):
    """Batches of consecutive indices [start + j*bs, ...) up to stop, in order."""

    def __init__(self, start: int, stop: int, batch_size: int):
        self.start, self.stop, self.batch_size = start, stop, batch_size

    def __iter__(self):
        for first in range(self.start, self.stop, self.batch_size):
            yield list(range(first, min(first + self.batch_size, self.stop)))

    def __len__(self) -> int:
        return max(0, -(-(self.stop - self.start) // self.batch_size))


def _collate(items):
    indices = [i for i, array, _ in items if array is not None]
    arrays = [array for _, array, _ in items if array is not None]
    skipped = [(i, reason) for i, array, reason in items if array is None]
    pixels = torch.from_numpy(np.stack(arrays)) if arrays else None
    return items[0][0], items[-1][0] + 1, indices, pixels, skipped


def batches(dataset: ImageDataset, size: int, start: int, stop: int, batch_size: int, workers: int):
    """Yields (start, stop, indices, uint8 pixels (b,3,S,S) or None, skipped) per batch, in index order."""
    yield from image_batches(dataset, size, _Ranges(start, stop, batch_size), workers)


def image_batches(dataset: ImageDataset, size: int, index_batches, workers: int):
    """Like `batches`, for any sequence of index lists (e.g. a shuffled order), decoded in that order."""
    loader = torch.utils.data.DataLoader(
        _Decoded(dataset, size), batch_sampler=index_batches, num_workers=workers,
        collate_fn=_collate, pin_memory=False, prefetch_factor=2 if workers > 0 else None)
    yield from loader


# ---------------------------------------------------------------------------------------------- the scan

def scan_range(clip, spec: LayerSpec, dataset: ImageDataset, start: int = 0, stop: Optional[int] = None, *,
               top_k: int = 32, batch_size: Optional[int] = None, workers: Optional[int] = None,
               precision: str = "fp32", embeddings: bool = False, stats: Optional[ScanStats] = None,
               on_batch: Optional[Callable[[BatchOutput], None]] = None,
               progress: Optional[Callable[[int, int], None]] = None, bases: Sequence = ()) -> ScanStats:
    """Scan dataset items [start, stop) into `stats` (new if None) and return it.

    `start` must be a batch boundary of the full scan (a multiple of batch_size) for a resumed scan to
    batch exactly like an uninterrupted one; any range works for shards (merge them with ScanStats.merge).

    bases: other bases of the layer scanned in the same pass, objects with `id`, `units` and
    `activations(acts (B,C,H,W)) -> (B,units,H,W)` (SAE features: neurolens.sae.basis); each gets its
    statistics in stats.bases[id] and its per-image maxima in BatchOutput.basis_maxima[id]."""
    if precision not in PRECISIONS:
        raise NeurolensError(f"unknown precision {precision!r}; use fp32 or bf16")
    stop = len(dataset) if stop is None else min(stop, len(dataset))
    batch_size = int(batch_size or default_batch_size(clip.device))
    workers = default_workers() if workers is None else int(workers)
    stats = stats if stats is not None else ScanStats.empty(spec, top_k, clip.device)
    for basis in bases:
        if basis.id not in stats.bases:
            stats.bases[basis.id] = ScanStats.empty(spec, top_k, clip.device, units=basis.units)
    if progress:
        progress(start, len(dataset))
    for first, last, indices, pixels, skipped in batches(dataset, clip.image_size, start, stop, batch_size, workers):
        stats.skipped.extend(skipped)
        maxima = np.zeros((0, spec.channels), np.float32)
        basis_maxima = {basis.id: np.zeros((0, basis.units), np.float32) for basis in bases}
        emb = None
        if pixels is not None:
            images = pixels.to(clip.device).float().div_(255.0)
            acts, emb_t = layer_forward(clip, spec, images, precision, embeddings, pad_to=batch_size)
            index_t = torch.as_tensor(indices, dtype=torch.int64, device=clip.device)
            maxima = stats.add(acts, index_t).cpu().numpy()
            for basis in bases:
                with torch.no_grad():
                    basis_acts = basis.activations(acts)
                basis_maxima[basis.id] = stats.bases[basis.id].add(basis_acts, index_t).cpu().numpy()
            emb = emb_t.cpu().numpy() if emb_t is not None else None
        elif embeddings:
            emb = np.zeros((0, 0), np.float32)
        if on_batch:
            on_batch(BatchOutput(first, last, np.asarray(indices, np.int64), maxima, emb, skipped, basis_maxima))
        if progress:
            progress(last, len(dataset))
    return stats


def scan_shard(clip, spec: LayerSpec, dataset: ImageDataset, start: int, stop: int, **options) -> ScanStats:
    """One shard of a scan (items [start, stop)); merge shards with `ScanStats.merge`."""
    return scan_range(clip, spec, dataset, start, stop, **options)
