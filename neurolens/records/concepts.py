"""The concepts record (`neurolens concepts`): every unit of a layer against every concept of a concept set;
the one reader and writer, readable without a model.

    concepts/<model fingerprint[:16]>/<layer>/<key>.h5
        auc, auprc, p, q, correlation, top_share (K, U) float   one row per concept, in the set's order
        flagged (K, U) bool
        image_labels (K, N) float32   each concept's combined per-image label (1, 0, NaN unknown or skipped)
        source_scores/<k> (S_k, N) float32   concept k's label sources' per-image scores (attrs' order)
        attrs: layer, basis (the neurons when absent) and basis_name, rule, method (exact | binned), the
               concept set (name, source, identity, every concept's fields), per concept its counts, its
               label sources (LabelSet.as_attrs: kind, threshold, agreement, kept or dropped) or why it has
               none, scan record, model, pretrained, fingerprint

`ConceptsResult.rows()` is the one home of the JSON rows and their order (docs/concepts.md); the blur policy
reads the units flagged for a sensitive concept (`flagged_in_cache`) and the images labelled with one
(`sensitive_labels`). The key is made by neurolens.pipelines.concepts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set

import numpy as np

from ..labels.concepts import Concept, ConceptSet, parse_concept_set
from ..labels.reliability import LabelSet
from ..scoring.flags import WEAK_CLASS, FlagRule
from ..storage.cache import Cache, Record, written_at
from .keys import NEURONS
from .sweep import label_set_from_parts

CONCEPTS_KIND = "concepts"
CONCEPTS_VERSION = 1
ROW_KEYS = ("unit", "basis", "concept", "auc", "auprc", "prevalence", "correlation", "p", "q", "flagged")
SCORE_NAMES = ("auc", "auprc", "p", "q", "correlation", "top_share")


@dataclass
class ConceptScores:
    """One concept's scores of every unit; arrays are (U,)."""
    concept: Concept
    auc: np.ndarray
    auprc: np.ndarray
    p: np.ndarray
    q: np.ndarray
    correlation: np.ndarray
    top_share: np.ndarray                  # share of the unit's top-k images labelled positive (known ones)
    flagged: np.ndarray
    n_pos: int
    n_neg: int
    labels: Optional[LabelSet] = None      # None: no source could label this concept (`note` says why)
    note: str = ""

    @property
    def name(self) -> str:
        return self.concept.name

    @property
    def prevalence(self) -> float:
        """n_pos / (n_pos + n_neg): the AUPRC of a unit that knows nothing (NaN without labelled images)."""
        total = self.n_pos + self.n_neg
        return self.n_pos / total if total else float("nan")

    @property
    def weak(self) -> bool:
        """Fewer than WEAK_CLASS (10) images in a class: the concept gets a warning and no flags."""
        return min(self.n_pos, self.n_neg) < WEAK_CLASS

    @property
    def used(self) -> List[str]:
        return self.labels.used if self.labels is not None else []

    @property
    def model_based(self) -> bool:
        """True when the inspected model's zero-shot score is among the sources used (kept by the check)."""
        return "zero-shot" in self.used


@dataclass
class ConceptsResult:
    layer: str
    concept_set: ConceptSet
    scores: List[ConceptScores]
    rule: FlagRule
    method: str
    basis: str = NEURONS                # whose units: "neurons" or an SAE basis id (neurolens.sae.basis)
    basis_name: str = ""
    scan: object = None
    path: Optional[Path] = None
    cached: bool = False
    attrs: dict = field(default_factory=dict)

    @property
    def units(self) -> int:
        return int(len(self.scores[0].auc)) if self.scores else 0

    @property
    def unit_word(self) -> str:
        return "unit" if self.basis == NEURONS else "feature"

    def concept(self, name: str) -> ConceptScores:
        return self.scores[self.concept_set.index(name)]

    def flagged(self) -> np.ndarray:
        """(K, U) bool."""
        return np.stack([s.flagged for s in self.scores]) if self.scores else np.zeros((0, 0), bool)

    def intersections(self) -> List[int]:
        """Units flagged for two or more concepts, by their best flagged AUC (highest first), then unit."""
        flagged = self.flagged()
        units = np.flatnonzero(flagged.sum(axis=0) >= 2)
        auc = np.stack([np.nan_to_num(s.auc.astype(np.float64), nan=-np.inf) for s in self.scores])
        best = np.where(flagged[:, units], auc[:, units], -np.inf).max(axis=0) if len(units) else np.zeros(0)
        return [int(u) for u in units[np.lexsort((units, -best))]]

    def row(self, k: int, unit: int) -> dict:
        s, u = self.scores[k], int(unit)
        return {"unit": u, "basis": self.basis, "concept": s.name, "auc": _number(s.auc[u]),
                "auprc": _number(s.auprc[u]), "prevalence": _number(s.prevalence),
                "correlation": _number(s.correlation[u]), "p": _number(s.p[u]), "q": _number(s.q[u]),
                "flagged": bool(s.flagged[u])}

    def order(self, pairs: bool = False) -> List[tuple]:
        """(concept index, unit) of every row, in the documented order: first the rows of units flagged for two
        or more concepts, for the concepts they are flagged for; then every other row; within each part by
        AUC, highest first (NaN last), ties by unit, then by the concept's place in the set. pairs: the first
        part only."""
        if not self.scores:
            return []
        flagged = self.flagged()
        k, u = np.meshgrid(np.arange(flagged.shape[0]), np.arange(flagged.shape[1]), indexing="ij")
        auc = np.stack([np.nan_to_num(s.auc.astype(np.float64), nan=-np.inf) for s in self.scores])
        first = flagged & (flagged.sum(axis=0) >= 2)[None, :]
        tier = np.where(first, 0, 1).ravel()
        order = np.lexsort((k.ravel(), u.ravel(), -auc.ravel(), tier))
        if pairs:
            order = order[tier[order] == 0]
        return [(int(k.ravel()[i]), int(u.ravel()[i])) for i in order]

    def rows(self, pairs: bool = False, limit: Optional[int] = None) -> List[dict]:
        """The `concepts --json` rows (ROW_KEYS, NaN as None) in `order`; pairs: intersection rows only."""
        chosen = self.order(pairs)
        return [self.row(k, u) for k, u in (chosen[:limit] if limit else chosen)]

    def lines(self) -> List[str]:
        """Per concept: its label sources and checks, and the warnings (no labels, weak, model-based)."""
        out = []
        for s in self.scores:
            if s.labels is None:
                out.append(f"{s.name}: no label source: {s.note}; nothing is flagged for it")
                continue
            out += [f"{s.name}: labels: {line}" for line in s.labels.lines()]
            if s.model_based:
                out.append(f"{s.name}: uses the inspected model's own zero-shot score (model-based), kept because "
                           f"it agrees with the independent sources")
            if s.n_pos == 0:
                out.append(f"warning: {s.name}: no image is labelled positive: nothing can be flagged; scan a dataset "
                           f"that shows it, or give it a column or more terms")
            elif s.weak:
                out.append(f"warning: {s.name}: only {s.n_pos} positive and {s.n_neg} negative images (fewer than "
                           f"{WEAK_CLASS} in a class): no unit is flagged for it; scan more images")
        return out


def _number(value) -> Optional[float]:
    value = float(value)
    return value if np.isfinite(value) else None


# ------------------------------------------------------------------------------------------- paths

def concepts_path(cache: Cache, fingerprint: str, layer: str, key: str) -> Path:
    return cache.path(CONCEPTS_KIND, fingerprint, layer, key)


def concepts_paths(cache: Cache, fingerprint: str, layer: str) -> List[Path]:
    """Every concepts record of one model's layer (every dataset, concept set and setting), by name."""
    return cache.layer_records(CONCEPTS_KIND, fingerprint, layer)


def newest_result(cache: Cache, fingerprint: str, layer: str, basis: str = NEURONS) -> Optional[ConceptsResult]:
    """The newest concepts record of one model's layer and basis (any dataset and concept set), read without a
    model (its scan is not attached), or None."""
    for path in sorted(concepts_paths(cache, fingerprint, layer), key=written_at, reverse=True):
        record = cache.read(path)
        if record is not None and record.attrs.get("basis", NEURONS) == basis:
            return from_record(record)
    return None


def sensitive_rows(record: Record) -> List[int]:
    """The rows (concepts) of a concepts record whose concept is sensitive (blurred by the blur policy)."""
    return [k for k, concept in enumerate(record.attrs["concept_set"]["concepts"]) if concept.get("sensitive", True)]


def flagged_in_cache(cache: Cache, fingerprint: str, layer: str, basis: str = NEURONS) -> Set[int]:
    """Units flagged for a sensitive concept in ANY cached concepts record of `layer` made with these weights,
    of one basis (the blur policy blurs them as it blurs the sweep's flagged units)."""
    flagged: Set[int] = set()
    for path in concepts_paths(cache, fingerprint, layer):
        record = cache.read(path, names=["flagged"])
        if record is None or record.attrs.get("basis", NEURONS) != basis:
            continue
        rows = sensitive_rows(record)
        if rows:
            flagged.update(int(u) for u in np.flatnonzero(np.asarray(record.arrays["flagged"])[rows].any(axis=0)))
    return flagged


def sensitive_labels(record: Record) -> Optional[np.ndarray]:
    """(N,) per dataset index: 1 where an image is labelled positive for a sensitive concept, 0 where every
    sensitive concept knows it negative, NaN otherwise (for the blur policy's image_labels); None without any
    sensitive concept."""
    rows = sensitive_rows(record)
    if not rows:
        return None
    labels = np.asarray(record.arrays["image_labels"], dtype=np.float64)[rows]
    out = np.where(np.isfinite(labels).all(axis=0), 0.0, np.nan)
    out[(labels >= 0.5).any(axis=0)] = 1.0
    return out


# ------------------------------------------------------------------------------------------- writing

def to_record(result: ConceptsResult, clip) -> Record:
    arrays: Dict[str, np.ndarray] = {name: np.stack([np.asarray(getattr(s, name), np.float64) for s in result.scores])
                                     for name in SCORE_NAMES}
    arrays["flagged"] = result.flagged().astype(bool)
    size = len(result.scan.keys) if result.scan is not None else 0
    labels = np.full((len(result.scores), size), np.nan, dtype=np.float32)
    concepts = []
    for k, s in enumerate(result.scores):
        info = {"name": s.name, "n_pos": int(s.n_pos), "n_neg": int(s.n_neg), "note": s.note, "labels": None}
        if s.labels is not None:
            labels[k] = s.labels.labels
            info["labels"] = s.labels.as_attrs()
            arrays[f"source_scores/{k}"] = np.stack([src.scores for src in s.labels.sources]).astype(np.float32) \
                if s.labels.sources else np.zeros((0, size), np.float32)
        concepts.append(info)
    arrays["image_labels"] = labels
    attrs = {"layer": result.layer, "basis": result.basis, "basis_name": result.basis_name,
             "rule": result.rule.as_dict(), "method": result.method, "concept_set": result.concept_set.as_attrs(),
             "concepts": concepts, "scan_record": str(result.scan.path) if result.scan is not None else None,
             "model": clip.name, "pretrained": clip.pretrained, "fingerprint": clip.fingerprint}
    return Record(arrays=arrays, attrs=attrs)


# ------------------------------------------------------------------------------------------- reading

def concept_set_from_record(record: Record) -> ConceptSet:
    """The concept set a record was made with (its concepts' fields, as stored)."""
    info = record.attrs["concept_set"]
    entries = [_entry(c) for c in info["concepts"]]
    parsed = parse_concept_set({"concepts": entries}, where=f"concepts record {record.path}", name=info["name"])
    return ConceptSet(parsed.concepts, name=info["name"], source=info["source"])


def _entry(stored: dict) -> dict:
    """A stored Concept (its fields) as a concept-set entry."""
    entry = {key: value for key, value in stored.items() if key not in ("negative_prompts",) and value not in
             (None, [], (), "")}
    if stored.get("prompts"):
        entry["prompts"] = {"positive": list(stored["prompts"])}
        if stored.get("negative_prompts"):
            entry["prompts"]["negative"] = list(stored["negative_prompts"])
    return entry


def from_record(record: Record, scan=None) -> ConceptsResult:
    """The ConceptsResult of a concepts record (with the scan it was made from, when given)."""
    a, attrs = record.arrays, record.attrs
    concept_set = concept_set_from_record(record)
    scores = []
    for k, (concept, info) in enumerate(zip(concept_set, attrs["concepts"])):
        label_set = None
        if info.get("labels") is not None:
            label_set = label_set_from_parts(a[f"source_scores/{k}"], a["image_labels"][k], info["labels"])
        scores.append(ConceptScores(concept, *(np.asarray(a[name][k]) for name in SCORE_NAMES),
                                    flagged=np.asarray(a["flagged"][k], dtype=bool), n_pos=int(info["n_pos"]),
                                    n_neg=int(info["n_neg"]), labels=label_set, note=info.get("note", "")))
    return ConceptsResult(layer=attrs["layer"], concept_set=concept_set, scores=scores, rule=FlagRule(**attrs["rule"]),
                          method=attrs["method"], basis=attrs.get("basis", NEURONS),
                          basis_name=attrs.get("basis_name", ""), scan=scan, path=record.path, cached=True,
                          attrs=attrs)
