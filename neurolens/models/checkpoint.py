"""Weights files: the one reader (read_checkpoint) and writer (save_checkpoint) of neurolens.

Weights are never unpickled as arbitrary objects: every file that becomes weights (--checkpoint, a file
given as --pretrained, a tag's cached or downloaded file) goes through read_checkpoint: .pt/.bin/.pth through
torch.load(weights_only=True), .safetensors through safetensors; TorchScript archives are refused; open_clip
never opens a weights file itself. A config carried by a checkpoint is registered under a neurolens-made name
(sanitized name + config hash) and never replaces an open_clip config.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..errors import NeurolensError
from ..storage.files import write_bytes
from .pretrained import is_torchscript_archive

_OPEN_CLIP_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def _refusal_reason(exc: Exception) -> str:
    """torch's weights_only refusal (a page of advice) as one short reason."""
    text = str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it asks to run the Python object {found.group(1)}"
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
    line = (found.group(1) if found else text).strip().splitlines()
    return " ".join(line[:1])[:200] or type(exc).__name__


def read_checkpoint(path: str | os.PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state_dict, metadata) from a .safetensors file or a torch file holding only tensors and plain data.

    This is the one reader of weights files: torch files go through torch.load(weights_only=True), so a
    pickle that asks to run code is refused before anything runs."""
    path = Path(path)
    if not path.is_file():
        raise NeurolensError(f"checkpoint {path} does not exist; give the path of a .pt, .bin or .safetensors file")
    meta: Dict[str, Any] = {}
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path), device="cpu")
            with safe_open(str(path), framework="pt") as handle:
                raw = handle.metadata() or {}
        except Exception as exc:  # safetensors raises several types for a bad header
            raise NeurolensError(f"checkpoint {path} is not a readable safetensors file ({exc})") from None
        if "neurolens" in raw:
            try:
                meta = json.loads(raw["neurolens"])
            except ValueError:
                meta = None
            if not isinstance(meta, dict):
                raise NeurolensError(f"checkpoint {path} has unreadable neurolens metadata (not a JSON object); "
                                     f"save it again with neurolens.models.checkpoint.save_checkpoint")
        return state, meta
    if is_torchscript_archive(path):
        raise NeurolensError(
            f"checkpoint {path} is a TorchScript archive (like OpenAI's original CLIP .pt files), which neurolens "
            f"does not load; use the open_clip tag (its weights come as a plain state dict) or convert the file "
            f"to a state dict or .safetensors")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # pickle-protocol notes; the refusal itself is the exception
            blob = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise NeurolensError(
            f"checkpoint {path} could not be read as plain tensors ({_refusal_reason(exc)}; neurolens loads "
            f"weights with weights_only=True and never runs code from a checkpoint); "
            f"convert it to a state dict or .safetensors"
        ) from None
    if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict):
        meta = {k: v for k, v in blob.items() if k != "state_dict"}
        state = blob["state_dict"]
    elif isinstance(blob, dict) and isinstance(blob.get("model"), dict):
        state = blob["model"]
    elif isinstance(blob, dict):
        state = blob
    else:
        raise NeurolensError(f"checkpoint {path} holds a {type(blob).__name__}, not a state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()
             if isinstance(v, torch.Tensor)}
    return state, meta


def checkpoint_model_name(claimed: Any, config_json: str) -> str:
    """The name a checkpoint's config is registered under: its claimed name reduced to [A-Za-z0-9._-] (no
    path can come out of it) plus a hash of the config, so it can never replace another config."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", claimed if isinstance(claimed, str) else "")
    safe = safe.strip(".-")[:48].strip(".-") or "checkpoint"
    return f"{safe}-cfg{hashlib.sha256(config_json.encode()).hexdigest()[:12]}"


def register_checkpoint_config(meta: Dict[str, Any], source: str | os.PathLike) -> Optional[str]:
    """The open_clip model name for a checkpoint that carries its config (toy models do), or None.

    A config equal to the one open_clip already has under the claimed name is used under that name.
    Any other is registered under checkpoint_model_name(): written only inside a private temporary folder
    (removed right after open_clip has read it), never over an existing config."""
    config = meta.get("model_config")
    if config is None:
        return None
    if not isinstance(config, dict) or not all(key in config for key in _OPEN_CLIP_CONFIG_KEYS):
        raise NeurolensError(f"checkpoint {source} carries a model_config that is not an open_clip config "
                             f"(it needs {', '.join(_OPEN_CLIP_CONFIG_KEYS)}); save it with its model's config")
    try:
        config_json = json.dumps(config, sort_keys=True)
    except (TypeError, ValueError):
        raise NeurolensError(f"checkpoint {source} carries a model_config that is not plain JSON data; "
                             f"save it with its model's config") from None
    config = json.loads(config_json)
    import open_clip  # lazy: open_clip takes seconds to import; only a checkpoint with its config needs it
    claimed = meta.get("model_name")
    if isinstance(claimed, str) and claimed in open_clip.list_models() and open_clip.get_model_config(claimed) == config:
        return claimed
    name = checkpoint_model_name(claimed, config_json)
    if name in open_clip.list_models():
        if open_clip.get_model_config(name) == config:
            return name   # registered earlier in this process
        raise NeurolensError(f"checkpoint {source}: model name {name} is taken by another config; "
                             f"rename the model_name stored in the checkpoint")
    folder = Path(tempfile.mkdtemp(prefix="neurolens-model-config-"))
    try:
        config_path = folder / f"{name}.json"
        if config_path.parent != folder:  # cannot happen: the name holds no path separator
            raise NeurolensError(f"checkpoint {source}: refusing model name {name!r}")
        config_path.write_text(config_json)
        open_clip.add_model_config(config_path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if name not in open_clip.list_models():
        raise NeurolensError(f"checkpoint {source}: open_clip did not accept its model config")
    return name


def save_checkpoint(clip: torch.nn.Module, path: str | os.PathLike, model_name: str,
                    model_config: Optional[Dict[str, Any]] = None, extra: Optional[Dict[str, Any]] = None,
                    option: str = "--out") -> Path:
    """Save a state dict that load_clip(checkpoint=...) reads with weights_only=True; carries its config.
    Written atomically (neurolens.storage.files); `option` is what a failed write tells the user to change."""
    path = Path(path)
    blob: Dict[str, Any] = {"state_dict": {k: v.detach().cpu() for k, v in clip.state_dict().items()},
                            "model_name": model_name}
    if model_config is not None:
        blob["model_config"] = model_config
    if extra:
        blob.update(extra)
    # serialized in memory first: torch's zip writer turns a failing disk into an opaque RuntimeError
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    write_bytes(path, buffer.getbuffer(), option)
    return path
