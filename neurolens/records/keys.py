"""What every record key and folder shares: the neurons' basis id, a basis as keys see it, and the cache.

A basis (neurolens.sae.basis) is the layer's neurons or the features of one SAE. Records of the neurons keep
the keys they had before bases existed (nothing is added to their key); a record of another basis adds its
id (`basis_parts`) and says whose units it holds in its `basis` attr (`basis_id`; absent = the neurons).
Likewise a record computed from images decoded by PIL keeps its key, and one decoded by another decoder adds
the decoder's name after the basis id (`decoder_parts`).
"""
from __future__ import annotations

import os
from typing import Union

from ..storage.cache import Cache

NEURONS = "neurons"      # the basis id of a layer's own channels


def as_basis(basis):
    """None for the neurons (None, or a basis whose id is the neurons'), else the basis itself."""
    return None if basis is None or getattr(basis, "id", NEURONS) == NEURONS else basis


def basis_id(basis) -> str:
    """The id a record's `basis` attr holds: NEURONS for None or the neurons, else the basis's id."""
    return NEURONS if basis is None else str(getattr(basis, "id", NEURONS))


def basis_parts(basis) -> list:
    """Extra key parts: none for the neurons (their keys stay what they always were), [basis id] otherwise."""
    basis = as_basis(basis)
    return [] if basis is None else [basis.id]


def decoder_parts(decoder: str) -> list:
    """Extra key parts for the image decoder (neurolens.datasets.decode.DECODERS, resolved): none for "pil", which
    every record was made with before `--decode` existed (their keys stay what they were), [decoder] otherwise."""
    return [] if decoder == "pil" else [str(decoder)]


def as_cache(cache: Union[Cache, str, os.PathLike, None]) -> Cache:
    """A Cache from a Cache, a folder, or None (the default cache: $NEUROLENS_CACHE or outputs/cache)."""
    return cache if isinstance(cache, Cache) else Cache(cache)
