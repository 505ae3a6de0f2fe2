"""The activation maps of every unit's top-k images, cache-or-compute: what the web app and the static site
draw over each dataset example (where the unit fired), without a model.

One job after a scan: the union of all units' top-k images is run through the model once (the same
truncated forward as the scan, neurolens.activations.forward.layer_forward), and for every (unit, rank) the unit's H x W
map on that image is kept. With a basis (SAE features, neurolens.sae.basis.load_basis) the units are its features
and a map is the feature's activation on every cell: the basis applied to the layer's maps, exactly as the
feature scan computed it. One record per scan record (neurolens.records.maps).

The scan's images are found again from its record (its `keys`), so no --dataset is needed.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

from ..activations.forward import layer_forward
from ..datasets.open import dataset_from_keys
from ..datasets.types import ImageDataset
from ..engines.local import batches, default_batch_size, default_workers
from ..errors import NeurolensError
from ..models.layer_table import resolve_layer
from ..records.keys import NEURONS, as_basis, as_cache, basis_id
from ..records.maps import TopMaps, read_top_maps, top_maps_path, write_top_maps
from ..records.scan import newest_scan

Progress = Optional[Callable[[int, int], None]]
MISMATCH_TOLERANCE = 1e-3      # relative to the unit's top value: more than float rounding between forwards


class _Subset:
    """Items `indices` of a dataset, as a dataset of their own (what scan.batches iterates over)."""

    def __init__(self, dataset: ImageDataset, indices: np.ndarray):
        self.dataset, self.indices = dataset, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, position: int):
        return self.dataset.load(self.indices[position])

    def encoded(self, position: int):
        return self.dataset.encoded(self.indices[position])


def run_top_maps(clip, layer: str, scan=None, dataset: Optional[ImageDataset] = None, cache=None,
                 force: bool = False, batch_size: Optional[int] = None, workers: Optional[int] = None,
                 progress: Progress = None, basis=None) -> TopMaps:
    """Activation maps of the top-k images of every unit of `layer` (module docstring), cached.

    scan: a ScanResult (default: the newest cached scan of the layer and basis); dataset: its dataset
    (default: read again from the scan's keys); basis: None for the neurons, or a basis of the layer
    (neurolens.sae.basis.load_basis) whose units' maps are wanted (the scan must be of that basis)."""
    cache = as_cache(cache)
    spec = resolve_layer(clip, layer)
    basis = as_basis(basis)
    scan = scan if scan is not None else newest_scan(cache, clip.fingerprint, spec.name, basis)
    if scan is None:
        option = "" if basis is None else f" --sae {basis.name}"
        raise NeurolensError(f"no finished scan of {spec.name}{option} with these weights in {cache.root}; "
                             f"run `neurolens scan --layer {spec.name}{option}` first")
    if str(getattr(scan, "basis", NEURONS)) != basis_id(basis):
        raise NeurolensError(f"the scan holds the units of {scan.basis}, not of {basis_id(basis)}; pass the scan "
                             f"of the same basis")
    path = top_maps_path(cache, clip.fingerprint, spec.name, scan.path)
    if not force:
        found = read_top_maps(cache, path, scan.top_indices.shape)
        if found is not None:
            if progress:
                progress(found.images, found.images)
            return found
    dataset = dataset if dataset is not None else dataset_from_keys(scan.keys, scan.description)
    if len(dataset) != len(scan.keys):
        raise NeurolensError(f"the dataset has {len(dataset)} items but the scan had {len(scan.keys)}; "
                             f"pass the dataset that was scanned")

    top = np.asarray(scan.top_indices)
    units, k = top.shape
    height, width = (int(v) for v in scan.grid)
    maps = np.full((units, k, height, width), np.nan, dtype=np.float32)
    slots = np.argwhere(top >= 0)                       # (S, 2) of (unit, rank)
    owners = top[slots[:, 0], slots[:, 1]]
    order = np.argsort(owners, kind="stable")
    slots, owners = slots[order], owners[order]
    images = np.unique(owners)
    starts = np.searchsorted(owners, images, side="left")
    stops = np.searchsorted(owners, images, side="right")

    subset = _Subset(dataset, images)
    batch_size = int(batch_size or default_batch_size(clip.device))
    workers = default_workers() if workers is None else int(workers)
    unreadable = 0
    if progress:
        progress(0, len(images))
    decoder = getattr(scan, "decoder", "pil")        # the scan's decoder: its values come back exactly
    for batch in batches(subset, clip.image_size, 0, len(subset), batch_size, workers, decoder, clip.device):
        unreadable += len(batch.skipped)
        if batch.pixels is not None:
            acts, _ = layer_forward(clip, spec, batch.pixels.float().div_(255.0), scan.precision)
            if basis is not None:            # the features' maps: the basis applied on every cell
                with torch.no_grad():
                    acts = basis.activations(acts)
            acts = acts.float().cpu().numpy()
            for row, position in enumerate(batch.indices):
                chosen = slots[starts[position]:stops[position]]
                maps[chosen[:, 0], chosen[:, 1]] = acts[row, chosen[:, 0]]
        if progress:
            progress(batch.stop, len(images))

    peaks = np.nanmax(maps.reshape(units, k, -1), axis=2, initial=-np.inf) if maps.size else np.zeros((units, k))
    filled = np.isfinite(peaks) & (top >= 0)
    scale = np.maximum(np.abs(np.asarray(scan.top_values, dtype=np.float64)), 1.0)
    mismatched = int((np.abs(peaks - scan.top_values)[filled] > MISMATCH_TOLERANCE * scale[filled]).sum())
    return write_top_maps(cache, path, maps, clip, spec.name, scan.path, basis, len(images), unreadable, mismatched)

