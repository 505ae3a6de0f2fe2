"""The model, cache-or-compute: a cached answer needs no model.

`load_model` reads the request's model card (neurolens.records.models): when the weights' identity still
matches it, it returns a LazyClip, which has every attribute a pipeline's cache lookup reads (name,
pretrained, fingerprint, image size, mean/std, device, notes, the layer table) without importing open_clip
or building anything; the model itself (`.model`, `.tokenizer`, anything else of LoadedClip) is loaded on
first touch, with a note through `announce`. Without a matching card the model is loaded now and its card
written, so the next request is answered from the card.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..errors import NeurolensError
from ..models import build
from ..models.build import LoadedClip, resolve_device
from ..models.identity import model_request
from ..models.layers import LayerTable, registry_for
from ..models.names import DEFAULT_MODEL, DEFAULT_PRETRAINED
from ..records.keys import as_cache
from ..records.models import ModelCard, card_from_clip, read_card, write_card
from ..types import LayerSpec

Announce = Optional[Callable[[str], None]]


class LazyClip:
    """A LoadedClip whose model loads on first use (module docstring); `loaded` says whether it has."""

    def __init__(self, card: ModelCard, device: str = "auto", announce: Announce = None):
        self.card = card
        self.name, self.pretrained, self.fingerprint = card.name, card.pretrained, card.fingerprint
        self.image_size, self.mean, self.std, self.notes = card.image_size, card.mean, card.std, card.notes
        self.weights_file, self.weights_source = card.weights_file, dict(card.weights_source)
        self.device = resolve_device(device)
        self._device_name = device
        self._announce = announce
        self._clip: Optional[LoadedClip] = None
        self._layers = LayerTable(card.layers, fallback=self._measure)

    @property
    def loaded(self) -> bool:
        return self._clip is not None

    def load(self) -> LoadedClip:
        """The LoadedClip (loaded now if it was not); its weights must be the card's."""
        if self._clip is None:
            if self._announce is not None:
                self._announce(f"loading {self.name} ({self.pretrained}): the cache does not hold all of this answer")
            request = self.card.request
            clip = build.load_clip(model=request["model"], pretrained=request["pretrained"],
                             checkpoint=request["checkpoint"], device=self._device_name)
            if clip.fingerprint != self.fingerprint:
                raise NeurolensError(f"the weights of {self.name} changed while neurolens was using them (fingerprint "
                                     f"{clip.fingerprint[:16]}, not {self.fingerprint[:16]}); run the command again")
            self._clip = clip
        return self._clip

    @property
    def model(self) -> torch.nn.Module:
        return self.load().model

    @property
    def tokenizer(self) -> Callable:
        return self.load().tokenizer

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return LoadedClip.normalize(self, images)      # mean/std only: no model needed

    def _measure(self, name: str) -> Optional[LayerSpec]:
        """A module path the card's table does not hold: measured on the loaded model."""
        return registry_for(self.load()).resolve(name)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.load(), name)

    def __repr__(self) -> str:
        state = "loaded" if self.loaded else "not loaded"
        return f"LazyClip({self.name}, {self.pretrained}, fingerprint {self.fingerprint[:16]}, {state})"


def load_model(model: str = DEFAULT_MODEL, pretrained: str = DEFAULT_PRETRAINED, checkpoint: Optional[str] = None,
               device: str = "auto", cache=None, announce: Announce = None):
    """A LazyClip from the request's model card when its weights' identity matches (no model loaded), else the
    LoadedClip, loaded now, with its card written to `cache` (a Cache, a folder, or None: the default)."""
    cache = as_cache(cache)
    request = model_request(model, pretrained, checkpoint)
    card = read_card(cache, request)
    if card is not None:
        return LazyClip(card, device, announce)
    clip = build.load_clip(model=model, pretrained=pretrained, checkpoint=checkpoint, device=device)
    write_card(cache, card_from_clip(request, clip, registry_for(clip).layers))
    return clip
