"""Per-unit NSFW scores and the sweep pipeline, against brute force on a tiny model and synthetic data."""
import csv

import numpy as np
import pytest

from neurolens.scoring.units import FlagRule, apply_rule, top_share
from sweep_data import LAYER, stub_scorer


def brute_auc(x, positive):
    """Pairwise count per column: P(x_pos > x_neg) + 0.5 P(x_pos == x_neg)."""
    pos, neg = x[positive], x[~positive]
    greater = (pos[:, None, :] > neg[None, :, :]).sum(axis=(0, 1))
    equal = (pos[:, None, :] == neg[None, :, :]).sum(axis=(0, 1))
    return (greater + 0.5 * equal) / (len(pos) * len(neg))


def test_top_share_counts_known_labels_and_the_rule_needs_both_bars():
    labels = np.array([1.0, 0.0, 1.0, 0.0, np.nan])
    top = np.array([[0, 2, 1, -1], [1, 3, 4, -1], [-1, -1, -1, -1], [4, 4, 0, 1]])
    np.testing.assert_allclose(top_share(top, labels), [2 / 3, 0, 0, 0.5])
    np.testing.assert_allclose(top_share(top, labels, k=2), [1, 0, 0, 0])
    rule = FlagRule(max_q=0.01, min_auc=0.8)
    auc = np.array([0.9, 0.9, 0.7, np.nan, 0.95])
    q = np.array([0.001, 0.02, 0.0001, 0.0, np.nan])
    assert apply_rule(auc, q, rule).tolist() == [True, False, False, False, False]


def read_flags(path):
    """flags.csv: its '#' comment lines and its rows."""
    lines = open(path, encoding="utf-8").read().splitlines()
    comments = [line for line in lines if line.startswith("#")]
    return comments, list(csv.DictReader([line for line in lines if not line.startswith("#")]))


def test_run_sweep_statistics_equal_brute_force_and_scipy_flags_csv_and_cache(tiny_clip, dataset_table, vocab_file,
                                                                                tmp_path):
    from scipy.stats import false_discovery_control
    from neurolens.pipelines.sweep import run_sweep
    from neurolens.storage.cache import Cache
    cache = Cache(tmp_path / "cache")
    out = tmp_path / "out"
    ticks = []
    # every 6th caption says "adult": with a scorer (tests only) the zero-shot source exists for a random model
    result = run_sweep(tiny_clip, LAYER, dataset_table, vocab=vocab_file, top_k=8, text_top_k=10, cache=cache,
                       out=out, scorer=stub_scorer, detector=False, rule=FlagRule(max_q=1.0, min_auc=0.75),
                       progress=lambda done, total: ticks.append((done, total)))
    assert ticks and not result.cached
    assert [s.name for s in result.labels.sources] == ["captions", "zero-shot"]
    captions = result.source_scores("captions")
    assert captions.sum() == 6 and result.scores.n_pos == 6
    labels = result.image_labels
    assert np.all(labels[captions == 1] == 1)
    maxima = result.scan.per_image_max().astype(np.float64)
    known = np.isfinite(labels)
    np.testing.assert_allclose(result.scores.auc, brute_auc(maxima[known], labels[known] == 1), atol=1e-12)
    np.testing.assert_allclose(result.scores.q, false_discovery_control(result.scores.p, method="bh"), rtol=1e-9)
    for u in range(0, result.scan.channels, 97):
        expected = np.corrcoef(maxima[known, u], labels[known])[0, 1]
        assert result.scores.correlation[u] == pytest.approx(expected, abs=1e-5)
    ranked = [row["auc"] for row in result.ranking()]
    assert ranked == sorted(ranked, reverse=True)
    flagged = result.scores.flagged
    assert np.array_equal(flagged, result.scores.auc >= 0.75)        # (6 positives: no q is small)
    row = next(r for r in result.ranking() if r["flagged"])
    assert row["why"].startswith("flagged: AUC") and "captions" in row["why"]
    # top-image share by brute force, with the combined labels
    for u in range(0, result.scan.channels, 7):
        idx = result.scan.top_indices[u][result.scan.top_indices[u] >= 0]
        seen = labels[idx][np.isfinite(labels[idx])]
        assert result.scores.top_nsfw_share[u] == pytest.approx(seen.mean() if len(seen) else 0.0)

    comments, rows = read_flags(result.flags_csv)
    assert result.flags_csv == out / "flags.csv" and len(rows) == result.scan.channels
    assert any(c.startswith("# labels: captions: 6 positive") for c in comments)
    assert [int(r["unit"]) for r in rows] == [row["unit"] for row in result.ranking()]
    assert sum(int(r["flagged"]) for r in rows) == int(flagged.sum())
    assert set(rows[0]) == {"rank", "unit", "auc", "p", "q", "correlation", "top_nsfw_share", "text_nsfw_share",
                            "flagged", "text_flag", "why", "top_texts"}

    # texts: shares agree with the per-text NSFW marks of the top 10 texts; texts alone never flag
    for unit in range(0, result.scan.channels, 50):
        marks = [nsfw for _, _, nsfw in result.top_texts(unit, 10)]
        assert result.scores.text_nsfw_share[unit] == pytest.approx(np.mean(marks))
        assert result.scores.text_flag[unit] == (np.mean(marks) >= 0.3)

    again = run_sweep(tiny_clip, LAYER, dataset_table, vocab=vocab_file, top_k=8, text_top_k=10, cache=cache,
                      out=out, scorer=stub_scorer, detector=False, rule=FlagRule(max_q=1.0, min_auc=0.75))
    assert again.cached and again.path == result.path
    np.testing.assert_array_equal(again.scores.flagged, result.scores.flagged)
    np.testing.assert_array_equal(again.image_labels, result.image_labels)
    assert again.labels.used == result.labels.used and again.lines() == result.lines()
    record = cache.read(result.path)
    assert record.arrays["flagged"].dtype == bool and record.arrays["image_labels"].shape == (36,)
    assert record.attrs["labels"]["used"] == result.labels.used


def test_binned_path_matches_the_exact_one(tiny_clip, dataset_table, vocab_file, tmp_path):
    from neurolens.pipelines.sweep import run_sweep
    from neurolens.storage.cache import Cache
    kw = dict(vocab=vocab_file, top_k=8, text_top_k=10, cache=Cache(tmp_path / "c"), labels=["captions"],
              write_csv=False)
    exact = run_sweep(tiny_clip, LAYER, dataset_table, **kw)
    binned = run_sweep(tiny_clip, LAYER, dataset_table, auc_memory=0, **kw)
    assert exact.scores.method == "exact" and binned.scores.method == "binned"
    assert np.abs(exact.scores.auc - binned.scores.auc).max() <= 0.005


def test_a_dataset_without_positives_flags_nothing_and_says_what_to_do(tiny_clip, dataset_table, vocab_file,
                                                                       tmp_path):
    from neurolens.pipelines.sweep import run_sweep
    from neurolens.storage.cache import Cache
    result = run_sweep(tiny_clip, LAYER, dataset_table, vocab=vocab_file, top_k=8, text_top_k=10,
                       cache=Cache(tmp_path / "c"), labels=["captions"], caption_terms=["zebra"], write_csv=False)
    assert result.scores.n_pos == 0 and not result.scores.flagged.any() and np.isnan(result.scores.auc).all()
    assert any("no image is labelled positive" in line and "--labels column:" in line for line in result.lines())


def test_bad_options_are_one_line_errors(tiny_clip, dataset_table):
    from neurolens.errors import NeurolensError
    from neurolens.pipelines.sweep import run_sweep
    with pytest.raises(NeurolensError, match="caption-match"):
        run_sweep(tiny_clip, LAYER, dataset_table, caption_mode="fuzzy")
