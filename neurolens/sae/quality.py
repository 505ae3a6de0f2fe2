"""How good an SAE is on images it was not trained on (the quality report `sae train` prints and stores).

Over the held-out images' channel vectors x (every cell / patch token), with x_hat the SAE's reconstruction:
  explained_variance     1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2   (mean over the held-out vectors)
  l0                     mean number of non-zero feature activations per vector
  never_fired_share      share of features that are zero on every held-out vector
  embedding_cosine       mean over held-out images of cos(e, e'), e the image embedding of the model, e' the
                         embedding with the layer replaced by its reconstruction (every cell at once)
The dead share (training-time: no firing over the last `dead_after` training vectors) comes from training.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets.types import ImageDataset
from ..activations.hooks import inject
from ..engines.local import image_batches
from ..activations.forward import layer_forward
from ..types import LayerSpec
from .buffer import cell_vectors
from .model import SparseAutoencoder


@dataclass
class QualityReport:
    explained_variance: float
    l0: float
    dead_share: float             # training-time definition (see train.py); NaN for an SAE made elsewhere
    never_fired_share: float
    embedding_cosine: float
    held_out_images: int
    held_out_vectors: int
    dead_after: int = 0

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}


def reconstruct_map(sae: SparseAutoencoder, acts: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) layer activations -> their reconstruction, same layout (or (B, C) -> (B, C))."""
    if acts.dim() == 2:
        return sae(acts.float())
    batch, channels, height, width = acts.shape
    rebuilt = sae(cell_vectors(acts))
    return rebuilt.reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()


def evaluate(clip, spec: LayerSpec, sae: SparseAutoencoder, dataset: ImageDataset, indices: Sequence[int],
             dead_share: float = float("nan"), dead_after: int = 0, batch_size: int = 16, workers: int = 0,
             precision: str = "fp32", progress: Optional[Callable[[int, int], None]] = None,
             decoder: str = "auto") -> QualityReport:
    """The report over the images `indices` of `dataset` (module docstring)."""
    indices = [int(i) for i in indices]
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    device = clip.device       # sums stay on the device until the end: no wait for it per batch
    total = 0.0
    sse = torch.zeros((), dtype=torch.float64, device=device)
    sum_x = torch.zeros(spec.channels, dtype=torch.float64, device=device)
    sum_sq = torch.zeros((), dtype=torch.float64, device=device)
    vectors = images = 0
    active = torch.zeros((), dtype=torch.int64, device=device)
    fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=device)
    cosines = []
    done = 0
    model = clip.model
    for batch in image_batches(dataset, clip.image_size, batches, workers, decoder, clip.device):
        done += len(batch.skipped)
        if batch.pixels is None:
            continue
        pixel_batch = batch.pixels.float().div_(255.0)
        acts, embedding = layer_forward(clip, spec, pixel_batch, precision, embeddings=True)
        with torch.no_grad():
            flat = cell_vectors(acts)
            z = sae.encode(flat)
            rebuilt_flat = sae(flat)
            sse += (flat - rebuilt_flat).double().pow(2).sum()
            sum_x += flat.double().sum(0)
            sum_sq += flat.double().pow(2).sum()
            vectors += flat.shape[0]
            nonzero = z != 0
            active += nonzero.sum()
            fired |= nonzero.any(0)
            rebuilt = reconstruct_map(sae, acts)
            with inject(model, spec, rebuilt.to(acts.dtype)):
                replaced = model.visual(clip.normalize(pixel_batch))
            replaced = F.normalize(replaced.float(), dim=-1)
            cosines.append((replaced * embedding).sum(-1))
        images += len(batch.indices)
        done += len(batch.indices)
        if progress is not None:
            progress(done, len(indices))
    sse, sum_sq, active = float(sse), float(sum_sq), float(active)
    if vectors:
        mean = sum_x.cpu() / vectors
        total = sum_sq - vectors * float(mean.pow(2).sum())
    explained = 1.0 - sse / total if total > 0 else float("nan")
    return QualityReport(
        explained_variance=float(explained), l0=active / vectors if vectors else float("nan"),
        dead_share=float(dead_share), never_fired_share=float(1.0 - fired.float().mean()),
        embedding_cosine=float(torch.cat(cosines).cpu().mean()) if cosines else float("nan"),
        held_out_images=images, held_out_vectors=vectors, dead_after=int(dead_after))
