"""The dose-response experiment (`neurolens demo --compare`): is the compare report evidence about training
data? Toys are trained on the same generator with one planted concept at several training shares (same seed
otherwise: neurolens.toy.recipes.DoseResponseRecipe), all audited by `compare` on ONE probe set (another seed,
a fixed share of planted images), each beside the random-weights model of its architecture and beside the
concept's prevalence in its own training captions. If the report measures what training put into the models,
the flagged count and the count of units with AUC >= 0.95 rise with the training share.

Written to OUT: the compare report (report.html, report.json, report.csv, the flagged-share plot), the
dose-response plot (dose_response.png: both counts over the training share, the random-weights baseline
dashed) and dose_response.json (shares, counts, Spearman's rho of each count against the share, the 0 %
model and its baseline, timings)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

from scipy.stats import spearmanr

from ..display.charts import lines
from ..labels.concepts import parse_concept_set
from ..records.keys import as_cache
from ..serve.images import encode
from ..storage.files import ensure_folder, write_bytes, write_text
from ..toy.recipes import DoseResponseRecipe, dose_response_models, dose_response_probe
from .compare import CompareModel, CompareSettings, ReportFiles, plain, run_compare, write_report
from .settings import ConceptSettings

StageProgress = Optional[Callable[[str, int, int], None]]
PLOT, SUMMARY = "dose_response.png", "dose_response.json"


@dataclass
class DoseReport:
    out: Path
    files: ReportFiles
    plot: Path
    summary: Path
    shares: List[float]
    flagged: List[int]
    strong: List[int]                       # units with AUC >= 0.95
    baseline_flagged: Optional[int]         # the random-weights model of the architecture
    baseline_strong: Optional[int]
    rho_flagged: float
    rho_strong: float
    train_prevalence: List[Optional[float]]
    rows: List[dict] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return plain({"out": str(self.out), "report": str(self.files.html), "plot": str(self.plot),
                      "shares": self.shares, "n_flagged": self.flagged, "n_auc_095": self.strong,
                      "baseline_n_flagged": self.baseline_flagged, "baseline_n_auc_095": self.baseline_strong,
                      "rho_flagged": self.rho_flagged, "rho_auc_095": self.rho_strong,
                      "train_prevalence": self.train_prevalence, "seconds": self.seconds})

    def lines(self) -> List[str]:
        out = [f"{'share':>6} {'train prev':>10} {'flagged':>8} {'AUC>=.95':>8}"]
        for share, prev, flagged, strong in zip(self.shares, self.train_prevalence, self.flagged, self.strong):
            prev_text = "-" if prev is None else f"{prev:.3f}"
            out.append(f"{share:>6.0%} {prev_text:>10} {flagged:>8} {strong:>8}")
        out.append(f"random weights: {self.baseline_flagged} flagged, {self.baseline_strong} with AUC >= 0.95")
        out.append(f"Spearman rho over the shares: flagged {self.rho_flagged:.3f}, AUC >= 0.95 {self.rho_strong:.3f}")
        return out


def toy_concept_settings(recipe: DoseResponseRecipe) -> ConceptSettings:
    """The planted concept as a one-concept set: its caption lexicon (word match), no detector, no zero-shot."""
    concepts = parse_concept_set({"concepts": [{"name": recipe.concept, "terms": list(recipe.terms),
                                                "match": "word"}]}, name="toy-planted")
    return ConceptSettings(concepts=concepts, detector=False)


def share_label(share: float) -> str:
    return f"share {100 * share:g}%"


def run_dose_demo(out, seed: int = 0, cache=None, recipe: DoseResponseRecipe = DoseResponseRecipe(),
                  device: str = "cpu", progress: StageProgress = None, workers: Optional[int] = None) -> DoseReport:
    """Train (or reuse) the recipe's toys, compare them on its probe set, write the report and the plot."""
    started = time.perf_counter()
    cache = as_cache(cache)
    out = ensure_folder(out)
    toys = dose_response_models(seed=seed, cache=cache, recipe=recipe, progress=progress)
    trained = time.perf_counter()
    probe = dose_response_probe(seed, cache=cache, recipe=recipe)
    models = [CompareModel(share_label(toy.share), checkpoint=str(toy.checkpoint), train_captions=str(toy.dataset))
              for toy in toys]
    settings = CompareSettings(layers=(recipe.layer,), concepts=toy_concept_settings(recipe))
    result = run_compare(models, str(probe), settings, cache=cache, device=device, progress=progress,
                         workers=workers, dataset_name=f"toy probe (seed {seed + recipe.probe_seed_offset}, "
                                                       f"{recipe.probe_share:.0%} planted)")
    files = write_report(result, out)
    rows = result.rows()
    shares = [float(toy.share) for toy in toys]
    flagged, strong = [r["n_flagged"] for r in rows], [r["n_auc_095"] for r in rows]
    report = DoseReport(out=out, files=files, plot=out / PLOT, summary=out / SUMMARY, shares=shares,
                        flagged=flagged, strong=strong, baseline_flagged=rows[0]["baseline_n_flagged"],
                        baseline_strong=rows[0]["baseline_n_auc_095"], rho_flagged=_rho(shares, flagged),
                        rho_strong=_rho(shares, strong), train_prevalence=[r["train_prevalence"] for r in rows],
                        rows=rows)
    chart = lines(shares, ["units flagged", "units with AUC >= 0.95"], [flagged, strong],
                  dashed=[report.baseline_flagged, report.baseline_strong], dashed_label="random weights (dashed)",
                  title=f"dose-response: {recipe.concept} units of {recipe.layer} by planted share of training "
                        f"images", x_label="planted share of the training images", y_label="units")
    write_bytes(report.plot, encode(chart, "PNG"))
    report.seconds = {"train": round(trained - started, 1), "compare": round(result.seconds, 1),
                      "total": round(time.perf_counter() - started, 1)}
    write_text(report.summary, json.dumps(report.to_dict(), indent=2, allow_nan=False))
    return report


def _rho(x: List[float], y: List[int]) -> float:
    if len(set(y)) < 2:
        return float("nan")
    return float(spearmanr(x, y).correlation)
