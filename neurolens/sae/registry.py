"""Where SAEs live: next to the cache, keyed by the model fingerprint and the layer,

    <cache root>/sae/<model fingerprint[:16]>/<layer>/<name>/cfg.json, sae_weights.safetensors

and how `--sae NAME_OR_PATH` finds one: an existing path is read as an SAE folder (or weights file) made
anywhere, SAELens's or Prisma's included; anything else is a name under this model and layer."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Tuple, Union

from ..errors import NeurolensError
from ..storage.cache import Cache
from .io import CFG_NAME, WEIGHTS_NAME

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
KIND = "sae"


def as_cache(cache: Union[Cache, str, os.PathLike, None]) -> Cache:
    return cache if isinstance(cache, Cache) else Cache(cache)


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(str(name)):
        raise NeurolensError(f"SAE name {name!r} is not usable: use letters, digits, '.', '_' and '-' "
                             f"(at most 100), starting with a letter or digit")
    return str(name)


def layer_folder(cache: Cache, clip, layer: str) -> Path:
    return cache.folder(KIND, clip.fingerprint, layer)


def sae_folder(cache: Cache, clip, layer: str, name: str) -> Path:
    return layer_folder(cache, clip, layer) / check_name(name)


def is_complete(folder: Path) -> bool:
    return (folder / CFG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file()


def list_saes(clip, layer: str, cache=None) -> List[str]:
    """Names of the finished SAEs of this model and layer."""
    folder = layer_folder(as_cache(cache), clip, layer)
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and is_complete(entry))


def locate(clip, layer: str, sae: str, cache=None) -> Tuple[Path, str, bool]:
    """(path, name, made here?) of `--sae NAME_OR_PATH`: a name of an SAE trained for this model and layer, else
    an existing path (a folder in the working directory that happens to carry the name does not shadow it)."""
    text = str(sae)
    path = Path(text).expanduser()
    looks_like_path = os.sep in text or text.startswith(".") or path.suffix in (".safetensors", ".pt")
    if not looks_like_path and NAME_PATTERN.match(text):
        folder = sae_folder(as_cache(cache), clip, layer, text)
        if is_complete(folder):
            return folder, text, True
    if path.exists():
        name = path.name if path.is_dir() else path.parent.name
        return path, _display_name(name), False
    if looks_like_path or not NAME_PATTERN.match(text):
        raise NeurolensError(f"no SAE at {text}: the path does not exist (give an SAE folder with cfg.json, or a "
                             f"name from `neurolens sae list`)")
    folder = sae_folder(as_cache(cache), clip, layer, text)
    known = list_saes(clip, layer, cache)
    hint = f"SAEs of this model and layer: {', '.join(known)}" if known else \
        f"none is trained for this model and layer yet; run `neurolens sae train --layer {layer} ...`"
    raise NeurolensError(f"no SAE named {text!r} for layer {layer} of {clip.name} in {folder.parent}; {hint}")


def _display_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip("._-")
    return cleaned or "external"
