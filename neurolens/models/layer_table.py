"""A model's layer table and how a layer name resolves in it (light: no torch, so that a model card's table
answers without a model; neurolens.models.layers measures a loaded model's table).

A name resolves by canonical name, alias, Microscope's Add form (image_block_S_B_Add_6_0) or a registered
layer's dotted module path; any other dotted path goes to the table's fallback (measured on the model).
"""
from __future__ import annotations

import difflib
import re
from typing import Callable, Dict, List, Optional, Sequence

from ..errors import UnitOutOfRangeError, UnknownLayerError
from ..types import LayerSpec

_MICROSCOPE_ADD = re.compile(r"^(image_block_\d+_\d+)_Add_\d+_0$")


class LayerTable:
    """A model's addressable layers (LayerSpecs) and how a name resolves to one: canonical name, alias,
    Microscope Add form, or a registered layer's module path. `fallback(name)` answers any other name (a
    registry measures the module; a model card's table loads the model first), else UnknownLayerError."""

    def __init__(self, layers: Sequence[LayerSpec], fallback: Optional[Callable[[str], LayerSpec]] = None):
        self.layers: List[LayerSpec] = list(layers)
        self._fallback = fallback
        self._by_name: Dict[str, LayerSpec] = {}
        for spec in self.layers:
            self._by_name[spec.name] = spec
            for alias in spec.aliases:
                self._by_name[alias] = spec

    def names(self) -> List[str]:
        return list(self._by_name)

    def resolve(self, name: str) -> LayerSpec:
        """A layer by canonical name, alias, Microscope Add form, or dotted module path."""
        if name in self._by_name:
            return self._by_name[name]
        match = _MICROSCOPE_ADD.match(name)
        if match and match.group(1) in self._by_name:
            return self._by_name[match.group(1)]
        for spec in self.layers:
            if spec.module == name:
                return spec
        found = self._fallback(name) if self._fallback is not None and name.startswith("visual") else None
        if found is not None:
            self._by_name[name] = found
            return found
        close = difflib.get_close_matches(name, self.names(), n=5, cutoff=0.6)
        hint = f"closest: {', '.join(close)}" if close else "run `neurolens layers` to list them"
        raise UnknownLayerError(f"unknown layer {name!r} for this model; {hint}")


def check_unit(spec: LayerSpec, unit: int) -> None:
    if not 0 <= unit < spec.channels:
        raise UnitOutOfRangeError(
            f"unit {unit} is out of range for layer {spec.name}: it has {spec.channels} units, 0 to {spec.channels - 1}"
        )


def resolve_layer(clip, name: str) -> LayerSpec:
    """The layer `name` of `clip` (a LoadedClip measures its table on first use; a LazyClip has its card's)."""
    return clip.layer_table().resolve(name)
