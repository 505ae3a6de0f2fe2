"""The SAE records: sparse autoencoders trained for one (weights, layer), kept beside the cache in SAELens's
layout (neurolens.sae.io writes and reads the files, weights first):

    sae/<fp>/<layer>/<name>/cfg.json                  architecture, sizes, metadata (model, layer, quality)
    sae/<fp>/<layer>/<name>/sae_weights.safetensors   W_enc, b_enc, W_dec, b_dec

<fp> is the weights fingerprint's first 16 hex digits; <name> is what `--sae NAME` names. A folder counts
as a saved SAE only when both files are there and its name is a usable name (hidden `.<name>.<tag>.tmp`
folders are an SAE being written: neurolens.sae.io swaps them in whole).

The cfg.json format is read here too (`read_config`, `check_config`): configs come from strangers (SAEs
made elsewhere, caches exchanged), so every field neurolens uses is checked (types; d_in, d_sae, k,
expansion_factor finite whole numbers within sane sizes; metadata and its quality report objects of
numbers) and the first bad one is named in one line. neurolens.sae.io reads the weights.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Tuple

from ..errors import NeurolensError
from ..storage.cache import Cache

KIND = "sae"
CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
PRISMA_CFG_NAME = "config.json"
MAX_CONFIG_BYTES = 16 * 2 ** 20    # a cfg.json is a few KB; a larger one is not read
# sane sizes: the widest CLIP layer has 8192 channels, the largest published SAEs about 16M features
MAX_SIZES = {"d_in": 2 ** 20, "d_sae": 2 ** 27, "k": 2 ** 27, "expansion_factor": 2 ** 16}


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
    """Names of the complete SAEs of one (weights, layer), sorted (a hidden staging folder is not one)."""
    folder = layer_folder(cache, fingerprint, layer)
    if not folder.is_dir():
        return []
    return sorted(entry.name for entry in folder.iterdir()
                  if NAME_PATTERN.match(entry.name) and entry.is_dir() and is_complete(entry))


@dataclass
class TrainedSae:
    """An SAE trained for a (weights, layer) of the cache, as its cfg.json describes it (no weights read)."""
    name: str
    features: Optional[int]
    k: Optional[int]
    quality: Optional[dict]
    unreadable: Optional[str] = None       # why its cfg.json is not usable (listed so, never a 500)


def trained_saes(cache: Cache, fingerprint: str, layer: str) -> List[TrainedSae]:
    """The complete SAEs of one (weights, layer), from their cfg.json (every value checked by check_config; a
    bad one is listed with its reason)."""
    found = []
    for name in saved_names(cache, fingerprint, layer):
        try:
            config = read_config(layer_folder(cache, fingerprint, layer) / name)
        except NeurolensError as exc:
            found.append(TrainedSae(name, None, None, None, unreadable=str(exc)))
            continue
        info = (config.get("metadata") or {}).get("neurolens") or {}
        found.append(TrainedSae(name, config.get("d_sae"), config.get("k"), info.get("quality")))
    return found


def find_files(path: str | os.PathLike) -> Tuple[Path, Path, str]:
    """(config file, weights file, layout 'saelens' | 'prisma') for a folder or a weights file."""
    path = Path(path)
    if not path.exists():
        raise NeurolensError(f"no SAE at {path}: the path does not exist")
    folder = path if path.is_dir() else path.parent
    if path.is_file():
        weights = path
    else:
        candidates = [folder / WEIGHTS_NAME] + sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.pt"))
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise NeurolensError(f"no SAE weights in {folder}: expected {WEIGHTS_NAME} (SAELens) or a .pt/"
                                 f".safetensors state dict next to config.json (Prisma)")
        weights = found[0]
    if (folder / CFG_NAME).is_file():
        return folder / CFG_NAME, weights, "saelens"
    if (folder / PRISMA_CFG_NAME).is_file():
        return folder / PRISMA_CFG_NAME, weights, "prisma"
    raise NeurolensError(f"no SAE config next to {weights}: expected {CFG_NAME} (SAELens) or "
                         f"{PRISMA_CFG_NAME} (Prisma) in {folder}")


def read_cfg_file(cfg_path: Path) -> dict:
    """A config file's JSON object, checked (check_config), or one NeurolensError line."""
    try:
        if cfg_path.stat().st_size > MAX_CONFIG_BYTES:
            raise NeurolensError(f"the SAE config {cfg_path} is over {MAX_CONFIG_BYTES // 2 ** 20} MB; a cfg.json "
                                 f"is a few KB: check the file")
        raw_cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise NeurolensError(f"cannot read the SAE config {cfg_path} ({exc}); it must be a JSON object") from None
    return check_config(raw_cfg, str(cfg_path))


def check_config(cfg: Any, source: str) -> dict:
    """`cfg` as read from an SAE's cfg.json / config.json, with every field neurolens uses checked, or a
    NeurolensError naming the first bad one (module docstring)."""
    def bad(field: str, value: Any, wanted: str) -> NeurolensError:
        shown = json.dumps(value, default=str)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        return NeurolensError(f"the SAE config {source} is not usable: {field} is {shown}, expected {wanted}; fix "
                              f"the file or replace the SAE")
    if not isinstance(cfg, dict):
        raise bad("the file", cfg, "a JSON object")
    kwargs = cfg.get("activation_fn_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise bad("activation_fn_kwargs", kwargs, "an object")
    sizes = [(name, cfg.get(name)) for name in MAX_SIZES] + [("activation_fn_kwargs.k", (kwargs or {}).get("k"))]
    for name, value in sizes:
        limit = MAX_SIZES[name.rpartition(".")[2]]
        if value is None:
            continue
        integral = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value == int(value))
        if isinstance(value, bool) or not integral or not 1 <= value <= limit:
            raise bad(name, value, f"a whole number from 1 to {limit}")
    for name in ("architecture", "activation_fn", "activation_fn_str", "dtype", "model_name", "hook_name",
                 "hook_point"):
        if cfg.get(name) is not None and not isinstance(cfg[name], str):
            raise bad(name, cfg[name], "a string")
    if not isinstance(cfg.get("normalize_activations"), (str, bool, type(None))):
        raise bad("normalize_activations", cfg["normalize_activations"], "a string")
    if not isinstance(cfg.get("apply_b_dec_to_input", True), (bool, int)) or \
            isinstance(cfg.get("apply_b_dec_to_input"), float):
        raise bad("apply_b_dec_to_input", cfg["apply_b_dec_to_input"], "true or false")
    metadata = cfg.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise bad("metadata", metadata, "an object")
    ours = (metadata or {}).get("neurolens")
    if ours is not None and not isinstance(ours, dict):
        raise bad("metadata.neurolens", ours, "an object")
    quality = (ours or {}).get("quality")
    if quality is not None and not isinstance(quality, dict):
        raise bad("metadata.neurolens.quality", quality, "an object")
    for name, value in (quality or {}).items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise bad(f"metadata.neurolens.quality.{name}", value, "a number")
    return cfg


def read_config(path: str | os.PathLike) -> dict:
    """The cfg.json / config.json of an SAE folder (for listings), without the weights, checked (check_config);
    NeurolensError (one line) when it is missing, unreadable or not usable."""
    cfg_path, _, _ = find_files(path)
    return read_cfg_file(cfg_path)
