"""Cache-or-compute text feature visualization for every unit of a layer at once.

Three records (neurolens.records.text): the vocabulary's text embeddings (per model), the layer's unit
directions (per reference activation, reused by every vocabulary and top-k) and the ranking (per vocabulary,
reference and top-k). A reference's identity is `neutral-grey-0.5` or `scan-mean-<hash of the mean map's
bytes>`.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Union

import numpy as np

from ..errors import NeurolensError
from ..models.layer_table import resolve_layer
from ..records import text as text_records
from ..records.keys import NEURONS, as_basis, as_cache, basis_id
from ..storage.cache import Cache
from ..text.vocab import Vocabulary, builtin_identity, builtin_vocab, is_builtin, load_vocab

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
    basis: str = NEURONS               # whose units: "neurons" or an SAE basis id (neurolens.sae.basis)

    def rows(self, unit: int, limit: Optional[int] = None) -> List[dict]:
        """JSON-able rows {unit, rank, score, text}, rank 1 = highest cosine."""
        count = self.top_indices.shape[1] if limit is None else min(limit, self.top_indices.shape[1])
        return [{"unit": int(unit), "rank": rank + 1, "score": float(self.top_scores[unit, rank]),
                 "text": self.entries[int(self.top_indices[unit, rank])]} for rank in range(count)]


def vocabulary(spec: Union[str, Vocabulary, None] = "builtin", cache=None) -> Vocabulary:
    """load_vocab(spec), with the builtin list kept in the cache (records.text's vocabulary record): building it
    reads timm's and open_clip's files, about a second, which a cached answer should not spend."""
    if isinstance(spec, Vocabulary):
        return spec
    if not is_builtin(spec):
        return load_vocab(spec)
    cache = as_cache(cache)
    path = text_records.vocabulary_path(cache, builtin_identity())
    vocab = text_records.read_vocabulary(cache, path)
    if vocab is None:
        vocab = builtin_vocab()
        text_records.write_vocabulary(cache, path, vocab)
    return vocab


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
    cache = as_cache(cache)
    path = text_records.embeddings_path(cache, clip.fingerprint, vocab.identity)
    if not force:
        embeddings = text_records.read_embeddings(cache, path, len(vocab))
        if embeddings is not None:
            if progress is not None:
                progress(len(vocab), len(vocab))
            return embeddings, True, path
    from ..text.encode import encode_texts  # lazy: torch only to compute; a cached answer imports none
    embeddings = encode_texts(clip, vocab.entries, batch_size=batch_size, progress=progress)
    text_records.write_embeddings(cache, path, embeddings, vocab, clip)
    return embeddings, False, path


def _units(spec, basis) -> int:
    return spec.channels if basis is None else basis.units


def unit_directions_cached(clip, spec, scan=None, cache=None, force: bool = False,
                           progress: Progress = None, basis=None) -> "tuple[np.ndarray, bool]":
    """(U,D) unit directions at the reference (the scan's mean map, else the neutral image), cached.
    basis: None for the neurons; an SAE basis gives each feature's decoder direction through the same Jacobian."""
    cache = as_cache(cache)
    basis = as_basis(basis)
    ref_id = reference_identity(scan)
    path = text_records.directions_path(cache, clip.fingerprint, spec, ref_id, basis)
    if not force:
        directions = text_records.read_directions(cache, path, _units(spec, basis))
        if directions is not None:
            return directions, True
    from ..text import directions as directionlib  # lazy: torch only to compute; a cached answer imports none
    reference_map = None if scan is None else scan.mean_map
    if basis is None:
        directions = directionlib.unit_directions(clip, spec, reference_map=reference_map, progress=progress)
    else:
        jacobian = directionlib.image_jacobian(clip, spec, reference_map, progress=progress)
        directions = np.asarray(basis.directions(jacobian), dtype=np.float32)
    text_records.write_directions(cache, path, directions, spec.name, ref_id, reference_description(scan), basis)
    return directions, False


def _ranking_path(clip, spec, vocab: Vocabulary, top_k: int, scan, cache: Cache, basis=None) -> Path:
    return text_records.ranking_path(cache, clip.fingerprint, spec, vocab.identity, reference_identity(scan), top_k,
                                     basis)


def _prepare(clip, layer: str, vocab, top_k: int, scan, cache: Cache):
    if int(top_k) < 1:
        raise NeurolensError(f"--top-k must be at least 1, got {top_k}")
    spec = resolve_layer(clip, layer)
    if scan is not None and getattr(scan, "layer", spec.name) != spec.name:
        raise NeurolensError(f"the scan is of layer {scan.layer}, not {spec.name}; scan {spec.name} first")
    vocab = vocabulary(vocab, cache)
    return spec, vocab, int(min(int(top_k), len(vocab)))


def _ranking(spec, vocab: Vocabulary, scan, path: Path, basis=None, **fields) -> TextRanking:
    return TextRanking(layer=spec.name, entries=vocab.entries, reference=reference_identity(scan),
                       reference_description=reference_description(scan), vocab_source=vocab.source,
                       vocab_identity=vocab.identity, path=path, basis=basis_id(basis), **fields)


def find_text(clip, layer: str, vocab: Union[str, Vocabulary] = "builtin", top_k: int = 30, scan=None,
              cache=None, basis=None) -> Optional[TextRanking]:
    """The cached ranking for these settings, or None."""
    cache = as_cache(cache)
    spec, vocab, top_k = _prepare(clip, layer, vocab, top_k, scan, cache)
    basis = as_basis(basis)
    path = _ranking_path(clip, spec, vocab, top_k, scan, cache, basis)
    found = text_records.read_ranking(cache, path, _units(spec, basis), top_k)
    if found is None:
        return None
    return _ranking(spec, vocab, scan, path, basis, top_indices=found[0], top_scores=found[1], cached=True,
                    embeddings_cached=True, directions_cached=True)


def run_text(clip, layer: str, vocab: Union[str, Vocabulary] = "builtin", top_k: int = 30, scan=None,
             cache=None, force: bool = False, progress: Progress = None, batch_size: int = 256,
             direction_progress: Progress = None, basis=None) -> TextRanking:
    """Top-k vocabulary entries for ALL units of `layer`, cache-or-compute.

    scan: a ScanResult whose mean_map is the reference activation (None: the neutral grey image).
    progress: called (done, total) while encoding the vocabulary; direction_progress: while computing the
    Jacobian (embedding dimensions done). Embeddings, directions and the ranking are cached separately, so a
    new vocabulary reuses the directions and a new layer reuses the embeddings.
    basis: None for neurons, or a basis of the layer (neurolens.sae.basis.load_basis) whose units are ranked."""
    cache = as_cache(cache)
    spec, vocab, top_k = _prepare(clip, layer, vocab, top_k, scan, cache)
    basis = as_basis(basis)
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
    from ..text.directions import top_k_texts  # lazy: torch only to compute; a cached answer imports none
    indices, scores = top_k_texts(directions, embeddings, top_k, device=clip.device)
    ranked = time.perf_counter()
    path = _ranking_path(clip, spec, vocab, top_k, scan, cache, basis)
    text_records.write_ranking(cache, path, indices, scores, top_k, spec.name, vocab, reference_identity(scan),
                               reference_description(scan), basis)
    return _ranking(spec, vocab, scan, path, basis, top_indices=indices, top_scores=scores, cached=False,
                    embeddings_cached=embeddings_cached, directions_cached=directions_cached,
                    timings={"encode_s": encoded - started, "directions_s": directed - encoded,
                             "rank_s": ranked - directed})
