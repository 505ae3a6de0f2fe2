"""One layer's concept audit and descriptions as the pages show them, read through neurolens.records: a unit's
concept table and description, the layer page's concept filter, the independent marks of texts, what the blur
policy takes from the audit (units flagged for a sensitive concept, images labelled with one), and the search
index that the browser ranks units with (static/find.js: the same ranking as `neurolens find`).

Which records: the newest concepts record of the layer and basis made from the scan the pages show (else the
newest), and the newest descriptions record made from it. None of them: every answer is empty.

The search index of a layer (`find_index`, shipped as L/<layer id>/find-index.js so that it loads from file://
as well): the captions of the images that are some unit's top image, each unit's top images (positions in that
list), and for every concept name and lexicon term (labels.query: the same matches as `neurolens find`) the
images it matches and those whose match is unknown, the concept's AUC per unit, and the stored text-direction
score per unit (model-based; describe stores it for trained weights). Free text is matched in the browser: the
query's words without STOPWORDS, each a word of the caption (scoring.enrichment.words).
"""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Set

import numpy as np

from ..labels.lexicon import caption_nsfw_matches
from ..labels.query import caption_matches, parse_query
from ..records import concepts as concept_records
from ..records import descriptions as description_records
from ..records.index import LayerEntry
from ..scoring.captions import STOPWORDS
from ..scoring.intervals import Z95
from ..storage.cache import Cache, written_at


def _round(values, digits: Optional[int] = None) -> List[Optional[float]]:
    """Finite values as floats (rounded to `digits` when given), NaN as None."""
    return [None if not np.isfinite(v) else (float(v) if digits is None else round(float(v), digits))
            for v in np.asarray(values, dtype=np.float64)]


class LayerConcepts:
    """The concept audit and descriptions of one layer and basis (module docstring), read on first use."""

    def __init__(self, cache: Cache, entry: LayerEntry, scan_name: Optional[str]):
        self.cache, self.entry, self.scan_name = cache, entry, scan_name
        self._lock = threading.RLock()
        self._loaded = False
        self.audit: Optional[concept_records.ConceptsResult] = None
        self.record = None
        self.descriptions: Optional[description_records.DescriptionsResult] = None

    def load(self) -> "LayerConcepts":
        with self._lock:
            if not self._loaded:
                self._loaded = True
                paths = sorted(self.entry.paths.get(concept_records.CONCEPTS_KIND, []), key=written_at, reverse=True)
                records = [r for r in (self.cache.read(p) for p in paths) if r is not None]
                made = [r for r in records if _name(r.attrs.get("scan_record")) == self.scan_name]
                self.record = (made or records or [None])[0]
                if self.record is not None:
                    self.audit = concept_records.from_record(self.record)
                    self.descriptions = self._descriptions(self.record.path.name)
        return self

    def _descriptions(self, concepts_name: str) -> Optional[description_records.DescriptionsResult]:
        paths = sorted(self.entry.paths.get(description_records.DESCRIPTIONS_KIND, []), key=written_at, reverse=True)
        for path in paths:
            record = self.cache.read(path)
            if record is not None and record.attrs.get("concepts_record") == concepts_name:
                return description_records.from_record(record, self.audit)
        return None

    @property
    def present(self) -> bool:
        return self.load().audit is not None

    # ---------------------------------------------------------------------------------------- a unit

    def table(self, unit: int) -> List[dict]:
        """Every concept's scores of the unit, in the set's order (the unit page's concept table)."""
        if not self.present:
            return []
        u = int(unit)
        return [{"concept": s.name, "auc": _float(s.auc[u]), "auprc": _float(s.auprc[u]),
                 "prevalence": _float(s.prevalence), "q": _float(s.q[u]), "top_share": _float(s.top_share[u]),
                 "flagged": bool(s.flagged[u]), "model_based": bool(s.model_based),
                 "sensitive": bool(s.concept.sensitive), "sources": " + ".join(s.used) or "none", "note": s.note}
                for s in self.audit.scores]

    def description(self, unit: int) -> Optional[dict]:
        """The unit's description (records.descriptions row), or None without a descriptions record."""
        return self.descriptions.row(unit) if self.load().descriptions is not None else None

    def lexicon_marks(self, texts: List[str]) -> List[List[dict]]:
        """Per text: [{concept, source: "lexicon"}] for every concept whose caption lexicon matches it."""
        marks: List[List[dict]] = [[] for _ in texts]
        if not self.present or not texts:
            return marks
        for concept in self.audit.concept_set:
            if concept.terms:
                for i in np.flatnonzero(caption_nsfw_matches(texts, list(concept.terms), concept.match)):
                    marks[int(i)].append({"concept": concept.name, "source": "lexicon"})
        return marks

    # ---------------------------------------------------------------------------------------- the layer

    def flagged(self) -> np.ndarray:
        """(K, U) bool."""
        return self.audit.flagged() if self.present else np.zeros((0, 0), bool)

    def sensitive_flagged(self) -> Set[int]:
        """Units flagged for a sensitive concept in this audit (the blur policy blurs their images)."""
        if not self.present:
            return set()
        rows = concept_records.sensitive_rows(self.record)
        flagged = self.flagged()
        return set(int(u) for u in np.flatnonzero(flagged[rows].any(axis=0))) if rows else set()

    def sensitive_labels(self) -> Optional[np.ndarray]:
        """(N,) images labelled with a sensitive concept (records.concepts.sensitive_labels), or None."""
        return concept_records.sensitive_labels(self.record) if self.present else None

    def layer_payload(self) -> Optional[dict]:
        """The layer page's concept data: the concepts, and per unit the concepts it is flagged for and every
        concept's AUC (the concept filter: flagged units, intersections first, by that concept's AUC)."""
        if not self.present:
            return None
        flagged = self.flagged()
        return {"concepts": [{"name": s.name, "sensitive": bool(s.concept.sensitive), "flagged": int(s.flagged.sum()),
                              "model_based": bool(s.model_based)} for s in self.audit.scores],
                "flags": [[int(k) for k in np.flatnonzero(flagged[:, u])] for u in range(flagged.shape[1])],
                "auc": [_round(s.auc, 3) for s in self.audit.scores],
                "intersections": len(self.audit.intersections())}

    def find_index(self, top_indices: np.ndarray, captions: Optional[List[str]]) -> Optional[dict]:
        """The layer's search index (module docstring), or None without a concept audit."""
        if not self.present:
            return None
        top = np.asarray(top_indices)
        used = np.unique(top[top >= 0])
        local = np.full(int(used.max()) + 1 if len(used) else 0, -1, dtype=np.int64)
        local[used] = np.arange(len(used))
        queries: Dict[str, dict] = {}
        for concept in self.audit.concept_set:
            for text in (concept.name, *concept.terms):
                if text.lower() in queries:
                    continue
                query = parse_query(text, self.audit)
                match = caption_matches(query, self.audit, captions)
                values = match[used] if len(match) else np.full(len(used), np.nan)
                scores = self.descriptions.query_scores(text) if self.descriptions is not None else None
                queries[text.lower()] = {
                    "kind": query.kind, "concept": query.concept, "source": query.source,
                    "hits": [int(i) for i in np.flatnonzero(values >= 0.5)],
                    "unknown": [int(i) for i in np.flatnonzero(~np.isfinite(values))],
                    "auc": _round(self.audit.concept(query.concept).auc) if query.kind == "concept" else None,
                    "text": _round(scores, 4) if scores is not None else None}
        return {"id": self.entry.id, "title": self.entry.title, "unit_word": self.entry.words["unit"],
                "units": int(top.shape[0]), "z": Z95, "stopwords": sorted(STOPWORDS),
                "captions": [str(captions[i]) if captions else "" for i in used],
                "top": [[int(local[i]) for i in row if i >= 0] for row in top],
                "concepts": [{"name": c.name, "terms": list(c.terms)} for c in self.audit.concept_set],
                "queries": queries, "flags": self.layer_payload()["flags"]}


def _float(value) -> Optional[float]:
    value = float(value)
    return value if np.isfinite(value) else None


def _name(path) -> str:
    return str(path or "").replace("\\", "/").rpartition("/")[2]
