"""The image-score records: what an independent detector or the inspected model said about an image, kept so
that it is never asked twice.

    labels-nudenet/<dataset identity[:16]>/images/<key>-<first index>.h5
        scores (n,) float32: NudeNet's image scores of NUDENET_CHUNK dataset items from <first index> on
        (NaN: unreadable or skipped); the key hashes the NudeNet version, its exposed classes and the chunk
        size; attrs first, dataset, nudenet (the version). Written by the `nudenet` label source (sweeps).
    nudenet/<settings key of the NudeNet version>/images/<key>.h5
        one image's NudeNet score (attr score), keyed by a hash of its pixels (the blur policy)
    fv-nsfw/<fp>/images/<key>.h5
        one image's zero-shot NSFW score by the model with weights <fp> (attr score), keyed by the pixels'
        hash, the prompt lists' identity and the logit scale (the blur policy)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..storage.cache import Cache, Record, settings_key

NUDENET_CHUNKS_KIND = "labels-nudenet"
DETECTOR_SCORE_KIND = "nudenet"
ZERO_SHOT_SCORE_KIND = "fv-nsfw"
IMAGES = "images"            # the layer folder of per-image records: they belong to no layer
NUDENET_CHUNK = 1024         # images per NudeNet chunk record: an interrupted run keeps what it finished


# ------------------------------------------------------------------------------ a dataset's NudeNet scores

def nudenet_chunk_key(nudenet_version: str, exposed: Sequence[str]) -> str:
    return settings_key("nudenet", nudenet_version, sorted(exposed), NUDENET_CHUNK)


def nudenet_chunk_path(cache: Cache, dataset_identity: str, key: str, first: int) -> Path:
    return cache.path(NUDENET_CHUNKS_KIND, dataset_identity, IMAGES, f"{key}-{first}")


def read_nudenet_chunk(cache: Cache, path: Path, count: int) -> Optional[np.ndarray]:
    """The chunk's (count,) scores, or None when absent, unreadable or of another length."""
    record = cache.read(path)
    if record is None or len(record.arrays.get("scores", ())) != count:
        return None
    return record.arrays["scores"]


def write_nudenet_chunk(cache: Cache, path: Path, scores: np.ndarray, first: int, dataset_description: str,
                        nudenet_version: str) -> Path:
    return cache.write(path, Record(arrays={"scores": scores},
                                    attrs={"first": first, "dataset": dataset_description,
                                           "nudenet": nudenet_version}))


# ------------------------------------------------------------------------------ one image's scores

def detector_score_path(cache: Cache, detector_version: str, digest: str) -> Path:
    """The NudeNet score of the image whose pixels hash to `digest`."""
    return cache.path(DETECTOR_SCORE_KIND, settings_key("nudenet", detector_version), IMAGES, settings_key(digest))


def zero_shot_score_path(cache: Cache, fingerprint: str, digest: str, prompts_identity: str,
                         logit_scale: float) -> Path:
    """The zero-shot NSFW score, by the model with weights `fingerprint`, of the image hashing to `digest`."""
    return cache.path(ZERO_SHOT_SCORE_KIND, fingerprint, IMAGES, settings_key(digest, prompts_identity, logit_scale))


def read_score(cache: Cache, path: Path) -> Optional[float]:
    record = cache.read(path)
    return float(record.attrs["score"]) if record is not None and "score" in record.attrs else None


def write_score(cache: Cache, path: Path, score: float) -> Path:
    return cache.write(path, Record(arrays={}, attrs={"score": float(score)}))
