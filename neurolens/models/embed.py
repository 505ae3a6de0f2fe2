"""CLIP image embeddings through the full image tower, with the model's own evaluation preprocessing.

The one place that turns PIL images into embeddings for the NSFW scores (neurolens.labels.zero_shot), the blur
policy's zero-shot branch and the similarity probe: open_clip's evaluation transform as the model was
configured (its input size, resize mode, interpolation and fill colour from open_clip's preprocess config,
and the model's mean/std), then model.encode_image, L2-normalized."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch


def eval_transform(clip):
    """The model's own open_clip evaluation transform (what create_model_and_transforms returns)."""
    import open_clip  # lazy: open_clip takes seconds to import
    cfg = open_clip.get_model_preprocess_cfg(clip.model)
    return open_clip.image_transform(
        cfg.get("size", clip.image_size), is_train=False, mean=clip.mean, std=clip.std,
        resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"),
        fill_color=cfg.get("fill_color", 0))


def image_embeddings(clip, images: Sequence, batch_size: int = 32,
                     progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """(N, D) float32 L2-normalized embeddings of PIL images (converted to RGB)."""
    images = list(images)
    transform = eval_transform(clip)
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([transform(image.convert("RGB")) for image in images[start:start + batch_size]])
        with torch.no_grad():
            features = clip.model.encode_image(batch.to(clip.device)).float()
        chunks.append(torch.nn.functional.normalize(features, dim=-1).cpu().numpy())
        if progress:
            progress(min(start + batch_size, len(images)), len(images))
    if not chunks:
        return np.zeros((0, int(getattr(clip.model, "embed_dim", 0) or 0)), np.float32)
    return np.concatenate(chunks).astype(np.float32)
