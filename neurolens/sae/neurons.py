"""A layer's own channels as a basis (the neurons): what scan, visualize, text, sweep and the pages ask of a
basis, without torch, so that a cached answer for neurons imports none (neurolens.sae.basis: SAE features).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import UnitOutOfRangeError
from ..models.layer_table import resolve_layer
from ..records.keys import NEURONS
from ..records.visualize import unit_tag
from ..types import LayerSpec


class NeuronBasis:
    """The layer's own channels."""
    kind = NEURONS
    id = NEURONS
    name = ""
    unit_word = "unit"
    path: Optional[Path] = None
    sae = None

    def __init__(self, spec: LayerSpec):
        self.spec = spec
        self.units = spec.channels

    def activations(self, acts):
        return acts

    def objective(self, kind: str, layer: str, units: Sequence[int]):
        from ..optvis.objectives import unit_objective  # lazy: only rendering asks (torch); answers from the cache do not
        return unit_objective(kind, layer, units)

    def directions(self, jacobian) -> np.ndarray:
        import torch  # lazy: only the text job's Jacobian asks (a tensor: torch is imported already)
        return torch.nn.functional.normalize(torch.as_tensor(jacobian).float().t(), dim=-1).numpy()

    def tag(self, unit: int) -> str:
        return unit_tag(unit)

    def label(self, unit: int) -> str:
        return f"unit {int(unit)}"

    def check_unit(self, unit: int) -> None:
        check_basis_unit(self, unit)

    def describe(self) -> dict:
        return {"basis": self.id, "kind": self.kind, "units": self.units}


def neuron_basis(clip, layer: str) -> NeuronBasis:
    """The neurons of `layer` of `clip` (sae.basis.load_basis with no SAE)."""
    return NeuronBasis(resolve_layer(clip, layer))


def check_basis_unit(basis, unit: int) -> None:
    """One line (UnitOutOfRangeError) when `unit` is not one of the basis's units."""
    if not 0 <= int(unit) < basis.units:
        what = f"SAE {basis.name}" if basis.kind != NEURONS else f"layer {basis.spec.name}"
        raise UnitOutOfRangeError(f"{basis.unit_word} {unit} is out of range for {what}: it has {basis.units} "
                                  f"{basis.unit_word}s, 0 to {basis.units - 1}")


def is_neurons(basis) -> bool:
    return basis is None or getattr(basis, "kind", None) == NEURONS
