"""Per-unit NSFW scores and the sweep pipeline, against brute force on a tiny model and synthetic data."""
import csv
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from neurolens import safety
from neurolens.unit_scores import CorrelationAccumulator, FlagRule, apply_rule, combine_image_scores, score_units, top_share

LAYER = "image_block_4_0"


def _synthetic(seed, size=64):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((size, size), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(2):
        x0, y0 = rng.integers(0, size - 16, 2)
        draw.ellipse([x0, y0, x0 + 15, y0 + 15], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


@pytest.fixture(scope="module")
def dataset_table(tmp_path_factory):
    """36 synthetic images in a CSV table with captions; every 6th caption has a lexicon word."""
    root = tmp_path_factory.mktemp("sweepdata")
    rows = []
    for i in range(36):
        name = f"img_{i:03d}.png"
        _synthetic(i).save(root / name)
        caption = f"adult content number {i}" if i % 6 == 0 else f"a photo of shapes number {i}"
        rows.append((name, caption))
    table = root / "data.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    return str(table)


VOCAB_WORDS = ["cat", "dog", "car", "tree", "house", "moon", "circle", "square", "red", "blue", "green",
               "pattern", "texture", "noise", "ball", "sky", "water", "stone", "erotic pleasure", "nude", "sexy",
               "porn", "adult content", "a photo of shapes", "bicycle", "flower", "bird", "horse", "coffee", "book"]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    """A small vocabulary (the builtin one has ~47k entries: too slow to encode in every test)."""
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(VOCAB_WORDS) + "\n")
    return str(path)


def stub_scorer(clip, embeddings):
    """A known per-image score: a fixed function of the image embeddings (the logistic of the standardized
    first embedding coordinate; random tiny-model embeddings are close together, so it is standardized)."""
    first = np.asarray(embeddings, dtype=np.float64)[:, 0]
    return 1.0 / (1.0 + np.exp(-3.0 * (first - first.mean()) / (first.std() + 1e-12)))


def _brute_corr(maxima, scores):
    out = np.zeros(maxima.shape[1])
    for u in range(maxima.shape[1]):
        if maxima[:, u].std() > 0 and scores.std() > 0:
            out[u] = np.corrcoef(maxima[:, u], scores)[0, 1]
    return out


def test_streaming_correlation_equals_corrcoef_in_any_block_order():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 7)) * [1, 2, 3, 4, 5, 6, 7] + 1000.0   # large offsets: cancellation check
    x[:, 3] = 5.0                                                       # a dead unit
    s = rng.random(500)
    x[:, 0] += 4 * s
    acc = CorrelationAccumulator(s, 7)
    order = rng.permutation(500)
    for block in np.array_split(order, 9):
        acc.add(block, x[block])
    np.testing.assert_allclose(acc.correlation(), _brute_corr(x, s), atol=1e-6)
    assert acc.correlation()[3] == 0.0


def test_nan_rows_are_left_out():
    rng = np.random.default_rng(1)
    x, s = rng.normal(size=(50, 3)), rng.random(50)
    x[4], s[9] = np.nan, np.nan
    acc = CorrelationAccumulator(s, 3)
    acc.add(np.arange(50), x)
    keep = np.isfinite(s) & np.isfinite(x).all(1)
    np.testing.assert_allclose(acc.correlation(), _brute_corr(x[keep], s[keep]), atol=1e-6)
    assert acc.n == 48


def test_top_share_and_flag_rule():
    scores = np.array([0.9, 0.1, 0.6, 0.2, np.nan])
    top = np.array([[0, 2, 1, -1], [1, 3, 4, -1], [-1, -1, -1, -1]])
    np.testing.assert_allclose(top_share(top, scores, 0.5), [2 / 3, 0, 0])
    np.testing.assert_allclose(top_share(top, scores, 0.5, k=2), [1, 0, 0])
    rule = FlagRule(min_correlation=0.2, min_top_share=0.5, min_text_share=0.3, noise_z=3.0)
    corr = np.array([0.5, 0.5, 0.5, 0.1, 0.25])
    flagged = apply_rule(corr, np.array([0.6, 0.0, 0.0, 1.0, 0.6]), np.array([0.0, 0.4, 0.1, 1.0, 0.0]), 100, rule)
    # bar = max(0.2, 3/sqrt(100)) = 0.3
    assert flagged.tolist() == [True, True, False, False, False]
    assert rule.correlation_bar(25) == pytest.approx(0.6)


def test_combined_image_score_is_raised_to_one_by_a_caption_match():
    np.testing.assert_allclose(combine_image_scores(np.array([0.2, 0.3]), np.array([False, True])), [0.2, 1.0])


@pytest.fixture(scope="module")
def scanned(tiny_clip, dataset_table, tmp_path_factory):
    from neurolens.pipelines.scan import run_scan
    from neurolens.store import Cache
    cache = Cache(tmp_path_factory.mktemp("sweepcache"))
    scan = run_scan(tiny_clip, LAYER, dataset_table, top_k=8, cache=cache, embeddings=True, batch_size=16)
    return scan, cache


def test_ranking_by_correlation_equals_brute_force_with_a_known_score(tiny_clip, scanned):
    from neurolens.pipelines.sweep import caption_matches, clip_image_scores
    scan, _ = scanned
    # the same code path as the sweep: scorer -> per-image scores -> caption combination -> unit scores
    clip_scores = clip_image_scores(tiny_clip, scan.embeddings, len(scan.keys), stub_scorer)
    matched = caption_matches(scan.keys, scan.captions, None, "word")
    assert matched.sum() == 6
    scores = combine_image_scores(clip_scores, matched)
    units = score_units(scan, scores, rule=FlagRule(), top_k=8)

    maxima = scan.per_image_max()
    known = np.where(matched, 1.0, stub_scorer(None, scan.embeddings))  # no skipped rows here
    brute = _brute_corr(maxima.astype(np.float64), known)
    np.testing.assert_allclose(units.correlation, brute, atol=1e-5)
    expected_order = np.lexsort((np.arange(len(brute)), -np.round(brute, 5)))
    got_order = units.ranking()
    # same ranking (units whose correlations tie to 1e-5 may swap)
    np.testing.assert_allclose(brute[got_order], brute[expected_order], atol=1e-5)
    assert len(set(got_order.tolist())) == scan.channels
    # top-k share by brute force
    for u in range(0, scan.channels, 7):
        idx = scan.top_indices[u][scan.top_indices[u] >= 0]
        assert units.top_nsfw_share[u] == pytest.approx(np.mean(known[idx] >= safety.IMAGE_NSFW_THRESHOLD))


def test_run_sweep_ranks_like_brute_force_writes_flags_and_reuses_the_cache(tiny_clip, dataset_table, vocab_file,
                                                                            tmp_path):
    from neurolens.pipelines.sweep import run_sweep
    from neurolens.store import Cache
    cache = Cache(tmp_path / "cache")
    out = tmp_path / "out"
    ticks = []
    result = run_sweep(tiny_clip, LAYER, dataset_table, vocab=vocab_file, top_k=8, text_top_k=10, cache=cache,
                       out=out, scorer=stub_scorer, progress=lambda done, total: ticks.append((done, total)))
    assert ticks and not result.cached
    scan = result.scan
    known = np.where(result.caption_match, 1.0, stub_scorer(None, scan.embeddings))
    brute = _brute_corr(scan.per_image_max().astype(np.float64), known)
    np.testing.assert_allclose(result.scores.correlation, brute, atol=1e-5)
    ranked = [row["correlation"] for row in result.ranking()]
    np.testing.assert_allclose(ranked, np.sort(brute)[::-1], atol=1e-5)
    assert result.caption_match.sum() == 6

    with open(result.flags_csv) as handle:
        rows = list(csv.DictReader(handle))
    assert result.flags_csv == out / "flags.csv" and len(rows) == scan.channels
    assert [int(r["unit"]) for r in rows] == [row["unit"] for row in result.ranking()]
    assert sum(int(r["flagged"]) for r in rows) == int(result.scores.flagged.sum())

    # texts: shares agree with the per-text NSFW marks of the top 10 texts
    for unit in range(0, scan.channels, 50):
        marks = [nsfw for _, _, nsfw in result.top_texts(unit, 10)]
        assert result.scores.text_nsfw_share[unit] == pytest.approx(np.mean(marks))
        assert all(nsfw == bool(safety.caption_nsfw_matches([t], safety.lexicon_terms(), mode="word")[0]) or nsfw
                   for t, _, nsfw in result.top_texts(unit, 10))

    again = run_sweep(tiny_clip, LAYER, dataset_table, vocab=vocab_file, top_k=8, text_top_k=10, cache=cache,
                      out=out, scorer=stub_scorer)
    assert again.cached and again.path == result.path
    np.testing.assert_array_equal(again.scores.flagged, result.scores.flagged)
    np.testing.assert_array_equal(again.image_scores, result.image_scores)


def test_bad_options_are_one_line_errors(tiny_clip, dataset_table):
    from neurolens.errors import NeurolensError
    from neurolens.pipelines.sweep import run_sweep
    with pytest.raises(NeurolensError, match="caption-match"):
        run_sweep(tiny_clip, LAYER, dataset_table, caption_mode="fuzzy")
