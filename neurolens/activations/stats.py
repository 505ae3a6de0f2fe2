"""Streaming statistics over a dataset, in baukit's style: each object has add, state_dict,
load_state_dict and merge, so a scan can stop and resume, or be split into shards and merged.

They hold torch tensors on the scan's device (updates are a few tensor ops per batch, no Python loop over
units); state_dict gives numpy arrays for the HDF5 cache. Memory is O(units x k), independent of the
number of images. ScanStats is what a scan accumulates (TopK, Moments and MeanMap of a layer, the skip list,
other bases); BatchOutput is what one batch of a scan hands to its caller.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..types import LayerSpec

_NO_INDEX = torch.iinfo(torch.int64).max  # sorts empty slots after every real dataset index


class TopK:
    """Per unit, the k largest values seen, with the dataset index and an integer tag (here: the flat
    spatial cell of the max) of each.

    Order: value descending; equal values by lower dataset index first; empty slots (value -inf, index -1)
    last. The order is total, so the result does not depend on batch sizes, resumes or shard merges."""

    def __init__(self, units: int, k: int, device: torch.device | str = "cpu"):
        self.units, self.k = int(units), int(k)
        self.values = torch.full((units, k), float("-inf"), dtype=torch.float32, device=device)
        self.indices = torch.full((units, k), -1, dtype=torch.int64, device=device)
        self.cells = torch.full((units, k), -1, dtype=torch.int64, device=device)

    def add(self, values: torch.Tensor, indices: torch.Tensor, cells: torch.Tensor) -> None:
        """values, cells: (B, units); indices: (B,) dataset indices of the batch's images."""
        if values.shape[0] == 0:
            return
        values = torch.nan_to_num(values.float(), nan=float("-inf")).t()
        units, batch = values.shape
        indices = indices.to(self.indices.device).view(1, batch).expand(units, batch)
        self._keep(torch.cat([self.values, values], 1), torch.cat([self.indices, indices], 1),
                   torch.cat([self.cells, cells.t().to(self.cells.dtype)], 1))

    def merge(self, other: "TopK") -> None:
        if (other.units, other.k) != (self.units, self.k):
            raise ValueError("cannot merge TopK of different shapes")
        device = self.values.device
        self._keep(torch.cat([self.values, other.values.to(device)], 1),
                   torch.cat([self.indices, other.indices.to(device)], 1),
                   torch.cat([self.cells, other.cells.to(device)], 1))

    def _keep(self, values: torch.Tensor, indices: torch.Tensor, cells: torch.Tensor) -> None:
        # two stable sorts = a lexicographic sort on (-value, index)
        by_index = torch.where(indices < 0, torch.full_like(indices, _NO_INDEX), indices)
        order = torch.sort(by_index, dim=1, stable=True).indices
        values, indices, cells = values.gather(1, order), indices.gather(1, order), cells.gather(1, order)
        order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, : self.k]
        self.values, self.indices, self.cells = values.gather(1, order), indices.gather(1, order), cells.gather(1, order)

    def state_dict(self) -> Dict[str, np.ndarray]:
        return {"values": self.values.cpu().numpy(), "indices": self.indices.cpu().numpy(),
                "cells": self.cells.cpu().numpy()}

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        device = self.values.device
        self.values = torch.as_tensor(np.asarray(state["values"], dtype=np.float32), device=device)
        self.indices = torch.as_tensor(np.asarray(state["indices"], dtype=np.int64), device=device)
        self.cells = torch.as_tensor(np.asarray(state["cells"], dtype=np.int64), device=device)
        self.units, self.k = self.values.shape


class Moments:
    """Per unit, count, mean and variance of a stream of values, in float64 (Chan et al.'s pairwise
    update per batch, which is Welford's algorithm for batches of one): exact to float64 rounding even
    when the mean is large compared to the spread."""

    def __init__(self, units: int, device: torch.device | str = "cpu"):
        self.units = int(units)
        self.count = 0
        self.mean = torch.zeros(units, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(units, dtype=torch.float64, device=device)

    def add(self, values: torch.Tensor) -> None:
        """values: (B, units)."""
        batch = int(values.shape[0])
        if batch == 0:
            return
        values = values.to(torch.float64)
        batch_mean = values.mean(0)
        batch_m2 = ((values - batch_mean) ** 2).sum(0)
        self._combine(batch, batch_mean, batch_m2)

    def merge(self, other: "Moments") -> None:
        if other.count:
            self._combine(other.count, other.mean.to(self.mean.device), other.m2.to(self.m2.device))

    def _combine(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * count / total)
        self.count = total

    @property
    def variance(self) -> torch.Tensor:
        """Population variance (divides by the count, like numpy's var)."""
        return self.m2 / self.count if self.count else torch.full_like(self.m2, float("nan"))

    def state_dict(self) -> Dict[str, np.ndarray]:
        return {"count": np.asarray(self.count, dtype=np.int64), "mean": self.mean.cpu().numpy(),
                "m2": self.m2.cpu().numpy()}

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        device = self.mean.device
        self.count = int(np.asarray(state["count"]))
        self.mean = torch.as_tensor(np.asarray(state["mean"], dtype=np.float64), device=device)
        self.m2 = torch.as_tensor(np.asarray(state["m2"], dtype=np.float64), device=device)
        self.units = int(self.mean.shape[0])


class MeanMap:
    """The mean of a stream of (C, H, W) maps (float64 sum and count)."""

    def __init__(self, shape, device: torch.device | str = "cpu"):
        self.count = 0
        self.total = torch.zeros(tuple(shape), dtype=torch.float64, device=device)

    def add(self, maps: torch.Tensor) -> None:
        """maps: (B, C, H, W)."""
        if maps.shape[0]:
            self.total += maps.to(torch.float64).sum(0)
            self.count += int(maps.shape[0])

    def merge(self, other: "MeanMap") -> None:
        self.total += other.total.to(self.total.device)
        self.count += other.count

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count if self.count else torch.full_like(self.total, float("nan"))

    def state_dict(self) -> Dict[str, np.ndarray]:
        return {"count": np.asarray(self.count, dtype=np.int64), "total": self.total.cpu().numpy()}

    def load_state_dict(self, state: Dict[str, np.ndarray]) -> None:
        self.count = int(np.asarray(state["count"]))
        self.total = torch.as_tensor(np.asarray(state["total"], dtype=np.float64), device=self.total.device)


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
    """What one batch produced, handed to `on_batch` (the pipeline writes it to the cache). The per-image values
    are tensors on the scan's device: a caller copies them to the host once per chunk of batches, not per batch
    (a copy per batch would make the host wait for the device every batch)."""
    start: int                        # the batch covers dataset indices [start, stop)
    stop: int
    indices: np.ndarray               # (b,) the readable images among them
    maxima: torch.Tensor              # (b, units) float32 spatial max per image and unit
    embeddings: Optional[torch.Tensor]  # (b, D) float32 L2-normalized, when asked for
    skipped: List[Tuple[int, str]]
    basis_maxima: Dict[str, torch.Tensor] = field(default_factory=dict)  # basis id -> (b, units) of that basis
