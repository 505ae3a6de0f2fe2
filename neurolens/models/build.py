"""Build an open_clip model for inspection from a pretrained tag, a local checkpoint, or random weights:
LoadedClip (the model with what every job needs to know about it), the bundled configs, the device, the
weights fingerprint, and open_clip's fix-ups of a state dict before loading.

Every weights file is read by checkpoint.read_checkpoint; a tag's file is found or fetched by
pretrained.pretrained_weights_file; open_clip only builds the network.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import inspect
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ..data import MODEL_CONFIGS
from ..errors import NeurolensError
from .checkpoint import read_checkpoint, register_checkpoint_config
from .devices import no_gpu_possible
from .layers import registry_for
from .names import DEFAULT_MODEL, DEFAULT_PRETRAINED, RANDOM_SEED, RANDOM_WEIGHTS
from .pretrained import pretrained_weights_file, weights_unavailable
from .random_init import recalibrate_batch_norms

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
    weights_file: Optional[str] = None  # the file the weights were read from (None: seeded random weights)
    weights_source: Dict[str, str] = field(default_factory=dict)   # a tag's hub repo / URL its file came from
    _layers: Optional[Any] = field(default=None, repr=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """(N,3,H,W) in [0,1] -> CLIP's input normalization (OpenAI mean/std, not ImageNet's)."""
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std

    @property
    def device_type(self) -> str:
        """"cpu" or "cuda" (as LazyClip's, which knows it without torch on the CPU)."""
        return self.device.type

    def layer_table(self):
        """The model's layer table (neurolens.models.layers: measured by one forward on first use)."""
        return registry_for(self)


def register_bundled_configs() -> None:
    """Make the small configs that ship with neurolens (tests, the toy demo) known to open_clip."""
    global _registered
    if _registered:
        return
    import open_clip  # lazy: open_clip takes seconds to import (import neurolens stays light)
    open_clip.add_model_config(_CONFIG_DIR)
    _registered = True


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cpu" if no_gpu_possible() or not torch.cuda.is_available() else "cuda")
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


def _fit_state_dict(clip: torch.nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """open_clip's own fix-ups of a state dict before loading (what its load_checkpoint does after reading the
    file): older text-tower key names, scalar vs 1-d logit scale/bias, stale position ids, and positional
    embeddings resized to the model's grid and context length."""
    from open_clip import model as clip_model  # lazy: open_clip takes seconds to import
    try:
        from open_clip.convert import convert_state_dict  # lazy, open_clip >= 3: third-party layouts
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
    import open_clip  # lazy: open_clip takes seconds to import (import neurolens stays light)

    register_bundled_configs()
    torch_device = resolve_device(device)
    notes = []
    state = None
    if (not checkpoint and pretrained.lower() != RANDOM_WEIGHTS
            and not open_clip.get_pretrained_cfg(model, pretrained) and os.path.isfile(pretrained)):
        checkpoint = pretrained   # --pretrained FILE: a checkpoint like any other
    if checkpoint:
        state, meta = read_checkpoint(checkpoint)
        model = register_checkpoint_config(meta, checkpoint) or model
    if model not in open_clip.list_models():
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
        weights_file = pretrained_weights_file(tag_cfg, model, pretrained)
        state, _ = read_checkpoint(weights_file)

    # Random init is seeded so that 'none' always means the same weights (and the same cache entries).
    with torch.random.fork_rng(devices=[]), _quiet_open_clip():
        torch.manual_seed(RANDOM_SEED)
        try:
            clip = open_clip.create_model(model, pretrained=None, **_create_kwargs(open_clip.create_model, tag_cfg))
        except (RuntimeError, OSError) as exc:
            raise weights_unavailable(model, pretrained, str(exc).splitlines()[0]) from None

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
        weights_file=str(Path(checkpoint).resolve()) if checkpoint else weights_file,
        weights_source={k: str(tag_cfg[k]) for k in ("hf_hub", "url") if tag_cfg.get(k)} if weights_file else {},
    )
