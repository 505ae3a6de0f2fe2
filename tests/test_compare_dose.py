"""The dose-response proof of `neurolens compare` (integration: it trains toys). The toys of the dose-response
recipe (neurolens.toy.recipes: one planted concept at five or more shares of the training images, 0 % first,
same seed otherwise; the session fixture `toy_dose`, trained once per test session) are compared on the
recipe's one probe set by the pipeline of `neurolens demo --compare` (pipelines.dose.run_dose_demo). The counts
come from the compare rows and Spearman's rho is computed here with scipy."""
import json
from pathlib import Path

import pytest
from PIL import Image
from scipy.stats import spearmanr

pytestmark = pytest.mark.integration   # trains five toy CLIPs (shared with tests/test_toy_recipes.py)


@pytest.fixture(scope="module")
def dose(toy_dose, tmp_path_factory):
    from neurolens.pipelines.dose import run_dose_demo
    root = Path(toy_dose.models[0].checkpoint).parents[2]        # the fixture's cache: its toys are reused
    return run_dose_demo(tmp_path_factory.mktemp("dose") / "compare", seed=0, cache=root, recipe=toy_dose.recipe,
                         workers=0)


def test_flagged_and_strong_unit_counts_rise_with_the_training_share(dose, toy_dose):
    rows = json.loads(dose.files.json.read_text())["rows"]
    shares = [float(row["model"].removeprefix("share ").removesuffix("%")) / 100 for row in rows]
    assert shares == pytest.approx(list(toy_dose.recipe.shares)) and len(shares) >= 5 and shares[0] == 0.0
    flagged, strong = [row["n_flagged"] for row in rows], [row["n_auc_095"] for row in rows]
    assert spearmanr(shares, flagged).correlation >= 0.8, flagged
    assert spearmanr(shares, strong).correlation >= 0.8, strong
    assert flagged[-1] >= 10 and strong[-1] >= 5, (flagged, strong)
    assert (dose.flagged, dose.strong) == (flagged, strong)
    # each model's training captions carry the concept in its share of the rows (the caption audit)
    assert [row["train_prevalence"] for row in rows] == pytest.approx(shares, abs=0.005)
    assert all(row["concept_prevalence"] == pytest.approx(0.15) for row in rows)


def test_the_zero_share_model_stands_beside_its_random_weights_baseline(dose):
    zero = dose.rows[0]
    assert zero["model"] == "share 0%" and zero["baseline_n_flagged"] is not None
    assert zero["baseline_n_auc_095"] == 0 and zero["n_auc_095"] == 0
    assert zero["n_flagged"] <= dose.flagged[-1] / 5 and zero["baseline_n_flagged"] <= dose.flagged[-1] / 5
    html = dose.files.html.read_text()
    assert "share 0%" in html and "baseline flagged" in html


def test_the_dose_response_plot_and_summary_are_written(dose):
    plot = Image.open(dose.plot)
    assert plot.format == "PNG" and plot.size == (700, 380)
    summary = json.loads(dose.summary.read_text())
    assert summary["n_flagged"] == dose.flagged and summary["rho_flagged"] == pytest.approx(dose.rho_flagged)
