"""The model card record: what a full load of one model request found out, so that a cached answer needs no
model (neurolens.pipelines.model reads it before loading anything).

    model-card/<request key>.h5       no arrays; attrs:
        version, request {model, pretrained, checkpoint} (files as absolute paths),
        identity   the weights' identity when the card was written (neurolens.models.identity: the weights
                   file's path, size, mtime_ns and partial hash, or the seed, config and package versions of
                   random weights; the torch and open_clip versions either way)
        fingerprint, name, pretrained, image_size, mean, std, notes, weights_file, weights_source
        layers     the layer table: every LayerSpec as a dict (models.layers)

The request key hashes the request only; the identity is checked on every read (one stat and at most 2 MiB
read of the weights file; for a pretrained tag also where its hub source resolves now), and a card whose
identity does not match is never used: the model is loaded again and the card rewritten.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..errors import NeurolensError
from ..models.identity import file_identity, package_versions, weights_identity
from ..models.pretrained import cached_tag_file
from ..storage.cache import Cache, Record, safe_segment, settings_key
from ..types import LayerSpec

KIND = "model-card"
CARD_VERSION = 1


@dataclass(frozen=True)
class ModelCard:
    """What pipelines read of a model without loading it (the fields of LoadedClip that are not the model)."""
    request: Dict[str, Optional[str]]
    identity: Dict[str, Any]
    fingerprint: str
    name: str
    pretrained: str
    image_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    layers: Tuple[LayerSpec, ...]
    notes: Tuple[str, ...] = ()
    weights_file: Optional[str] = None
    weights_source: Dict[str, str] = dataclasses.field(default_factory=dict)


def card_path(cache: Cache, request: Dict[str, Optional[str]]) -> Path:
    return cache.root / KIND / f"{safe_segment(settings_key(KIND, CARD_VERSION, request))}.h5"


def card_from_clip(request: Dict[str, Optional[str]], clip, layers) -> ModelCard:
    """The card of a loaded model (a LoadedClip and its layer table's LayerSpecs)."""
    identity = weights_identity(clip.name, clip.weights_file, clip.weights_source)
    return ModelCard(request=dict(request), identity=identity, fingerprint=clip.fingerprint, name=clip.name,
                     pretrained=clip.pretrained, image_size=int(clip.image_size), mean=tuple(float(v) for v in clip.mean),
                     std=tuple(float(v) for v in clip.std), layers=tuple(layers), notes=tuple(clip.notes),
                     weights_file=clip.weights_file, weights_source=dict(clip.weights_source))


def write_card(cache: Cache, card: ModelCard) -> Optional[Path]:
    """Write the card; a cache that cannot be written (read-only, full) only means no card: None."""
    attrs = dataclasses.asdict(card)
    attrs["version"] = CARD_VERSION
    try:
        return cache.write(card_path(cache, card.request), Record(attrs=attrs))
    except (NeurolensError, OSError):
        return None


def read_card(cache: Cache, request: Dict[str, Optional[str]]) -> Optional[ModelCard]:
    """The card of `request` when there is one and the weights' identity still matches it, else None."""
    record = cache.read(card_path(cache, request))
    if record is None:
        return None
    attrs = record.attrs
    try:
        if attrs.get("version") != CARD_VERSION or attrs.get("request") != dict(request):
            return None
        card = ModelCard(
            request=attrs["request"], identity=attrs["identity"], fingerprint=str(attrs["fingerprint"]),
            name=str(attrs["name"]), pretrained=str(attrs["pretrained"]), image_size=int(attrs["image_size"]),
            mean=tuple(float(v) for v in attrs["mean"]), std=tuple(float(v) for v in attrs["std"]),
            layers=tuple(_layer_spec(layer) for layer in attrs["layers"]), notes=tuple(attrs.get("notes") or ()),
            weights_file=attrs.get("weights_file"), weights_source=dict(attrs.get("weights_source") or {}))
    except (KeyError, TypeError, ValueError):
        return None
    return card if identity_matches(card) else None


def identity_matches(card: ModelCard) -> bool:
    """True when the weights are still those the card was written for (module docstring)."""
    identity = card.identity
    if identity.get("kind") != "file":
        return identity == weights_identity(card.name, None)
    stored = identity.get("file") or {}
    if identity.get("packages") != package_versions() or not stored.get("path"):
        return False
    if file_identity(stored["path"]) != stored:
        return False
    source = identity.get("source") or {}
    if not source:
        return True
    now = cached_tag_file(source)       # the hub keeps a snapshot link to the blob the card names
    return now is not None and str(Path(now).resolve()) == stored["path"]


def _layer_spec(values: Dict[str, Any]) -> LayerSpec:
    values = dict(values)
    values["aliases"] = tuple(values.get("aliases") or ())
    return LayerSpec(**values)
