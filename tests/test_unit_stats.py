"""The per-unit statistics (neurolens.scoring.statistics) against brute force and scipy, and their merges."""
import numpy as np
import pytest
from scipy import stats

from neurolens.scoring.statistics import (BinnedAUC, Correlation, ExactAUC, UnitLabelStats, bh_qvalues,
                                          mann_whitney_p, quantile_edges)


def brute_auc(x, positive):
    """Pairwise count: P(x_pos > x_neg) + 0.5 P(x_pos == x_neg), per column."""
    pos, neg = x[positive], x[~positive]
    greater = (pos[:, None, :] > neg[None, :, :]).sum(axis=(0, 1))
    equal = (pos[:, None, :] == neg[None, :, :]).sum(axis=(0, 1))
    return (greater + 0.5 * equal) / (len(pos) * len(neg))


def small_data(seed=0, n=120, units=9):
    rng = np.random.default_rng(seed)
    positive = rng.random(n) < 0.3
    x = rng.normal(size=(n, units)).astype(np.float32)
    x[:, 0] += 2.0 * positive                                   # a unit that separates
    x[:, 1] = np.round(x[:, 1] * 2) / 2                         # many ties
    x[:, 2] = np.maximum(x[:, 2], 0)                            # a ReLU: ties at 0
    x[:, 3] = 1.5                                               # constant
    x[:, 4] -= 1.0 * positive                                   # lower on positives
    return x, positive


def test_exact_auc_equals_brute_force_pairwise_count_and_p_equals_scipy():
    x, positive = small_data()
    acc = ExactAUC(x.shape[1])
    for rows in np.array_split(np.arange(len(x)), 7):
        acc.add(x[rows], positive[rows].astype(float))
    result = acc.result()
    np.testing.assert_allclose(result.auc, brute_auc(x, positive), atol=1e-12)
    assert result.n_pos == positive.sum() and result.n_neg == (~positive).sum()
    for u in range(x.shape[1]):
        if u == 3:
            assert result.auc[u] == 0.5 and result.p[u] == 1.0       # every value tied: no evidence
            continue
        expected = stats.mannwhitneyu(x[positive, u], x[~positive, u], alternative="two-sided",
                                      method="asymptotic", use_continuity=True).pvalue
        assert result.p[u] == pytest.approx(expected, rel=1e-5)   # z is rounded differently
    assert result.auc[0] > 0.85 and result.auc[4] < 0.3


def test_bh_qvalues_equal_scipy_false_discovery_control():
    rng = np.random.default_rng(3)
    p = np.concatenate([rng.random(200), rng.random(50) * 1e-4, [0.0, 1.0, 0.5, 0.5]])
    np.testing.assert_allclose(bh_qvalues(p), stats.false_discovery_control(p, method="bh"), rtol=1e-12)
    with_nan = p.copy()
    with_nan[[3, 10]] = np.nan
    q = bh_qvalues(with_nan)
    assert np.isnan(q[[3, 10]]).all()
    finite = np.isfinite(with_nan)
    np.testing.assert_allclose(q[finite], stats.false_discovery_control(with_nan[finite], method="bh"), rtol=1e-12)


def test_unknown_labels_and_nan_rows_are_left_out():
    x, positive = small_data(1)
    labels = positive.astype(float)
    labels[[0, 5, 7]] = np.nan
    x_nan = x.copy()
    x_nan[9] = np.nan
    acc = ExactAUC(x.shape[1])
    acc.add(x_nan, labels)
    keep = np.isfinite(labels) & np.isfinite(x_nan).all(1)
    np.testing.assert_allclose(acc.result().auc, brute_auc(x[keep], positive[keep]), atol=1e-12)
    assert acc.count == keep.sum()


def test_an_empty_class_gives_nan_not_a_flag():
    x, _ = small_data(2)
    for acc in (ExactAUC(x.shape[1]), BinnedAUC(quantile_edges(x, 16))):
        acc.add(x, np.zeros(len(x)))
        result = acc.result()
        assert np.isnan(result.auc).all() and np.isnan(result.p).all() and result.n_pos == 0
    assert np.isnan(bh_qvalues(np.full(4, np.nan))).all()
    assert np.isnan(mann_whitney_p(np.zeros(3), 0, 10, np.zeros(3))).all()


def test_merged_shards_give_the_unsplit_result():
    x, positive = small_data(4, n=300)
    labels = positive.astype(float)
    edges = quantile_edges(x, 32)
    whole = [UnitLabelStats(x.shape[1]), UnitLabelStats(x.shape[1], edges=edges)]
    for acc in whole:
        acc.add(x, labels)
    for edges_or_none, reference in ((None, whole[0]), (edges, whole[1])):
        shards = [UnitLabelStats(x.shape[1], edges=edges_or_none) for _ in range(3)]
        order = np.random.default_rng(0).permutation(len(x))
        for shard, rows in zip(shards, np.array_split(order, 3)):
            shard.add(x[rows], labels[rows])
        restored = UnitLabelStats(x.shape[1], edges=edges_or_none)
        restored.load_state_dict(shards[0].state_dict())     # a resumed shard
        restored.merge(shards[1])
        restored.merge(shards[2])
        got, want = restored.result(), reference.result()
        assert got.method == want.method
        np.testing.assert_allclose(got.auc, want.auc, atol=1e-12)
        np.testing.assert_allclose(got.p, want.p, rtol=1e-9)
        np.testing.assert_allclose(got.q, want.q, rtol=1e-9)
        np.testing.assert_allclose(got.correlation, want.correlation, atol=1e-6)


def test_binned_merge_refuses_other_edges():
    x, positive = small_data(5)
    a, b = BinnedAUC(quantile_edges(x, 16)), BinnedAUC(quantile_edges(x[:50], 16))
    with pytest.raises(ValueError, match="same edges"):
        a.merge(b)


def test_correlation_equals_corrcoef_with_large_offsets():
    rng = np.random.default_rng(6)
    s = rng.random(400)
    x = rng.normal(size=(400, 5)) * [1, 2, 3, 4, 5] + 1e4
    x[:, 0] += 3 * s
    x[:, 3] = 7.0
    acc = Correlation(5)
    for rows in np.array_split(np.arange(400), 6):
        acc.add(x[rows], s[rows])
    got = acc.result()
    for u in (0, 1, 2, 4):
        assert got[u] == pytest.approx(np.corrcoef(x[:, u], s)[0, 1], abs=1e-6)
    assert got[3] == 0.0


@pytest.mark.parametrize("shape", ["normal", "relu", "heavy_tail", "shifted_later_rows"])
def test_binned_auc_is_within_0005_of_exact(shape):
    """Streaming estimate vs exact on 20k rows x 64 units, edges from the first 4096 rows only."""
    rng = np.random.default_rng(7)
    n, units = 20000, 64
    positive = rng.random(n) < 0.12
    effect = np.linspace(0, 3, units)
    x = rng.normal(size=(n, units)) + positive[:, None] * effect
    if shape == "relu":
        x = np.maximum(x - 0.5, 0)                        # ~70% exact zeros
    elif shape == "heavy_tail":
        x = np.exp(1.5 * x)                              # bulk crowded at the bottom of the range
    elif shape == "shifted_later_rows":
        x[n // 2:] += 2.0                                 # later rows outside the sampled range
    x = x.astype(np.float32)
    labels = positive.astype(float)
    exact, binned = ExactAUC(units), BinnedAUC.from_sample(x[:4096])
    for rows in np.array_split(np.arange(n), 5):
        exact.add(x[rows], labels[rows])
        binned.add(x[rows], labels[rows])
    e, b = exact.result(), binned.result()
    assert np.abs(e.auc - b.auc).max() <= 0.005, np.abs(e.auc - b.auc).max()
    big = e.p < 1e-3
    assert np.array_equal(big, b.p < 1e-3) or np.abs(np.log10(e.p[big]) - np.log10(b.p[big])).max() < 0.5
