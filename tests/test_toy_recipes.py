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
    shares = [model.share for model in toy_dose.models]
    assert shares == [0.0, 0.01, 0.04, 0.10, 0.25]
    flagged = [int(a.flagged.sum()) for a in toy_dose.audits]
    strong = [a.truth_units for a in toy_dose.audits]
    assert spearmanr(shares, flagged).correlation >= 0.8, flagged
    assert spearmanr(shares, strong).correlation >= 0.8, strong
    assert flagged[-1] >= 10 and strong[-1] >= 5, (flagged, strong)


def test_dose_response_zero_share_model_beside_random_weights(toy_dose):
    """Neither the model that never saw the concept nor random weights has a unit that separates it well."""
    zero, random = toy_dose.audits[0], toy_dose.random_audit
    assert zero.truth_units == 0 and random.truth_units == 0
    top = int(toy_dose.audits[-1].flagged.sum())
    assert int(zero.flagged.sum()) <= top / 5 and int(random.flagged.sum()) <= top / 5
