"""Run an open_clip image tower on images of another size than its own.

Convolutions take any size. What does not are the learned position embeddings: a ViT's (the class token's
plus one per patch of its grid) and a ModifiedResNet attention pool's (the mean token's plus one per cell
of the last feature map). Within `any_input_size(model)` each is replaced, for the grid the current input
actually gives, by a bicubic interpolation of its grid part (the prefix token kept as is), the way timm and
open_clip resize a checkpoint to a new resolution; a ViT's `grid_size` then names the grid in use, so
token layers map to the right (H, W). At the model's own size nothing changes. Everything is restored on
exit, errors included.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, Tuple

import torch
import torch.nn.functional as F


def resize_positions(table: torch.Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int]) -> torch.Tensor:
    """(prefix + old_h*old_w, D) position table -> (prefix + new_h*new_w, D); prefix rows kept."""
    cells = old_grid[0] * old_grid[1]
    prefix, grid = table[:-cells], table[-cells:]
    width = table.shape[-1]
    image = grid.reshape(1, old_grid[0], old_grid[1], width).permute(0, 3, 1, 2).float()
    shrink = new_grid[0] < old_grid[0] or new_grid[1] < old_grid[1]
    image = F.interpolate(image, size=new_grid, mode="bicubic", align_corners=False, antialias=shrink)
    return torch.cat([prefix, image.permute(0, 2, 3, 1).reshape(-1, width).to(table.dtype)])


def _square_grid(table: torch.Tensor, prefix: int = 1) -> Tuple[int, int]:
    side = int(round((table.shape[0] - prefix) ** 0.5))
    return side, side


class _PositionSwap:
    """Replaces `owner.<name>` (a Parameter) by its resized copy for the grid in use; remembers the original."""

    def __init__(self, owner: torch.nn.Module, name: str, native_grid: Tuple[int, int]):
        self.owner, self.name, self.native_grid = owner, name, tuple(native_grid)
        self.original = getattr(owner, name)
        self.resized: Dict[Tuple[int, int], torch.nn.Parameter] = {}

    def use(self, grid: Tuple[int, int]) -> None:
        grid = tuple(int(g) for g in grid)
        if grid == self.native_grid:
            table = self.original
        else:
            if grid not in self.resized:
                with torch.no_grad():
                    values = resize_positions(self.original.detach(), self.native_grid, grid)
                self.resized[grid] = torch.nn.Parameter(values, requires_grad=False)
            table = self.resized[grid]
        setattr(self.owner, self.name, table)

    def restore(self) -> None:
        setattr(self.owner, self.name, self.original)


@contextmanager
def any_input_size(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, `model.visual` accepts square or rectangular inputs of any size (see the module
    docstring). A tower without learned position embeddings is left untouched."""
    from open_clip.modified_resnet import ModifiedResNet  # lazy: open_clip takes seconds to import
    from open_clip.transformer import VisionTransformer  # lazy: open_clip takes seconds to import

    visual = model.visual
    handles, swaps = [], []
    native_grid_size = getattr(visual, "grid_size", None)
    try:
        if isinstance(visual, VisionTransformer):
            swap = _PositionSwap(visual, "positional_embedding", tuple(visual.grid_size))
            swaps.append(swap)

            def patches_embedded(module, args, output):
                grid = tuple(output.shape[-2:])
                swap.use(grid)
                visual.grid_size = grid
            handles.append(visual.conv1.register_forward_hook(patches_embedded))
        elif isinstance(visual, ModifiedResNet) and getattr(visual, "attnpool", None) is not None:
            pool = visual.attnpool
            swap = _PositionSwap(pool, "positional_embedding", _square_grid(pool.positional_embedding))
            swaps.append(swap)
            handles.append(pool.register_forward_pre_hook(lambda module, args: swap.use(tuple(args[0].shape[-2:]))))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for swap in swaps:
            swap.restore()
        if native_grid_size is not None:
            visual.grid_size = native_grid_size
