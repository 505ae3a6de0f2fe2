"""A small cache for the web-app tests: the tiny RN model (random weights) over 96 generated toy images
(a quarter of them showing the planted pattern), with every record kind the pages show: scan (with
per-image maxima), text ranking (the captions as vocabulary), sweep, feature visualizations of a few
units, and the top-k activation maps. Built in about 10 s on one core.

The sweep's per-image NSFW score is the generator's planted label (injected as the scorer), so the flagged
units are the ones that respond to the planted pattern."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np

LAYER = "image_block_3_0"
IMAGES = 96


@dataclass
class Fixture:
    cache: Path
    dataset: Path
    clip: object
    layer: str
    units: int
    flagged: List[int]
    visualized: List[int]
    planted: np.ndarray


def build(root: Path, clip) -> Fixture:
    import pyarrow.parquet as pq
    from neurolens.datasets import open_dataset
    from neurolens.pipelines.scan import run_scan
    from neurolens.pipelines.sweep import run_sweep
    from neurolens.pipelines.topmaps import run_top_maps
    from neurolens.pipelines.visualize import run_visualize
    from neurolens.store import Cache
    from neurolens.toy.generate import ToySettings, write_dataset
    from neurolens.types import RenderSettings

    root = Path(root)
    parquet = write_dataset(root / "data", ToySettings(n=IMAGES, size=64, planted_share=0.25, seed=3))
    planted = np.asarray(pq.read_table(parquet, columns=["planted"]).column("planted").to_pylist(), dtype=bool)
    dataset = open_dataset(str(parquet))
    cache = Cache(root / "cache")

    def planted_scorer(model, embeddings):  # every image is readable, so rows are dataset indices in order
        assert len(embeddings) == len(planted)
        return planted.astype(np.float32)

    scan = run_scan(clip, LAYER, dataset, top_k=8, cache=cache, embeddings=True, workers=0)
    sweep = run_sweep(clip, LAYER, dataset, vocab=f"{parquet}:caption", top_k=8, text_top_k=10, cache=cache,
                      scorer=planted_scorer, workers=0, write_csv=False)
    flagged = sweep.flagged_units
    visualized = sorted(set(flagged[:2]) | {0})
    run_visualize(clip, LAYER, visualized, RenderSettings(steps=8, seeds=(0, 1)), cache=cache)
    run_top_maps(clip, LAYER, scan=scan, cache=cache, workers=0)
    return Fixture(cache=root / "cache", dataset=parquet, clip=clip, layer=LAYER, units=scan.channels,
                   flagged=flagged, visualized=visualized, planted=planted)
