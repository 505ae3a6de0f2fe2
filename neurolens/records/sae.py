"""The SAE records: sparse autoencoders trained for one (weights, layer), kept beside the cache in SAELens's
layout (neurolens.sae.io writes and reads the files, weights first):

    sae/<fp>/<layer>/<name>/cfg.json                  architecture, sizes, metadata (model, layer, quality)
    sae/<fp>/<layer>/<name>/sae_weights.safetensors   W_enc, b_enc, W_dec, b_dec

<fp> is the weights fingerprint's first 16 hex digits; <name> is what `--sae NAME` names. A folder counts
as a saved SAE only when both files are there.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

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
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and is_complete(entry))


@dataclass
class TrainedSae:
    """An SAE trained for a (weights, layer) of the cache, as its cfg.json describes it (no weights read)."""
    name: str
    features: Optional[int]
    k: Optional[int]
    quality: Optional[dict]


def trained_saes(cache: Cache, fingerprint: str, layer: str) -> List[TrainedSae]:
    """The complete SAEs of one (weights, layer), from their cfg.json; a folder whose cfg.json is not a JSON
    object is left out."""
    folder = layer_folder(cache, fingerprint, layer)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        config = _read_json(path / CFG_NAME) if path.is_dir() and is_complete(path) else None
        if config is None:
            continue
        metadata = config.get("metadata")
        info = metadata.get("neurolens") if isinstance(metadata, dict) else None
        info = info if isinstance(info, dict) else {}
        found.append(TrainedSae(path.name, _int_or_none(config.get("d_sae")), _int_or_none(config.get("k")),
                                info.get("quality") if isinstance(info.get("quality"), dict) else None))
    return found


def _read_json(path: Path) -> Optional[dict]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _int_or_none(value) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
