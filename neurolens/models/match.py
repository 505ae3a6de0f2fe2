"""Matching a layer across models of different architectures (the `compare` report's rule; light: no torch).

A layer named with --layer is used as it is in every model that has it (its name, an alias, or Microscope's
`_Add_6_0` form, as `neurolens layers` lists them). A model without it gets the block at the nearest
**relative depth**:

    the blocks of a model, in forward order: ResNet image_block_1_0 ... image_block_4_L (the residual sums),
    ViT image_resblock_0 ... image_resblock_L
    relative depth of block i of n: i / (n - 1)   (0 the first block, 1 the last)

The requested layer's depth is taken in the first model (in the order given) that has it by name; every other
model gets its block whose relative depth is nearest (a tie goes to the shallower one). So `image_block_4_5`,
RN50x4's last block (25 / 25 = 1.0), is RN50's `image_block_4_2` and ViT-B/32's `image_resblock_11`;
RN50x4's `image_block_3_9` (19 / 25 = 0.76) is RN50's `image_block_3_4` (11 / 15 = 0.733) and ViT-B/32's
`image_resblock_8` (8 / 11 = 0.727). Layers that are not blocks (image_stem, image_embedding, `_relu` twins, module
paths) match by name only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from ..errors import NeurolensError

BY_NAME = "name"
BY_DEPTH = "depth"


@dataclass(frozen=True)
class LayerMatch:
    """Which layer of one model stands for a requested layer, and how it was chosen."""
    requested: str
    layer: str                  # the model's own layer name
    how: str                    # "name" or "depth"
    depth: float                # the model layer's relative depth (NaN when it is not on the chain)
    target: float               # the requested layer's relative depth (in the model that has it by name)

    def describe(self) -> str:
        if self.how == BY_NAME:
            return f"{self.layer} (by name)"
        return f"{self.layer} (relative depth {self.depth:.3f}, nearest to {self.requested}'s {self.target:.3f})"


_BLOCK = re.compile(r"^image_(block_\d+_\d+|resblock_\d+)$")


def depth_chain(specs: Sequence) -> List[str]:
    """The canonical names of a model's blocks (module docstring), in forward order. specs: LayerSpec objects
    of neurolens.models.layers (name, order)."""
    ordered = sorted(specs, key=lambda spec: spec.order)
    return [spec.name for spec in ordered if _BLOCK.match(spec.name)]


def relative_depth(chain: Sequence[str], name: str) -> Optional[float]:
    if name not in chain:
        return None
    return chain.index(name) / max(1, len(chain) - 1)


def match_layers(requested: str, chains: Sequence[Sequence[str]],
                 resolve: Sequence[Dict[str, str]]) -> List[LayerMatch]:
    """One LayerMatch per model for the requested layer name.

    chains[m]: model m's depth chain; resolve[m]: every name model m accepts (aliases included) -> its
    canonical layer name. A NeurolensError line when no model has the layer by name, or when a model that has
    it by name has it off its chain and another model needs its depth."""
    canonical = [names.get(requested) for names in resolve]
    reference = next((m for m, name in enumerate(canonical) if name is not None), None)
    if reference is None:
        raise NeurolensError(f"no model of the comparison has a layer {requested!r}; give a layer of one of them "
                             f"(`neurolens layers --checkpoint PATH` lists a model's layers)")
    target = relative_depth(chains[reference], canonical[reference])
    out = []
    for m, chain in enumerate(chains):
        if canonical[m] is not None:
            depth = relative_depth(chain, canonical[m])
            out.append(LayerMatch(requested, canonical[m], BY_NAME, float("nan") if depth is None else depth,
                                  float("nan") if target is None else target))
            continue
        if target is None:
            raise NeurolensError(f"layer {requested!r} is not a block of the model that has it, so it cannot be "
                                 f"matched by depth in the others; give a block (image_block_S_B, image_resblock_I) "
                                 f"or a layer every model has")
        if not chain:
            raise NeurolensError(f"a model of the comparison has no layer to match {requested!r} by depth")
        depths = [i / max(1, len(chain) - 1) for i in range(len(chain))]
        best = min(range(len(chain)), key=lambda i: (abs(depths[i] - target), i))
        out.append(LayerMatch(requested, chain[best], BY_DEPTH, depths[best], target))
    return out
