"""Layer names: Microscope's names <-> module paths and capture points, with channel counts and sizes.

ModifiedResNet (CLIP RN50, RN50x4, ...):
  image_stem              output of the stem (visual.avgpool)
  image_block_S_B         residual sum `out + identity` of block B of stage S, BEFORE the block's final ReLU
                          (the input of visual.layerS.B.act3). Microscope's image_block_S_B_Add_6_0 is an alias.
  image_block_S_B_relu    the block's output after that ReLU
  image_embedding         output of the attention pool (the image embedding, before normalization)
VisionTransformer:
  image_resblock_I        tokens after residual block I, class/prefix tokens dropped, as a (width, grid, grid) map
  image_embedding         the image embedding

A dotted module path names the registered layer with that module (visual.layer4.5 -> image_block_4_5, the
pre-ReLU sum); any other module path captures that module's output.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ..activations.hooks import to_feature_map
from ..types import CAPTURE_INPUT, CAPTURE_OUTPUT, LayerSpec
from .layer_table import LayerTable


def _candidate_layers(model: torch.nn.Module) -> List[dict]:
    """Layers named by convention, without shapes yet."""
    from open_clip.modified_resnet import ModifiedResNet  # lazy: open_clip takes seconds to import
    from open_clip.transformer import VisionTransformer  # lazy: open_clip takes seconds to import

    visual = model.visual
    found: List[dict] = []
    if isinstance(visual, ModifiedResNet):
        found.append(dict(name="image_stem", module="visual.avgpool", hook="visual.avgpool",
                          capture=CAPTURE_OUTPUT, description="stem output"))
        for stage in range(1, 5):
            blocks = getattr(visual, f"layer{stage}")
            for block in range(len(blocks)):
                path = f"visual.layer{stage}.{block}"
                short = f"image_block_{stage}_{block}"
                found.append(dict(name=short, module=path, hook=f"{path}.act3", capture=CAPTURE_INPUT,
                                  aliases=(f"{short}_Add_6_0",),
                                  description="residual sum before the block's final ReLU"))
                found.append(dict(name=f"{short}_relu", module=f"{path}.act3", hook=path, capture=CAPTURE_OUTPUT,
                                  description="block output after its final ReLU"))
        found.append(dict(name="image_embedding", module="visual.attnpool", hook="visual.attnpool",
                          capture=CAPTURE_OUTPUT, aliases=("image_attnpool",),
                          description="attention-pool output (image embedding)"))
    elif isinstance(visual, VisionTransformer):
        for index in range(len(visual.transformer.resblocks)):
            path = f"visual.transformer.resblocks.{index}"
            found.append(dict(name=f"image_resblock_{index}", module=path, hook=path, capture=CAPTURE_OUTPUT,
                              description="patch tokens after the residual block"))
        found.append(dict(name="image_embedding", module="visual", hook="visual", capture=CAPTURE_OUTPUT,
                          description="image embedding"))
    else:
        found.append(dict(name="image_embedding", module="visual", hook="visual", capture=CAPTURE_OUTPUT,
                          description="image embedding"))
    return found


class LayerRegistry(LayerTable):
    """The addressable layers of one loaded model, with shapes measured by one forward pass; any other
    module of the image tower resolves by its dotted path (its output, measured on first use)."""

    def __init__(self, model: torch.nn.Module, image_size: int, device: torch.device):
        self._model = model
        self._modules = dict(model.named_modules())
        self._image_size = image_size
        self._device = device
        super().__init__(self._measure(_candidate_layers(model)), fallback=self._measure_module)

    def _measure(self, candidates: Sequence[dict]) -> List[LayerSpec]:

        shapes: Dict[str, tuple] = {}
        order: Dict[str, int] = {}
        handles = []

        def make_hook(entry):
            def record(tensor):
                mapped = to_feature_map(tensor, self._model, entry["hook"])
                shapes[entry["name"]] = tuple(mapped.shape[1:])
                order.setdefault(entry["name"], len(order))
            if entry["capture"] == CAPTURE_INPUT:
                return lambda module, args: record(args[0])
            return lambda module, args, output: record(output)

        try:
            for entry in candidates:
                module = self._modules[entry["hook"]]
                if entry["capture"] == CAPTURE_INPUT:
                    handles.append(module.register_forward_pre_hook(make_hook(entry)))
                else:
                    handles.append(module.register_forward_hook(make_hook(entry)))
            probe = torch.zeros(1, 3, self._image_size, self._image_size, device=self._device)
            with torch.no_grad():
                self._model.visual(probe)
        finally:
            for handle in handles:
                handle.remove()
        specs = []
        for entry in candidates:
            shape = shapes[entry["name"]]
            channels, height, width = (shape + (1, 1))[:3] if len(shape) == 1 else shape
            specs.append(LayerSpec(name=entry["name"], module=entry["module"], hook_module=entry["hook"],
                                   capture=entry["capture"], channels=int(channels), height=int(height),
                                   width=int(width), aliases=tuple(entry.get("aliases", ())),
                                   description=entry.get("description", ""), order=order[entry["name"]]))
        return specs

    def _measure_module(self, path: str) -> Optional[LayerSpec]:
        if path not in self._modules:
            return None
        return self._measure([dict(name=path, module=path, hook=path, capture=CAPTURE_OUTPUT,
                                   description="module output")])[0]


def registry_for(clip) -> LayerTable:
    """The (memoized) layer table of a LoadedClip (measured on first use), or the one a model card brought."""
    if clip._layers is None:
        clip._layers = LayerRegistry(clip.model, clip.image_size, clip.device)
    return clip._layers
