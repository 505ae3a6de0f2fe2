"""What a label source is, before anything is computed (light: no model, no torch): the kinds, the order the
reliability check reads them in, a requested source (LabelSpec, parsed from `--labels`) and a computed one
(LabelSource: per-image scores and a threshold). neurolens.labels.sources computes them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..errors import NeurolensError
from ..models.names import RANDOM_WEIGHTS


KINDS = ("captions", "column", "nudenet", "zero-shot")
AUTO_KINDS = ("captions", "nudenet", "zero-shot")    # the kinds `--labels auto` may add
# Checked for agreement least trusted first, so a bad source never judges a better one.
CHECK_ORDER = ("zero-shot", "nudenet", "captions", "column")
# A source is kept when it agrees with the sources checked after it at least this well (AUC; labels.reliability).
DEFAULT_MIN_AGREEMENT = 0.75


def is_random(clip) -> bool:
    """True when the model has random weights (`--pretrained none` without a checkpoint): its zero-shot
    score is noise, so it is never a label source (and never judges an image for the blur policy)."""
    return clip is not None and str(getattr(clip, "pretrained", "")) == RANDOM_WEIGHTS


@dataclass(frozen=True)
class LabelSpec:
    """One requested source. explicit: named by the user (never dropped by the reliability check)."""
    kind: str
    column: Optional[str] = None
    values: Tuple[str, ...] = ()
    explicit: bool = True

    @property
    def name(self) -> str:
        if self.kind != "column":
            return self.kind
        return f"column:{self.column}" + (f"={','.join(self.values)}" if self.values else "")

    @property
    def independent(self) -> bool:
        """True when the source does not come from the inspected model."""
        return self.kind != "zero-shot"


def parse_labels(specs: Sequence[str] | str | None) -> Tuple[List[LabelSpec], bool]:
    """(the explicitly named sources, whether `auto` was asked) from --labels values; none at all = auto."""
    if specs is None or isinstance(specs, str):
        specs = [specs] if specs else []
    named: List[LabelSpec] = []
    auto = not specs
    for text in specs:
        text = str(text).strip()
        if text == "auto":
            auto = True
            continue
        spec = _parse_one(text)
        if spec.name not in {s.name for s in named}:
            named.append(spec)
    return named, auto


def _parse_one(text: str) -> LabelSpec:
    lower = text.lower()
    if lower in ("captions", "caption"):
        return LabelSpec("captions")
    if lower in ("nudenet", "zero-shot", "zeroshot", "zero_shot"):
        return LabelSpec("zero-shot" if lower.startswith("zero") else "nudenet")
    if lower.startswith("column:"):
        body = text.split(":", 1)[1]
        name, equals, values = body.partition("=")
        name = name.strip()
        if not name:
            raise NeurolensError(f"--labels {text!r} names no column; write column:NAME or column:NAME=V1,V2")
        chosen = tuple(v.strip() for v in values.split(",") if v.strip())
        if equals and not chosen:
            raise NeurolensError(f"--labels {text!r} lists no value after '='; write e.g. column:NSFW=NSFW,UNSURE")
        return LabelSpec("column", column=name, values=chosen)
    raise NeurolensError(f"unknown label source {text!r}; use auto, captions, column:NAME[=V1,V2], nudenet or "
                         f"zero-shot")


@dataclass
class LabelSource:
    """A computed source: scores (N,) float32 in [0, 1], NaN unknown; label = score >= threshold."""
    spec: LabelSpec
    scores: np.ndarray
    threshold: float
    detail: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def labels(self) -> np.ndarray:
        """(N,) float32: 1 positive, 0 negative, NaN unknown."""
        scores = np.asarray(self.scores, dtype=np.float32)
        out = np.full(scores.shape, np.nan, dtype=np.float32)
        known = np.isfinite(scores)
        out[known] = (scores[known] >= self.threshold).astype(np.float32)
        return out

    @property
    def counts(self) -> Tuple[int, int, int]:
        """(positive, negative, unknown) images."""
        labels = self.labels
        positive = int(np.nansum(labels == 1))
        unknown = int(np.isnan(labels).sum())
        return positive, len(labels) - positive - unknown, unknown
