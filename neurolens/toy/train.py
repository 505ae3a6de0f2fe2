"""Contrastive training of a small open_clip model on image-caption pairs (the toy CLIP, or any dataset).

The model is built by open_clip.create_model from a config (default: the bundled nl-toy-RN, a ModifiedResNet
image tower so Microscope layer names apply, and a 2-layer text transformer with CLIP's tokenizer), randomly
initialized under the seed, trained with the symmetric InfoNCE loss of CLIP (learned temperature), AdamW and
a cosine learning-rate schedule with linear warm-up, then saved as a checkpoint that carries its config.

Determinism: on CPU the same seed, data and settings give the same weights (torch.manual_seed for the
init, a seeded generator for the batch order, a fixed number of threads, no data-loader workers).
Speed: every caption is tokenized once and the text tower runs on the longest caption's tokens only
(CLIP's causal mask makes that truncation exact); every image is decoded once and kept as uint8.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..datasets.decode import BadImage, preprocess_array
from ..datasets.open import open_dataset
from ..errors import DatasetError, NeurolensError
from ..models.build import register_bundled_configs, weights_fingerprint
from ..models.checkpoint import save_checkpoint
from ..text.encode import encode_tokens_truncated, pool_positions
from .settings import DEFAULT_TOY_MODEL, TrainSettings


@dataclass
class TrainResult:
    path: Path
    model_name: str
    pairs: int                       # image-caption pairs trained on
    skipped: int                     # dataset items that could not be read (skipped, counted)
    steps: int
    seconds: float
    losses: List[float] = field(default_factory=list)   # per step
    fingerprint: str = ""            # neurolens.models weights_fingerprint of the saved weights
    settings: Optional[TrainSettings] = None

    @property
    def final_loss(self) -> float:
        tail = self.losses[-10:]
        return float(sum(tail) / len(tail)) if tail else float("nan")


@contextlib.contextmanager
def _threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def model_config(name: str) -> Dict:
    """The open_clip config (a dict) of a model name, bundled configs included."""
    import open_clip  # lazy: open_clip takes seconds to import
    register_bundled_configs()
    config = open_clip.get_model_config(name)
    if config is None:
        raise NeurolensError(f"unknown model config {name!r}; use {DEFAULT_TOY_MODEL} or another open_clip model name")
    return config


def build_model(name: str, seed: int) -> torch.nn.Module:
    """A randomly initialized open_clip model (open_clip's own init, seeded)."""
    import open_clip  # lazy: open_clip takes seconds to import
    model_config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            return open_clip.create_model(name, pretrained=None)
        finally:
            logging.disable(previous)


def encode_text_truncated(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """model.encode_text on tokens cut to their real length (exact under the causal mask), unnormalized,
    with gradients (training uses it)."""
    return encode_tokens_truncated(model, tokens, pool_positions(model, tokens))


def tokenize(model_name: str, captions: Sequence[str]) -> torch.Tensor:
    """(N, L) token ids, L = the longest caption's length (end-of-text token included)."""
    import open_clip  # lazy: open_clip takes seconds to import
    tokens = open_clip.get_tokenizer(model_name)(list(captions))
    length = int((tokens != 0).sum(dim=1).max().item())
    return tokens[:, :max(2, length)].contiguous()


def load_pairs(source: str, image_column: str = "image", caption_column: str = "caption", size: int = 64,
               progress: Optional[Callable[[int, int], None]] = None) -> Tuple[np.ndarray, List[str], int]:
    """(images uint8 (N,size,size,3), captions, skipped) from a parquet/CSV of image paths and captions.

    Image paths are relative to the table's folder. Unreadable images are skipped and counted."""
    dataset = open_dataset(source, image_column=image_column, caption_column=caption_column)
    if dataset.captions is None:
        raise DatasetError(f"{source} has no caption column {caption_column!r}; training needs captions: "
                           f"name the column with --caption-column")
    keep_images, keep_captions, skipped = [], [], 0
    total = len(dataset)
    for i in range(total):
        try:
            keep_images.append(preprocess_array(dataset.load(i), size).transpose(1, 2, 0))
            keep_captions.append(dataset.captions[i])
        except BadImage:  # a bad file is skipped and counted, never fatal
            skipped += 1
        if progress is not None and ((i + 1) % 200 == 0 or i + 1 == total):
            progress(i + 1, total)
    if len(keep_images) < 2:
        raise DatasetError(f"{source} has {len(keep_images)} readable image-caption pairs; training needs at least 2")
    return np.stack(keep_images), keep_captions, skipped


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: cross-entropy over image->text and text->image logits of the batch."""
    logits = logit_scale * image_features @ text_features.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def train_clip(images: np.ndarray, captions: Sequence[str], settings: TrainSettings = TrainSettings(),
               progress: Optional[Callable[[int, int], None]] = None,
               max_steps: Optional[int] = None) -> Tuple[torch.nn.Module, List[float]]:
    """Train settings.model on (images uint8 (N,S,S,3), captions); returns the model (eval mode) and losses.

    max_steps stops early (the schedule is still planned for all epochs); tests use it."""
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # lazy: open_clip takes seconds to import
    if len(images) != len(captions):
        raise NeurolensError(f"{len(images)} images but {len(captions)} captions")
    with _threads(settings.threads):
        model = build_model(settings.model, settings.seed)
        model.train()
        tokens = tokenize(settings.model, captions)
        pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)   # uint8 (N,3,S,S)
        mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
        n = len(captions)
        batch = min(settings.batch_size, n)
        per_epoch = n // batch                     # drop the last partial batch: equal batch sizes
        total = per_epoch * settings.epochs
        if max_steps is not None:
            total_run = min(total, max_steps)
        else:
            total_run = total
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            # CLIP's recipe: no weight decay on gains, biases, embeddings and the temperature.
            (no_decay if param.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(param)
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr,
                                      betas=(0.9, 0.98), eps=1e-6)
        warmup = max(1, int(settings.warmup_fraction * total))
        generator = torch.Generator().manual_seed(settings.seed)
        losses: List[float] = []
        step = 0
        for _epoch in range(settings.epochs):
            order = torch.randperm(n, generator=generator)
            for b in range(per_epoch):
                if step >= total_run:
                    break
                lr = settings.lr * ((step + 1) / warmup if step < warmup
                                    else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
                for group in optimizer.param_groups:
                    group["lr"] = lr
                index = order[b * batch:(b + 1) * batch]
                x = (pixels[index].float() / 255.0 - mean) / std
                image_features = F.normalize(model.encode_image(x), dim=-1)
                text_features = F.normalize(encode_text_truncated(model, tokens[index]), dim=-1)
                loss = clip_loss(image_features, text_features, model.logit_scale.exp())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
                losses.append(float(loss.item()))
                step += 1
                if progress is not None:
                    progress(step, total_run)
        model.eval().requires_grad_(False)
    return model, losses


def train_toy(dataset: str, out: str | os.PathLike, settings: TrainSettings = TrainSettings(),
              image_column: str = "image", caption_column: str = "caption",
              progress: Optional[Callable[[int, int], None]] = None,
              load_progress: Optional[Callable[[int, int], None]] = None, out_option: str = "--out",
              max_steps: Optional[int] = None) -> TrainResult:
    """Train a small CLIP on a parquet/CSV of image paths and captions and save it to `out`.

    The checkpoint carries its model config, so load_clip(checkpoint=out) needs no model name."""
    config = model_config(settings.model)
    size = int(config["vision_cfg"]["image_size"])
    started = time.perf_counter()
    images, captions, skipped = load_pairs(dataset, image_column, caption_column, size, progress=load_progress)
    model, losses = train_clip(images, captions, settings, progress=progress, max_steps=max_steps)
    seconds = time.perf_counter() - started
    extra = {"neurolens_training": {"settings": asdict(settings), "pairs": len(captions), "skipped": skipped,
                                    "steps": len(losses), "seconds": round(seconds, 2),
                                    "final_loss": float(np.mean(losses[-10:])) if losses else None,
                                    "dataset": str(dataset)}}
    path = save_checkpoint(model, out, settings.model, model_config=config, extra=extra,
                           option=out_option)
    return TrainResult(path=Path(path), model_name=settings.model, pairs=len(captions), skipped=skipped,
                       steps=len(losses), seconds=seconds, losses=losses,
                       fingerprint=weights_fingerprint(model), settings=settings)
