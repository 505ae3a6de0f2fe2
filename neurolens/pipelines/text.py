"""Cache-or-compute text feature visualization for every unit of a layer at once.

Cache records (one HDF5 file each; <fp> is the model fingerprint's first 16 hex digits):
  text-embeddings/<fp>/text/<key>.h5     embeddings (N,D) float32 L2-normalized, one row per vocabulary
                                         entry; key = (vocabulary identity, encoder version)
  text-directions/<fp>/<layer>/<key>.h5  directions (C,D) float32, the unit directions; key = (layer's
                                         capture point, reference identity, version). Reused by every
                                         vocabulary and top-k.
  text-rankings/<fp>/<layer>/<key>.h5    top_indices (C,k) int64 and top_scores (C,k) float32, best first;
                                         key = (vocabulary identity, reference identity, top-k, version)
A vocabulary's identity is a hash of its entries (same content, same cache, whatever the file name); a
reference's identity is `neutral-grey-0.5` or `scan-mean-<hash of the mean map's bytes>`.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Union

import numpy as np

from ..text import directions as directionlib, encode as textlib
from ..errors import NeurolensError
from ..models import resolve_layer
from ..storage.cache import Cache, Record, settings_key
from ..text.vocab import Vocabulary, load_vocab

TEXT_VERSION = 1
NEUTRAL_REFERENCE = "neutral-grey-0.5"
Progress = Optional[Callable[[int, int], None]]


@dataclass
class TextRanking:
    """Each unit's top-k vocabulary entries by cosine between the unit direction and the text embedding."""
    layer: str
    entries: List[str]                 # the vocabulary, in its order; top_indices index into it
    top_indices: np.ndarray            # (U, k) int64, best first
    top_scores: np.ndarray             # (U, k) float32 cosines, descending
    reference: str = NEUTRAL_REFERENCE   # identity of the reference activation
    reference_description: str = ""
    vocab_source: str = ""
    vocab_identity: str = ""
    cached: bool = False               # the ranking itself came from the cache
    embeddings_cached: bool = False
    directions_cached: bool = False
    path: Optional[Path] = None
    timings: dict = field(default_factory=dict)
    basis: str = "neurons"             # whose units: "neurons" or an SAE basis id (neurolens.sae.basis)

    def rows(self, unit: int, limit: Optional[int] = None) -> List[dict]:
        """JSON-able rows {unit, rank, score, text}, rank 1 = highest cosine."""
        count = self.top_indices.shape[1] if limit is None else min(limit, self.top_indices.shape[1])
        return [{"unit": int(unit), "rank": rank + 1, "score": float(self.top_scores[unit, rank]),
                 "text": self.entries[int(self.top_indices[unit, rank])]} for rank in range(count)]


def _as_cache(cache: Union[Cache, str, None]) -> Cache:
    return cache if isinstance(cache, Cache) else Cache(cache)


def reference_identity(scan=None) -> str:
    if scan is None:
        return NEUTRAL_REFERENCE
    mean_map = np.ascontiguousarray(np.asarray(scan.mean_map, dtype=np.float32))
    return "scan-mean-" + hashlib.sha1(mean_map.tobytes() + str(mean_map.shape).encode()).hexdigest()[:16]


def reference_description(scan=None) -> str:
    if scan is None:
        return "neutral image (0.5 grey, normalized with the model's mean/std)"
    what = getattr(scan, "description", "") or "the scanned dataset"
    return f"mean activation map over {scan.count} images of {what}"


def text_embeddings(clip, vocab: Vocabulary, cache=None, force: bool = False, batch_size: int = 256,
                    progress: Progress = None) -> "tuple[np.ndarray, bool, Path]":
    """The vocabulary's (N,D) text embeddings from the cache, or encoded (truncated) and cached.
    Returns (embeddings, cached, record path)."""
    cache = _as_cache(cache)
    key = settings_key("text-embeddings", TEXT_VERSION, vocab.identity)
    path = cache.path("text-embeddings", clip.fingerprint, "text", key)
    if not force:
        record = cache.read(path)
        if record is not None and record.arrays.get("embeddings", np.empty(0)).shape[:1] == (len(vocab),):
            if progress is not None:
                progress(len(vocab), len(vocab))
            return record.arrays["embeddings"].astype(np.float32, copy=False), True, path
    embeddings = textlib.encode_texts(clip, vocab.entries, batch_size=batch_size, progress=progress)
    cache.write(path, Record(arrays={"embeddings": embeddings},
                             attrs={"vocab_identity": vocab.identity, "vocab_source": vocab.source,
                                    "count": len(vocab), "model": clip.name, "fingerprint": clip.fingerprint}))
    return embeddings, False, path


def _basis_parts(basis) -> list:
    """Extra key parts: none for the neurons (their keys stay what they always were), the basis id otherwise."""
    return [] if basis is None else [basis.id]


def _units(spec, basis) -> int:
    return spec.channels if basis is None else basis.units


def _as_basis(basis):
    return None if basis is None or getattr(basis, "id", "neurons") == "neurons" else basis


def unit_directions_cached(clip, spec, scan=None, cache=None, force: bool = False,
                           progress: Progress = None, basis=None) -> "tuple[np.ndarray, bool]":
    """(U,D) unit directions at the reference (the scan's mean map, else the neutral image), cached.
    basis: None for the neurons; an SAE basis gives each feature's decoder direction through the same Jacobian."""
    cache = _as_cache(cache)
    basis = _as_basis(basis)
    ref_id = reference_identity(scan)
    key = settings_key("text-directions", TEXT_VERSION, spec.hook_module, spec.capture, ref_id, *_basis_parts(basis))
    path = cache.path("text-directions", clip.fingerprint, spec.name, key)
    units = _units(spec, basis)
    if not force:
        record = cache.read(path)
        if record is not None and record.arrays.get("directions", np.empty(0)).shape[:1] == (units,):
            return record.arrays["directions"], True
    reference_map = None if scan is None else scan.mean_map
    if basis is None:
        directions = directionlib.unit_directions(clip, spec, reference_map=reference_map, progress=progress)
    else:
        jacobian = directionlib.image_jacobian(clip, spec, reference_map, progress=progress)
        directions = np.asarray(basis.directions(jacobian), dtype=np.float32)
    cache.write(path, Record(arrays={"directions": directions},
                             attrs={"layer": spec.name, "reference": ref_id, "basis": basis.id if basis else "neurons",
                                    "reference_description": reference_description(scan)}))
    return directions, False


def _ranking_path(clip, spec, vocab: Vocabulary, top_k: int, scan, cache: Cache, basis=None) -> Path:
    key = settings_key("text-rankings", TEXT_VERSION, spec.hook_module, spec.capture, vocab.identity,
                       reference_identity(scan), int(top_k), *_basis_parts(basis))
    return cache.path("text-rankings", clip.fingerprint, spec.name, key)


def _prepare(clip, layer: str, vocab, top_k: int, scan):
    if int(top_k) < 1:
        raise NeurolensError(f"--top-k must be at least 1, got {top_k}")
    spec = resolve_layer(clip, layer)
    if scan is not None and getattr(scan, "layer", spec.name) != spec.name:
        raise NeurolensError(f"the scan is of layer {scan.layer}, not {spec.name}; scan {spec.name} first")
    vocab = vocab if isinstance(vocab, Vocabulary) else load_vocab(vocab)
    return spec, vocab, int(min(int(top_k), len(vocab)))


def _ranking(spec, vocab: Vocabulary, scan, path: Path, basis=None, **fields) -> TextRanking:
    return TextRanking(layer=spec.name, entries=vocab.entries, reference=reference_identity(scan),
                       reference_description=reference_description(scan), vocab_source=vocab.source,
                       vocab_identity=vocab.identity, path=path, basis=basis.id if basis else "neurons", **fields)


def find_text(clip, layer: str, vocab: Union[str, Vocabulary] = "builtin", top_k: int = 30, scan=None,
              cache=None, basis=None) -> Optional[TextRanking]:
    """The cached ranking for these settings, or None."""
    spec, vocab, top_k = _prepare(clip, layer, vocab, top_k, scan)
    cache = _as_cache(cache)
    basis = _as_basis(basis)
    path = _ranking_path(clip, spec, vocab, top_k, scan, cache, basis)
    record = cache.read(path)
    if record is None or record.arrays.get("top_indices", np.empty((0, 0))).shape != (_units(spec, basis), top_k):
        return None
    return _ranking(spec, vocab, scan, path, basis, top_indices=record.arrays["top_indices"].astype(np.int64),
                    top_scores=record.arrays["top_scores"].astype(np.float32), cached=True,
                    embeddings_cached=True, directions_cached=True)


def run_text(clip, layer: str, vocab: Union[str, Vocabulary] = "builtin", top_k: int = 30, scan=None,
             cache=None, force: bool = False, progress: Progress = None, batch_size: int = 256,
             direction_progress: Progress = None, basis=None) -> TextRanking:
    """Top-k vocabulary entries for ALL units of `layer`, cache-or-compute.

    scan: a ScanResult whose mean_map is the reference activation (None: the neutral grey image).
    progress: called (done, total) while encoding the vocabulary; direction_progress: while computing the
    Jacobian (embedding dimensions done). Embeddings, directions and the ranking are cached separately, so a
    new vocabulary reuses the directions and a new layer reuses the embeddings.
    basis: None for neurons, or a basis of the layer (neurolens.sae.load_basis) whose units are ranked."""
    spec, vocab, top_k = _prepare(clip, layer, vocab, top_k, scan)
    cache = _as_cache(cache)
    basis = _as_basis(basis)
    if not force:
        found = find_text(clip, spec.name, vocab, top_k, scan, cache, basis)
        if found is not None:
            return found
    started = time.perf_counter()
    embeddings, embeddings_cached, _ = text_embeddings(clip, vocab, cache, force=force, batch_size=batch_size,
                                                       progress=progress)
    encoded = time.perf_counter()
    directions, directions_cached = unit_directions_cached(clip, spec, scan, cache, force=force,
                                                           progress=direction_progress, basis=basis)
    directed = time.perf_counter()
    indices, scores = directionlib.top_k_texts(directions, embeddings, top_k, device=clip.device)
    ranked = time.perf_counter()
    path = _ranking_path(clip, spec, vocab, top_k, scan, cache, basis)
    # the ranked texts themselves, so readers of the cache (the web app, the static site) need no vocabulary
    texts = np.asarray([[vocab.entries[int(i)] for i in row] for row in np.asarray(indices)], dtype=object)
    cache.write(path, Record(arrays={"top_indices": indices, "top_scores": scores, "texts": texts},
                             attrs={"layer": spec.name, "vocab_identity": vocab.identity, "vocab_source": vocab.source,
                                    "basis": basis.id if basis else "neurons",
                                    "reference": reference_identity(scan),
                                    "reference_description": reference_description(scan),
                                    "top_k": top_k, "count": len(vocab)}))
    return _ranking(spec, vocab, scan, path, basis, top_indices=indices, top_scores=scores, cached=False,
                    embeddings_cached=embeddings_cached, directions_cached=directions_cached,
                    timings={"encode_s": encoded - started, "directions_s": directed - encoded,
                             "rank_s": ranked - directed})
