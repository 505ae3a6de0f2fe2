"""How far each label source can be trusted on the data at hand, and the one label the sweep uses.

Agreement of source s with a set of other sources R (`agreement`), over the images both know:

- s has a graded score (NudeNet, zero-shot, a numeric column): the ROC AUC of s's score against the label
  R combines (`combine`). 1.0: s ranks every image R calls positive above every image R calls negative;
  0.5: s knows nothing R knows.
- s only says yes or no (captions, a column with named values: at most two distinct scores) and R has
  graded sources: the AUC of their score against s's label (the best of them), i.e. whether the images s
  calls positive are the ones R scores high. A yes/no source is not punished for naming only part of the
  positives (captions rarely mention nudity), only for naming the wrong ones. For a yes/no source and a
  graded one the two ways give the same number, so the pair agrees or not whichever is checked.
- both sides yes/no: the AUC of s's label against R's label (the mean of the two classes' hit rates).

The check (`check_reliability`) goes through the sources least trusted first (zero-shot, nudenet,
captions, columns) and measures each against the union of the INDEPENDENT sources still kept (captions,
columns, NudeNet: the inspected model's zero-shot score is checked, but never judges); a source below
`min_agreement` (default 0.75) is dropped with one line saying so, unless it was named explicitly. A
source that nothing else can judge (it is the last one left, or the others label no positive or no
negative image it knows) is kept, and its agreement is "not measured". Every ordered pair's AUC (s's score
against t's label) is also kept, as the agreement matrix.

Combined label of image i from the kept sources (`combine`):

    1    some independent source (captions, a column, NudeNet) labels i positive
    0    no independent source labels i positive and one labels it negative, unless a kept zero-shot
         source finds it doubtful
    NaN  unknown to every independent source, or doubtful: negative to them, but the inspected model's
         zero-shot score is at or above both its threshold and the median score of the images the
         independent sources call positive (`doubt_threshold`): as NSFW-looking to the model as a typical
         labelled positive. A doubtful image is left out of the statistics.

so the inspected model never adds positives of its own when an independent source exists: it can only
take images it is as sure of as of the labelled positives out of the negatives (such as planted images
whose captions do not say so). Leaving out only those keeps the bias small that leaving out images the
model likes would give the units that follow the model's own notion. When zero-shot is the only source,
its label is the label.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..scoring.ranks import column_auc
from .spec import CHECK_ORDER, DEFAULT_MIN_AGREEMENT, LabelSource


def combine(sources: Sequence[LabelSource], size: Optional[int] = None,
            doubt: Optional[Dict[str, float]] = None) -> np.ndarray:
    """(N,) float32 combined label (module docstring): 1, 0 or NaN.

    doubt: {model source name: threshold} decided beforehand (a fused sweep on Ray decides them on its
    first images, then labels the rest batch by batch); default: doubt_threshold over these images."""
    if not sources:
        return np.full(size or 0, np.nan, dtype=np.float32)
    n = len(sources[0].scores)
    independent = [s.labels for s in sources if s.spec.independent]
    model = [s.labels for s in sources if not s.spec.independent]
    if not independent:
        out = np.full(n, np.nan, dtype=np.float32)
        for labels in model:
            known = np.isfinite(labels)
            out[known & np.isnan(out)] = 0.0
            out[labels == 1] = 1.0
        return out
    positive = np.zeros(n, dtype=bool)
    negative = np.zeros(n, dtype=bool)
    for labels in independent:
        positive |= labels == 1
        negative |= labels == 0
    out = np.full(n, np.nan, dtype=np.float32)
    out[negative] = 0.0
    out[positive] = 1.0
    for source in (s for s in sources if not s.spec.independent):
        threshold = doubt[source.name] if doubt is not None else doubt_threshold(source, positive)
        out[(out == 0) & (source.scores >= threshold)] = np.nan
    return out


def doubt_threshold(source: LabelSource, positive: np.ndarray) -> float:
    """The model score from which an image the independent sources call negative is left out as doubtful:
    the source's own threshold, or the median score of the images they call positive when that is higher
    (as NSFW-looking to the model as a typical labelled positive)."""
    scores = np.asarray(source.scores, dtype=np.float64)[np.asarray(positive, dtype=bool)]
    scores = scores[np.isfinite(scores)]
    return max(float(source.threshold), float(np.median(scores)) if len(scores) else -np.inf)


def source_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC of scores against a 0/1/NaN label over the images both know; NaN without both classes."""
    return column_auc(scores, labels)


def is_graded(source: LabelSource) -> bool:
    """True when the source's scores take more than two values (a ranking, not a yes/no)."""
    finite = np.asarray(source.scores, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return len(np.unique(finite)) > 2


def agreement(source: LabelSource, others: Sequence[LabelSource]) -> float:
    """The AUC agreement of `source` with the union of `others` (module docstring); NaN when it cannot be
    measured (no other source, or a class missing)."""
    if not others:
        return float("nan")
    graded = [t for t in others if is_graded(t)]
    if is_graded(source) or not graded:
        return source_auc(source.scores, combine(others, len(source.scores)))
    values = [source_auc(t.scores, source.labels) for t in graded]
    values = [v for v in values if np.isfinite(v)]
    return max(values) if values else float("nan")


@dataclass
class Agreement:
    """The check of one source: its AUC against the union of `reference` (NaN: not measured)."""
    source: str
    reference: List[str]
    auc: float
    kept: bool
    note: str

    def as_dict(self) -> dict:
        return {"source": self.source, "reference": list(self.reference),
                "auc": None if not np.isfinite(self.auc) else round(float(self.auc), 6), "kept": self.kept,
                "note": self.note}


@dataclass
class LabelSet:
    """Every computed source, which were kept, their agreement, and the combined label."""
    sources: List[LabelSource]
    agreements: Dict[str, Agreement]
    pairwise: Dict[str, Dict[str, Optional[float]]]
    labels: np.ndarray
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    notes: List[str] = field(default_factory=list)

    @property
    def kept(self) -> List[LabelSource]:
        return [s for s in self.sources if self.agreements[s.name].kept]

    @property
    def used(self) -> List[str]:
        return [s.name for s in self.kept]

    @property
    def dropped(self) -> List[str]:
        return [s.name for s in self.sources if not self.agreements[s.name].kept]

    @property
    def counts(self) -> tuple:
        """(positive, negative, unknown) images of the combined label."""
        positive = int((self.labels == 1).sum())
        unknown = int(np.isnan(self.labels).sum())
        return positive, len(self.labels) - positive - unknown, unknown

    def lines(self) -> List[str]:
        """What to tell the user: the sources used, each check, and what was left out."""
        out = list(self.notes)
        for source in self.sources:
            a = self.agreements[source.name]
            pos, neg, unknown = source.counts
            out.append(f"{source.name}: {pos} positive, {neg} negative, {unknown} unknown images; {a.note}")
        pos, neg, unknown = self.counts
        out.append(f"used: {' + '.join(self.used) or 'none'} ({pos} positive, {neg} negative, "
                   f"{unknown} left out)")
        return out

    def as_attrs(self) -> dict:
        return {"sources": [{"name": s.name, "kind": s.spec.kind, "explicit": s.spec.explicit,
                             "threshold": float(s.threshold), "detail": s.detail,
                             "counts": list(s.counts), **self.agreements[s.name].as_dict()}
                            for s in self.sources],
                "used": self.used, "dropped": self.dropped, "pairwise": self.pairwise,
                "min_agreement": self.min_agreement, "notes": list(self.notes), "counts": list(self.counts)}


def _check_line(source: LabelSource, reference: List[str], auc: float, kept: bool, min_agreement: float) -> str:
    against = " + ".join(reference)
    if not np.isfinite(auc):
        why = "the others label no positive or no negative image it knows" if reference else \
            "no other independent source kept"
        return f"agreement not measured ({why}): kept"
    measured = f"agreement with {against}: AUC {auc:.3f}"
    if auc >= min_agreement:
        return f"{measured}: kept"
    if kept:
        return f"{measured} < {min_agreement}: kept, named explicitly"
    return f"{measured} < {min_agreement}: DROPPED (name it with --labels to keep it)"


def check_reliability(sources: Sequence[LabelSource], min_agreement: float = DEFAULT_MIN_AGREEMENT,
                      notes: Sequence[str] = ()) -> LabelSet:
    """Measure every source against the others, drop the unreliable ones (module docstring), combine."""
    sources = list(sources)
    pairwise: Dict[str, Dict[str, Optional[float]]] = {}
    for s in sources:
        pairwise[s.name] = {}
        for t in sources:
            if t is not s:
                value = source_auc(s.scores, t.labels)
                pairwise[s.name][t.name] = round(value, 6) if np.isfinite(value) else None
    rank = {kind: i for i, kind in enumerate(CHECK_ORDER)}
    order = sorted(range(len(sources)), key=lambda i: (rank[sources[i].spec.kind], -i))
    kept = {s.name: True for s in sources}
    agreements: Dict[str, Agreement] = {}
    for i in order:
        source = sources[i]
        # the inspected model never judges an independent source: those are checked against each other
        others = [t for t in sources if t is not source and kept[t.name] and t.spec.independent]
        auc = agreement(source, others)
        keep = not np.isfinite(auc) or auc >= min_agreement or source.spec.explicit
        kept[source.name] = keep
        agreements[source.name] = Agreement(source.name, [t.name for t in others], auc, keep,
                                            _check_line(source, [t.name for t in others], auc, keep, min_agreement))
    chosen = [s for s in sources if kept[s.name]]
    size = len(sources[0].scores) if sources else 0
    return LabelSet(sources=sources, agreements=agreements, pairwise=pairwise, labels=combine(chosen, size),
                    min_agreement=float(min_agreement), notes=list(notes))
