"""Find the units (or SAE features) of a layer that encode a concept, a lexicon word or free text, from the
cache alone: no model, no torch (the records of `neurolens describe` / `neurolens concepts`, their scan).

The query is, case-insensitively, first a concept name of the layer's concept audit, else a lexicon term of one
of its concepts, else free text; which images' captions match it is labels.query. For each unit:

    caption_share   the share of the unit's top images (the scan's top-k: the images the unit fires hardest on
                    over the whole dataset) whose captions match the query, over those with a known match
    ci_low, ci_high the 95 % Wilson score interval of caption_share (scoring.enrichment.wilson_interval)
    score           ci_low: what the ranking uses, highest first; ties by caption_share, then (a concept) the
                    audit's AUC for it, then the unit
    text_score      MODEL-BASED: the cosine of the unit's text direction with the query's text embedding;
                    stored by `describe` for every concept name and lexicon term (trained weights); free text
                    needs the model's text tower (the caller passes its embedding, `query_embedding`); null
                    otherwise
    model_based     true when text_score is given (the only model-based part of a row; never in `score`)

`Located` names the records a query reads: the newest concepts record of the layer and basis made with the
given weights (by fingerprint, or, without a model, by the model name and weights tag, or a checkpoint's file
name, as the records state them), its scan, and the descriptions record made from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..errors import NeurolensError
from ..labels.query import Query, caption_matches, parse_query
from ..records import scan as scan_records
from ..records import text as text_records
from ..records.concepts import CONCEPTS_KIND, ConceptsResult, from_record as concepts_from_record
from ..records.descriptions import DESCRIPTIONS_KIND, DescriptionsResult, read_descriptions, sibling
from ..records.keys import NEURONS
from ..scoring.intervals import wilson_interval
from ..storage.cache import Cache, read_attrs, safe_segment, written_at

ROW_KEYS = ("unit", "basis", "score", "caption_share", "ci_low", "ci_high", "text_score", "model_based")


@dataclass
class Located:
    """The records one layer's queries read (module docstring)."""
    concepts: ConceptsResult
    top_indices: np.ndarray                  # (U, k) the scan's top images, -1 empty
    captions: Optional[List[str]]
    descriptions: Optional[DescriptionsResult]
    fingerprint: str
    layer: str
    basis: str
    notes: List[str] = field(default_factory=list)

    def directions(self, cache: Cache) -> Optional[np.ndarray]:
        """(U, D) the unit directions the descriptions' text scores used, or None."""
        name = self.descriptions.attrs.get("directions_record") if self.descriptions is not None else None
        if not name:
            return None
        return text_records.read_directions(cache, sibling(cache, self.descriptions.path, text_records.DIRECTIONS_KIND,
                                                           name))


@dataclass
class FindResult:
    query: Query
    rows: List[dict]                         # ROW_KEYS, best first
    units: int
    basis: str
    notes: List[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- locating

def locate(cache: Cache, layer: str, *, fingerprint: Optional[str] = None, model: Optional[str] = None,
           pretrained: Optional[str] = None, checkpoint: Optional[str] = None, sae: Optional[str] = None,
           dataset_identity: Optional[str] = None) -> Located:
    """The newest concept audit of `layer` (the neurons, or the features of the SAE named `sae`) made with these
    weights, and what it was made from; one clear NeurolensError when there is none."""
    wanted_pretrained = f"checkpoint:{Path(checkpoint).name}" if checkpoint else pretrained
    candidates = []
    kind_root = cache.root / safe_segment(CONCEPTS_KIND)
    folders = [kind_root / fingerprint[:16]] if fingerprint else \
        (sorted(p for p in kind_root.iterdir() if p.is_dir()) if kind_root.is_dir() else [])
    for folder in folders:
        for path in sorted((folder / safe_segment(layer)).glob("*.h5")) if (folder / safe_segment(layer)).is_dir() \
                else []:
            try:
                attrs = read_attrs(path)
            except (OSError, KeyError, ValueError):
                continue
            basis = str(attrs.get("basis", NEURONS))
            if (sae is None) != (basis == NEURONS) or (sae is not None and attrs.get("basis_name") != sae):
                continue
            if fingerprint is None and (attrs.get("pretrained") != wanted_pretrained or
                                        (not checkpoint and model and attrs.get("model") != model)):
                continue
            candidates.append((written_at(path), path, attrs))
    notes = []
    for when, path, attrs in sorted(candidates, key=lambda c: c[0], reverse=True):
        scan = cache.read(sibling(cache, path, scan_records.KIND, Path(str(attrs.get("scan_record"))).name),
                          names=["top_indices", "captions"])
        if scan is None:
            continue
        if dataset_identity is not None and scan.attrs.get("dataset_identity") != dataset_identity:
            continue
        record = cache.read(path)
        if record is None:
            continue
        fingerprints = {str(a.get("fingerprint", ""))[:16] for _, _, a in candidates}
        if len(fingerprints) > 1:
            notes.append(f"{len(fingerprints)} sets of weights match; the newest audit ({str(attrs['fingerprint'])[:16]}) "
                         f"is used; pass the model that made it to choose")
        concepts = concepts_from_record(record)
        return Located(concepts=concepts, top_indices=np.asarray(scan.arrays["top_indices"]),
                       captions=[str(c) for c in scan.arrays["captions"]] if "captions" in scan.arrays else None,
                       descriptions=_descriptions_of(cache, path), fingerprint=str(attrs.get("fingerprint", "")),
                       layer=str(attrs.get("layer", layer)), basis=concepts.basis, notes=notes)
    what = f"the features of SAE {sae}" if sae else "the neurons"
    weights = (f"checkpoint {Path(checkpoint).name}" if checkpoint else f"{model} ({pretrained})") \
        if fingerprint is None else f"weights {fingerprint[:16]}"
    raise NeurolensError(f"no concept audit of {what} of layer {layer} for {weights} in the cache at {cache.root}"
                         f"{' for this dataset' if dataset_identity else ''}: run `neurolens describe --layer {layer}"
                         f" --dataset ...` (or `neurolens concepts`) with the same model options first")


def _descriptions_of(cache: Cache, concepts_path: Path) -> Optional[DescriptionsResult]:
    """The newest descriptions record made from this concepts record, or None."""
    folder = sibling(cache, concepts_path, DESCRIPTIONS_KIND, "x").parent
    paths = sorted(folder.glob("*.h5"), key=written_at, reverse=True) if folder.is_dir() else []
    for path in paths:
        try:
            if read_attrs(path).get("concepts_record") != concepts_path.name:
                continue
        except (OSError, KeyError, ValueError):
            continue
        found = read_descriptions(cache, path)
        if found is not None:
            return found
    return None


# ------------------------------------------------------------------------------------------- the query

def find(located: Located, text: str, *, query_embedding: Optional[np.ndarray] = None,
         directions: Optional[np.ndarray] = None, limit: Optional[int] = None) -> FindResult:
    """Rank the units for the query (module docstring). query_embedding (D,) with directions (U, D): the free
    text's text score (the caller encodes the query with the model's text tower)."""
    query = parse_query(text, located.concepts)
    match = caption_matches(query, located.concepts, located.captions)
    top = np.asarray(located.top_indices)
    units = top.shape[0]
    values = np.full(top.shape, np.nan)
    valid = (top >= 0) & (top < len(match))
    values[valid] = match[top[valid]]
    known = np.isfinite(values)
    hits = ((np.nan_to_num(values) >= 0.5) & known).sum(axis=1)
    n = known.sum(axis=1)
    share = np.where(n > 0, hits / np.maximum(n, 1), np.nan)
    low, high = wilson_interval(hits, n)
    notes = list(located.notes)
    text_score = None
    if query.kind != "free text" and located.descriptions is not None:
        text_score = located.descriptions.query_scores(query.text)
    if text_score is None and query_embedding is not None and directions is not None:
        d = np.asarray(directions, dtype=np.float64)
        e = np.asarray(query_embedding, dtype=np.float64).reshape(-1)
        text_score = d @ e / np.maximum(np.linalg.norm(d, axis=1) * max(np.linalg.norm(e), 1e-12), 1e-12)
    if text_score is None:
        notes.append("no text-direction score: " + (
            "free text needs the model's text tower and the unit directions of `neurolens describe`"
            if query.kind == "free text" else "`neurolens describe` with trained weights stores it for every concept "
            "name and lexicon term"))
    auc = np.zeros(units)
    if query.kind == "concept":
        auc = np.nan_to_num(np.asarray(located.concepts.concept(query.concept).auc, np.float64), nan=-np.inf)
    order = np.lexsort((np.arange(units), -auc, -np.nan_to_num(share, nan=-np.inf), -np.nan_to_num(low, nan=-np.inf)))
    chosen = order[:limit] if limit else order
    rows = []
    for u in chosen:
        score = None if text_score is None or not np.isfinite(text_score[u]) else float(text_score[u])
        rows.append({"unit": int(u), "basis": located.basis, "score": _num(low[u]), "caption_share": _num(share[u]),
                     "ci_low": _num(low[u]), "ci_high": _num(high[u]), "text_score": score,
                     "model_based": score is not None})
    if not np.any(n > 0):
        notes.append(f"no top image has a known match ({query.source}): every share is null")
    return FindResult(query=query, rows=rows, units=units, basis=located.basis, notes=notes)


def _num(value) -> Optional[float]:
    value = float(value)
    return value if np.isfinite(value) else None
