"""What a toy training run depends on besides its data (light: the CLI builds its option defaults from it)."""
from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TOY_MODEL = "nl-toy-RN"


@dataclass(frozen=True)
class TrainSettings:
    """Everything a trained model depends on besides the data; the demo's cache key hashes these."""
    model: str = DEFAULT_TOY_MODEL
    epochs: int = 6
    batch_size: int = 100
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    seed: int = 0
    threads: int = 1
