"""The truncated layer forward of a scan: one forward per batch of images in [0,1], stopped right after the
layer (or run to the image embedding when embeddings are asked for), at a fixed batch size so that an image's
values do not depend on which images share its batch; and the brute-force references the tests hold a scan to.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ..types import LayerSpec
from .hooks import StopForward, capture


def _autocast(clip, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=clip.device.type, dtype=torch.bfloat16)


def layer_forward(clip, spec: LayerSpec, images01: torch.Tensor, precision: str = "fp32",
                  embeddings: bool = False, pad_to: Optional[int] = None
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(acts (B,C,H,W) float32, L2-normalized embeddings (B,D) float32 or None) for images in [0,1].

    Without embeddings the forward stops right after the layer; with them it runs to the image embedding
    and a non-stopping hook keeps the layer.

    pad_to: run the forward on at least this many rows (black images appended, their outputs dropped).
    Kernels may round differently at another batch size (oneDNN's convolutions do for a batch of one, by
    ~1e-8; cuDNN picks its algorithm by shape), so forwards of one fixed size give an image the same values
    whichever images, and how many, share its batch: scans split or batched differently then agree exactly,
    the order of identical images in a top-k included."""
    count = int(images01.shape[0])
    if pad_to is not None and count < pad_to:
        images01 = torch.cat([images01, images01.new_zeros((pad_to - count, *images01.shape[1:]))])
    normalized = clip.normalize(images01)
    with torch.no_grad(), _autocast(clip, precision):
        with capture(clip.model, [spec], stop=not embeddings) as captured:
            try:
                output = clip.model.visual(normalized)
            except StopForward:
                output = None
    acts = captured[spec.name].float()[:count]
    if acts.dim() == 2:
        acts = acts[:, :, None, None]
    emb = None
    if embeddings:
        emb = torch.nn.functional.normalize(output.float()[:count], dim=-1)
    return acts, emb


def brute_force_maxima(clip, spec: LayerSpec, images01: torch.Tensor, precision: str = "fp32"
                       ) -> Tuple[np.ndarray, np.ndarray]:
    """(spatial max (N,C), flat argmax cell (N,C)) of already preprocessed images, in one forward."""
    acts, _ = layer_forward(clip, spec, images01, precision)
    values, cells = acts.flatten(2).max(dim=2)
    return values.cpu().numpy(), cells.cpu().numpy()


def rank_order(values: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """Positions that sort (value desc, index asc): the order TopK keeps (for tests and brute force)."""
    return np.lexsort((np.asarray(indices), -np.asarray(values)))
