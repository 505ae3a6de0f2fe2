"""The visualization record: the feature visualizations of one unit with one set of render settings.

    visualize/<fp>/<layer>/unit<U>_<key>.h5                   a neuron (the layer's channel U)
    visualize/<fp>/<layer>/sae-<name>_feature<F>_<key>.h5     feature F of the SAE <name>
        images (seeds, H, W, 3) uint8, activations (seeds,), curve (steps, seeds), maxima (seeds,): the unit's
        highest activation over the cells of each image, as a scan measures (absent in older records)
        attrs: model, pretrained, fingerprint, layer, module, unit, basis, settings (RenderSettings as a dict),
               batch_units, seconds_for_batch, created
The key hashes the fingerprint, layer, unit and settings (and the basis id for features). The file name says
whose unit it is, so a reader lists a layer's visualizations without opening them (`parse_name`); two SAEs of
the same name (one retrained) are told apart by the record's `basis` attr.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

from ..storage.cache import Cache, Record, settings_key
from .keys import NEURONS, as_basis, basis_id, basis_parts

KIND = "visualize"
NEURON_PREFIX = "unit"
FEATURE_PREFIX, FEATURE_MARK = "sae-", "_feature"


class VisualizationName(NamedTuple):
    """What a visualization record's file name says: whose unit (NEURONS or the SAE's name) and which."""
    owner: str
    unit: int


def unit_tag(unit: int, basis=None) -> str:
    """How file names name a unit: unit<U>, or sae-<name>_feature<F> for an SAE basis."""
    basis = as_basis(basis)
    return f"{NEURON_PREFIX}{int(unit)}" if basis is None else f"{FEATURE_PREFIX}{basis.name}{FEATURE_MARK}{int(unit)}"


def parse_name(path: Path) -> Optional[VisualizationName]:
    """(owner, unit) from a record's file name `<unit tag>_<key>.h5`, None for any other name."""
    tag, separator, _ = Path(path).stem.rpartition("_")
    if not separator:
        return None
    if tag.startswith(NEURON_PREFIX) and tag[len(NEURON_PREFIX):].isdigit():
        return VisualizationName(NEURONS, int(tag[len(NEURON_PREFIX):]))
    if tag.startswith(FEATURE_PREFIX):
        name, mark, number = tag[len(FEATURE_PREFIX):].rpartition(FEATURE_MARK)
        if mark and name and number.isdigit():
            return VisualizationName(name, int(number))
    return None


def record_path(cache: Cache, clip, layer: str, unit: int, settings, basis=None) -> Path:
    """The record of `unit` of `layer` rendered with `settings` (resolved RenderSettings); `clip`: anything
    with the weights' `fingerprint`."""
    key = settings_key(clip.fingerprint, layer, unit, dataclasses.asdict(settings), *basis_parts(basis))
    return cache.path(KIND, clip.fingerprint, layer, f"{unit_tag(unit, basis)}_{key}")


def layer_records(cache: Cache, fingerprint: str, layer: str, owner: str = NEURONS) -> dict:
    """unit -> record paths of one layer's visualizations whose file name names `owner` (NEURONS or an SAE's
    name), without opening them."""
    found: dict = {}
    for path in cache.layer_records(KIND, fingerprint, layer):
        name = parse_name(path)
        if name is not None and name.owner == owner:
            found.setdefault(name.unit, []).append(path)
    return found


def visualization_record(clip, spec, unit: int, settings, images: np.ndarray, activations: np.ndarray,
                         curve: np.ndarray, batch_units: Sequence[int], seconds: float, basis=None,
                         maxima: Optional[np.ndarray] = None) -> Record:
    arrays = {"images": images, "activations": activations, "curve": curve}
    if maxima is not None:
        arrays["maxima"] = maxima
    return Record(
        arrays=arrays,
        attrs={"model": clip.name, "pretrained": clip.pretrained, "fingerprint": clip.fingerprint,
               "layer": spec.name, "module": spec.module, "unit": unit, "basis": basis_id(basis),
               "settings": dataclasses.asdict(settings), "batch_units": list(batch_units),
               "seconds_for_batch": seconds, "created": time.time()})


def read_visualization(cache: Cache, path: Path, names: Optional[list] = None, basis: Optional[str] = None
                       ) -> Optional[Record]:
    """The record at `path` (only the arrays `names` when given), or None when absent or unreadable, or, with
    `basis` (a basis id), when the record holds another basis's unit (an SAE of the same name, retrained)."""
    record = cache.read(path, names=names)
    if record is None or (basis is not None and str(record.attrs.get("basis") or NEURONS) != basis):
        return None
    return record
