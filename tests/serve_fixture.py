"""A small cache for the web-app tests: the tiny RN model (random weights) over 96 generated toy images
(a quarter of them showing the planted pattern), with every record kind the pages show: scan (with
per-image maxima), text ranking (the captions as vocabulary), sweep, feature visualizations of a few
units, the top-k activation maps, and a concept audit with descriptions (CONCEPTS: nsfw by its caption
lexicon, a non-sensitive `pattern` concept from the same `planted` column, so that every unit flagged for
both is an intersection, and a non-sensitive `circles` lexicon); and the same again for the 64 features of a
tiny TopK SAE trained on the layer (3 epochs over the 96 images). Built in about 10 s on one core.

The sweep's label source is the generator's `planted` column (`--labels column:planted`), so the flagged
units are the ones that respond to the planted pattern."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List

import numpy as np

LAYER = "image_block_3_0"
IMAGES = 96
SAE = "tiny"


def concepts():
    """The fixture's concept set (module docstring)."""
    from neurolens.labels.concepts import concept_set_of
    from neurolens.toy.concepts import planted_words
    return concept_set_of([{"name": "nsfw", "terms": planted_words(), "match": "word"},
                           {"name": "pattern", "column": "planted", "sensitive": False},
                           {"name": "circles", "terms": ["circle", "circles"], "match": "exact", "sensitive": False}],
                          name="fixture")


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
    sae: str = SAE                  # the SAE's name
    basis: str = ""                 # its basis id (sae-<name>-<hash>)
    features: int = 0
    feature_flagged: List[int] = None
    feature_visualized: List[int] = None
    intersections: List[int] = None     # units flagged for two or more concepts (nsfw and pattern)


def build(root: Path, clip) -> Fixture:
    import pyarrow.parquet as pq
    from neurolens.datasets.open import open_dataset
    from neurolens.pipelines.describe import run_describe
    from neurolens.pipelines.scan import run_scan
    from neurolens.pipelines.settings import ConceptSettings, DescribeSettings
    from neurolens.pipelines.sweep import run_sweep
    from neurolens.pipelines.topmaps import run_top_maps
    from neurolens.pipelines.sae import run_sae_train
    from neurolens.pipelines.visualize import run_visualize
    from neurolens.sae.train import SaeTrainSettings
    from neurolens.sae.basis import load_basis
    from neurolens.storage.cache import Cache
    from neurolens.toy.generate import ToySettings, write_dataset
    from neurolens.types import RenderSettings

    root = Path(root)
    parquet = write_dataset(root / "data", ToySettings(n=IMAGES, size=64, planted_share=0.25, seed=3))
    planted = np.asarray(pq.read_table(parquet, columns=["planted"]).column("planted").to_pylist(), dtype=bool)
    dataset = open_dataset(str(parquet))
    cache = Cache(root / "cache")

    scan = run_scan(clip, LAYER, dataset, top_k=8, cache=cache, embeddings=True, workers=0)
    sweep = run_sweep(clip, LAYER, dataset, vocab=f"{parquet}:caption", top_k=8, text_top_k=10, cache=cache,
                      labels=("column:planted",), workers=0, write_csv=False)
    flagged = sweep.flagged_units
    visualized = sorted(set(flagged[:2]) | {0})
    run_visualize(clip, LAYER, visualized, RenderSettings(steps=8, seeds=(0, 1)), cache=cache)
    run_top_maps(clip, LAYER, scan=scan, cache=cache, workers=0)
    concept_settings = ConceptSettings(concepts=concepts(), top_k=8, detector=False)
    described = run_describe(clip, LAYER, dataset, concept_settings, DescribeSettings(top_k=6), cache=cache, workers=0)

    # the features of a tiny SAE: trained, swept (scan + texts + sweep), two visualized, their top maps
    run_sae_train(clip, LAYER, dataset, SaeTrainSettings(features="64", k=8, epochs=3, batch_size=64, held_out=0.2),
                  name=SAE, cache=cache, workers=0)
    basis = load_basis(clip, LAYER, SAE, cache)
    feature_sweep = run_sweep(clip, LAYER, dataset, vocab=f"{parquet}:caption", top_k=8, text_top_k=10, cache=cache,
                              labels=("column:planted",), workers=0, write_csv=False, basis=basis)
    feature_flagged = feature_sweep.flagged_units
    feature_visualized = sorted(set(feature_flagged[:1]) | {0})
    run_visualize(clip, LAYER, feature_visualized, RenderSettings(steps=8, seeds=(0, 1)), cache=cache, basis=basis)
    run_top_maps(clip, LAYER, cache=cache, workers=0, basis=basis)
    run_describe(clip, LAYER, dataset, concept_settings, DescribeSettings(top_k=6), cache=cache, workers=0, basis=basis)
    return Fixture(cache=root / "cache", dataset=parquet, clip=clip, layer=LAYER, units=scan.channels,
                   flagged=flagged, visualized=visualized, planted=planted, basis=basis.id, features=basis.units,
                   feature_flagged=feature_flagged, feature_visualized=feature_visualized,
                   intersections=described.concepts.intersections())


# ------------------------------------------------------------------------------------------ a live server

@dataclass
class Server:
    process: object
    url: str               # the printed URL (with ?token=... when a token is in force)
    base: str              # scheme://host:port
    port: int
    stderr: str = ""


def start_server(cache: Path, *options: str, timeout: float = 180.0) -> Server:
    """`neurolens serve --cache CACHE --port 0 OPTIONS` in a subprocess; waits (bounded) for its URL line."""
    import os
    import re
    import selectors
    import subprocess
    import sys
    import time

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "neurolens", "serve", "--cache", str(cache), "--port", "0",
                                *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline and process.poll() is None:
        if selector.select(timeout=0.5):
            line = process.stdout.readline()
            if line.startswith("serving "):
                break
    selector.close()
    match = re.fullmatch(r"serving (http://([0-9.]+):(\d+))/(\?token=\S+)?\n?", line)
    if match is None:
        stop_server(Server(process, "", "", 0))
        raise AssertionError(f"no URL line from neurolens serve (got {line!r}); stderr: {process.stderr.read()[-2000:]}")
    return Server(process, match.group(0)[len("serving "):].strip(), match.group(1), int(match.group(3)))


def stop_server(server: Server) -> None:
    import subprocess
    process = server.process
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def snapshot(folder: Path) -> dict:
    """{relative path: (size, mtime_ns)} of every file under folder (to show that nothing was written)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}
