"""Load an open_clip model from a pretrained tag, a local checkpoint, or random weights.

Weights are never unpickled as arbitrary objects: every file that becomes weights (--checkpoint, a file
given as --pretrained, a tag's cached or downloaded file) goes through read_checkpoint: .pt/.bin/.pth through
torch.load(weights_only=True), .safetensors through safetensors; open_clip never opens a weights file itself.
A config carried by a checkpoint is registered under a neurolens-made name (sanitized name + config hash)
and never replaces an open_clip config. Without network and without cached weights the loader fails within
seconds (instead of open_clip's ~46 s of retries) with a line that names the ways out.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import urllib.parse
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..data import MODEL_CONFIGS
from ..errors import NeurolensError, WeightsUnavailableError
from .random_init import recalibrate_batch_norms

DEFAULT_MODEL = "RN50x4"
DEFAULT_PRETRAINED = "openai"
RANDOM_WEIGHTS = "none"
RANDOM_SEED = 0

_CONFIG_DIR = MODEL_CONFIGS
_registered = False


@dataclass
class LoadedClip:
    """A CLIP model ready for inspection, with what every job needs to know about it."""
    model: torch.nn.Module
    name: str
    pretrained: str                     # tag, 'none', or 'checkpoint:<file name>'
    device: torch.device
    image_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    fingerprint: str                    # hash of every weight: cache keys depend on it
    tokenizer: Callable
    notes: Tuple[str, ...] = ()
    _layers: Optional[Any] = field(default=None, repr=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) in [0,1] -> CLIP's input normalization (OpenAI mean/std, not ImageNet's)."""
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std


def register_bundled_configs() -> None:
    """Make the small configs that ship with neurolens (tests, the toy demo) known to open_clip."""
    global _registered
    if _registered:
        return
    import open_clip
    open_clip.add_model_config(_CONFIG_DIR)
    _registered = True


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise NeurolensError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise NeurolensError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device(device)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer (names, shapes, dtypes, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)
        digest.update(tensor.numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet_open_clip():
    """open_clip logs 'initialized randomly' warnings through the root logger; we report our own notes."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


HF_DEFAULT_ENDPOINT = "https://huggingface.co"


def _host_port(url: str, default_scheme: str) -> Optional[Tuple[str, int]]:
    """(host, port) of a URL; a bare 'host:port' counts as default_scheme://host:port."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"{default_scheme}://{url}")
    try:
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _probe_target() -> Tuple[str, int]:
    """Where a download would connect first: the proxy that requests/httpx would use for the hub
    (HTTPS_PROXY / https_proxy, ALL_PROXY, honouring NO_PROXY), else the hub itself (HF_ENDPOINT or
    huggingface.co)."""
    endpoint = os.environ.get("HF_ENDPOINT", "").strip() or HF_DEFAULT_ENDPOINT
    scheme = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}").scheme or "https"
    hub = _host_port(endpoint, "https") or _host_port(HF_DEFAULT_ENDPOINT, "https")
    proxies = urllib.request.getproxies_environment()   # lower-case names win, as in requests and httpx
    proxy = proxies.get(scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass_environment(hub[0], proxies):
        target = _host_port(proxy, "http")
        if target is not None:
            return target
    return hub


def _network_reachable(timeout: float = 2.0) -> bool:
    """One TCP connection to the proxy or hub host (see _probe_target), within `timeout` seconds."""
    host, port = _probe_target()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_file_names(hub: str) -> Tuple[str, List[str]]:
    """(repo id, file names to try) for a tag's 'org/repo/[file]': safetensors first, as open_clip does."""
    repo_id, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
    names = ["open_clip_model.safetensors"]
    if filename:
        stem, suffix = os.path.splitext(filename)
        names = ([f"{stem}.safetensors"] if suffix != ".safetensors" else []) + [filename]
    return repo_id, names + ["open_clip_pytorch_model.bin"]


def _cached_pretrained_file(pretrained_cfg: Dict[str, Any]) -> Optional[str]:
    """The local file of a pretrained tag's weights, if open_clip or huggingface_hub cached it before."""
    hub = pretrained_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache
        repo_id, names = _hub_file_names(hub)
        for name in names:
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = pretrained_cfg.get("url", "")
    if url:
        candidate = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if candidate.is_file() and not _is_torchscript_archive(candidate):
            return str(candidate)
    return None


def _download_pretrained(pretrained_cfg: Dict[str, Any], model_name: str, pretrained: str) -> str:
    """Fetch a tag's weights file (the hub copy when there is one) without loading it: the file is then read
    by read_checkpoint like any other."""
    failures = []
    hub = pretrained_cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import hf_hub_download
        repo_id, names = _hub_file_names(hub)
        for name in names:
            try:
                return hf_hub_download(repo_id=repo_id, filename=name)
            except Exception as exc:  # a missing file, an HTTP error, no network: try the next name
                failures.append(f"{repo_id}/{name}: {type(exc).__name__}")
    url = pretrained_cfg.get("url", "")
    if url:
        from open_clip.pretrained import download_pretrained_from_url
        try:
            return download_pretrained_from_url(url)
        except Exception as exc:
            failures.append(f"{url}: {type(exc).__name__}")
    raise _weights_unavailable(model_name, pretrained, f"the download failed ({'; '.join(failures) or 'no source'})")


def _weights_unavailable(model_name: str, pretrained: str, why: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"cannot load {model_name} weights '{pretrained}': {why}; "
        f"pass --checkpoint PATH to load a local .pt/.bin/.safetensors file, or --pretrained none for random weights"
    )


def _is_torchscript_archive(path: Path) -> bool:
    """OpenAI's original CLIP .pt files are TorchScript archives (code + constants), not state dicts."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


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
        from safetensors import safe_open
        from safetensors.torch import load_file
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
                                     f"save it again with neurolens.models.save_checkpoint")
        return state, meta
    if _is_torchscript_archive(path):
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


_OPEN_CLIP_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


def checkpoint_model_name(claimed: Any, config_json: str) -> str:
    """The name a checkpoint's config is registered under: its claimed name reduced to [A-Za-z0-9._-] (no
    path can come out of it) plus a hash of the config, so it can never replace another config."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", claimed if isinstance(claimed, str) else "")
    safe = safe.strip(".-")[:48].strip(".-") or "checkpoint"
    return f"{safe}-cfg{hashlib.sha256(config_json.encode()).hexdigest()[:12]}"


def _register_checkpoint_config(meta: Dict[str, Any], source: str | os.PathLike) -> Optional[str]:
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
    import open_clip
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


def _fit_state_dict(clip: torch.nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """open_clip's own fix-ups of a state dict before loading (what its load_checkpoint does after reading the
    file): older text-tower key names, scalar vs 1-d logit scale/bias, stale position ids, and positional
    embeddings resized to the model's grid and context length."""
    from open_clip import model as clip_model
    try:
        from open_clip.convert import convert_state_dict  # open_clip >= 3: third-party layouts
        state = convert_state_dict(clip, state)
    except ImportError:
        pass
    if "positional_embedding" in state and not hasattr(clip, "positional_embedding"):
        state = clip_model.convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(clip, key, None)
        if key in state and isinstance(own, torch.Tensor) and own.ndim != state[key].ndim:
            state[key] = state[key].reshape(own.shape)
    if "logit_bias" not in state and getattr(clip, "logit_bias", None) is not None and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    position_ids = "text.transformer.embeddings.position_ids"
    if position_ids in state and position_ids not in clip.state_dict():
        del state[position_ids]
    clip_model.resize_pos_embed(state, clip)
    if hasattr(clip_model, "resize_text_pos_embed"):
        clip_model.resize_text_pos_embed(state, clip)
    return state


def _load_weights(clip: torch.nn.Module, state: Dict[str, torch.Tensor], source: str, model: str) -> None:
    missing, unexpected = clip.load_state_dict(_fit_state_dict(clip, dict(state)), strict=False)
    if missing or unexpected:
        raise NeurolensError(
            f"{source} does not fit {model}: {len(missing)} missing keys "
            f"(e.g. {', '.join(list(missing)[:3]) or '-'}), {len(unexpected)} unexpected "
            f"(e.g. {', '.join(list(unexpected)[:3]) or '-'}); pass the right --model"
        )


def _create_kwargs(create_model: Callable, tag_cfg: Dict[str, Any]) -> Dict[str, Any]:
    """open_clip.create_model options: the tag's QuickGELU and preprocessing, and no sub-tower downloads
    (timm / Hugging Face towers would fetch and load their own weights files; neurolens loads every weight)."""
    import inspect
    kwargs: Dict[str, Any] = {}
    if tag_cfg.get("quick_gelu"):
        kwargs["force_quick_gelu"] = True
    preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode", "fill_color")
                  if tag_cfg.get(k) is not None}
    accepted = inspect.signature(create_model).parameters
    if preprocess and "force_preprocess_cfg" in accepted:
        kwargs["force_preprocess_cfg"] = preprocess
    for flag in ("pretrained_image", "pretrained_text", "pretrained_hf"):
        if flag in accepted:
            kwargs[flag] = False
    return kwargs


def load_clip(
    model: str = DEFAULT_MODEL,
    pretrained: str = DEFAULT_PRETRAINED,
    checkpoint: Optional[str] = None,
    device: str = "auto",
) -> LoadedClip:
    """Load a CLIP model for inspection (eval mode, gradients off for weights).

    `pretrained` is an open_clip tag, 'none' (seeded random weights) or a weights file, which is read like
    `checkpoint`. Every weights file goes through read_checkpoint; open_clip only builds the network."""
    import open_clip

    register_bundled_configs()
    torch_device = resolve_device(device)
    notes = []
    state = None
    if (not checkpoint and pretrained.lower() != RANDOM_WEIGHTS
            and not open_clip.get_pretrained_cfg(model, pretrained) and os.path.isfile(pretrained)):
        checkpoint = pretrained   # --pretrained FILE: a checkpoint like any other
    if checkpoint:
        state, meta = read_checkpoint(checkpoint)
        model = _register_checkpoint_config(meta, checkpoint) or model
    if model not in open_clip.list_models():
        import difflib
        close = difflib.get_close_matches(model, open_clip.list_models(), n=4, cutoff=0.5)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise NeurolensError(f"unknown model {model!r}{hint}; `python -c 'import open_clip; print(open_clip.list_models())'` lists them")

    tag_cfg: Dict[str, Any] = {}
    weights_file = None
    if state is None and pretrained.lower() != RANDOM_WEIGHTS:
        tag_cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(model)
            raise NeurolensError(
                f"unknown pretrained tag {pretrained!r} for {model}; known tags: {', '.join(tags) or 'none'}; "
                f"or use --checkpoint PATH or --pretrained none"
            )
        weights_file = _cached_pretrained_file(tag_cfg)
        if weights_file is None:
            if _offline_env():
                raise _weights_unavailable(model, pretrained, "they are not cached and HF_HUB_OFFLINE is set")
            if not _network_reachable():
                raise _weights_unavailable(model, pretrained, "they are not cached and the network is unreachable")
            weights_file = _download_pretrained(tag_cfg, model, pretrained)
        state, _ = read_checkpoint(weights_file)

    # Random init is seeded so that 'none' always means the same weights (and the same cache entries).
    with torch.random.fork_rng(devices=[]), _quiet_open_clip():
        torch.manual_seed(RANDOM_SEED)
        try:
            clip = open_clip.create_model(model, pretrained=None, **_create_kwargs(open_clip.create_model, tag_cfg))
        except (RuntimeError, OSError) as exc:
            raise _weights_unavailable(model, pretrained, str(exc).splitlines()[0]) from None

    if checkpoint:
        _load_weights(clip, state, f"checkpoint {checkpoint}", model)
        pretrained_label = f"checkpoint:{Path(checkpoint).name}"
    elif pretrained.lower() == RANDOM_WEIGHTS:
        count = recalibrate_batch_norms(clip)
        if count:
            notes.append(f"random weights: {count} BatchNorms re-initialized to the statistics of natural images "
                         f"(variance-preserving; see neurolens.models.random_init)")
        pretrained_label = RANDOM_WEIGHTS
    else:
        _load_weights(clip, state, f"the '{pretrained}' weights file {weights_file}", model)
        pretrained_label = pretrained

    clip.eval().requires_grad_(False).to(torch_device)
    preprocess_cfg = open_clip.get_model_preprocess_cfg(clip)
    mean = tuple(tag_cfg.get("mean") or preprocess_cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(tag_cfg.get("std") or preprocess_cfg.get("std") or open_clip.OPENAI_DATASET_STD)
    size = clip.visual.image_size
    image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return LoadedClip(
        model=clip,
        name=model,
        pretrained=pretrained_label,
        device=torch_device,
        image_size=image_size,
        mean=mean,
        std=std,
        fingerprint=weights_fingerprint(clip),
        tokenizer=open_clip.get_tokenizer(model),
        notes=tuple(notes),
    )


def save_checkpoint(clip: torch.nn.Module, path: str | os.PathLike, model_name: str,
                    model_config: Optional[Dict[str, Any]] = None, extra: Optional[Dict[str, Any]] = None,
                    option: str = "--out") -> Path:
    """Save a state dict that load_clip(checkpoint=...) reads with weights_only=True; carries its config.
    Written atomically (neurolens.storage.files); `option` is what a failed write tells the user to change."""
    from ..storage.files import write_bytes
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
