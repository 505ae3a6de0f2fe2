"""Activation maximization: Fourier-parameterized images, random transforms, CLIP normalization, Adam.

No disk I/O and no printing here: the caller gets arrays and passes a progress callback.

Speed: the first `low_res_fraction` of the steps optimize the image seen at half resolution (a quarter of
the compute per step); the parameterization stays at full resolution, so the later full-resolution steps
refine the same image. The forward always stops right after the unit's layer.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..activations.hooks import forward_to
from ..models.resize import any_input_size
from ..types import LayerSpec, RenderSettings
from .objectives import Objective, diversity, unit_objective
from .param import FourierImage
from .precision import resolve_precision

# Lucid's standard transforms, folded into one affine resampling per step: pad with grey and jitter
# (up to 8 + 4 px at 224 px, scaled to the image size), scale 0.9-1.1, rotate -10..10 degrees.
JITTER_FRACTION = 12 / 224
SCALE_RANGE = (0.9, 1.1)
ROTATE_DEGREES = 10.0
PAD_VALUE = 0.5

StepCallback = Callable[[int, Callable[[], torch.Tensor]], None]


@dataclass
class RenderOutput:
    images: np.ndarray        # uint8 (N, H, W, 3)
    activations: np.ndarray   # float32 (N,) objective of each final image: fp32, full size, no transforms
    maxima: np.ndarray        # float32 (N,) the unit's highest activation over the cells of each final image
                              # (unit_maxima: what a scan records per dataset image)
    curve: np.ndarray         # float32 (steps, N) objective of the transformed batch at every step


def transform_seed(seeds: Sequence[int]) -> int:
    """The transform stream depends only on the seeds, so a unit's result does not depend on its batch."""
    return int.from_bytes(hashlib.sha1(repr(tuple(seeds)).encode()).digest()[:4], "little")


def random_view(images: torch.Tensor, out_size: int, generator: torch.Generator) -> torch.Tensor:
    """One random affine view (same for the whole batch) at out_size x out_size, grey outside the image."""
    if out_size < images.shape[-1]:
        images = F.interpolate(images, size=(out_size, out_size), mode="bilinear", antialias=True,
                               align_corners=False)
    draws = torch.rand(4, generator=generator).tolist()
    scale = SCALE_RANGE[0] + (SCALE_RANGE[1] - SCALE_RANGE[0]) * draws[0]
    angle = math.radians(ROTATE_DEGREES * (2 * draws[1] - 1))
    shift_x = 2 * JITTER_FRACTION * (2 * draws[2] - 1)
    shift_y = 2 * JITTER_FRACTION * (2 * draws[3] - 1)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    theta = torch.tensor([[cos, -sin, shift_x], [sin, cos, shift_y]], dtype=images.dtype, device=images.device)
    theta = theta.expand(images.shape[0], 2, 3)
    grid = F.affine_grid(theta, [images.shape[0], 3, out_size, out_size], align_corners=False)
    return F.grid_sample(images - PAD_VALUE, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False) + PAD_VALUE


# The low-resolution steps run only where the layer keeps at least this many cells per side at the lower size:
# on the trained toy (image_block_4_0: 2x2 at 64 px, 1x1 at 32 px) the low-resolution steps drove the
# full-size activation of some units below zero.
MIN_LOW_RES_GRID = 3


def is_vit(clip) -> bool:
    return getattr(clip.model.visual, "patch_size", None) is not None


def low_res_size(clip, spec: LayerSpec, size: int, scale: float) -> int:
    """Image size of the low-resolution steps: the layer's grid scaled by `scale` (rounded half up), in whole
    cells (a vector layer counts a ResNet's final 1/32 grid). 0, i.e. every step at full size, where that grid
    would have fewer than MIN_LOW_RES_GRID cells per side or would not be smaller, and for ViTs: measured on a
    random ViT-B/32 (image_resblock_6, units 10 and 300, 128 steps), a step at 128 px (4x4 patches, resized
    position embeddings) cost 70 % of a 224 px step (0.17 vs 0.24 s CPU) and the half of the steps taken
    there left the full-size activation lower at the end (0.66 and 1.01 vs 0.93 and 1.47)."""
    if is_vit(clip):
        return 0
    stride = max(1, clip.image_size // spec.height) if spec.height > 1 else 32
    grid = size // stride
    low_grid = int(math.floor(grid * scale + 0.5))
    if low_grid < MIN_LOW_RES_GRID or low_grid >= grid:
        return 0
    return low_grid * stride


def learning_rate(settings: RenderSettings, step: int) -> float:
    """Adam's lr at `step`: a linear warm-up over the first lr_warmup of the steps, constant, then a cosine from
    lr down to lr * lr_final at the last step."""
    warmup = int(round(settings.steps * settings.lr_warmup))
    if step < warmup:
        return settings.lr * (step + 1) / (warmup + 1)
    start = int(round(settings.steps * settings.lr_decay_start))
    if step < start or settings.steps - 1 <= start:
        return settings.lr
    progress = (step - start) / (settings.steps - 1 - start)
    floor = settings.lr * settings.lr_final
    return floor + (settings.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class BestImages:
    """The image with the highest clean objective (fp32, full size, no transforms) seen so far, per batch row.

    Optimizing under random jitter, scale and rotation maximizes the unit's activation on average over
    views; on some units that average rises while the clean image's own activation falls (on a random RN50x4,
    image_block_4_5 unit 2000 fell from 0.56 to 0.10 over lucent's 512 steps, and below zero under ours).
    Checking the clean objective every few steps and keeping the best image returns what the unit responds to
    most among the images the run went through, at the cost of one no-grad forward per check."""

    def __init__(self, score: Callable[[torch.Tensor], torch.Tensor]):
        self.score = score
        self.images: Optional[torch.Tensor] = None
        self.activations: Optional[torch.Tensor] = None

    def offer(self, images: torch.Tensor) -> None:
        scores = self.score(images)
        if self.images is None:
            self.images, self.activations = images.clone(), scores.clone()
            return
        better = scores > self.activations
        self.images[better.to(self.images.device)] = images[better.to(images.device)]
        self.activations = torch.where(better, scores, self.activations)


def build_objective(settings: RenderSettings, layer: str, units: Sequence[int], basis=None) -> Objective:
    """basis: None for the layer's neurons, or a basis (neurolens.sae.basis) whose `objective` gives its units'."""
    batch_units = [unit for unit in units for _ in settings.seeds]
    if basis is None:
        objective = unit_objective(settings.objective, layer, batch_units)
    else:
        objective = basis.objective(settings.objective, layer, batch_units)
    if settings.diversity > 0 and len(settings.seeds) > 1:
        groups = [index for index, _ in enumerate(units) for _ in settings.seeds]
        objective = objective + settings.diversity * diversity(layer, groups)
    return objective


def evaluate(clip, spec: LayerSpec, kind: str, units: Sequence[int], images: torch.Tensor, basis=None) -> torch.Tensor:
    """The plain objective (no diversity) of images in [0,1]: fp32, no transforms, no gradients."""
    with torch.no_grad(), any_input_size(clip.model):
        acts = forward_to(clip.model, clip.normalize(images.float()), [spec])
        objective = unit_objective(kind, spec.name, list(units)) if basis is None else \
            basis.objective(kind, spec.name, list(units))
        return objective(acts).float().cpu()


def unit_maxima(clip, spec: LayerSpec, units: Sequence[int], images: torch.Tensor, basis=None) -> torch.Tensor:
    """Each image's own unit's highest activation over the layer's cells (fp32, no transforms, no gradients):
    the value a scan records per dataset image (for a basis, its units' activations as the scan computes
    them), so a visualization compares with the dataset's top images like for like. The objective does not:
    `channel` is the mean over the cells, which a dataset image's maximum exceeds by construction."""
    with torch.no_grad(), any_input_size(clip.model):
        act = forward_to(clip.model, clip.normalize(images.float()), [spec])[spec.name].float()
        if act.dim() == 2:
            act = act[:, :, None, None]
        maps = act if basis is None else basis.activations(act)
        index = torch.as_tensor(list(units), dtype=torch.long, device=maps.device)
        return maps[torch.arange(maps.shape[0], device=maps.device), index].flatten(1).amax(1).float().cpu()


def render(clip, spec: LayerSpec, units: Sequence[int], settings: RenderSettings,
           progress: Optional[Callable[[int, int], None]] = None,
           on_step: Optional[StepCallback] = None, basis=None) -> RenderOutput:
    """Optimize one image per (unit, seed), all in one batch. Images are ordered unit-major, seed-minor.
    basis: None for neurons, or a basis of the layer (e.g. SAE features) whose units are optimized."""
    size = settings.size or clip.image_size
    device = clip.device
    precision = resolve_precision(settings.precision, device)
    batch_seeds = [seed for _ in units for seed in settings.seeds]
    batch_units = [unit for unit in units for _ in settings.seeds]
    param = FourierImage(batch_seeds, size, size, settings.decay_power, device)
    objective = build_objective(settings, spec.name, units, basis)
    optimizer = torch.optim.Adam(param.parameters(), lr=settings.lr)
    generator = torch.Generator().manual_seed(transform_seed(settings.seeds))
    low_size = low_res_size(clip, spec, size, settings.low_res_scale)
    low_res_steps = int(round(settings.steps * settings.low_res_fraction)) if low_size else 0
    curve = np.zeros((settings.steps, len(batch_seeds)), dtype=np.float32)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    best = BestImages(lambda images: evaluate(clip, spec, settings.objective, batch_units, images, basis)) \
        if settings.keep_best > 0 else None

    with any_input_size(clip.model):  # a ViT off its own size (low-resolution steps, --size) resizes its positions
        for step in range(settings.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(settings, step)
            images = param()
            view_size = low_size if step < low_res_steps else size
            if settings.transforms == "none":
                view = images if view_size == size else F.interpolate(images, size=(view_size, view_size),
                                                                      mode="bilinear", antialias=True)
            else:
                view = random_view(images, view_size, generator)
            with autocast:
                acts = forward_to(clip.model, clip.normalize(view), [spec])
                values = objective(acts).float()
            optimizer.zero_grad(set_to_none=True)
            (-values.sum()).backward()
            optimizer.step()
            curve[step] = values.detach().cpu().numpy()
            if on_step is not None:
                on_step(step, lambda: param().detach())
            if progress is not None:
                progress(step + 1, settings.steps)

            if best is not None and ((step + 1) % settings.keep_best == 0 or step + 1 == settings.steps):
                best.offer(param().detach())

    if best is None:
        final = param().detach()
        activations = evaluate(clip, spec, settings.objective, batch_units, final, basis)
    else:
        final, activations = best.images, best.activations
    activations = activations.numpy()
    pixels = (final.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    saved = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float() / 255   # the image as written
    maxima = unit_maxima(clip, spec, batch_units, saved, basis).numpy()
    return RenderOutput(images=pixels, activations=activations.astype(np.float32), curve=curve,
                        maxima=maxima.astype(np.float32))
