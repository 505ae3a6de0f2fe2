"""The SAE records: sparse autoencoders trained for one (weights, layer), kept beside the cache in SAELens's
layout (neurolens.sae.io writes and reads the files, weights first):

    sae/<fp>/<layer>/<name>/cfg.json                  architecture, sizes, metadata (model, layer, quality)
    sae/<fp>/<layer>/<name>/sae_weights.safetensors   W_enc, b_enc, W_dec, b_dec

<fp> is the weights fingerprint's first 16 hex digits; <name> is what `--sae NAME` names. A folder counts
as a saved SAE only when both files are there and its name is a usable name (hidden `.<name>.<tag>.tmp`
folders are an SAE being written: neurolens.sae.io swaps them in whole).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List

from ..errors import NeurolensError
from ..storage.cache import Cache

KIND = "sae"
CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(str(name)):
        raise NeurolensError(f"SAE name {name!r} is not usable: use letters, digits, '.', '_' and '-' "
                             f"(at most 100), starting with a letter or digit")
    return str(name)


def layer_folder(cache: Cache, fingerprint: str, layer: str) -> Path:
    """The folder of every SAE of one (weights, layer)."""
    return cache.folder(KIND, fingerprint, layer)


def sae_folder(cache: Cache, fingerprint: str, layer: str, name: str) -> Path:
    return layer_folder(cache, fingerprint, layer) / check_name(name)


def is_complete(folder: Path) -> bool:
    return (Path(folder) / CFG_NAME).is_file() and (Path(folder) / WEIGHTS_NAME).is_file()


def saved_names(cache: Cache, fingerprint: str, layer: str) -> List[str]:
    """Names of the complete SAEs of one (weights, layer), sorted."""
    folder = layer_folder(cache, fingerprint, layer)
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir()
                  if NAME_PATTERN.match(entry.name) and entry.is_dir() and is_complete(entry))   # no staging folder
