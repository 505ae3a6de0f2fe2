"""The flag rule and the per-unit values it reads and writes (numpy only: settings, records and the CLI import
it without torch): FlagRule and its wording, apply_rule, UnitStatsResult (one label's statistics, computed
by scoring.statistics) and UnitScores (every unit's scores and flags, assembled by scoring.units)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

import numpy as np

DEFAULT_AUC_MEMORY = 2 * 2 ** 30        # bytes the exact AUC may keep (20k images x 2560 units: 0.2 GB)


@dataclass(frozen=True)
class FlagRule:
    """flagged = q <= max_q and auc >= min_auc; text_flag = top-text NSFW share >= min_text_share."""
    max_q: float = 0.01
    min_auc: float = 0.8
    min_text_share: float = 0.3
    text_k: int = 10

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """The flag part in words, e.g. `q <= 0.01 and AUC >= 0.8`."""
        return f"q <= {self.max_q:g} and AUC >= {self.min_auc:g}"

    def describe_text(self) -> str:
        """The text flag in words, e.g. `text_flag when at least 30% of the top 10 texts are NSFW`."""
        return _text_flag_words(self.min_text_share, self.text_k)


def _text_flag_words(share, k) -> str:
    return f"text_flag when at least {share:.0%} of the top {k} texts are NSFW"


def describe_rule(rule: dict, has_auc: bool = True) -> str:
    """The flag rule in words from the thresholds a sweep record stored (its `rule` attr: FlagRule.as_dict(),
    or, in records made before the AUC rule, a correlation rule); '' when none is stored."""
    if not rule:
        return ""
    if has_auc and "max_q" in rule and "min_auc" in rule:
        flag = FlagRule(max_q=float(rule["max_q"]), min_auc=float(rule["min_auc"])).describe()
        return f"flagged when {flag}; {_text_flag_words(rule.get('min_text_share', 0), rule.get('text_k'))}"
    if has_auc:
        parts = [f"{k} {v}" for k, v in rule.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return "flag rule: " + ", ".join(parts)
    return (f"flagged when the NSFW correlation reaches max({rule.get('min_correlation')}, "
            f"{rule.get('noise_z')}/sqrt(N)) and either at least {rule.get('min_top_share', 0):.0%} of the top "
            f"images or {rule.get('min_text_share', 0):.0%} of the top {rule.get('text_k')} texts are NSFW")


def apply_rule(auc: np.ndarray, q: np.ndarray, rule: FlagRule) -> np.ndarray:
    """flagged = q <= max_q and auc >= min_auc (NaN never flags)."""
    auc, q = np.asarray(auc, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return (np.nan_to_num(q, nan=np.inf) <= rule.max_q) & (np.nan_to_num(auc, nan=-np.inf) >= rule.min_auc)


@dataclass
class UnitStatsResult:
    """Every unit's statistics against one label; arrays are (U,)."""
    auc: np.ndarray
    p: np.ndarray
    q: np.ndarray
    correlation: np.ndarray
    n_pos: int
    n_neg: int
    method: str
    auprc: Optional[np.ndarray] = None      # average precision (scoring.multilabel), when computed


WEAK_CLASS = 10                         # fewer positives or negatives than this: the statistics are weak


@dataclass
class UnitScores:
    """Scores of every unit of a layer; arrays are (U,)."""
    auc: np.ndarray
    p: np.ndarray
    q: np.ndarray
    correlation: np.ndarray
    top_nsfw_share: np.ndarray
    text_nsfw_share: np.ndarray
    flagged: np.ndarray
    text_flag: np.ndarray
    n_pos: int
    n_neg: int
    rule: FlagRule = field(default_factory=FlagRule)
    method: str = "exact"
    sources: Tuple[str, ...] = ()           # the label sources the statistics used

    @property
    def n_images(self) -> int:
        """Images with a known label (the statistics' sample)."""
        return int(self.n_pos + self.n_neg)

    @property
    def weak(self) -> bool:
        """True when either class has fewer than WEAK_CLASS images."""
        return min(self.n_pos, self.n_neg) < WEAK_CLASS

    def ranking(self) -> np.ndarray:
        """Unit indices by AUC, highest first (NaN last; ties: lower unit first)."""
        auc = np.nan_to_num(self.auc.astype(np.float64), nan=-np.inf)
        return np.lexsort((np.arange(len(auc)), -auc))

    def why(self, unit: int) -> str:
        """Why the unit is (or is not) flagged: the sources, AUC, q, top share and text share."""
        u = int(unit)
        auc, q = self.auc[u], self.q[u]
        verdict = "flagged" if self.flagged[u] else "not flagged"
        sources = " + ".join(self.sources) or "no labels"
        return (f"{verdict}: AUC {_num(auc, '.3f')} (bar {self.rule.min_auc:g}), q {_num(q, '.2g')} (bar "
                f"{self.rule.max_q:g}) against {sources}; top images {100 * self.top_nsfw_share[u]:.0f}% "
                f"positive, {text_share_words(self.text_nsfw_share[u])}" + ("; text flag" if self.text_flag[u] else ""))

    def row(self, unit: int) -> dict:
        u = int(unit)
        return {"unit": u, "correlation": float(self.correlation[u]), "top_nsfw_share": float(self.top_nsfw_share[u]),
                "text_nsfw_share": _json_float(self.text_nsfw_share[u]), "flagged": bool(self.flagged[u]),
                "auc": _json_float(self.auc[u]), "p": _json_float(self.p[u]), "q": _json_float(self.q[u]),
                "text_flag": bool(self.text_flag[u]), "why": self.why(u)}

    def rows(self, limit: Optional[int] = None) -> List[dict]:
        order = self.ranking()
        return [self.row(u) for u in (order[:limit] if limit else order)]


def text_share_words(share: float) -> str:
    """'top texts 40% NSFW', or 'no text evidence' for a unit without one (NaN share: no texts, or every
    cosine ~0, neurolens.scoring.units.text_shares)."""
    return f"top texts {100 * float(share):.0f}% NSFW" if np.isfinite(share) else "no text evidence"


def _num(value: float, spec: str) -> str:
    return format(float(value), spec) if np.isfinite(value) else "n/a"


def _json_float(value: float) -> Optional[float]:
    return float(value) if np.isfinite(value) else None


def exact_bytes(rows: int, units: int, labels: int = 1) -> int:
    """Memory the exact AUC path keeps: `rows` rows of `units` float32 values and `labels` int8 label codes
    (scoring.multilabel.MultiLabelStats; result() adds a bounded workspace)."""
    return int(rows) * (int(units) * 4 + int(labels))


def auc_method(rows: int, units: int, memory: int, labels: int = 1) -> str:
    """'exact' when `rows` rows of `units` values and `labels` label codes fit `memory` bytes (exact_bytes),
    else 'binned:<memory>' (the records' keys name it). Numpy-free arithmetic: a cached answer decides it
    without the scorers."""
    return "exact" if int(memory) >= exact_bytes(rows, units, labels) else f"binned:{int(memory)}"
