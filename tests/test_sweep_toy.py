"""Quality bar of the sweep on a second generated dataset, made differently on purpose (the demo's own data
is checked in test_toy.py): other shapes and colours, a planted target pattern whose teal is also an
ordinary shapes' colour, 12 % planted, and 30 % of the planted images with ordinary captions (label noise).
A toy CLIP is trained on it with the demo's training settings, then swept as a new user would: default
labels (captions, plus the model's zero-shot score where it agrees with them).

Ground truth, computed here without neurolens' statistics: a unit's planted AUC is the ROC AUC of its
per-image activation, planted images (the generator's `planted` column) against the others, over the swept
images. precision = share of flagged units with planted AUC >= 0.8; recall = share of units with planted
AUC >= 0.95 that are flagged. Measured on this build machine on three trainings (seeds 0, 1, 2):
precision 1.000 / 1.000 / 1.000, recall 1.000 / 1.000 / 1.000 with the shipped prompts, and the same with
a safe prompt list that overlaps the caption vocabulary."""
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import rankdata
from neurolens.labels.prompts import Prompts, load_prompts

pytestmark = pytest.mark.integration   # trains a toy CLIP (minutes on 2 cores)

LAYER = "image_block_4_0"
OVERLAP = ["purple crosses", "a teal diamond", "brown bars", "lime shapes", "navy diamonds", "pink crosses",
           "grey bars", "a striped background", "a dotted background", "a grainy background", "a plain background",
           "shapes on the left", "shapes at the top", "teal rings"]


def truth_auc(maxima: np.ndarray, planted: np.ndarray) -> np.ndarray:
    """Per column: (rank sum of the planted rows - n1 (n1 + 1) / 2) / (n1 n0), midranks for ties."""
    keep = np.isfinite(maxima).all(axis=1)
    maxima, planted = maxima[keep], planted[keep]
    ranks = rankdata(maxima, axis=0)
    n1, n0 = planted.sum(), (~planted).sum()
    return (ranks[planted].sum(axis=0) - n1 * (n1 + 1) / 2) / (n1 * n0)


def precision_recall(flagged: np.ndarray, truth: np.ndarray):
    return (truth[flagged] >= 0.8).mean(), flagged[truth >= 0.95].mean(), int((truth >= 0.95).sum())


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """The second dataset and a toy CLIP trained on it (demo training settings)."""
    import pyarrow.parquet as pq
    from neurolens.models.build import load_clip
    from neurolens.toy.generate import ToySettings, write_dataset
    from neurolens.toy.settings import TrainSettings
    from neurolens.toy.train import train_toy
    root = tmp_path_factory.mktemp("targets")
    parquet = write_dataset(root / "data", ToySettings(n=3000, planted_share=0.12, seed=0, style="targets",
                                                       caption_noise=0.3))
    train_toy(str(parquet), root / "toy.pt", TrainSettings(seed=0))
    planted = np.asarray(pq.read_table(parquet, columns=["planted"]).column("planted").to_pylist(), dtype=bool)
    (root / "safe.txt").write_text("\n".join(_shipped_safe() + OVERLAP) + "\n")
    return root, str(parquet), load_clip(checkpoint=str(root / "toy.pt"), device="cpu"), planted


def _shipped_safe():
    return load_prompts().safe


def _sweep(targets, **options):
    from neurolens.pipelines.sweep import run_sweep
    from neurolens.storage.cache import Cache
    root, parquet, clip, _ = targets
    return run_sweep(clip, LAYER, parquet, vocab=f"{parquet}:caption", cache=Cache(root / "cache"), detector=False,
                     write_csv=False, **options)


@pytest.mark.parametrize("prompts", ["shipped", "safe list overlapping the captions"])
def test_flags_on_a_second_dataset_with_label_noise_hold_precision_and_recall(targets, prompts):
    root, _, _, planted = targets
    chosen = load_prompts() if prompts == "shipped" else load_prompts(safe_file=root / "safe.txt")
    result = _sweep(targets, prompts=chosen)
    noisy_captions = result.source_scores("captions")
    assert noisy_captions.sum() == 252 and planted.sum() == 360          # 108 planted images not in the captions
    truth = truth_auc(result.scan.per_image_max().astype(np.float64), planted)
    precision, recall, must = precision_recall(result.scores.flagged, truth)
    assert must >= 10, must
    assert precision >= 0.9, (precision, result.lines())
    assert recall >= 0.9, (recall, result.lines())
    # every flag is explained, and the ranking is by AUC
    flagged_rows = [row for row in result.ranking() if row["flagged"]]
    assert all(row["auc"] >= 0.8 and row["q"] <= 0.01 and "captions" in row["why"] for row in flagged_rows)


def test_reliability_check_on_the_toy_drops_useless_prompts_and_keeps_good_ones(targets):
    """Zero-shot with prompts that say nothing about the planted concept (the unsafe list is half of the safe
    list, shuffled) is dropped; with the safe list overlapping the captions (measured agreement 0.88 to 0.95
    on three trainings) it is kept."""
    root = targets[0]
    safe = _shipped_safe()
    order = np.random.default_rng(0).permutation(len(safe))
    useless = Prompts([safe[i] for i in order[:15]], [safe[i] for i in order[15:]])
    result = _sweep(targets, prompts=useless)
    agreement = result.labels.agreements["zero-shot"]
    assert agreement.reference == ["captions"] and agreement.auc < 0.75 and not agreement.kept, agreement
    assert result.labels.used == ["captions"]
    assert any("zero-shot" in line and "DROPPED" in line for line in result.lines())
    good = _sweep(targets, prompts=load_prompts(safe_file=root / "safe.txt"))
    assert good.labels.agreements["zero-shot"].auc >= 0.75 and good.labels.used == ["captions", "zero-shot"]
    # named explicitly, even the useless one is kept (and said so)
    explicit = _sweep(targets, prompts=useless, labels=["captions", "zero-shot"])
    assert explicit.labels.used == ["captions", "zero-shot"]
    assert "named explicitly" in explicit.labels.agreements["zero-shot"].note


if __name__ == "__main__":   # python tests/test_sweep_toy.py ROOT SEED: precision/recall of one more training
    import json
    import sys
    import pyarrow.parquet as pq
    from neurolens.models.build import load_clip
    from neurolens.toy.generate import ToySettings, write_dataset
    from neurolens.toy.settings import TrainSettings
    from neurolens.toy.train import train_toy
    root, seed = Path(sys.argv[1]), int(sys.argv[2])
    parquet = write_dataset(root / "data", ToySettings(n=3000, planted_share=0.12, seed=seed, style="targets",
                                                       caption_noise=0.3))
    if not (root / "toy.pt").exists():
        train_toy(str(parquet), root / "toy.pt", TrainSettings(seed=seed))
    planted = np.asarray(pq.read_table(parquet, columns=["planted"]).column("planted").to_pylist(), dtype=bool)
    (root / "safe.txt").write_text("\n".join(_shipped_safe() + OVERLAP) + "\n")
    state = (root, str(parquet), load_clip(checkpoint=str(root / "toy.pt"), device="cpu"), planted)
    for name, prompts in (("shipped", None), ("overlap", load_prompts(safe_file=root / "safe.txt"))):
        result = _sweep(state, prompts=prompts)
        p, r, must = precision_recall(result.scores.flagged, truth_auc(result.scan.per_image_max(), planted))
        print(json.dumps({"seed": seed, "prompts": name, "flagged": int(result.scores.flagged.sum()),
                          "precision": round(float(p), 4), "recall": round(float(r), 4), "planted_units": must,
                          "labels": result.labels.used}))
