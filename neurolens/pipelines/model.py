"""The model, cache-or-compute: a cached answer needs no model.

`load_model` reads the request's model card (neurolens.records.models): when the weights' identity still
matches it, it returns a LazyClip, which has every attribute a pipeline's cache lookup reads (name,
pretrained, fingerprint, image size, mean/std, device, notes, the layer table) without importing open_clip
or building anything; the model itself (`.model`, `.tokenizer`, anything else of LoadedClip) is loaded on
first touch, with a note through `announce`. Without a matching card the model is loaded now and its card
written, so the next request is answered from the card.

This module imports no torch: a LazyClip on the CPU (`device="cpu"`) answers a cached request without it;
torch comes with the first thing that needs it (the model, a torch.device for "auto" or "cuda", normalize).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from ..errors import NeurolensError
from ..models.devices import auto_device_name
from ..models.identity import model_request
from ..models.layer_table import LayerTable
from ..models.names import DEFAULT_MODEL, DEFAULT_PRETRAINED
from ..records.keys import as_cache
from ..records.models import ModelCard, card_from_clip, read_card, write_card
from ..types import LayerSpec

if TYPE_CHECKING:
    from ..models.build import LoadedClip

Announce = Optional[Callable[[str], None]]
CPU = "cpu"


class LazyClip:
    """A LoadedClip whose model loads on first use (module docstring); `loaded` says whether it has."""

    def __init__(self, card: ModelCard, device: str = "auto", announce: Announce = None):
        self.card = card
        self.name, self.pretrained, self.fingerprint = card.name, card.pretrained, card.fingerprint
        self.image_size, self.mean, self.std, self.notes = card.image_size, card.mean, card.std, card.notes
        self.weights_file, self.weights_source = card.weights_file, dict(card.weights_source)
        device = auto_device_name(device)       # "auto" without a GPU on the machine: CPU, without torch
        self._device_name = device
        self._device = None if device == CPU else _torch_device(device)   # checks the name (one line if bad)
        self._announce = announce
        self._clip: Optional[LoadedClip] = None
        self._layers = LayerTable(card.layers, fallback=self._measure)

    @property
    def device(self):
        """The torch.device (torch is imported here for a CPU LazyClip: only compute needs it)."""
        if self._device is None:
            self._device = _torch_device(self._device_name)
        return self._device

    @property
    def device_type(self) -> str:
        """"cpu" or "cuda", without torch for device="cpu" (what cache keys depend on: precision, decoder)."""
        return CPU if self._device_name == CPU else self.device.type

    def layer_table(self) -> LayerTable:
        """The card's layer table (a module path it lacks is measured on the model, loaded then)."""
        return self._layers

    @property
    def loaded(self) -> bool:
        return self._clip is not None

    def load(self) -> LoadedClip:
        """The LoadedClip (loaded now if it was not); its weights must be the card's."""
        if self._clip is None:
            if self._announce is not None:
                self._announce(f"loading {self.name} ({self.pretrained}): the cache does not hold all of this answer")
            request = self.card.request
            from ..models.build import load_clip  # lazy: torch and open_clip only when the cache lacks the answer
            clip = load_clip(model=request["model"], pretrained=request["pretrained"],
                             checkpoint=request["checkpoint"], device=self._device_name)
            if clip.fingerprint != self.fingerprint:
                raise NeurolensError(f"the weights of {self.name} changed while neurolens was using them (fingerprint "
                                     f"{clip.fingerprint[:16]}, not {self.fingerprint[:16]}); run the command again")
            self._clip = clip
        return self._clip

    @property
    def model(self):
        return self.load().model

    @property
    def tokenizer(self) -> Callable:
        return self.load().tokenizer

    def normalize(self, images):
        from ..models.build import LoadedClip  # lazy: a tensor is given, so torch is imported already
        return LoadedClip.normalize(self, images)      # mean/std only: no model needed

    def _measure(self, name: str) -> Optional[LayerSpec]:
        """A module path the card's table does not hold: measured on the loaded model."""
        return self.load().layer_table().resolve(name)

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
    from ..models.build import load_clip  # lazy: torch and open_clip only when no card answers
    clip = load_clip(model=model, pretrained=pretrained, checkpoint=checkpoint, device=device)
    write_card(cache, card_from_clip(request, clip, clip.layer_table().layers))
    return clip


def _torch_device(name: str):
    from ..models.build import resolve_device  # lazy: "auto" and "cuda" ask torch; a CPU answer does not
    return resolve_device(name)
