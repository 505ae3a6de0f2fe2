"""Every unit's (or SAE feature's) description, cached: the concept audit (pipelines.concepts: one scan pass,
independent labels) gives each unit's best concepts with their scores; the captions give an open-vocabulary
part, the caption n-grams most enriched in the unit's top images, chosen on one half of the images and scored
on the other (scoring.enrichment); the model's own text-direction score of every concept name and lexicon term
is stored beside them for `find`, marked model-based (never on random weights).

    1. run_concepts (or run_ray_concepts): cached; its scan keeps the per-image maxima
    2. the caption n-grams of the scan's captions, the halves, every unit's top images per half (one stream
       over the scan's chunk records), chosen on half A, scored on half B
    3. the text-direction cosines (trained weights only): the unit directions at the scan's mean activation
       (pipelines.text.unit_directions_cached, cached) against the text embeddings of the concept names and
       terms (the one text encoder)
    4. the descriptions record (records.descriptions), keyed by the concepts record, the settings and the
       directions record

A second run reads the record: no forward pass, no encoding.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np

from ..labels.spec import is_random
from ..models.layer_table import resolve_layer
from ..records import text as text_records
from ..records.descriptions import (DESCRIPTIONS_KIND, DESCRIPTIONS_VERSION, DescriptionsResult, descriptions_path,
                                    from_record, to_record)
from ..records.keys import as_basis, as_cache
from ..scoring.enrichment import MIN_TOP_COUNT, SELECT_Z, NgramTable, caption_evidence, halves, merge_top
from ..scoring.units import maxima_blocks
from ..storage.cache import settings_key
from ..text.encode import encode_texts
from .concepts import run_concepts, run_ray_concepts
from .settings import ConceptSettings, DescribeSettings
from .text import reference_identity, unit_directions_cached

Progress = Optional[Callable[[int, int], None]]


def query_texts(concepts) -> List[str]:
    """Every concept name and lexicon term of a concept set, once each (case-insensitive), in set order."""
    seen, out = set(), []
    for concept in concepts:
        for text in (concept.name, *concept.terms):
            if text.lower() not in seen:
                seen.add(text.lower())
                out.append(text)
    return out


def top_by_half(scan, half: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """(2, U, k) dataset indices (-1 empty) and values of every unit's top-k images within each half, best
    first, ties by lower index: one stream over the scan's per-image maxima (scoring.units.maxima_blocks)."""
    units = int(scan.channels)
    values = np.full((2, units, k), -np.inf)
    indices = np.full((2, units, k), -1, dtype=np.int64)
    for rows, maxima in maxima_blocks(scan):
        rows = np.asarray(rows, dtype=np.int64)
        maxima = np.asarray(maxima, dtype=np.float64)
        for h in (0, 1):
            chosen = half[rows] == h
            if chosen.any():
                values[h], indices[h] = merge_top(values[h], indices[h], rows[chosen], maxima[chosen], k)
    return indices, values


def describe_units(clip, concepts_result, settings: DescribeSettings, *, cache=None, force: bool = False,
                   progress: Progress = None, basis=None) -> DescriptionsResult:
    """The descriptions of every unit of a concept audit (its scan attached), cached (module docstring)."""
    cache = as_cache(cache)
    basis = as_basis(basis)
    scan = concepts_result.scan
    spec = resolve_layer(clip, scan.layer)
    text_scores = not is_random(clip)
    directions_name = None
    if text_scores:
        directions_name = text_records.directions_path(cache, clip.fingerprint, spec, reference_identity(scan),
                                                       basis).name
    key = settings_key(DESCRIPTIONS_KIND, DESCRIPTIONS_VERSION, Path(concepts_result.path).name, asdict(settings),
                       MIN_TOP_COUNT, SELECT_Z, directions_name)
    path = descriptions_path(cache, clip.fingerprint, scan.layer, key)
    record = None if force else cache.read(path)
    if record is not None:
        return from_record(record, concepts_result)
    arrays, note, info = _caption_arrays(scan, settings, progress)
    if text_scores:
        texts = query_texts(concepts_result.concept_set)
        directions, _ = unit_directions_cached(clip, spec, scan, cache, basis=basis)
        embeddings = encode_texts(clip, texts)
        arrays["query_texts"] = texts
        arrays["query_scores"] = cosines(directions, embeddings).astype(np.float16)
    result = DescriptionsResult(layer=scan.layer, concepts=concepts_result, arrays=arrays, settings=asdict(settings),
                                basis=concepts_result.basis, basis_name=concepts_result.basis_name, note=note)
    attrs = {"concepts_record": Path(concepts_result.path).name,
             "scan_record": Path(scan.path).name if scan.path else None, "directions_record": directions_name,
             "info": info, "min_top_count": MIN_TOP_COUNT, "select_z": SELECT_Z, "model": clip.name,
             "pretrained": clip.pretrained, "fingerprint": clip.fingerprint}
    cache.write(path, to_record(result, attrs))
    result.path, result.attrs = path, attrs
    return result


def cosines(directions: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """(U, Q) cosine of every unit direction with every text embedding (0 for a zero direction)."""
    d = np.asarray(directions, dtype=np.float64)
    e = np.asarray(embeddings, dtype=np.float64)
    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return d @ e.T


def _caption_arrays(scan, settings: DescribeSettings, progress: Progress):
    units, m = int(scan.channels), int(settings.ngrams)
    if not scan.captions or not any(str(c or "").strip() for c in scan.captions):
        empty = {"ngrams": [], "ngram_index": np.full((units, m), -1, np.int32),
                 "top_images": np.zeros(units, np.int32), "base_images": np.zeros(units, np.int32)}
        for name in ("top_hits", "base_hits"):
            empty[name] = np.full((units, m), -1, np.int32)
        for name in ("selection_z", "log_odds", "ci_low", "ci_high", "z"):
            empty[name] = np.full((units, m), np.nan, np.float32)
        return empty, "the dataset has no captions: no caption part", {}
    table = NgramTable.of(scan.captions)
    half = halves(table.captioned & scan.valid, int(settings.seed))
    top, _ = top_by_half(scan, half, int(settings.top_k))
    if progress:
        progress(len(scan.keys), len(scan.keys))
    evidence = caption_evidence(table, half, top, m, float(settings.prior))
    arrays = {"ngrams": evidence.ngrams, "ngram_index": evidence.index.astype(np.int32),
              "selection_z": evidence.selection_z, "top_hits": evidence.top_hits, "base_hits": evidence.base_hits,
              "top_images": evidence.top_images, "base_images": evidence.base_images, "log_odds": evidence.log_odds,
              "ci_low": evidence.ci_low, "ci_high": evidence.ci_high, "z": evidence.z}
    return arrays, "", evidence.info


def run_describe(clip, layer: str, dataset=None, concepts: Optional[ConceptSettings] = None,
                 settings: Optional[DescribeSettings] = None, *, cache=None, force: bool = False,
                 progress: Progress = None, batch_size: Optional[int] = None, workers: Optional[int] = None,
                 basis=None) -> DescriptionsResult:
    """Describe every unit of `layer` (or, with basis, every SAE feature) over `dataset`: the concept audit
    (run_concepts, cached), then the descriptions (describe_units, cached)."""
    audit = run_concepts(clip, layer, dataset, concepts, cache=cache, force=force, progress=progress,
                         batch_size=batch_size, workers=workers, basis=basis)
    return describe_units(clip, audit, settings or DescribeSettings(), cache=cache, force=force, basis=basis)


def run_ray_describe(clip, layer: str, dataset=None, concepts: Optional[ConceptSettings] = None,
                     settings: Optional[DescribeSettings] = None, *, cache=None, force: bool = False,
                     progress: Progress = None, **ray_options) -> DescriptionsResult:
    """run_describe with the concept audit's scan on Ray (pipelines.concepts.run_ray_concepts and its options)."""
    audit = run_ray_concepts(clip, layer, dataset, concepts, cache=cache, force=force, progress=progress,
                             **ray_options)
    return describe_units(clip, audit, settings or DescribeSettings(), cache=cache, force=force)
