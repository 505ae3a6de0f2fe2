"""How `--sae NAME_OR_PATH` finds an SAE: a name of an SAE trained for this model and layer (kept beside the
cache, keyed by the weights fingerprint and the layer: neurolens.records.sae), else an existing path, read as
an SAE folder (or weights file) made anywhere, SAELens's or Prisma's included."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Tuple

from ..errors import NeurolensError
from ..records.keys import as_cache
from ..records.sae import NAME_PATTERN, is_complete, saved_names, sae_folder


def list_saes(clip, layer: str, cache=None) -> List[str]:
    """Names of the finished SAEs of this model and layer."""
    return saved_names(as_cache(cache), clip.fingerprint, layer)


def locate(clip, layer: str, sae: str, cache=None) -> Tuple[Path, str, bool]:
    """(path, name, made here?) of `--sae NAME_OR_PATH`: a name of an SAE trained for this model and layer, else
    an existing path (a folder in the working directory that happens to carry the name does not shadow it)."""
    text = str(sae)
    path = Path(text).expanduser()
    looks_like_path = os.sep in text or text.startswith(".") or path.suffix in (".safetensors", ".pt")
    if not looks_like_path and NAME_PATTERN.match(text):
        folder = sae_folder(as_cache(cache), clip.fingerprint, layer, text)
        if is_complete(folder):
            return folder, text, True
    if path.exists():
        name = path.name if path.is_dir() else path.parent.name
        return path, _display_name(name), False
    if looks_like_path or not NAME_PATTERN.match(text):
        raise NeurolensError(f"no SAE at {text}: the path does not exist (give an SAE folder with cfg.json, or a "
                             f"name from `neurolens sae list`)")
    folder = sae_folder(as_cache(cache), clip.fingerprint, layer, text)
    known = list_saes(clip, layer, cache)
    hint = f"SAEs of this model and layer: {', '.join(known)}" if known else \
        f"none is trained for this model and layer yet; run `neurolens sae train --layer {layer} ...`"
    raise NeurolensError(f"no SAE named {text!r} for layer {layer} of {clip.name} in {folder.parent}; {hint}")


def _display_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip("._-")
    return cleaned or "external"
