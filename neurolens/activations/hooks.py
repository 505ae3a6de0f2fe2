"""Capture activations: hooks that are always removed, inputs cloned before in-place ops, and an
early stop right after the deepest captured layer so no compute is spent past it."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, Sequence

import torch

from ..types import CAPTURE_INPUT, LayerSpec


class StopForward(Exception):
    """Raised inside a hook once every requested layer is captured."""


def sequence_first(model: torch.nn.Module, hook_module: str) -> bool:
    """Whether a token tensor at `hook_module` is (L, N, D) rather than (N, L, D).

    Blocks inside an open_clip transformer see its internal layout: sequence-first before open_clip 2.26
    (no `batch_first` attribute yet) and where a transformer is built with batch_first=False; batch-first
    otherwise. A transformer's own output follows its interface, which is batch-first wherever the
    attribute exists. Modules outside any transformer (ln_pre, ...) are batch-first in every version."""
    parts = hook_module.split(".")
    for depth in range(len(parts), 0, -1):
        module = model.get_submodule(".".join(parts[:depth]))
        if hasattr(module, "resblocks"):
            if depth == len(parts):
                return not hasattr(module, "batch_first")
            return not getattr(module, "batch_first", False)
    return False


def to_feature_map(tensor: torch.Tensor, model: torch.nn.Module, hook_module: str) -> torch.Tensor:
    """Any captured tensor as (N, C, H, W) or (N, C).

    Transformer blocks give tokens (N, L, D) (or (L, N, D), see sequence_first); the patch tokens are
    reshaped to a grid and the class and other prefix tokens dropped, so every layer has the same
    channel/spatial layout."""
    if isinstance(tensor, (tuple, list)):
        tensor = tensor[0]
    if tensor.dim() == 3:
        grid = getattr(model.visual, "grid_size", None)
        if grid is None:
            raise ValueError(f"cannot map a token tensor of {hook_module} to a grid")
        if sequence_first(model, hook_module):
            tensor = tensor.transpose(0, 1)
        count = grid[0] * grid[1]
        tokens = tensor[:, -count:, :]  # prefix tokens (class token etc.) come first
        return tokens.transpose(1, 2).reshape(tensor.shape[0], tensor.shape[2], grid[0], grid[1])
    return tensor


@contextmanager
def capture(model: torch.nn.Module, specs: Sequence[LayerSpec], stop: bool = True) -> Iterator[Dict[str, torch.Tensor]]:
    """Within the block, a forward of `model.visual` fills the yielded dict {layer name: (N,C,H,W) tensor}.

    With stop=True the forward raises StopForward right after the last layer is captured; use
    `forward_to` to run and swallow it. Hooks are removed on exit, errors included."""
    modules = dict(model.named_modules())
    captured: Dict[str, torch.Tensor] = {}
    wanted = {spec.name for spec in specs}
    handles = []

    def make_hook(spec: LayerSpec):
        def keep(tensor: torch.Tensor) -> None:
            captured[spec.name] = to_feature_map(tensor, model, spec.hook_module)
            if stop and wanted.issubset(captured):
                raise StopForward()

        if spec.capture == CAPTURE_INPUT:
            # the module (an in-place ReLU) overwrites its input: keep a copy
            return lambda module, args: keep(args[0].clone())
        return lambda module, args, output: keep(output)

    try:
        for spec in specs:
            module = modules[spec.hook_module]
            if spec.capture == CAPTURE_INPUT:
                handles.append(module.register_forward_pre_hook(make_hook(spec)))
            else:
                handles.append(module.register_forward_hook(make_hook(spec)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def forward_to(model: torch.nn.Module, images: torch.Tensor, specs: Sequence[LayerSpec]) -> Dict[str, torch.Tensor]:
    """Run the image tower on normalized images only as far as the deepest of `specs`."""
    with capture(model, specs, stop=True) as captured:
        try:
            model.visual(images)
        except StopForward:
            pass
    return captured


def hook_count(model: torch.nn.Module) -> int:
    """Hooks left on any module (tests assert this is 0 after every command)."""
    total = 0
    for module in model.modules():
        total += len(module._forward_hooks) + len(module._forward_pre_hooks)
        total += len(module._backward_hooks) + len(getattr(module, "_backward_pre_hooks", {}))
    return total


def from_feature_map(replacement: torch.Tensor, native: torch.Tensor, model: torch.nn.Module,
                     hook_module: str) -> torch.Tensor:
    """The inverse of to_feature_map: a (B,C,H,W) map (or (B,C)) in the layout of the module's own tensor.

    `native` is the tensor the forward produced there (batch 1 or B); token layers keep its prefix tokens
    (class token etc.), broadcast to the replacement's batch."""
    if isinstance(native, (tuple, list)):
        native = native[0]
    batch = replacement.shape[0]
    if native.dim() == 3:
        flip = sequence_first(model, hook_module)
        if flip:
            native = native.transpose(0, 1)
        count = replacement.shape[2] * replacement.shape[3]
        tokens = replacement.reshape(batch, replacement.shape[1], count).transpose(1, 2)
        prefix = native[:, : native.shape[1] - count, :].expand(batch, -1, -1)
        joined = torch.cat([prefix.to(tokens.dtype), tokens], dim=1)
        return joined.transpose(0, 1) if flip else joined
    if native.dim() == 2:
        return replacement.reshape(batch, -1)
    return replacement


@contextmanager
def inject(model: torch.nn.Module, spec: LayerSpec, replacement: torch.Tensor) -> Iterator[None]:
    """Within the block, a forward of `model.visual` continues from `replacement` at `spec` instead of the
    tensor it computed there: replacement is (B,C,H,W) in to_feature_map's layout (or (B,C) for vector
    layers), and its batch B may differ from the input's (run the prefix on one image, continue on B).
    Gradients flow into `replacement`; it is copied first, as the next module may work in place. The hook
    is removed on exit, errors included."""
    module = dict(model.named_modules())[spec.hook_module]

    if spec.capture == CAPTURE_INPUT:
        def pre_hook(mod, args):
            swapped = from_feature_map(replacement, args[0], model, spec.hook_module).clone()
            return (swapped,) + tuple(args[1:])
        handle = module.register_forward_pre_hook(pre_hook)
    else:
        def post_hook(mod, args, output):
            swapped = from_feature_map(replacement, output, model, spec.hook_module).clone()
            if isinstance(output, tuple):
                return (swapped,) + tuple(output[1:])
            return swapped
        handle = module.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()
