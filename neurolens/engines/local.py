"""The streaming scan: one forward per batch, truncated right after the layer, updates the statistics of
ALL units of that layer at once. Images are decoded in DataLoader workers (overlapped with the model);
a bad item is caught inside the worker and reported back with its reason, never raised.

Per image and unit the activation is the spatial max of the unit's map (Microscope's dataset samples),
and the (row, col) of that max is kept for the crop. Batches are fixed index ranges [start + j*bs, ...),
so a scan resumed from any batch boundary, or split into shards and merged, gives the same result. Every
forward runs on batch_size rows (padded when bad items or the end leave fewer), so an image's values do not
depend on which images share its batch (see layer_forward): another engine that forwards the same batch size
(engines/ray_scan.py) gets the same values.
No disk I/O here: `on_batch` hands each batch's per-image values to the caller (pipelines/scan.py).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..datasets.decode import decode_item
from ..datasets.types import ImageDataset
from ..activations.hooks import StopForward, capture
from ..activations.stats import MeanMap, Moments, TopK
from ..types import LayerSpec

PRECISIONS = ("fp32", "bf16")


def default_workers() -> int:
    return min(2, os.cpu_count() or 1)


def default_batch_size(device: torch.device) -> int:
    return 64 if device.type == "cuda" else 16


@dataclass
class ScanStats:
    """Everything a scan accumulates; O(units x k + C x H x W) memory.

    `bases` holds the statistics of other bases of the same layer (e.g. SAE features, see neurolens.sae.basis)
    computed from the same forward: one ScanStats per basis id, without a mean map of its own (the layer's
    mean map is this one's)."""
    topk: TopK
    moments: Moments
    mean_map: Optional[MeanMap]
    grid: Tuple[int, int]
    skipped: List[Tuple[int, str]] = field(default_factory=list)  # (dataset index, reason)
    bases: Dict[str, "ScanStats"] = field(default_factory=dict)

    @classmethod
    def empty(cls, spec: LayerSpec, top_k: int, device: torch.device | str = "cpu",
              units: Optional[int] = None) -> "ScanStats":
        """Statistics of the layer's channels, or with `units` of another basis of that many units (no mean map)."""
        channels, height, width = spec.channels, max(1, spec.height), max(1, spec.width)
        count = channels if units is None else int(units)
        mean_map = MeanMap((channels, height, width), device) if units is None else None
        return cls(TopK(count, top_k, device), Moments(count, device), mean_map, (height, width))

    @property
    def count(self) -> int:
        return self.moments.count

    def add(self, acts: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """acts: (B, C, H, W) float32 of the images with dataset `indices`; returns their spatial max (B, C)."""
        flat = acts.flatten(2)
        values, cells = flat.max(dim=2)  # first maximal cell on ties, like numpy's argmax
        self.topk.add(values, indices, cells)
        self.moments.add(values)
        if self.mean_map is not None:
            self.mean_map.add(acts)
        return values

    def merge(self, other: "ScanStats") -> "ScanStats":
        self.topk.merge(other.topk)
        self.moments.merge(other.moments)
        if self.mean_map is not None and other.mean_map is not None:
            self.mean_map.merge(other.mean_map)
        self.skipped = sorted(self.skipped + other.skipped)
        for basis_id, stats in other.bases.items():
            if basis_id in self.bases:
                self.bases[basis_id].merge(stats)
            else:
                self.bases[basis_id] = stats
        return self

    def state_dict(self) -> Dict[str, np.ndarray]:
        state = {f"topk/{k}": v for k, v in self.topk.state_dict().items()}
        state.update({f"moments/{k}": v for k, v in self.moments.state_dict().items()})
        if self.mean_map is not None:
            state.update({f"mean_map/{k}": v for k, v in self.mean_map.state_dict().items()})
        state["skipped/indices"] = np.asarray([i for i, _ in self.skipped], dtype=np.int64)
        state["skipped/reasons"] = np.asarray([r for _, r in self.skipped] or [""], dtype=object)[: len(self.skipped)]
        for basis_id, stats in self.bases.items():
            state.update({f"bases/{basis_id}/{k}": v for k, v in stats.state_dict().items()
                          if not k.startswith("skipped/")})
        return state

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        def part(prefix: str) -> Dict[str, np.ndarray]:
            return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + "/")}
        self.topk.load_state_dict(part("topk"))
        self.moments.load_state_dict(part("moments"))
        if self.mean_map is not None:
            self.mean_map.load_state_dict(part("mean_map"))
        indices = np.asarray(state.get("skipped/indices", np.zeros(0, np.int64)), dtype=np.int64)
        reasons = list(state.get("skipped/reasons", []))
        self.skipped = [(int(i), str(r)) for i, r in zip(indices, reasons)]
        nested = part("bases")
        for basis_id in sorted({key.split("/", 1)[0] for key in nested}):
            basis_state = {k[len(basis_id) + 1:]: v for k, v in nested.items() if k.startswith(basis_id + "/")}
            units, k = np.asarray(basis_state["topk/values"]).shape
            device = self.topk.values.device
            stats = ScanStats(TopK(units, k, device), Moments(units, device), None, self.grid)
            stats.load_state_dict(basis_state)
            self.bases[basis_id] = stats

    def cells_rc(self) -> np.ndarray:
        """Top-k cells as (U, k, 2) int32 (row, col); -1 for empty slots."""
        flat = self.topk.cells.cpu().numpy()
        width = self.grid[1]
        rc = np.stack([flat // width, flat % width], axis=-1).astype(np.int32)
        rc[flat < 0] = -1
        return rc


@dataclass
class BatchOutput:
    """What one batch produced, handed to `on_batch` (the pipeline writes it to the cache)."""
    start: int                        # the batch covers dataset indices [start, stop)
    stop: int
    indices: np.ndarray               # (b,) the readable images among them
    maxima: np.ndarray                # (b, units) float32 spatial max per image and unit
    embeddings: Optional[np.ndarray]  # (b, D) float32 L2-normalized, when asked for
    skipped: List[Tuple[int, str]]
    basis_maxima: Dict[str, np.ndarray] = field(default_factory=dict)  # basis id -> (b, units) of that basis


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


# ---------------------------------------------------------------------------------------------- forward

def _autocast(clip, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=clip.device.type, dtype=torch.bfloat16)


def layer_forward(clip, spec: LayerSpec, images01: torch.Tensor, precision: str = "fp32",
                  embeddings: bool = False, pad_to: Optional[int] = None
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(acts (B,C,H,W) float32, L2-normalized embeddings (B,D) float32 or None) for images in [0,1].

    Without embeddings the forward stops right after the layer; with them it runs to the image embedding
    and a non-stopping hook keeps the layer.

    pad_to: run the forward on at least this many rows (black images appended, their outputs dropped).
    Kernels may round differently at another batch size (oneDNN's convolutions do for a batch of one, by
    ~1e-8; cuDNN picks its algorithm by shape), so forwards of one fixed size give an image the same values
    whichever images, and how many, share its batch: scans split or batched differently then agree exactly,
    the order of identical images in a top-k included."""
    count = int(images01.shape[0])
    if pad_to is not None and count < pad_to:
        images01 = torch.cat([images01, images01.new_zeros((pad_to - count, *images01.shape[1:]))])
    normalized = clip.normalize(images01)
    with torch.no_grad(), _autocast(clip, precision):
        with capture(clip.model, [spec], stop=not embeddings) as captured:
            try:
                output = clip.model.visual(normalized)
            except StopForward:
                output = None
    acts = captured[spec.name].float()[:count]
    if acts.dim() == 2:
        acts = acts[:, :, None, None]
    emb = None
    if embeddings:
        emb = torch.nn.functional.normalize(output.float()[:count], dim=-1)
    return acts, emb


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
        from ..errors import NeurolensError
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


def brute_force_maxima(clip, spec: LayerSpec, images01: torch.Tensor, precision: str = "fp32"
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """(spatial max (N,C), flat argmax cell (N,C)) of already preprocessed images, in one forward."""
    acts, _ = layer_forward(clip, spec, images01, precision)
    values, cells = acts.flatten(2).max(dim=2)
    return values.cpu().numpy(), cells.cpu().numpy()


def rank_order(values: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """Positions that sort (value desc, index asc): the order TopK keeps (for tests and brute force)."""
    return np.lexsort((np.asarray(indices), -np.asarray(values)))
