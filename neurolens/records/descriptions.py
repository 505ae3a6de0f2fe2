"""The descriptions record (`neurolens describe`): every unit's (or SAE feature's) description; the one reader
and writer, readable without a model.

    descriptions/<model fingerprint[:16]>/<layer>/<key>.h5
        ngrams (V,) str                      the caption n-grams some unit's description names
        ngram_index (U, m) int32             each unit's chosen n-grams (into ngrams; -1 empty), best first
        selection_z (U, m) float32           z on half A (what chose them)
        top_hits, base_hits (U, m) int32     held-out half B: captions holding the n-gram among the unit's top
                                             images / among the rest of the half
        top_images, base_images (U,) int32   held-out half B: the unit's top images / the rest
        log_odds, ci_low, ci_high, z (U, m) float32   held-out log-odds, its 95 % interval and z
        query_texts (Q,) str, query_scores (U, Q) float16   every concept name and lexicon term, and the cosine
                                             of each unit's text direction with its text embedding
                                             (MODEL-BASED; absent for random weights or without directions)
        attrs: layer, basis, basis_name, concepts_record and scan_record (file names in their folders),
               directions_record (file name or None), settings (top_k per half, ngrams, concepts, prior, seed,
               min_top_count, select_z), info (half sizes, vocabulary size), note, model, pretrained, fingerprint

The concept part of a description (its best concepts with their scores) is read from the concepts record it
names (records.concepts). `DescriptionsResult.row(unit)` is the one home of a description's JSON row and
summary line; `order()` the documented order of `describe --json`. The key is made by
neurolens.pipelines.describe. Definitions: neurolens.scoring.enrichment.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from ..storage.cache import Cache, Record, read_attrs, safe_segment, written_at
from .concepts import CONCEPTS_KIND, ConceptsResult, from_record as concepts_from_record
from .keys import NEURONS

DESCRIPTIONS_KIND = "descriptions"
DESCRIPTIONS_VERSION = 1
NGRAM_ARRAYS = ("selection_z", "top_hits", "base_hits", "log_odds", "ci_low", "ci_high", "z")
ROW_KEYS = ("unit", "basis", "concepts", "captions", "summary", "model_based")
CONCEPT_KEYS = ("concept", "auc", "auprc", "prevalence", "q", "flagged", "model_based")
CAPTION_KEYS = ("ngram", "top_share", "base_share", "log_odds", "ci_low", "ci_high", "z", "selection_z",
                "top_images")


def _number(value) -> Optional[float]:
    value = float(value)
    return value if np.isfinite(value) else None


@dataclass
class DescriptionsResult:
    """Every unit's description: the concept part from `concepts`, the caption part from the arrays."""
    layer: str
    concepts: ConceptsResult
    arrays: dict                      # the record's arrays (module docstring)
    settings: dict
    basis: str = NEURONS
    basis_name: str = ""
    note: str = ""
    path: Optional[Path] = None
    cached: bool = False
    attrs: dict = field(default_factory=dict)

    @property
    def units(self) -> int:
        return int(self.arrays["ngram_index"].shape[0])

    @property
    def unit_word(self) -> str:
        return "unit" if self.basis == NEURONS else "feature"

    @property
    def query_texts(self) -> List[str]:
        return [str(t) for t in self.arrays.get("query_texts", [])]

    def query_scores(self, text: str) -> Optional[np.ndarray]:
        """(U,) the stored text-direction cosines of a concept name or lexicon term (model-based), or None."""
        texts = [t.lower() for t in self.query_texts]
        if "query_scores" not in self.arrays or text.lower() not in texts:
            return None
        return np.asarray(self.arrays["query_scores"][:, texts.index(text.lower())], dtype=np.float64)

    # ---------------------------------------------------------------------------------------- one unit

    def concept_part(self, unit: int) -> List[dict]:
        """The unit's best concepts: those it is flagged for (by AUC), then the best unflagged ones, up to
        settings['concepts'] rows in all (more when flagged for more)."""
        result, u = self.concepts, int(unit)
        auc = np.array([float(s.auc[u]) for s in result.scores])
        flagged = np.array([bool(s.flagged[u]) for s in result.scores])
        order = np.lexsort((np.arange(len(auc)), -np.nan_to_num(auc, nan=-np.inf), ~flagged))
        limit = max(int(self.settings.get("concepts", 3)), int(flagged.sum()))
        rows = []
        for k in order[:limit]:
            s = result.scores[k]
            rows.append({"concept": s.name, "auc": _number(s.auc[u]), "auprc": _number(s.auprc[u]),
                         "prevalence": _number(s.prevalence), "q": _number(s.q[u]), "flagged": bool(s.flagged[u]),
                         "model_based": bool(s.model_based)})
        return rows

    def caption_part(self, unit: int) -> List[dict]:
        a, u = self.arrays, int(unit)
        rows = []
        k, rest = int(a["top_images"][u]), int(a["base_images"][u])
        for slot, index in enumerate(a["ngram_index"][u]):
            if index < 0:
                continue
            hits, base = int(a["top_hits"][u, slot]), int(a["base_hits"][u, slot])
            rows.append({"ngram": str(a["ngrams"][index]), "top_share": hits / k if k else None,
                         "base_share": base / rest if rest else None,
                         "log_odds": _number(a["log_odds"][u, slot]), "ci_low": _number(a["ci_low"][u, slot]),
                         "ci_high": _number(a["ci_high"][u, slot]), "z": _number(a["z"][u, slot]),
                         "selection_z": _number(a["selection_z"][u, slot]), "top_images": k})
        return rows

    def row(self, unit: int) -> dict:
        """The `describe --json` row of one unit (ROW_KEYS)."""
        concepts, captions = self.concept_part(unit), self.caption_part(unit)
        return {"unit": int(unit), "basis": self.basis, "concepts": concepts, "captions": captions,
                "summary": summary(concepts, captions), "model_based": any(c["model_based"] for c in concepts)}

    def rows(self, units: Optional[Sequence[int]] = None) -> List[dict]:
        """Rows of `units` in the order given, else of every unit in `order()`."""
        return [self.row(u) for u in (self.order() if units is None else units)]

    def order(self) -> List[int]:
        """Every unit: first those flagged for two or more concepts, then for one, then the rest; within each
        part by the unit's best AUC over the concepts (highest first, NaN last), ties by unit."""
        flagged = self.concepts.flagged()
        count = flagged.sum(axis=0) if flagged.size else np.zeros(self.units, int)
        tier = np.where(count >= 2, 0, np.where(count == 1, 1, 2))
        auc = np.stack([np.nan_to_num(s.auc.astype(np.float64), nan=-np.inf) for s in self.concepts.scores]) \
            if self.concepts.scores else np.full((1, self.units), -np.inf)
        units = np.arange(self.units)
        return [int(u) for u in np.lexsort((units, -auc.max(axis=0), tier))]


def summary(concepts: List[dict], captions: List[dict]) -> str:
    """One line: the concepts (flagged ones marked, model-based ones marked) and the held-out caption n-grams."""
    flagged = [c for c in concepts if c["flagged"]]
    shown = flagged or concepts[:1]

    def concept(c: dict) -> str:
        auc = "n/a" if c["auc"] is None else f"{c['auc']:.3f}"
        marks = (", flagged" if c["flagged"] else ", not flagged") + (", model-based" if c["model_based"] else "")
        return f"{c['concept']} (AUC {auc}{marks})"
    parts = [" + ".join(concept(c) for c in shown) if shown else "no concept scored"]
    replicated = [c for c in captions if c["ci_low"] is not None and c["ci_low"] > 0]
    if replicated:
        parts.append("captions: " + ", ".join(f"\"{c['ngram']}\" ({100 * (c['top_share'] or 0):.0f}% of top vs "
                                               f"{100 * (c['base_share'] or 0):.0f}%)" for c in replicated))
    elif captions:
        parts.append("captions: no chosen n-gram held on the held-out half")
    return "; ".join(parts)


# ------------------------------------------------------------------------------------------- paths

def descriptions_path(cache: Cache, fingerprint: str, layer: str, key: str) -> Path:
    return cache.path(DESCRIPTIONS_KIND, fingerprint, layer, key)


def descriptions_paths(cache: Cache, fingerprint: str, layer: str) -> List[Path]:
    return cache.layer_records(DESCRIPTIONS_KIND, fingerprint, layer)


def newest_descriptions(cache: Cache, fingerprint: str, layer: str, basis: str = NEURONS
                        ) -> Optional[DescriptionsResult]:
    """The newest descriptions record of one model's layer and basis whose concepts record is still there, read
    without a model, or None."""
    for path in sorted(descriptions_paths(cache, fingerprint, layer), key=written_at, reverse=True):
        try:
            attrs = read_attrs(path)
        except (OSError, KeyError, ValueError):
            continue
        if attrs.get("basis", NEURONS) != basis:
            continue
        found = read_descriptions(cache, path)
        if found is not None:
            return found
    return None


def read_descriptions(cache: Cache, path: Path) -> Optional[DescriptionsResult]:
    """The descriptions record at `path` with the concepts record it names, or None when either is missing."""
    record = cache.read(path)
    if record is None:
        return None
    concepts = cache.read(sibling(cache, record.path, CONCEPTS_KIND, record.attrs.get("concepts_record")))
    if concepts is None:
        return None
    return from_record(record, concepts_from_record(concepts))


def sibling(cache: Cache, path: Path, kind: str, name: Optional[str]) -> Path:
    """Where a record that the record at `path` names (by file name) is: the same model and layer folder, of
    `kind` (records name each other by file name, so a cache moved elsewhere still reads)."""
    folder = Path(path).parent
    return cache.root / safe_segment(kind) / folder.parent.name / folder.name / safe_segment(str(name or "-"))


# ------------------------------------------------------------------------------------------- writing, reading

def to_record(result: DescriptionsResult, attrs: dict) -> Record:
    arrays = dict(result.arrays)
    arrays["ngrams"] = np.asarray(arrays["ngrams"], dtype=object)
    if "query_texts" in arrays:
        arrays["query_texts"] = np.asarray(arrays["query_texts"], dtype=object)
    return Record(arrays=arrays, attrs=dict(attrs, layer=result.layer, basis=result.basis,
                                            basis_name=result.basis_name, settings=result.settings, note=result.note))


def from_record(record: Record, concepts: ConceptsResult) -> DescriptionsResult:
    attrs = record.attrs
    arrays = dict(record.arrays)
    arrays["ngrams"] = [str(t) for t in arrays.get("ngrams", [])]
    return DescriptionsResult(layer=attrs["layer"], concepts=concepts, arrays=arrays, settings=dict(attrs["settings"]),
                              basis=attrs.get("basis", NEURONS), basis_name=attrs.get("basis_name", ""),
                              note=attrs.get("note", ""), path=record.path, cached=True, attrs=attrs)
