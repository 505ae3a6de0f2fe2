"""Descriptions and find: the caption n-gram enrichment against a brute-force re-implementation of its formula,
the held-out split, the Wilson interval against known values, the describe and find commands on a tiny
model (random weights) and their records; find needs no model and no torch."""
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from neurolens.scoring.captions import caption_ngrams, words
from neurolens.scoring.enrichment import NgramTable, caption_evidence, halves, merge_top
from neurolens.scoring.intervals import wilson_interval
from sweep_data import LAYER


def test_words_and_ngrams_skip_stopwords_and_count_once():
    assert words("A dog's RED ball, on the grass!") == ["a", "dogs", "red", "ball", "on", "the", "grass"]
    assert caption_ngrams("two red circles on the left over red circles") == [
        "red", "circles", "left", "red circles"]
    assert caption_ngrams("") == [] and caption_ngrams(None) == []


def brute_top(values, half, h, k):
    """Per unit: the k images of half h with the highest value, ties by lower index."""
    out = []
    for u in range(values.shape[1]):
        rows = [i for i in range(len(values)) if half[i] == h and np.isfinite(values[i, u])]
        rows.sort(key=lambda i: (-values[i, u], i))
        out.append((rows[:k] + [-1] * k)[:k])
    return np.array(out)


def test_streamed_top_images_per_half_equal_brute_force_with_ties():
    from neurolens.pipelines.describe import top_by_half
    rng = np.random.default_rng(0)
    values = rng.integers(0, 5, size=(41, 6)).astype(np.float32)      # many ties
    values[3] = np.nan                                                # a skipped image
    half = halves(np.arange(41) != 7)                                 # image 7 has no caption
    assert half[7] == -1 and abs(int((half == 0).sum()) - int((half == 1).sum())) <= 1
    scan = SimpleNamespace(channels=6, per_image_max=lambda: values, keys=list(range(41)))
    top, _ = top_by_half(scan, half, 4)
    for h in (0, 1):
        np.testing.assert_array_equal(top[h], brute_top(values, half, h, 4))
    # merged block by block (any split) gives the same
    v, i = np.full((6, 4), -np.inf), np.full((6, 4), -1)
    for start in range(0, 41, 5):
        rows = np.arange(start, min(start + 5, 41))
        rows = rows[half[rows] == 0]
        v, i = merge_top(v, i, rows, values[rows].astype(np.float64), 4)
    np.testing.assert_array_equal(i, top[0])


def fightin_words(y, n, r, m, f, prior):
    """Monroe, Colaresi & Quinn (2008) eq. 22, each group's informative prior `prior` times its own size spread
    by the pooled frequency f (the test's own code)."""
    a, b = prior * n * f, prior * m * f
    delta = math.log((y + a) / (n + prior * n - y - a)) - math.log((r + b) / (m + prior * m - r - b))
    var = 1 / (y + a) + 1 / (r + b)
    return delta, var, delta / math.sqrt(var)


def test_chosen_on_one_half_and_scored_on_the_other_by_the_formula():
    rng = np.random.default_rng(1)
    n = 400
    filler = ["circle", "square", "blue", "green", "small", "large", "left", "right"]
    captions = [" ".join(rng.choice(filler, size=3, replace=False)) for _ in range(n)]
    values = rng.normal(size=(n, 3))
    planted = rng.permutation(n)[:60]
    for i in planted:                          # unit 0 fires on "gore" captions in both halves
        captions[i] += " gore"
        values[i, 0] += 5
    table = NgramTable.of(captions)
    half = halves(table.captioned)
    fluke = np.flatnonzero(half == 0)[:12]     # unit 1: "velvet" only among its half-A top images
    for i in fluke:
        captions[i] += " velvet"
        values[i, 1] += 9
    table = NgramTable.of(captions)
    k = 20
    top = np.stack([brute_top(values, half, h, k) for h in (0, 1)])
    evidence = caption_evidence(table, half, top, ngrams=3, prior=1.0)
    names = evidence.ngrams

    def chosen(u):
        return [names[j] for j in evidence.index[u] if j >= 0]
    assert chosen(0)[0] == "gore" and chosen(1)[0] == "velvet"
    # every held-out number, recomputed from the captions of half B
    holds = [set(caption_ngrams(c)) for c in captions]
    occurrences = {g: sum(g in h for h in holds) for g in table.vocabulary}
    total = sum(occurrences.values())
    in_b = np.flatnonzero(half == 1)
    for u in (0, 1):
        top_b = [i for i in top[1][u] if i >= 0]
        rest_b = [i for i in in_b if i not in set(top_b)]
        counts_top = {g: sum(g in holds[i] for i in top_b) for g in table.vocabulary}
        counts_rest = {g: sum(g in holds[i] for i in rest_b) for g in table.vocabulary}
        n_top, n_rest = sum(counts_top.values()), sum(counts_rest.values())
        for slot, j in enumerate(evidence.index[u]):
            if j < 0:
                continue
            gram = names[j]
            y, r = counts_top[gram], counts_rest[gram]
            delta, var, z = fightin_words(y, n_top, r, n_rest, occurrences[gram] / total, 1.0)
            assert evidence.top_hits[u, slot] == y and evidence.base_hits[u, slot] == r
            assert evidence.log_odds[u, slot] == pytest.approx(delta, rel=1e-5)
            assert evidence.z[u, slot] == pytest.approx(z, rel=1e-5)
            assert evidence.ci_low[u, slot] == pytest.approx(delta - 1.959964 * math.sqrt(var), rel=1e-4, abs=1e-5)
        assert evidence.top_images[u] == len(top_b) and evidence.base_images[u] == len(rest_b)
    gore, velvet = list(evidence.index[0]).index(names.index("gore")), list(evidence.index[1]).index(
        names.index("velvet"))
    assert evidence.ci_low[0, gore] > 0.5                       # replicated on the held-out half
    assert evidence.top_hits[1, velvet] == 0 and evidence.ci_low[1, velvet] < 0     # chosen on A, not held on B


def test_wilson_interval_matches_known_values():
    low, high = wilson_interval(np.array([0, 5, 10, 3]), np.array([10, 10, 10, 0]))
    np.testing.assert_allclose(low[:3], [0.0, 0.236593, 0.722467], atol=1e-6)
    np.testing.assert_allclose(high[:3], [0.277533, 0.763407, 1.0], atol=1e-6)
    assert np.isnan(low[3]) and np.isnan(high[3])


# ------------------------------------------------------------------------------------------ the commands

@pytest.fixture(scope="module")
def described(tmp_path_factory, dataset_table):
    """`describe --json` on the tiny model over the sweep test table, and its cache."""
    from neurolens.cli import app
    root = tmp_path_factory.mktemp("describe")
    out = CliRunner().invoke(app, ["describe", "--model", "nl-tiny-RN", "--pretrained", "none", "--layer", LAYER,
                                   "--dataset", str(dataset_table), "--cache", str(root / "cache"), "--top-k", "8",
                                   "--half-top", "4", "--json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout), root / "cache"


def test_describe_json_rows_follow_the_row_convention(described):
    rows, cache = described
    assert len(rows) == 512 and sorted(r["unit"] for r in rows) == list(range(512))
    for row in rows[:20]:
        assert list(row) == ["unit", "basis", "concepts", "captions", "summary", "model_based"]
        assert row["basis"] == "neurons" and len(row["concepts"]) >= 3 and row["model_based"] is False
        assert set(row["concepts"][0]) == {"concept", "auc", "auprc", "prevalence", "q", "flagged", "model_based"}
        for caption in row["captions"]:
            assert caption["ci_low"] <= caption["log_odds"] <= caption["ci_high"]
    best = [max((c["auc"] or -1) for c in row["concepts"]) for row in rows]
    assert best == sorted(best, reverse=True)          # nothing flagged here: by best AUC


def test_describe_reads_its_record_back_and_find_answers_without_a_model(described, dataset_table):
    """A second describe is read from the cache; `find` in a fresh process imports neither torch nor open_clip."""
    from neurolens.cli import app
    rows, cache = described
    code = ("import sys, json; from neurolens.cli import app; from typer.testing import CliRunner; "
            f"out = CliRunner().invoke(app, ['find', 'nsfw', '--layer', '{LAYER}', '--model', 'nl-tiny-RN', "
            f"'--pretrained', 'none', '--cache', r'{cache}', '--json', '--top', '0']); "
            "print(json.dumps([out.exit_code, 'torch' in sys.modules, 'open_clip' in sys.modules, out.stdout]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    exit_code, torch_loaded, clip_loaded, stdout = json.loads(done.stdout.strip().splitlines()[-1])
    assert exit_code == 0 and not torch_loaded and not clip_loaded, done.stderr
    found = json.loads(stdout)
    assert len(found) == 512 and list(found[0]) == ["unit", "basis", "score", "caption_share", "ci_low", "ci_high",
                                                    "text_score", "model_based"]
    scores = [r["score"] for r in found]
    assert scores == sorted(scores, reverse=True)
    assert all(r["score"] == r["ci_low"] and r["text_score"] is None and not r["model_based"] for r in found)
    records = sorted((cache / "descriptions").rglob("*.h5"))
    again = CliRunner().invoke(app, ["describe", "--model", "nl-tiny-RN", "--pretrained", "none", "--layer", LAYER,
                                     "--dataset", str(dataset_table), "--cache", str(cache), "--top-k", "8",
                                     "--half-top", "4", "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout) == rows
    assert sorted((cache / "descriptions").rglob("*.h5")) == records and len(records) == 1


def test_find_shares_are_the_top_images_caption_matches(described, dataset_table):
    """caption_share by brute force from the scan's top images and the captions ('adult' marks every 6th)."""
    import pandas
    from neurolens.pipelines.find import find, locate
    from neurolens.storage.cache import Cache
    rows, cache = described
    located = locate(Cache(cache), LAYER, model="nl-tiny-RN", pretrained="none")
    captions = pandas.read_csv(dataset_table)["caption"].tolist()
    result = find(located, "adult")
    assert result.query.kind == "lexicon" and result.query.concept == "nsfw"
    for row in result.rows[:50]:
        top = [i for i in located.top_indices[row["unit"]] if i >= 0]
        share = np.mean(["adult" in captions[i] for i in top])
        assert row["caption_share"] == pytest.approx(share)
        low, high = wilson_interval(np.array([round(share * len(top))]), np.array([len(top)]))
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((low[0], high[0]))
    free = find(located, "the shapes")                   # free text: 'shapes' (a stopword dropped)
    assert free.query.kind == "free text" and "'shapes'" in free.query.source
    with pytest.raises(Exception) as caught:
        locate(Cache(cache), LAYER, model="RN50x4", pretrained="openai")
    assert "no concept audit" in str(caught.value) and "neurolens describe" in str(caught.value)
