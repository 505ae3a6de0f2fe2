"""The toy datasets and models in the cache: generated or trained once per settings, then reused.

Cache layout (under the cache root):
    toy/data/<key>/captions.parquet, images/*.png, dataset.json     a generated dataset (<key>: ToySettings.identity())
    toy/models/<key>.pt, <key>.json                                  a checkpoint and its training/eval summary
                                                                     (<key>: the data and training settings, torch)
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch

from ..models.build import load_clip
from ..storage.cache import settings_key
from ..storage.files import CACHE_OPTION, write_text
from .evaluate import zero_shot_accuracy
from .generate import ToySettings, write_dataset
from .settings import TrainSettings
from .train import train_toy


def toy_dataset(cache_root: Path, seed: int = 0, settings: Optional[ToySettings] = None,
                progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """The generated toy dataset's parquet under cache_root/toy/data/<key>/ (generated once per settings)."""
    settings = settings or ToySettings(seed=seed)
    folder = Path(cache_root) / "toy" / "data" / settings_key("toy-data", settings.identity())
    return write_dataset(folder, settings, progress=progress)


def toy_model(cache_root: Path, dataset: Path, data: ToySettings, train: TrainSettings, retrain: bool = False,
              progress: Optional[Callable[[int, int], None]] = None,
              load_progress: Optional[Callable[[int, int], None]] = None, evaluate: bool = True) -> tuple:
    """(checkpoint path, summary dict, trained now?) of the toy model for these settings, trained if not cached.

    The summary holds the training figures (wall `seconds` and the process's `cpu_seconds`) and, with
    evaluate, the zero-shot report (neurolens.toy.evaluate; None without)."""
    key = settings_key("toy-model", data.identity(), asdict(train), torch.__version__)
    folder = Path(cache_root) / "toy" / "models"
    checkpoint, summary_path = folder / f"{key}.pt", folder / f"{key}.json"
    if not retrain and checkpoint.is_file() and summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
            if summary.get("zero_shot") is not None or not evaluate:
                return checkpoint, summary, False
        except (OSError, ValueError):
            pass
    cpu = time.process_time()
    result = train_toy(str(dataset), checkpoint, train, progress=progress, load_progress=load_progress,
                       out_option=CACHE_OPTION)
    cpu_seconds = time.process_time() - cpu
    report = None
    if evaluate:
        clip = load_clip(checkpoint=str(checkpoint), device="cpu")
        report = zero_shot_accuracy(clip, seed=data.seed, size=data.size, planted_share=data.planted_share,
                                    style=data.style, concepts=data.concepts,
                                    intersection_share=data.intersection_share).to_dict()
    summary = dict(steps=result.steps, seconds=round(result.seconds, 1), cpu_seconds=round(cpu_seconds, 1),
                   final_loss=round(result.final_loss, 4), pairs=result.pairs, fingerprint=result.fingerprint,
                   zero_shot=report)
    write_text(summary_path, json.dumps(summary, indent=2), CACHE_OPTION)
    return checkpoint, summary, True
