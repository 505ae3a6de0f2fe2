"""Toy models trained once per test session (tests/conftest.py: `toy_multi`, `toy_dose`) on the recipes of
neurolens.toy.recipes, and the audit that checks them against the generator's truth.

The audit is the EXISTING sweep (captions as the only label source, one concept's lexicon as its terms) on the
recipe's probe set; the truth is computed here, independently of neurolens' statistics: a unit's truth AUC is
the ROC AUC of its per-image activation maximum, images showing the concept (the generator's truth column)
against the others, from scipy's midranks."""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow.parquet as pq
from scipy.stats import rankdata


def truth_auc(maxima: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per column: (rank sum of the positive rows - n1 (n1 + 1) / 2) / (n1 n0), midranks for ties."""
    keep = np.isfinite(maxima).all(axis=1)
    maxima, truth = maxima[keep].astype(np.float64), truth[keep]
    ranks = rankdata(maxima, axis=0)
    n1, n0 = truth.sum(), (~truth).sum()
    return (ranks[truth].sum(axis=0) - n1 * (n1 + 1) / 2) / (n1 * n0)


@dataclass
class Audit:
    """One model's sweep for one concept on a probe set, beside the truth."""
    flagged: np.ndarray                  # (U,) the sweep's flags
    auc: np.ndarray                      # (U,) truth AUC
    prevalence: float

    @property
    def truth_units(self) -> int:
        return int((self.auc >= 0.95).sum())

    @property
    def precision(self) -> float:
        """The share of flagged units whose truth AUC >= 0.8 (the project's definition, as in test_toy.py)."""
        return float((self.auc[self.flagged] >= 0.8).mean())

    @property
    def strict_precision(self) -> float:
        """The share of flagged units whose truth AUC >= 0.95."""
        return float((self.auc[self.flagged] >= 0.95).mean())

    @property
    def recall(self) -> float:
        """The share of units with truth AUC >= 0.95 that are flagged."""
        return float(self.flagged[self.auc >= 0.95].mean())


def audit(clip, probe: Path, layer: str, terms: List[str], truth_column: str, cache) -> Audit:
    from neurolens.pipelines.sweep import run_sweep
    result = run_sweep(clip, layer, str(probe), vocab=f"{probe}:caption", cache=cache, labels="captions",
                       caption_terms=terms, detector=False, write_csv=False)
    truth = np.asarray(pq.read_table(probe, columns=[truth_column]).column(truth_column).to_pylist(), dtype=bool)
    maxima = result.scan.per_image_max()
    return Audit(np.asarray(result.scores.flagged, dtype=bool), truth_auc(maxima, truth), float(truth.mean()))


@dataclass
class MultiFixture:
    recipe: object
    model: object                                        # neurolens.toy.recipes.ToyModel
    probe: Path
    audits: Dict[str, Audit] = field(default_factory=dict)          # per concept, the trained toy
    random_audits: Dict[str, Audit] = field(default_factory=dict)   # per concept, random weights


def build_multi(root: Path, seed: int = 0) -> MultiFixture:
    """The multi-concept toy of the recipe, swept per concept on the probe, and the same audit of the
    random-weights model of the same architecture."""
    from neurolens.models.build import load_clip
    from neurolens.storage.cache import Cache
    from neurolens.toy.concepts import concept_set, truth_column
    from neurolens.toy.recipes import MultiConceptRecipe, multi_concept_model, multi_concept_probe
    recipe = MultiConceptRecipe()
    model = multi_concept_model(seed, cache=root, recipe=recipe)
    probe = multi_concept_probe(seed, cache=root, recipe=recipe)
    fixture = MultiFixture(recipe, model, probe)
    cache = Cache(root)
    trained = load_clip(checkpoint=str(model.checkpoint), device="cpu")
    random = load_clip(trained.name, "none", device="cpu")
    for row in concept_set():
        column = truth_column(row["name"])
        fixture.audits[row["name"]] = audit(trained, probe, recipe.layer, row["terms"], column, cache)
        fixture.random_audits[row["name"]] = audit(random, probe, recipe.layer, row["terms"], column, cache)
    return fixture


@dataclass
class DoseFixture:
    recipe: object
    models: list                                         # ToyModel per share, in order
    probe: Path
    audits: List[Audit] = field(default_factory=list)    # per share
    random_audit: Audit = None


def build_dose(root: Path, seed: int = 0) -> DoseFixture:
    """The dose-response toys of the recipe, all swept on its one probe set, and the random-weights model."""
    from neurolens.models.build import load_clip
    from neurolens.storage.cache import Cache
    from neurolens.toy.recipes import DoseResponseRecipe, dose_response_models, dose_response_probe
    recipe = DoseResponseRecipe()
    models = dose_response_models(seed=seed, cache=root, recipe=recipe)
    probe = dose_response_probe(seed, cache=root, recipe=recipe)
    cache = Cache(root)
    fixture = DoseFixture(recipe, models, probe)
    for model in models:
        clip = load_clip(checkpoint=str(model.checkpoint), device="cpu")
        fixture.audits.append(audit(clip, probe, recipe.layer, recipe.terms, "planted", cache))
    random = load_clip(recipe.train.model, "none", device="cpu")
    fixture.random_audit = audit(random, probe, recipe.layer, recipe.terms, "planted", cache)
    return fixture
