"""The sweep record and the fused-sweep record: the one reader and writer of both, readable without a model.

    sweep/<model fingerprint[:16]>/<layer>/<key>.h5
        auc, p, q, correlation, top_nsfw_share, text_nsfw_share (U,) float; flagged, text_flag (U,) bool
        image_labels (N,) float32 the combined label (1 positive, 0 negative, NaN unknown or skipped)
        source_scores (S, N) float32 each label source's per-image score (NaN unknown), in attrs' order
        text_scores (U, k_text) float32, text_nsfw (U, k_text) bool   (the unit's ranked top texts)
        text_mark_source (U, k_text) uint8   why a text is marked: 0 not marked, 1 the NSFW lexicon, 2 the
               model's zero-shot score (model-based; only where the check kept the zero-shot image source)
        attrs: layer, rule, n_pos, n_neg, method (exact | binned), labels (every source: kind, threshold,
               counts, agreement, kept or dropped and why; the agreement matrix; the sources used), prompts,
               caption terms and mode, scan record, model, basis (the neurons when absent) and its SAE's name

    sweep-fused/<model fingerprint[:16]>/<layer>/<key>.h5     (a sweep on Ray: the label results of its pass)
        auc, p, q, correlation (U,); image_labels (N,); source_scores (S, N); counts/pos, counts/neg (U, bins)
        when the AUC is binned; attrs: n_pos, n_neg, method, labels, warmup_items, warmup, bins

Records written before the AUC rule hold a correlation rule and no `auc`; the readers below (flagged,
evidence_*, unit_evidence, image_labels) answer for them too. Records written before SWEEP_VERSION 3 hold no
`text_mark_source` (their marks may come from the model's own zero-shot score): pages show no text marks
for them. The keys are made by neurolens.pipelines.sweep.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Set, Tuple

import numpy as np

from ..labels.prompts import LOGIT_SCALE, TEXT_NSFW_THRESHOLD
from ..labels.reliability import Agreement, LabelSet
from ..labels.spec import LabelSource, LabelSpec, parse_labels
from ..scoring.flags import FlagRule, UnitScores, UnitStatsResult, apply_rule, describe_rule
from ..storage.cache import Cache, Record
from .keys import NEURONS

SWEEP_KIND = "sweep"
FUSED_KIND = "sweep-fused"
SWEEP_VERSION = 3          # 3: text marks from the lexicon, or zero-shot only where the check kept it
MARK_NONE, MARK_LEXICON, MARK_ZERO_SHOT = 0, 1, 2
MARK_NAMES = {MARK_LEXICON: "lexicon", MARK_ZERO_SHOT: "zero-shot (model-based)"}


# ------------------------------------------------------------------------------------------- the result

@dataclass
class SweepResult:
    layer: str
    scores: UnitScores
    labels: LabelSet                    # the label sources, their agreement, the combined label
    text_entries: List[List[str]]       # per unit: its ranked top texts
    text_scores: np.ndarray             # (U, k_text) cosines of those texts
    text_nsfw: np.ndarray               # (U, k_text) bool
    text_mark_source: Optional[np.ndarray] = None   # (U, k_text) uint8: MARK_NONE, MARK_LEXICON or MARK_ZERO_SHOT
    scan: object = None                 # the ScanResult (keys, captions, top images and cells)
    text: object = None                 # the TextRanking
    path: Optional[Path] = None         # the sweep record
    flags_csv: Optional[Path] = None
    cached: bool = False
    attrs: dict = field(default_factory=dict)
    basis: str = NEURONS                # whose units: "neurons" or an SAE basis id (neurolens.sae.basis)
    basis_name: str = ""                # the SAE's name for an SAE basis

    @property
    def unit_word(self) -> str:
        return "unit" if self.basis == NEURONS else "feature"

    @property
    def image_labels(self) -> np.ndarray:
        """(N,) the combined per-image label: 1 positive, 0 negative, NaN unknown (or a skipped item)."""
        return self.labels.labels

    @property
    def image_scores(self) -> np.ndarray:
        """The combined label (1/0/NaN), under the name the figure code reads."""
        return self.labels.labels

    @property
    def flagged_units(self) -> List[int]:
        return [int(u) for u in self.scores.ranking() if self.scores.flagged[u]]

    def source_scores(self, name: str) -> Optional[np.ndarray]:
        """(N,) per-image scores of one label source (e.g. "nudenet"), or None when it was not computed."""
        for source in self.labels.sources:
            if source.name == name:
                return source.scores
        return None

    def top_texts(self, unit: int, n: int = 5) -> List[Tuple[str, float, bool]]:
        return [(t, float(s), bool(f)) for t, s, f in
                zip(self.text_entries[unit][:n], self.text_scores[unit][:n], self.text_nsfw[unit][:n])]

    def text_marks(self, unit: int, n: int = 5) -> List[Optional[str]]:
        """Why each of the unit's top n texts is marked NSFW ("lexicon", "zero-shot (model-based)") or None."""
        sources = self.text_mark_source[unit][:n] if self.text_mark_source is not None else \
            np.where(self.text_nsfw[unit][:n], MARK_LEXICON, MARK_NONE)
        return [MARK_NAMES.get(int(code)) for code in sources]

    def ranking(self, limit: Optional[int] = None, texts: int = 0) -> List[dict]:
        """The `sweep --json` rows, ranked by AUC: unit, correlation, top_nsfw_share, text_nsfw_share,
        flagged, auc, p, q, text_flag, why (and top_texts when texts > 0)."""
        rows = self.scores.rows(limit)
        if texts:
            for row in rows:
                row["top_texts"] = [t for t, _, _ in self.top_texts(row["unit"], texts)]
        return rows

    def lines(self) -> List[str]:
        """What the sweep tells the user about its labels and its statistics (sources, agreement, what was
        dropped, and the warnings about weak or missing positives)."""
        out = [f"labels: {line}" for line in self.labels.lines()]
        s = self.scores
        if s.n_pos == 0:
            out.append(f"no image is labelled positive by {' + '.join(s.sources) or 'any source'}: nothing can be "
                       f"flagged; sweep a dataset with NSFW content, or give labels with --labels "
                       f"column:NAME[=V1,V2]")
        elif s.weak:
            out.append(f"warning: only {s.n_pos} positive and {s.n_neg} negative images: the statistics are weak "
                       f"(fewer than 10 in a class); sweep more images")
        return out


def basis_fields(basis) -> dict:
    """SweepResult's basis fields for a basis object (None: the neurons)."""
    return {} if basis is None else {"basis": basis.id, "basis_name": basis.name}


def ranked_texts(ranking) -> List[List[str]]:
    """Per unit: the texts of a TextRanking's top indices, best first."""
    entries = list(ranking.entries)
    return [[entries[i] for i in row if i >= 0] for row in np.asarray(ranking.top_indices)]


# ------------------------------------------------------------------------------------------- paths

def sweep_path(cache: Cache, fingerprint: str, layer: str, key: str) -> Path:
    return cache.path(SWEEP_KIND, fingerprint, layer, key)


def fused_path(cache: Cache, fingerprint: str, layer: str, key: str) -> Path:
    return cache.path(FUSED_KIND, fingerprint, layer, key)


def sweep_paths(cache: Cache, fingerprint: str, layer: str) -> List[Path]:
    """Every sweep record of one model's layer (every dataset and setting swept), by name."""
    folder = cache.folder(SWEEP_KIND, fingerprint, layer)
    if not folder.is_dir():
        return []
    return [path for path in sorted(folder.glob("*.h5")) if not path.name.startswith(".")]


def flagged_in_cache(cache, fingerprint: str, layer: str, basis: str = NEURONS) -> Set[int]:
    """Units flagged in ANY cached sweep of `layer` made with these weights (every dataset swept), of one
    basis: the neurons, or an SAE's features (basis id, neurolens.sae.basis; a sweep record's `basis` attr)."""
    flagged: Set[int] = set()
    if cache is None:
        return flagged
    for path in sweep_paths(cache, fingerprint, layer):
        record = cache.read(path, names=["flagged"])
        if record is not None and "flagged" in record.arrays and record.attrs.get("basis", NEURONS) == basis:
            flagged.update(int(u) for u in np.flatnonzero(np.asarray(record.arrays["flagged"], dtype=bool)))
    return flagged


# ------------------------------------------------------------------------------------------- writing

def to_record(result: SweepResult, clip, prompts, terms, caption_mode: str, scorer_name: Optional[str]) -> Record:
    s = result.scores
    sources = result.labels.sources
    scores = np.stack([src.scores for src in sources]).astype(np.float32) if sources else \
        np.zeros((0, len(result.image_labels)), np.float32)
    arrays = {"auc": s.auc, "p": s.p, "q": s.q, "correlation": s.correlation, "top_nsfw_share": s.top_nsfw_share,
              "text_nsfw_share": s.text_nsfw_share, "flagged": s.flagged.astype(bool),
              "text_flag": s.text_flag.astype(bool), "image_labels": result.image_labels.astype(np.float32),
              "source_scores": scores, "text_scores": result.text_scores, "text_nsfw": result.text_nsfw}
    if result.text_mark_source is not None:
        arrays["text_mark_source"] = np.asarray(result.text_mark_source, dtype=np.uint8)
    attrs = {"layer": result.layer, "rule": s.rule.as_dict(), "n_pos": int(s.n_pos), "n_neg": int(s.n_neg),
             "method": s.method, "labels": result.labels.as_attrs(), "prompts_unsafe": prompts.unsafe,
             "prompts_safe": prompts.safe, "caption_terms": list(terms), "caption_mode": caption_mode,
             "logit_scale": LOGIT_SCALE, "text_threshold": TEXT_NSFW_THRESHOLD,
             "scorer": scorer_name, "scan_record": str(result.scan.path) if result.scan is not None else None,
             "model": clip.name, "pretrained": clip.pretrained, "fingerprint": clip.fingerprint,
             "basis": result.basis, "basis_name": result.basis_name}
    return Record(arrays=arrays, attrs=attrs)


def fused_record(outcome, warmup: int, bins: int) -> Record:
    """The label results of a fused sweep (engines.ray.fused.FusedOutcome): what label_set_from_record and
    statistics_from_record read."""
    result, label_set = outcome.statistics, outcome.label_set
    arrays = {"auc": result.auc, "p": result.p, "q": result.q, "correlation": result.correlation,
              "image_labels": label_set.labels.astype(np.float32),
              "source_scores": np.stack([s.scores for s in label_set.sources]).astype(np.float32)}
    if outcome.counts is not None:
        arrays["counts/pos"], arrays["counts/neg"] = outcome.counts
    return Record(arrays=arrays, attrs={"n_pos": int(result.n_pos), "n_neg": int(result.n_neg),
                                        "method": result.method, "labels": label_set.as_attrs(),
                                        "warmup_items": int(outcome.warmup_images), "warmup": warmup,
                                        "bins": bins})


# ------------------------------------------------------------------------------------------- reading

def label_set_from_record(record: Record) -> LabelSet:
    """The LabelSet a sweep (or fused-label) record stores: source_scores, image_labels, attrs' labels."""
    a = record.arrays
    return label_set_from_parts(a["source_scores"], a["image_labels"], record.attrs["labels"])


def label_set_from_parts(source_scores: np.ndarray, image_labels: np.ndarray, info: dict) -> LabelSet:
    """A LabelSet from its stored parts: every source's scores (S, N), the combined label (N,) and
    LabelSet.as_attrs() (a concepts record stores one per concept)."""
    sources, agreements = [], {}
    for row, scores in zip(info["sources"], np.asarray(source_scores)):
        spec = _spec_from_name(row["name"], row["kind"], row["explicit"])
        sources.append(LabelSource(spec, np.asarray(scores, np.float32), row["threshold"], row.get("detail", "")))
        agreements[row["name"]] = Agreement(row["name"], list(row["reference"]),
                                            float("nan") if row["auc"] is None else float(row["auc"]),
                                            bool(row["kept"]), row["note"])
    return LabelSet(sources=sources, agreements=agreements, pairwise=info["pairwise"],
                    labels=np.asarray(image_labels, np.float32), min_agreement=info["min_agreement"],
                    notes=list(info.get("notes", [])))


def statistics_from_record(record: Record) -> UnitStatsResult:
    """The units' label statistics a fused-sweep record stores."""
    a, attrs = record.arrays, record.attrs
    return UnitStatsResult(auc=a["auc"], p=a["p"], q=a["q"], correlation=a["correlation"], n_pos=int(attrs["n_pos"]),
                           n_neg=int(attrs["n_neg"]), method=attrs["method"])


def from_record(record: Record, scan, ranking, basis=None) -> SweepResult:
    """The SweepResult of a sweep record, with the scan and text ranking it was made from."""
    a, attrs = record.arrays, record.attrs
    rule = FlagRule(**attrs["rule"])
    info = attrs["labels"]
    scores = UnitScores(auc=a["auc"], p=a["p"], q=a["q"], correlation=a["correlation"],
                        top_nsfw_share=a["top_nsfw_share"], text_nsfw_share=a["text_nsfw_share"],
                        flagged=apply_rule(a["auc"], a["q"], rule), text_flag=a["text_flag"].astype(bool),
                        n_pos=int(attrs["n_pos"]), n_neg=int(attrs["n_neg"]), rule=rule, method=attrs["method"],
                        sources=tuple(info["used"]))
    return SweepResult(layer=attrs["layer"], scores=scores, labels=label_set_from_record(record),
                       text_entries=ranked_texts(ranking), text_scores=a["text_scores"],
                       text_nsfw=a["text_nsfw"].astype(bool), scan=scan, text=ranking, path=record.path, cached=True,
                       attrs=attrs, text_mark_source=a.get("text_mark_source"), **basis_fields(basis))


def _spec_from_name(name: str, kind: str, explicit: bool) -> LabelSpec:
    spec = parse_labels([name])[0][0]
    return LabelSpec(kind, spec.column, spec.values, bool(explicit))


# ------------------------------------------------------------------- what pages show (any record's age)

def made_from_scan(record: Record) -> str:
    """The file name of the scan record a sweep record was made from ('' when not stored)."""
    return Path(str(record.attrs.get("scan_record") or "")).name


def unit_count(record: Record) -> int:
    return int(len(record.arrays["flagged"]))


def flagged(record: Optional[Record], units: int) -> np.ndarray:
    """(U,) bool: the record's flags (all False without a record)."""
    if record is None:
        return np.zeros(units, dtype=bool)
    return np.asarray(record.arrays["flagged"], dtype=bool)


def evidence_name(record: Optional[Record]) -> str:
    """'AUC' when the sweep stores per-unit ROC AUCs, else 'correlation'."""
    return "AUC" if record is not None and "auc" in record.arrays else "correlation"


def evidence_values(record: Optional[Record], units: int) -> np.ndarray:
    """(U,) the number units are sorted by: AUC when stored, else the NSFW correlation (NaN: no sweep)."""
    if record is None:
        return np.full(units, np.nan)
    key = "auc" if "auc" in record.arrays else "correlation"
    return np.asarray(record.arrays[key], dtype=np.float64)


def image_labels(record: Optional[Record]) -> Optional[np.ndarray]:
    """(N,) per dataset index: the sweep's per-image NSFW label or score (NaN unknown), for the blur policy."""
    if record is None:
        return None
    for name in ("image_labels", "labels", "image_scores"):
        if name in record.arrays and np.ndim(record.arrays[name]) == 1:
            return np.asarray(record.arrays[name], dtype=np.float64)
    return None


def text_marks(record: Optional[Record], unit: int) -> Optional[List[Optional[str]]]:
    """Per ranked top text of the unit: why it is marked NSFW (MARK_NAMES: "lexicon", "zero-shot
    (model-based)") or None; None when the record does not say where its marks come from (before
    SWEEP_VERSION 3: they may be the model's own zero-shot score, so they are not shown)."""
    if record is None or "text_mark_source" not in record.arrays:
        return None
    return [MARK_NAMES.get(int(code)) for code in np.asarray(record.arrays["text_mark_source"][unit])]


def unit_evidence(record: Optional[Record], unit: int) -> Optional[dict]:
    """Everything the sweep says about one unit, and the rule's checks (why it is flagged or not)."""
    if record is None:
        return None
    a, attrs = record.arrays, record.attrs
    rule = dict(attrs.get("rule") or {})

    def value(name: str) -> Optional[float]:
        return float(a[name][unit]) if name in a and np.ndim(a[name]) >= 1 else None

    checks = []
    auc, q, p = value("auc"), value("q"), value("p")
    correlation = value("correlation")
    if auc is not None:
        checks.append(("AUC (activation separates labelled-NSFW from other images)", auc,
                       _first(rule, "min_auc", "auc"), ">="))
    if q is not None:
        checks.append(("q (Benjamini-Hochberg adjusted p)", q, _first(rule, "max_q", "fdr", "q"), "<="))
    if correlation is not None and auc is None:
        bar = attrs.get("correlation_bar", _first(rule, "min_correlation"))
        checks.append(("NSFW correlation", correlation, bar, ">="))
    top = value("top_nsfw_share")
    if top is not None:
        checks.append(("share of top images that are NSFW", top, _first(rule, "min_top_share"), ">="))
    text = value("text_nsfw_share")
    if text is not None and not np.isfinite(text):
        text = None              # no text evidence (no texts, or every cosine ~0): never a share
    if text is not None:
        # with an AUC rule the text share raises only text_flag (evidence), never the flag itself
        label = "share of top texts that are NSFW" + (" (text_flag, not the flag)" if auc is not None else "")
        checks.append((label, text, _first(rule, "min_text_share"), ">="))
    rows = []
    for label, number, bar, op in checks:
        passed = None if bar is None else (number >= bar if op == ">=" else number <= bar)
        rows.append({"label": label, "value": number, "bar": bar, "op": op, "passed": passed})
    text_flag = value("text_flag")
    return {"flagged": bool(a["flagged"][unit]), "auc": auc, "q": q, "p": p, "correlation": correlation,
            "top_share": top, "text_share": text, "text_flag": None if text_flag is None else bool(text_flag),
            "checks": rows, "rule": rule,
            "n_images": attrs.get("n_images", _sum_known(attrs.get("n_pos"), attrs.get("n_neg"))),
            "rule_text": describe_rule(rule, auc is not None)}


def _first(mapping: dict, *names: str) -> Optional[float]:
    for name in names:
        if name in mapping and mapping[name] is not None:
            try:
                return float(mapping[name])
            except (TypeError, ValueError):
                continue
    return None


def _sum_known(*counts) -> Optional[int]:
    """The sum of the counts, or None when one is unknown."""
    return None if any(c is None for c in counts) else int(sum(counts))
