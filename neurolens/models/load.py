"""Load an open_clip model from a pretrained tag, a local checkpoint, or random weights.

Weights are never unpickled as arbitrary objects: .pt/.bin go through torch.load(weights_only=True)
and .safetensors through safetensors. Without network and without cached weights the loader fails
within seconds (instead of open_clip's ~46 s of retries) with a line that names the ways out.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ..errors import NeurolensError, WeightsUnavailableError
from .random_init import recalibrate_batch_norms

DEFAULT_MODEL = "RN50x4"
DEFAULT_PRETRAINED = "openai"
RANDOM_WEIGHTS = "none"
RANDOM_SEED = 0

_CONFIG_DIR = Path(__file__).resolve().parent.parent / "data" / "model_configs"
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


def _network_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cached_pretrained_file(pretrained_cfg: Dict[str, Any]) -> Optional[str]:
    """The local file of a pretrained tag's weights, if open_clip or huggingface_hub cached it before."""
    hub = pretrained_cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - open_clip depends on it
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo_id, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
            names = [filename] if filename else []
            names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            for name in names:
                found = try_to_load_from_cache(repo_id, name)
                if isinstance(found, str) and os.path.isfile(found):
                    return found
    url = pretrained_cfg.get("url", "")
    if url:
        candidate = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if candidate.is_file():
            return str(candidate)
    return None


def _weights_unavailable(model_name: str, pretrained: str, why: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"cannot load {model_name} weights '{pretrained}': {why}; "
        f"pass --checkpoint PATH to load a local .pt/.bin/.safetensors file, or --pretrained none for random weights"
    )


def read_checkpoint(path: str | os.PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state_dict, metadata) from a .safetensors file or a torch file holding only tensors and plain data."""
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
            meta = json.loads(raw["neurolens"])
        return state, meta
    try:
        blob = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise NeurolensError(
            f"checkpoint {path} could not be read as plain tensors (weights_only=True refuses pickled code: {exc}); "
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


def _register_checkpoint_config(meta: Dict[str, Any]) -> Optional[str]:
    """A checkpoint that carries its model config (toy models do) is registered under its own name."""
    config = meta.get("model_config")
    if not isinstance(config, dict):
        return None
    import open_clip
    name = str(meta.get("model_name") or "neurolens-checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / f"{name}.json"
        config_path.write_text(json.dumps(config))
        open_clip.add_model_config(config_path)
    return name


def load_clip(
    model: str = DEFAULT_MODEL,
    pretrained: str = DEFAULT_PRETRAINED,
    checkpoint: Optional[str] = None,
    device: str = "auto",
) -> LoadedClip:
    """Load a CLIP model for inspection (eval mode, gradients off for weights)."""
    import open_clip

    register_bundled_configs()
    torch_device = resolve_device(device)
    notes = []
    meta: Dict[str, Any] = {}
    state = None
    if checkpoint:
        state, meta = read_checkpoint(checkpoint)
        model = _register_checkpoint_config(meta) or model
    if model not in open_clip.list_models():
        import difflib
        close = difflib.get_close_matches(model, open_clip.list_models(), n=4, cutoff=0.5)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise NeurolensError(f"unknown model {model!r}{hint}; `python -c 'import open_clip; print(open_clip.list_models())'` lists them")

    create_kwargs: Dict[str, Any] = {}
    tag_cfg: Dict[str, Any] = {}
    weights_file = None
    if state is None and pretrained.lower() != RANDOM_WEIGHTS:
        tag_cfg = open_clip.get_pretrained_cfg(model, pretrained) or {}
        if tag_cfg:
            weights_file = _cached_pretrained_file(tag_cfg)
            if weights_file is None:
                if _offline_env():
                    raise _weights_unavailable(model, pretrained, "they are not cached and HF_HUB_OFFLINE is set")
                if not _network_reachable():
                    raise _weights_unavailable(model, pretrained, "they are not cached and the network is unreachable")
            if tag_cfg.get("quick_gelu"):
                create_kwargs["force_quick_gelu"] = True
        elif os.path.isfile(pretrained):
            weights_file = pretrained
        else:
            tags = open_clip.list_pretrained_tags_by_model(model)
            raise NeurolensError(
                f"unknown pretrained tag {pretrained!r} for {model}; known tags: {', '.join(tags) or 'none'}; "
                f"or use --checkpoint PATH or --pretrained none"
            )

    # Random init is seeded so that 'none' always means the same weights (and the same cache entries).
    with torch.random.fork_rng(devices=[]), _quiet_open_clip():
        torch.manual_seed(RANDOM_SEED)
        try:
            if weights_file is not None:
                clip = open_clip.create_model(model, pretrained=weights_file, **create_kwargs)
            elif tag_cfg:
                clip = open_clip.create_model(model, pretrained=pretrained, **create_kwargs)
            else:
                clip = open_clip.create_model(model, pretrained=None, **create_kwargs)
        except RuntimeError as exc:
            raise _weights_unavailable(model, pretrained, str(exc).splitlines()[0]) from None

    if state is not None:
        missing, unexpected = clip.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise NeurolensError(
                f"checkpoint {checkpoint} does not fit {model}: {len(missing)} missing keys "
                f"(e.g. {', '.join(list(missing)[:3]) or '-'}), {len(unexpected)} unexpected "
                f"(e.g. {', '.join(list(unexpected)[:3]) or '-'}); pass the right --model"
            )
        pretrained_label = f"checkpoint:{Path(checkpoint).name}"
    elif pretrained.lower() == RANDOM_WEIGHTS:
        count = recalibrate_batch_norms(clip)
        if count:
            notes.append(f"random weights: {count} BatchNorms re-initialized to the statistics of natural images "
                         f"(variance-preserving; see neurolens.models.random_init)")
        pretrained_label = RANDOM_WEIGHTS
    else:
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
    Written atomically (neurolens.files); `option` is what a failed write tells the user to change."""
    from ..files import atomic_path
    path = Path(path)
    blob: Dict[str, Any] = {"state_dict": {k: v.detach().cpu() for k, v in clip.state_dict().items()},
                            "model_name": model_name}
    if model_config is not None:
        blob["model_config"] = model_config
    if extra:
        blob.update(extra)
    with atomic_path(path, option) as tmp:
        torch.save(blob, tmp)
    return path
