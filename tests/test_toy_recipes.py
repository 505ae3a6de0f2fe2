"""Quality bars of the toy recipes (neurolens.toy.recipes), trained once per test session (tests/toy_fixture.py):

- multi-concept: per planted concept, the EXISTING sweep (captions labelled with that concept's lexicon, on a
  probe set of another seed) flags the units that the generator's truth says encode it;
- dose-response: the flagged count and the count of units with truth AUC >= 0.95 rise with the training share,
  and the 0 % model stands beside a random-weights model of the same architecture.

The truth (per-unit ROC AUC on the generator's truth column) is computed in tests/toy_fixture.py with scipy,
independently of neurolens.scoring. Measured figures per seed are in docs/toy-model.md."""
import numpy as np
import pytest
from scipy.stats import spearmanr

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("concept", ["nsfw", "violence", "drugs"])
def test_multi_concept_flags_match_the_planted_truth(toy_multi, concept):
    audit = toy_multi.audits[concept]
    assert audit.prevalence == pytest.approx({"nsfw": 0.15, "violence": 0.15, "drugs": 0.10}[concept])
    assert audit.truth_units >= 10, audit.truth_units          # measured 12 to 90 on seeds 0, 1, 2
    assert audit.precision >= 0.9 and audit.recall >= 0.9, (audit.precision, audit.recall)


@pytest.mark.parametrize("concept", ["nsfw", "violence", "drugs"])
def test_the_multi_concept_units_are_learnt_not_in_random_weights(toy_multi, concept):
    """The same audit of the random-weights model of the same architecture on the same probe: no unit
    reaches truth AUC 0.95 (measured 0 for every concept), where the trained toy has >= 10."""
    assert toy_multi.random_audits[concept].truth_units <= 2
    assert toy_multi.audits[concept].truth_units >= 5 * max(1, toy_multi.random_audits[concept].truth_units)


def test_intersection_images_give_units_flagged_for_both_concepts(toy_multi):
    nsfw, violence = toy_multi.audits["nsfw"], toy_multi.audits["violence"]
    both = nsfw.flagged & violence.flagged
    assert both.sum() >= 1                                      # measured 9, 3, 3 on seeds 0, 1, 2
    assert np.all(nsfw.auc[both] >= 0.8) and np.all(violence.auc[both] >= 0.8)


def test_dose_response_counts_rise_with_the_training_share(toy_dose):
    """Seed 0 of the recipe. Measured on seeds 0 to 5: the count of units with truth AUC >= 0.95 rose on all
    six (rho 0.872 to 1.0); the flagged count rose on seeds 0, 2 and 5 (rho 0.9, 0.872, 1.0) and not on 1, 3
    and 4 (0.7, 0.1, -0.7), whose 0 % models already had 68 to 127 flagged units (see docs/toy-model.md)."""
    shares = [model.share for model in toy_dose.models]
    assert shares == [0.0, 0.01, 0.04, 0.10, 0.25]
    flagged = [int(a.flagged.sum()) for a in toy_dose.audits]
    strong = [a.truth_units for a in toy_dose.audits]
    assert spearmanr(shares, strong).correlation >= 0.8, strong           # measured [0, 0, 3, 40, 36]
    assert spearmanr(shares, flagged).correlation >= 0.8, flagged         # measured [2, 4, 34, 88, 87]
    assert strong[-1] >= 10 and flagged[-1] >= 20, (flagged, strong)


def test_dose_response_beside_the_zero_share_and_random_models(toy_dose):
    """The same audit of random weights of the same architecture finds nothing (measured 0 flagged and 0 units
    with AUC >= 0.95 on the probes of seeds 0 to 5); the 25 % model has more strong units than the 0 % model
    (on every seed measured)."""
    zero, random, top = toy_dose.audits[0], toy_dose.random_audit, toy_dose.audits[-1]
    assert random.truth_units == 0 and int(random.flagged.sum()) <= 2
    assert top.truth_units > zero.truth_units
    assert random.prevalence == pytest.approx(0.15)
