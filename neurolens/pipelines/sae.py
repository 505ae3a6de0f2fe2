"""Train an SAE on one layer of a model over a dataset, cache-or-compute, resumable.

The SAE lands next to the cache, keyed by the model fingerprint and the layer (neurolens/records/sae.py):

    <cache>/sae/<fingerprint[:16]>/<layer>/<name>/cfg.json, sae_weights.safetensors   SAELens's layout
    <cache>/sae/<fingerprint[:16]>/<layer>/<name>/checkpoint.pt                       while training

cfg.json's metadata.neurolens holds the training key (a hash of the model fingerprint, the layer's capture
point, the dataset identity, the preprocessing and every training setting), the settings, and the quality
report. The same request again reads the finished SAE; another request under an existing name is refused
unless --force. An interrupted run resumes from checkpoint.pt (written at chunk boundaries) and gives the
weights an uninterrupted run gives.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Union

from ..types import PRECISIONS
from ..datasets.decode import resolve_decoder
from ..datasets.open import open_dataset
from ..datasets.types import ImageDataset
from ..engines.local import default_batch_size, default_workers
from ..errors import NeurolensError
from ..models.layer_table import resolve_layer
from ..records.keys import as_cache, decoder_parts
from ..records.sae import check_name, is_complete, sae_folder
from ..sae.basis import SaeBasis
from ..sae.buffer import ActivationStream, split_images
from ..sae.io import load_sae, save_sae
from ..records.sae import read_config
from ..sae.quality import QualityReport, evaluate
from ..sae.train import (SPARSITIES, SaeTrainSettings, default_buffer_vectors, plan, resolve_features, resolved_lr,
                         train_loop)
from ..storage.cache import settings_key

SAE_TRAIN_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
Progress = Optional[Callable[[int, int], None]]


@dataclass
class SaeTrainResult:
    name: str
    path: Path
    layer: str
    features: int
    k: int
    quality: QualityReport
    settings: SaeTrainSettings
    cached: bool = False
    resumed_from: Optional[int] = None        # training vectors already done when this run resumed
    seconds: float = 0.0                      # training time of this run (0 when cached)
    vectors: int = 0                          # training vectors seen
    epochs: int = 0
    skipped: int = 0                          # unreadable training images
    basis: str = ""                           # the basis id that scans, texts and sweeps of it are keyed by
    history: List[list] = field(default_factory=list)   # per chunk: [vectors, loss, explained variance, dead share]
    info: dict = field(default_factory=dict)  # cfg.json's metadata.neurolens

    def summary(self) -> dict:
        """The `sae train --json` document."""
        q = self.quality.to_dict()
        return {"name": self.name, "path": str(self.path), "layer": self.layer, "features": self.features,
                "k": self.k, "explained_variance": q["explained_variance"], "l0": q["l0"],
                "dead_share": q["dead_share"], "embedding_cosine": q["embedding_cosine"],
                "never_fired_share": q["never_fired_share"], "held_out_images": q["held_out_images"],
                "held_out_vectors": q["held_out_vectors"], "dead_after": q["dead_after"], "vectors": self.vectors,
                "epochs": self.epochs, "skipped": self.skipped, "seconds": round(self.seconds, 2),
                "cached": self.cached, "resumed_from": self.resumed_from, "basis": self.basis,
                "model": self.info.get("model"), "fingerprint": self.info.get("fingerprint"),
                "settings": self.settings.as_dict()}


def train_key(clip, spec, dataset: ImageDataset, settings: SaeTrainSettings, d_sae: int, precision: str,
              decoder: str = "pil") -> str:
    """The training key; decoder: the resolved image decoder (named in the key unless pil, as for scans)."""
    return settings_key("sae-train", SAE_TRAIN_VERSION, clip.fingerprint, spec.name, spec.hook_module, spec.capture,
                        dataset.identity, clip.image_size, list(clip.mean), list(clip.std), precision,
                        settings.as_dict(), int(d_sae), *decoder_parts(decoder))


def _check(settings: SaeTrainSettings, d_sae: int, precision: str) -> None:
    if precision not in PRECISIONS:
        raise NeurolensError(f"unknown precision {precision!r}; use fp32 or bf16")
    if not 1 <= settings.k <= d_sae:
        raise NeurolensError(f"--k must be between 1 and the number of features ({d_sae}), got {settings.k}")
    if settings.batch_size < 1:
        raise NeurolensError(f"--batch-size must be at least 1, got {settings.batch_size}")
    if settings.epochs < 0:
        raise NeurolensError(f"--epochs must be 0 (automatic) or more, got {settings.epochs}")
    if not 0.0 <= settings.held_out < 1.0:
        raise NeurolensError(f"--held-out must be a share in [0, 1), got {settings.held_out}")
    if settings.lr < 0:
        raise NeurolensError(f"--lr must be positive (or 0 for the default), got {settings.lr}")
    if settings.sparsity not in SPARSITIES:
        raise NeurolensError(f"--sparsity must be {' or '.join(SPARSITIES)}, got {settings.sparsity!r}")


def run_sae_train(clip, layer: str, dataset: Union[ImageDataset, str, None] = None,
                  settings: SaeTrainSettings = SaeTrainSettings(), name: Optional[str] = None, cache=None,
                  force: bool = False, progress: Progress = None, on_metrics: Optional[Callable[[dict], None]] = None,
                  images_per_forward: Optional[int] = None, workers: Optional[int] = None, precision: str = "fp32",
                  checkpoint_seconds: float = 30.0, stop_after_chunks: Optional[int] = None,
                  quality_progress: Progress = None, decoder: str = "auto") -> SaeTrainResult:
    """Train (or read the cached) TopK or BatchTopK SAE (settings.sparsity) of `layer` over `dataset`; see the
    module docstring.

    progress(done, total) counts training vectors; on_metrics(dict) gets loss, explained_variance and dead_share
    after every chunk; quality_progress counts held-out images while the quality report is computed.
    decoder: the image decoder of the training and held-out images (run_scan's; named in cfg.json)."""
    spec = resolve_layer(clip, layer)
    dataset = dataset if isinstance(dataset, ImageDataset) else open_dataset(dataset)
    cache = as_cache(cache)
    d_sae = resolve_features(spec.channels, settings.features)
    _check(settings, d_sae, precision)
    decoder = resolve_decoder(decoder, clip.device)
    key = train_key(clip, spec, dataset, settings, d_sae, precision, decoder)
    name = check_name(name or f"{settings.sparsity}-{d_sae}-k{settings.k}-{key[:8]}")
    folder = sae_folder(cache, clip.fingerprint, spec.name, name)
    checkpoint = folder / CHECKPOINT_NAME

    if is_complete(folder) and not force:
        info = (read_config(folder).get("metadata") or {}).get("neurolens") or {}
        if info.get("key") != key:
            raise NeurolensError(f"an SAE named {name!r} already exists for layer {spec.name} of this model, made "
                                 f"with other settings or data ({folder}); pass --force to replace it or choose "
                                 f"another --out name")
        return _cached_result(clip, spec, folder, name, settings, info)
    if force:
        checkpoint.unlink(missing_ok=True)

    train_images, held_images = split_images(len(dataset), settings.held_out, settings.max_held_out, settings.seed)
    if len(train_images) == 0:
        raise NeurolensError(f"{dataset.description} has no image to train on; give a dataset with at least 2 images")
    images_per_forward = int(images_per_forward or default_batch_size(clip.device))
    workers = default_workers() if workers is None else int(workers)
    buffer_vectors = settings.buffer_vectors or default_buffer_vectors(spec.channels)
    stream = ActivationStream(clip, spec, dataset, train_images, buffer_vectors, settings.seed,
                              images_per_forward=images_per_forward, workers=workers, precision=precision,
                              decoder=decoder)
    epochs, _, dead_after = plan(stream, settings)
    loop = train_loop(stream, settings, d_sae, key, checkpoint, progress=progress, on_metrics=on_metrics,
                      checkpoint_seconds=checkpoint_seconds, stop_after_chunks=stop_after_chunks)
    trainer = loop.trainer
    dead_share = float(trainer.dead_mask().float().mean())
    quality = evaluate(clip, spec, loop.sae, dataset, held_images, dead_share=dead_share, dead_after=dead_after,
                       batch_size=images_per_forward, workers=workers, precision=precision,
                       progress=quality_progress, decoder=decoder)
    info = {"key": key, "name": name, "model": clip.name, "pretrained": clip.pretrained,
            "fingerprint": clip.fingerprint, "layer": spec.name, "hook_module": spec.hook_module,
            "capture": spec.capture, "grid": [spec.height, spec.width], "dataset": dataset.description,
            "dataset_identity": dataset.identity, "images": len(dataset), "train_images": int(len(train_images)),
            "held_out_images": int(len(held_images)), "skipped": len(trainer.state.skipped),
            "settings": settings.as_dict(), "features": d_sae, "lr": resolved_lr(settings, d_sae),
            "dead_after": dead_after, "epochs": epochs, "vectors": trainer.state.seen, "precision": precision,
            "decoder": decoder,
            "dead_feature_handling": "auxk", "sparsity": settings.sparsity,
            "inference_threshold": trainer.state.threshold, "quality": quality.to_dict(), "seconds": round(loop.seconds, 2),
            "history": trainer.state.history, "created": time.time()}
    save_sae(loop.sae, folder, {"model_name": clip.name, "hook_name": spec.name, "neurolens": info})
    checkpoint.unlink(missing_ok=True)
    return SaeTrainResult(name=name, path=folder, layer=spec.name, features=d_sae, k=settings.k, quality=quality,
                          settings=settings, cached=False, resumed_from=loop.resumed_from, seconds=loop.seconds,
                          vectors=trainer.state.seen, epochs=epochs, skipped=len(trainer.state.skipped),
                          basis=SaeBasis(loop.sae, name, spec, folder).id, history=trainer.state.history, info=info)


def _cached_result(clip, spec, folder: Path, name: str, settings: SaeTrainSettings, info: dict) -> SaeTrainResult:
    q = info.get("quality") or {}
    quality = QualityReport(
        explained_variance=_num(q.get("explained_variance")), l0=_num(q.get("l0")),
        dead_share=_num(q.get("dead_share")), never_fired_share=_num(q.get("never_fired_share")),
        embedding_cosine=_num(q.get("embedding_cosine")), held_out_images=int(q.get("held_out_images") or 0),
        held_out_vectors=int(q.get("held_out_vectors") or 0), dead_after=int(q.get("dead_after") or 0))
    sae = load_sae(folder, device=clip.device)
    # a BatchTopK SAE is saved as jumprelu, which has no k: k is that of the (matching) settings
    return SaeTrainResult(name=name, path=folder, layer=spec.name, features=sae.d_sae, k=int(sae.k or settings.k),
                          quality=quality, settings=settings, cached=True,
                          vectors=int(info.get("vectors") or 0), epochs=int(info.get("epochs") or 0),
                          skipped=int(info.get("skipped") or 0), basis=SaeBasis(sae, name, spec, folder).id,
                          history=list(info.get("history") or []), info=info)


def _num(value) -> float:
    return float("nan") if value is None else float(value)

