"""Training samples for an SAE, streamed from the model: nothing is written to disk.

A sample is the channel vector of one position of the layer: every spatial cell of a ResNet layer, every
patch token of a ViT layer (the class token is not a position of the map and is left out). Per epoch the
training images are put in a seeded random order and cut into chunks of about `buffer_vectors` vectors; a
chunk's images run through the model (forward stopped right after the layer, images decoded in DataLoader
workers, neurolens.engines.local.image_batches: the scan's input pipeline and `--decode`), and the chunk's
vectors are shuffled in memory and handed out. Vectors of one image are thereby
spread over the whole chunk, and each chunk holds a random sample of images.

When every training vector fits in the buffer, the model runs over the images once and every epoch reshuffles
the kept vectors instead of running the model again.

Everything depends only on (seed, epoch, chunk): a training run resumed at a chunk boundary sees exactly the
vectors an uninterrupted run sees there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..datasets.types import ImageDataset
from ..engines.local import image_batches
from ..activations.forward import layer_forward
from ..types import LayerSpec


def seeded_generator(*parts: int) -> torch.Generator:
    """A CPU generator whose seed mixes `parts` (seed, epoch, chunk ...) into one 63-bit number."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value * 6364136223846793005 + int(part) + 1442695040888963407) % (1 << 63)
    return torch.Generator().manual_seed(value)


def split_images(count: int, held_out: float, max_held_out: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices), both sorted: a seeded random `held_out` share of the images (at
    least 1 and at most max_held_out, and never all of them) is kept for the quality report."""
    if count < 2:
        return np.arange(count), np.zeros(0, np.int64)
    wanted = int(round(held_out * count))
    wanted = max(1 if held_out > 0 else 0, min(wanted, int(max_held_out), count - 1))
    order = torch.randperm(count, generator=seeded_generator(seed, 7)).numpy()
    held = np.sort(order[:wanted])
    train = np.sort(order[wanted:])
    return train.astype(np.int64), held.astype(np.int64)


@dataclass
class ChunkInfo:
    epoch: int
    index: int          # chunk number within the epoch
    chunks: int         # chunks in this epoch
    images: int         # readable images in the chunk
    skipped: List[Tuple[int, str]]


class ActivationStream:
    """Shuffled channel vectors of `spec` over the images `indices` of `dataset` (see the module docstring)."""

    def __init__(self, clip, spec: LayerSpec, dataset: ImageDataset, indices: Sequence[int], buffer_vectors: int,
                 seed: int, images_per_forward: int = 16, workers: int = 0, precision: str = "fp32",
                 decoder: str = "auto"):
        self.clip, self.spec, self.dataset = clip, spec, dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.cells = max(1, spec.height) * max(1, spec.width)
        self.images_per_chunk = max(1, int(buffer_vectors) // self.cells)
        self.seed = int(seed)
        self.images_per_forward = max(1, int(images_per_forward))
        self.workers = int(workers)
        self.precision = precision
        self.decoder = decoder             # the image decoder (neurolens.datasets.decode.resolve_decoder)
        self.kept: Optional[torch.Tensor] = None   # all vectors, when they fit in the buffer
        self.kept_skipped: List[Tuple[int, str]] = []

    @property
    def fits(self) -> bool:
        return len(self.indices) <= self.images_per_chunk

    @property
    def vectors_per_epoch(self) -> int:
        """Training vectors per epoch (before any unreadable image is skipped)."""
        return len(self.indices) * self.cells

    def chunks_per_epoch(self) -> int:
        return max(1, -(-len(self.indices) // self.images_per_chunk))

    def epoch(self, epoch: int, first_chunk: int = 0,
              progress: Optional[Callable[[int, int], None]] = None) -> Iterator[Tuple[ChunkInfo, torch.Tensor]]:
        """(chunk info, shuffled (n, C) float32 vectors on the model's device) for chunks first_chunk.. of epoch."""
        if self.fits:
            if self.kept is None:
                self.kept, self.kept_skipped = self._vectors(self.indices, progress)
            order = torch.randperm(self.kept.shape[0], generator=seeded_generator(self.seed, epoch, 0))
            info = ChunkInfo(epoch, 0, 1, len(self.indices) - len(self.kept_skipped), list(self.kept_skipped))
            if first_chunk == 0:
                yield info, self.kept[order.to(self.kept.device)]
            return
        order = torch.randperm(len(self.indices), generator=seeded_generator(self.seed, epoch, -1)).numpy()
        images = self.indices[order]
        count = self.chunks_per_epoch()
        for chunk in range(first_chunk, count):
            part = images[chunk * self.images_per_chunk:(chunk + 1) * self.images_per_chunk]
            vectors, skipped = self._vectors(part, progress)
            shuffle = torch.randperm(vectors.shape[0], generator=seeded_generator(self.seed, epoch, chunk))
            yield ChunkInfo(epoch, chunk, count, len(part) - len(skipped), skipped), vectors[shuffle.to(vectors.device)]

    def _vectors(self, image_indices: np.ndarray,
                 progress: Optional[Callable[[int, int], None]] = None) -> Tuple[torch.Tensor, List[Tuple[int, str]]]:
        """(n, C) vectors of these images in their order (cell-major within an image), and the skipped ones."""
        batches = [list(map(int, image_indices[i:i + self.images_per_forward]))
                   for i in range(0, len(image_indices), self.images_per_forward)]
        parts, skipped, done = [], [], 0
        for batch in image_batches(self.dataset, self.clip.image_size, batches, self.workers, self.decoder,
                                   self.clip.device):
            skipped.extend(batch.skipped)
            if batch.pixels is not None:
                acts, _ = layer_forward(self.clip, self.spec, batch.pixels.float().div_(255.0), self.precision)
                parts.append(cell_vectors(acts))
            done += len(batch.skipped) + len(batch.indices)
            if progress is not None:
                progress(done, len(image_indices))
        if not parts:
            return torch.zeros(0, self.spec.channels, device=self.clip.device), skipped
        return torch.cat(parts), skipped


def cell_vectors(acts: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C): one row per position, image-major."""
    if acts.dim() == 2:
        return acts.float()
    return acts.float().permute(0, 2, 3, 1).reshape(-1, acts.shape[1])
