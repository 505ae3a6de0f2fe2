"""Objectives for activation maximization.

One sign convention everywhere: an objective returns one value per image, and HIGHER IS BETTER; the
render loop minimizes the negated sum. Objectives are small factories that compose with + - and
scalar *, like lucid's: `channel("image_block_4_5", [1543, 244]) + 0.1 * diversity(...)`.
Each image in the batch may target its own unit (several units optimized together in one batch).
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence, Union

import torch

from ..errors import NeurolensError

Activations = Dict[str, torch.Tensor]


class Objective:
    def __init__(self, fn: Callable[[Activations], torch.Tensor], layers: Sequence[str], name: str):
        self.fn = fn
        self.layers = tuple(dict.fromkeys(layers))
        self.name = name

    def __call__(self, acts: Activations) -> torch.Tensor:
        return self.fn(acts)

    def __add__(self, other: "Objective") -> "Objective":
        return Objective(lambda a: self(a) + other(a), self.layers + other.layers, f"{self.name} + {other.name}")

    def __sub__(self, other: "Objective") -> "Objective":
        return Objective(lambda a: self(a) - other(a), self.layers + other.layers, f"{self.name} - {other.name}")

    def __mul__(self, scale: float) -> "Objective":
        return Objective(lambda a: scale * self(a), self.layers, f"{scale} * {self.name}")

    __rmul__ = __mul__

    def __neg__(self) -> "Objective":
        return self * -1.0


def _per_image_units(units: Union[int, Sequence[int]], batch: int, device) -> torch.Tensor:
    if isinstance(units, int):
        return torch.full((batch,), units, dtype=torch.long, device=device)
    index = torch.as_tensor(list(units), dtype=torch.long, device=device)
    if index.numel() != batch:
        raise ValueError(f"{index.numel()} units given for a batch of {batch} images")
    return index


def _select(act: torch.Tensor, units) -> torch.Tensor:
    """Each image's own channel: (N, C, H, W) -> (N, H, W)."""
    index = _per_image_units(units, act.shape[0], act.device)
    return act[torch.arange(act.shape[0], device=act.device), index]


def channel(layer: str, units: Union[int, Sequence[int]]) -> Objective:
    """Mean activation of the unit's channel over all spatial positions (Microscope's default)."""
    def fn(acts: Activations) -> torch.Tensor:
        selected = _select(acts[layer], units).float()
        return selected.flatten(1).mean(1) if selected.dim() > 1 else selected
    return Objective(fn, [layer], f"channel({layer})")


def neuron(layer: str, units: Union[int, Sequence[int]]) -> Objective:
    """Activation of the unit at the centre cell of the layer's grid."""
    def fn(acts: Activations) -> torch.Tensor:
        selected = _select(acts[layer], units).float()
        if selected.dim() == 1:
            return selected
        return selected[:, selected.shape[1] // 2, selected.shape[2] // 2]
    return Objective(fn, [layer], f"neuron({layer})")


def direction(layer: str, vectors: torch.Tensor) -> Objective:
    """Mean over positions of the dot product of the activation vector with a direction in channel space."""
    def fn(acts: Activations) -> torch.Tensor:
        act = acts[layer].float()
        vec = vectors.to(act.device, act.dtype)
        vec = vec.expand(act.shape[0], -1) if vec.dim() == 1 else vec
        if act.dim() == 2:
            return (act * vec).sum(1)
        return torch.einsum("nchw,nc->nhw", act, vec).flatten(1).mean(1)
    return Objective(fn, [layer], f"direction({layer})")


def diversity(layer: str, groups: Sequence[int]) -> Objective:
    """Lucid's diversity term, per image: minus the mean cosine similarity between its Gram matrix at `layer`
    and those of the other images of its group (the seeds of one unit). Images alone in a group get 0."""
    def fn(acts: Activations) -> torch.Tensor:
        act = acts[layer].float()
        flat = act.flatten(2)                                   # (N, C, HW)
        gram = torch.bmm(flat, flat.transpose(1, 2)).flatten(1)  # (N, C*C)
        gram = torch.nn.functional.normalize(gram, dim=1)
        similarity = gram @ gram.T                              # (N, N)
        group = torch.as_tensor(list(groups), device=act.device)
        same = (group[:, None] == group[None, :]) & ~torch.eye(len(group), dtype=torch.bool, device=act.device)
        count = same.sum(1).clamp(min=1)
        return -(similarity * same).sum(1) / count
    return Objective(fn, [layer], f"diversity({layer})")


OBJECTIVES = {"channel": channel, "neuron": neuron}


def unit_objective(kind: str, layer: str, units: Sequence[int]) -> Objective:
    if kind not in OBJECTIVES:
        raise NeurolensError(f"unknown objective {kind!r}; use one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[kind](layer, units)
