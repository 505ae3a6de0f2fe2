"""Text feature visualization: each unit's direction in the joint embedding space, and the top-k texts
of every unit (text embeddings come from text.encode.encode_texts).

Definitions (also in the README):
  image embedding   e(A) = v(A) / ||v(A)||, where v(A) is the image tower's output (the joint-space vector
                    CLIP compares with text) when the layer's activation is replaced by A (C,H,W).
  unit direction    J[:, c] = d e(A_ref + eps * 1_c) / d eps at eps = 0, with 1_c the (C,H,W) map that is 1
                    on every cell of channel c and 0 elsewhere (a spatially uniform increase of unit c);
                    direction_c = J[:, c] / ||J[:, c]|| (a unit that cannot move the embedding gets zeros).
  reference A_ref   the layer's mean activation map over a scanned dataset, or the activation of a neutral
                    image (0.5 grey in [0,1], normalized with the model's mean/std).
  score(c, t)       cos(direction_c, T(t)) with T(t) the L2-normalized text embedding. For a normalized text
                    embedding t, J[:, c] . t is exactly the derivative of CLIP's image-text cosine at A_ref
                    with respect to unit c, so each unit's ranking is the texts whose CLIP score that unit
                    raises fastest.
One Jacobian (D x C) gives every unit of the layer: D backward passes, batched.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..activations.hooks import forward_to, inject
from ..errors import NeurolensError
from ..types import LayerSpec
from .encode import Progress

NEUTRAL_GREY = 0.5


def neutral_image(clip) -> torch.Tensor:
    """(1,3,S,S) normalized mid-grey image (0.5 in [0,1] before the model's mean/std)."""
    dtype = _visual_dtype(clip.model)
    grey = torch.full((1, 3, clip.image_size, clip.image_size), NEUTRAL_GREY, device=clip.device)
    return clip.normalize(grey).to(dtype)


def neutral_reference(clip, spec: LayerSpec) -> torch.Tensor:
    """The layer's activation (C,H,W) for the neutral grey image: the reference when no scan is given."""
    with torch.no_grad():
        captured = forward_to(clip.model, neutral_image(clip), [spec])[spec.name]
    return _as_map(captured[0].detach(), spec)


def _as_map(tensor: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    return tensor.reshape(spec.channels, spec.height, spec.width)


def _visual_dtype(model: torch.nn.Module) -> torch.dtype:
    for param in model.visual.parameters():
        return param.dtype
    return torch.float32


def default_chunk_rows(spec: LayerSpec, embed_dim: int, budget_bytes: int = 1 << 28) -> int:
    """Backward passes per batch: each row carries about a dozen layer-sized tensors through the rest of the
    tower; keep a batch near `budget_bytes` (256 MiB) so that RN50x4's 2560 x 9 x 9 layer runs in ~20-row
    batches."""
    per_row = spec.channels * spec.height * spec.width * 4 * 12
    return int(max(1, min(embed_dim, budget_bytes // max(1, per_row))))


def image_jacobian(clip, spec: LayerSpec, reference_map=None, chunk_rows: Optional[int] = None,
                   progress: Progress = None, batched_backward: bool = True) -> torch.Tensor:
    """J (D, C): derivative of the normalized image embedding w.r.t. a spatially uniform increase of each
    channel of `spec`, at the reference activation (default: the neutral grey image's).

    One forward continues from A_ref + delta (delta: C zeros that require grad) at the layer; row d of J is
    the backward pass of embedding coordinate d, and the D backward passes run in batches of `chunk_rows`
    (autograd's batched gradients, i.e. vmap over grad_outputs) on that single forward. Where an op has no
    batching rule, each batch instead replicates the reference along the batch dimension (row i's gradient
    lands in its own delta[i]); both give the same J."""
    model = clip.model
    dtype = _visual_dtype(model)
    reference = neutral_reference(clip, spec) if reference_map is None else _reference_tensor(reference_map, spec)
    reference = reference.to(device=clip.device, dtype=dtype)
    probe = neutral_image(clip)
    with torch.enable_grad():
        delta = torch.zeros(1, spec.channels, device=clip.device, dtype=dtype, requires_grad=True)
        with inject(model, spec, reference[None] + delta[:, :, None, None]):
            embedding = F.normalize(model.visual(probe), dim=-1)[0]
        embed_dim = int(embedding.shape[-1])
        rows = chunk_rows or default_chunk_rows(spec, embed_dim)
        jacobian = torch.empty(embed_dim, spec.channels, dtype=torch.float32)
        eye = torch.eye(embed_dim, device=clip.device, dtype=embedding.dtype)
        for start in range(0, embed_dim, rows):
            stop = min(embed_dim, start + rows)
            grad = None
            if batched_backward:
                try:
                    (grad,) = torch.autograd.grad(embedding, delta, grad_outputs=eye[start:stop],
                                                  is_grads_batched=True, retain_graph=True)
                    grad = grad[:, 0]
                except RuntimeError:  # an op without a vmap rule for its backward: replicate instead
                    batched_backward = False
            if grad is None:
                grad = _replicated_rows(model, spec, reference, probe, start, stop)
            jacobian[start:stop] = grad.detach().float().cpu()
            if progress is not None:
                progress(stop, embed_dim)
    return jacobian


def _replicated_rows(model, spec: LayerSpec, reference: torch.Tensor, probe: torch.Tensor,
                     start: int, stop: int) -> torch.Tensor:
    """Rows start..stop of J by one forward of stop-start copies of the reference and one backward."""
    count = stop - start
    delta = torch.zeros(count, spec.channels, device=reference.device, dtype=reference.dtype, requires_grad=True)
    with inject(model, spec, reference[None] + delta[:, :, None, None]):
        embedding = F.normalize(model.visual(probe), dim=-1)
    rows = torch.arange(count, device=reference.device)
    picked = embedding[rows, rows + start].sum()
    (grad,) = torch.autograd.grad(picked, delta)
    return grad


def _reference_tensor(reference_map, spec: LayerSpec) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(reference_map, dtype=np.float32))
    if tensor.numel() != spec.channels * spec.height * spec.width:
        raise NeurolensError(
            f"reference activation has shape {tuple(tensor.shape)} but layer {spec.name} is "
            f"{spec.channels}x{spec.height}x{spec.width}; scan the same model and layer")
    return _as_map(tensor, spec)


def unit_directions(clip, spec: LayerSpec, reference_map=None, chunk_rows: Optional[int] = None,
                    progress: Progress = None) -> np.ndarray:
    """(C, D) float32: each unit's L2-normalized direction in the joint embedding space (module docstring)."""
    jacobian = image_jacobian(clip, spec, reference_map, chunk_rows=chunk_rows, progress=progress)
    return F.normalize(jacobian.t(), dim=-1).numpy()


# ------------------------------------------------------------------------------------------------ ranking

def top_k_texts(directions: np.ndarray, text_embeddings: np.ndarray, k: int, chunk: int = 8192,
                device: Optional[torch.device] = None, progress: Progress = None) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k texts for every unit at once: (C,k) indices and cosines, best first.

    Streams the (C,D) @ (D,N) score matrix over vocabulary chunks with a running top-k, so memory is
    O(C * (k + chunk)), not O(C * N). Ties go to the earlier entry (a stable sort of [best so far, chunk]
    keeps (score descending, index ascending) order), so results do not depend on k or the chunking."""
    dirs = torch.as_tensor(np.asarray(directions, dtype=np.float32), device=device)
    texts = np.asarray(text_embeddings, dtype=np.float32)
    total = texts.shape[0]
    k = int(max(1, min(k, total)))
    best_scores = torch.empty((dirs.shape[0], 0), device=dirs.device)
    best_index = torch.empty((dirs.shape[0], 0), dtype=torch.long, device=dirs.device)
    for start in range(0, total, chunk):
        block = torch.as_tensor(texts[start:start + chunk], device=dirs.device)
        index = torch.arange(start, start + block.shape[0], device=dirs.device).expand(dirs.shape[0], -1)
        merged_scores = torch.cat([best_scores, dirs @ block.t()], dim=1)
        merged_index = torch.cat([best_index, index], dim=1)
        order = torch.sort(merged_scores, dim=1, descending=True, stable=True).indices[:, :k]
        best_scores = torch.gather(merged_scores, 1, order)
        best_index = torch.gather(merged_index, 1, order)
        if progress is not None:
            progress(min(total, start + chunk), total)
    return best_index.cpu().numpy().astype(np.int64), best_scores.cpu().numpy().astype(np.float32)


def texts_for(entries: Sequence[str], indices: np.ndarray) -> List[List[str]]:
    return [[entries[i] for i in row] for row in np.asarray(indices)]
