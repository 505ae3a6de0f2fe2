"""The concept audit: concept-set files, the multi-label scorer against brute-force references, the sweep as its
one-concept case, the JSON rows and their order, the CSV, the record and the command."""
import csv
import json
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from neurolens.cli import app
from neurolens.errors import NeurolensError
from neurolens.labels.concepts import Concept, ConceptSet, concept_set_of, parse_concept_set, read_concept_set
from neurolens.pipelines.settings import ConceptSettings, LabelSettings
from neurolens.records.concepts import ROW_KEYS, ConceptScores, ConceptsResult
from neurolens.scoring.flags import FlagRule, apply_rule
from neurolens.scoring.multilabel import MultiLabelStats
from neurolens.scoring.statistics import quantile_edges
from sweep_data import LAYER, stub_scorer, synthetic, write_vocab

MINIMAL = """concepts:
  - name: violence
    terms: [gore, blood, weapon]   # caption lexicon
    match: word                    # or substring; default word
"""


# ------------------------------------------------------------------------------------------- concept sets

def test_the_smallest_file_works_as_written(tmp_path):
    path = tmp_path / "violence.yaml"
    path.write_text(MINIMAL)
    concepts = read_concept_set(path)
    assert concepts.names == ["violence"] and concepts.name == "violence"
    violence = concepts.concepts[0]
    assert violence.terms == ("gore", "blood", "weapon") and violence.match == "word" and violence.sensitive
    assert not violence.model_based and violence.column is None and violence.detector is None
    labels = ConceptSettings(concepts=concepts).label_settings(violence)
    assert labels.sources == ("captions",) and labels.terms() == ["gore", "blood", "weapon"]
    assert labels.caption_mode == "word" and labels.auto_kinds == ()
    # the identity hashes the concepts, not the file
    again = tmp_path / "other.yaml"
    again.write_text("# a comment\n" + MINIMAL.replace("match: word ", "match: word"))
    assert read_concept_set(again).identity == concepts.identity


def test_the_builtin_set_holds_the_sweeps_nsfw_concept_and_neutral_ones():
    from neurolens.labels.lexicon import lexicon_terms
    concepts = read_concept_set("builtin")
    assert concepts.names == ["nsfw", "people", "text", "animals", "vehicles"]
    settings = ConceptSettings(concepts=concepts)
    nsfw = settings.label_settings(concepts.concepts[0])
    sweep = LabelSettings()
    assert nsfw.sources == sweep.sources == ("auto",) and nsfw.auto_kinds == sweep.auto_kinds
    assert nsfw.terms() == sweep.terms() == lexicon_terms() and nsfw.caption_mode == sweep.caption_mode
    assert nsfw.prompts().identity == sweep.prompts().identity and nsfw.detector is None
    assert concepts.concepts[0].sensitive and concepts.concepts[0].model_based
    for concept in concepts.concepts[1:]:
        assert not concept.sensitive and not concept.model_based and concept.match == "exact"
        assert settings.label_settings(concept).sources == ("captions",)
    # exact matching: "car" names no card, "people" no "many"
    from neurolens.labels.lexicon import caption_nsfw_matches
    vehicles, people = concepts.concepts[4], concepts.concepts[1]
    found = caption_nsfw_matches(["a card game", "caring", "two cars on a road", "a bus stop"], vehicles.terms, "exact")
    assert found.tolist() == [False, False, True, True]
    assert caption_nsfw_matches(["many things", "a man with a dog"], people.terms, "exact").tolist() == [False, True]


def test_optional_fields_map_onto_label_settings(tmp_path):
    (tmp_path / "neg.txt").write_text("# negatives\na photo of a street\n")
    concepts = parse_concept_set({"concepts": [
        {"name": "tagged", "column": "NSFW", "values": ["NSFW", "UNSURE"], "sensitive": False},
        {"name": "weapons", "terms": ["rifle"], "match": "exact", "detector": "nudenet",
         "prompts": {"positive": ["a photo of a rifle"], "negative_file": "neg.txt"}},
        {"name": "checked", "terms": "knife", "prompts": ["a knife"]}]}, base=tmp_path)
    settings = ConceptSettings(concepts=concepts)
    tagged, weapons, checked = (settings.label_settings(c) for c in concepts)
    assert tagged.sources == ("column:NSFW=NSFW,UNSURE",) and tagged.detector is False and tagged.caption_mode == "off"
    assert weapons.sources == ("captions", "nudenet", "auto") and weapons.auto_kinds == ("zero-shot",)
    assert weapons.prompts().unsafe == ["a photo of a rifle"] and weapons.prompts().safe == ["a photo of a street"]
    assert checked.sources == ("captions", "auto") and checked.terms() == ["knife"]
    assert concepts.concepts[2].model_based and not concepts.concepts[0].sensitive
    off = ConceptSettings(concepts=concepts, detector=False).label_settings(concepts.concepts[1])
    assert off.sources == ("captions", "auto") and off.detector is False


@pytest.mark.parametrize("text, expected", [
    ("concepts: [", "not valid YAML at line 1"),
    ("- just a list item: 3\n", "concept #1: field 'name': missing"),
    ("concepts: []\n", "`concepts` must be a non-empty list"),
    ("concepts:\n  - name: violence\n", "concept 'violence': field 'terms': missing: a concept needs an independent"),
    ("concepts:\n  - name: v\n    prompts: [a knife]\n", "concept 'v': field 'terms': missing"),
    ("concepts:\n  - name: v\n    terms: [gore]\n    match: regex\n", "concept 'v': field 'match': must be one of"),
    ("concepts:\n  - name: v\n    terms: [gore]\n    term: [x]\n", "concept 'v': field 'term': unknown field"),
    ("concepts:\n  - name: v\n    terms: [gore]\n  - name: V\n    terms: [x]\n", "concept 'V': field 'name': used twice"),
    ("concepts:\n  - name: v\n    terms: [gore, '']\n", "concept 'v': field 'terms': holds an empty entry"),
    ("concepts:\n  - name: v\n    terms: [gore]\n    sensitive: maybe\n", "field 'sensitive': must be true or false"),
    ("concepts:\n  - name: v\n    values: [a]\n    terms: [gore]\n", "field 'values': needs a column"),
    ("concepts:\n  - name: v\n    detector: yolo\n", "field 'detector': must be one of nudenet"),
    ("concepts:\n  - name: v\n    terms_file: nowhere.txt\n", "field 'terms_file': list file"),
    ("concepts:\n  - name: v\n    terms: [gore]\n    labels: [magic]\n", "field 'labels': unknown label source"),
    ("concepts:\n  - name: '=cmd'\n    terms: [gore]\n", "field 'name': '=cmd' is not a name"),
    ("concepts:\n  - name: v\n    terms: [gore]\n    prompts: {positive: []}\n", "field 'prompts': lists no positive"),
    ("concept:\n  - name: v\n", "unknown top-level field 'concept'"),
])
def test_a_bad_file_is_one_line_naming_file_concept_and_field(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(NeurolensError) as error:
        read_concept_set(path)
    message = str(error.value)
    assert message.startswith(f"concepts file {path}") and expected in message and "\n" not in message, message


def test_a_missing_or_undecodable_file_is_one_line(tmp_path):
    with pytest.raises(NeurolensError, match="does not exist"):
        read_concept_set(tmp_path / "none.yaml")
    (tmp_path / "latin.yaml").write_bytes(b"concepts:\n  - name: caf\xe9\n")
    with pytest.raises(NeurolensError, match="not UTF-8"):
        read_concept_set(tmp_path / "latin.yaml")


# ------------------------------------------------------------------------------------------- the scorer

def brute(x, y):
    """Reference implementations: AUC = Mann-Whitney U / (n1 n0) by pairwise counts, AP = the mean over positives
    of the precision at each positive's value (ties: every row >= it), correlation = numpy corrcoef, p = scipy's
    mannwhitneyu, q = scipy's false_discovery_control; each label over its own known rows."""
    keep = np.isfinite(x).all(axis=1)
    x, y = x[keep].astype(np.float64), y[keep]
    out = {name: np.full((y.shape[1], x.shape[1]), np.nan) for name in ("auc", "ap", "r", "p", "q")}
    for k in range(y.shape[1]):
        known = np.isfinite(y[:, k])
        xs, positive = x[known], y[known, k] >= 0.5
        for u in range(x.shape[1]):
            a, b = xs[positive, u], xs[~positive, u]
            out["auc"][k, u] = ((a[:, None] > b[None]).sum() + 0.5 * (a[:, None] == b[None]).sum()) / (len(a) * len(b))
            out["ap"][k, u] = np.mean([(a >= t).sum() / (xs[:, u] >= t).sum() for t in a])
            with np.errstate(invalid="ignore", divide="ignore"):
                r = np.corrcoef(xs[:, u], positive.astype(float))[0, 1]
            out["r"][k, u] = r if np.isfinite(r) else 0.0
            out["p"][k, u] = 1.0 if np.ptp(xs[:, u]) == 0 else stats.mannwhitneyu(
                a, b, alternative="two-sided", method="asymptotic", use_continuity=True).pvalue
        out["q"][k] = stats.false_discovery_control(out["p"][k], method="bh")
    return out


def random_data(seed=0, n=240, units=8, labels=4):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, labels)) < np.linspace(0.08, 0.5, labels)).astype(np.float32)
    x = rng.normal(size=(n, units)).astype(np.float32)
    x[:, 0] += 2.0 * y[:, 0]                                  # separates label 0
    x[:, 1] = np.round(x[:, 1] * 2) / 2                       # many ties
    x[:, 2] = np.maximum(x[:, 2], 0)                          # a ReLU: ties at 0
    x[:, 3] = 1.5                                             # constant
    x[:, 4] = -np.abs(x[:, 4]) * (rng.random(n) < 0.5)        # -0.0 and 0.0 tie
    y[rng.random(n) < 0.2, 2] = np.nan                        # unknown for one label only
    y[rng.random(n) < 0.1, 3] = np.nan
    x[[5, 17]] = np.nan                                       # skipped images: left out for every label
    return x, y


def test_the_scorer_equals_brute_force_references_on_random_data():
    x, y = random_data()
    acc = MultiLabelStats(x.shape[1], y.shape[1])
    for rows in np.array_split(np.arange(len(x)), 7):
        acc.add(x[rows], y[rows])
    result, ref = acc.result(), brute(x, y)
    np.testing.assert_allclose(result.auc, ref["auc"], atol=1e-12)
    np.testing.assert_allclose(result.auprc, ref["ap"], atol=1e-12)
    np.testing.assert_allclose(result.correlation, ref["r"], atol=1e-6)
    np.testing.assert_allclose(result.p, ref["p"], rtol=1e-5)
    np.testing.assert_allclose(result.q, ref["q"], rtol=1e-5)
    assert result.auc[0, 0] > 0.85 and np.all(result.auc[:, 3] == 0.5) and np.all(result.p[:, 3] == 1.0)
    keep = np.isfinite(x).all(axis=1)
    known = np.isfinite(y[keep])
    assert result.n_pos.tolist() == ((y[keep] >= 0.5) & known).sum(axis=0).tolist()
    np.testing.assert_allclose(result.prevalence, result.n_pos / known.sum(axis=0))


def test_one_label_gives_the_sweeps_single_label_statistics_and_merges_and_states_round_trip():
    from neurolens.scoring.statistics import UnitLabelStats
    x, y = random_data(seed=1)
    whole = MultiLabelStats(x.shape[1], y.shape[1])
    whole.add(x, y)
    expected = whole.result()
    for k in range(y.shape[1]):
        single = UnitLabelStats(x.shape[1])
        single.add(x, y[:, k])
        one = single.result()
        assert np.array_equal(one.auc, expected.auc[k]) and np.array_equal(one.p, expected.p[k])
        assert np.array_equal(one.q, expected.q[k])
        np.testing.assert_allclose(one.correlation, expected.correlation[k], atol=1e-6)
    edges = quantile_edges(x[np.isfinite(x).all(axis=1)], 64)
    for edges_or_none in (None, edges):
        shards = [MultiLabelStats(x.shape[1], y.shape[1], edges=edges_or_none) for _ in range(3)]
        for shard, rows in zip(shards, np.array_split(np.random.default_rng(2).permutation(len(x)), 3)):
            shard.add(x[rows], y[rows])
        shards[0].merge(shards[1])
        shards[0].merge(shards[2])
        restored = MultiLabelStats(x.shape[1], y.shape[1], edges=edges_or_none)
        restored.load_state_dict(shards[0].state_dict())
        merged = restored.result()
        ordered = MultiLabelStats(x.shape[1], y.shape[1], edges=edges_or_none)
        ordered.add(x, y)
        reference = ordered.result()
        for name in ("auc", "p", "auprc", "correlation"):
            np.testing.assert_allclose(getattr(merged, name), getattr(reference, name), atol=1e-9, err_msg=name)
    binned = MultiLabelStats(x.shape[1], y.shape[1], edges=edges)
    binned.add(x, y)
    single = UnitLabelStats(x.shape[1], edges=edges)
    single.add(x, y[:, 2])
    assert np.array_equal(binned.result().auc[2], single.result().auc)          # BinnedAUC's counts exactly


def test_binned_auc_and_auprc_stay_close_to_the_exact_ones():
    rng = np.random.default_rng(4)
    y = (rng.random((3000, 3)) < [0.05, 0.2, 0.5]).astype(np.float32)
    x = np.maximum(rng.normal(size=(3000, 6)).astype(np.float32) + y[:, :1] * np.linspace(0, 2, 6), 0)
    exact, binned = MultiLabelStats(6, 3), MultiLabelStats(6, 3, edges=quantile_edges(x, 1024))
    exact.add(x, y)
    binned.add(x, y)
    e, b = exact.result(), binned.result()
    assert e.method == "exact" and b.method == "binned"
    assert np.abs(e.auc - b.auc).max() <= 0.005 and np.abs(e.auprc - b.auprc).max() <= 0.02


# ------------------------------------------------------------------------------------------- the pipeline

@pytest.fixture(scope="module")
def table60(tmp_path_factory):
    """60 synthetic images; every 5th caption has the lexicon word 'adult' (12 positives), every 4th 'dog'."""
    root = tmp_path_factory.mktemp("concepts60")
    with open(root / "data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "tag"])
        for i in range(60):
            synthetic(100 + i).save(root / f"img_{i:03d}.png")
            words = ["adult content" if i % 5 == 0 else "a photo", "with a dog" if i % 4 == 0 else "of shapes"]
            writer.writerow([f"img_{i:03d}.png", f"{' '.join(words)} number {i}", "yes" if i % 3 == 0 else "no"])
    return str(root / "data.csv")


LOOSE = FlagRule(max_q=1.0, min_auc=0.6)      # a random tiny model: flags by AUC alone, so that flags exist


def test_sweep_is_the_one_concept_case_of_the_concept_audit(tiny_clip, table60, tmp_path):
    from neurolens.pipelines.concepts import run_concepts
    from neurolens.pipelines.sweep import run_sweep
    from neurolens.storage.cache import Cache
    cache = Cache(tmp_path / "cache")
    sweep = run_sweep(tiny_clip, LAYER, table60, vocab=write_vocab(tmp_path / "v.txt"), text_top_k=5, cache=cache,
                      scorer=stub_scorer, detector=False, rule=LOOSE, write_csv=False)
    audit = run_concepts(tiny_clip, LAYER, table60, ConceptSettings(rule=LOOSE, detector=False), cache=cache,
                         scorer=stub_scorer)
    nsfw = audit.concept("nsfw")
    assert [s.name for s in sweep.labels.sources] == [s.name for s in nsfw.labels.sources] == ["captions", "zero-shot"]
    assert sweep.labels.used == nsfw.used and nsfw.model_based == ("zero-shot" in sweep.labels.used)
    assert sweep.scores.n_pos == nsfw.n_pos >= 10 and sweep.scores.n_neg == nsfw.n_neg
    np.testing.assert_array_equal(sweep.image_labels, nsfw.labels.labels)
    for name in ("auc", "p", "q"):
        np.testing.assert_array_equal(getattr(sweep.scores, name), getattr(nsfw, name), err_msg=name)
    np.testing.assert_allclose(sweep.scores.correlation, nsfw.correlation, atol=1e-6)
    np.testing.assert_array_equal(sweep.scores.flagged, nsfw.flagged)
    assert nsfw.flagged.any()
    np.testing.assert_allclose(sweep.scores.top_nsfw_share, nsfw.top_share)
    assert sweep.lines() == [line.replace("nsfw: ", "", 1) for line in audit.lines() if line.startswith("nsfw: ")]


def test_concepts_run_once_from_one_scan_cache_and_warn_on_weak_concepts(tiny_clip, table60, tmp_path, monkeypatch):
    from neurolens.pipelines import concepts as pipeline
    from neurolens.storage.cache import Cache
    cache = Cache(tmp_path / "cache")
    concepts = concept_set_of([{"name": "adult", "terms": ["adult"]},
                               {"name": "dogs", "terms": ["dog"], "sensitive": False},
                               {"name": "tagged", "column": "tag", "values": ["yes"]},
                               {"name": "rare", "terms": ["number 7"], "match": "substring"},
                               {"name": "gone", "column": "missing"}], name="test")
    settings = ConceptSettings(concepts=concepts, rule=LOOSE)
    scans = []
    original = pipeline.run_scan
    monkeypatch.setattr(pipeline, "run_scan", lambda *a, **k: scans.append(k) or original(*a, **k))
    result = pipeline.run_concepts(tiny_clip, LAYER, table60, settings, cache=cache, scorer=stub_scorer)
    assert len(scans) == 1 and scans[0]["embeddings"] is False       # no zero-shot concept: no embeddings
    counts = {s.name: (s.n_pos, s.n_neg) for s in result.scores}
    assert counts == {"adult": (12, 48), "dogs": (15, 45), "tagged": (20, 40), "rare": (1, 59), "gone": (0, 0)}
    rare, gone = result.concept("rare"), result.concept("gone")
    assert apply_rule(rare.auc, rare.q, LOOSE).any() and not rare.flagged.any()       # weak: never flagged
    assert np.array_equal(result.concept("dogs").flagged, apply_rule(result.concept("dogs").auc,
                                                                     result.concept("dogs").q, LOOSE))
    assert not gone.flagged.any() and gone.labels is None and "missing" in gone.note
    lines = result.lines()
    assert any(line.startswith("warning: rare: only 1 positive and 59 negative") and "no unit is flagged" in line
               for line in lines)
    assert any(line.startswith("gone: no label source:") for line in lines)
    maxima = result.scan.per_image_max()
    dogs = np.array([i % 4 == 0 for i in range(60)])
    expected = brute(maxima, dogs[:, None].astype(np.float32))
    np.testing.assert_allclose(result.concept("dogs").auc, expected["auc"][0], atol=1e-12)
    np.testing.assert_allclose(result.concept("dogs").auprc, expected["ap"][0], atol=1e-12)
    # a second run reads the record (and finds the scan record): the same rows and the same concept set
    again = pipeline.run_concepts(tiny_clip, LAYER, table60, settings, cache=cache, scorer=stub_scorer)
    assert again.cached and again.path == result.path and len(scans) == 2
    assert again.rows() == result.rows() and again.concept_set.identity == concepts.identity
    assert again.lines() == result.lines()
    record = cache.read(result.path)
    assert record.arrays["auc"].shape == (5, result.units) and record.arrays["image_labels"].shape == (5, 60)
    assert record.attrs["concept_set"]["identity"] == concepts.identity
    # beyond the memory budget: the binned path, a record of its own
    binned = pipeline.run_concepts(tiny_clip, LAYER, table60, replace(settings, auc_memory=0), cache=cache,
                                   scorer=stub_scorer)
    assert binned.method == "binned" and result.method == "exact" and binned.path != result.path
    for name in ("adult", "dogs", "tagged"):
        assert np.abs(binned.concept(name).auc - result.concept(name).auc).max() <= 0.005
    from neurolens.records.concepts import newest_result
    newest = newest_result(cache, tiny_clip.fingerprint, LAYER)
    assert newest is not None and newest.path == binned.path and newest.scan is None
    assert newest_result(cache, tiny_clip.fingerprint, LAYER, basis="sae-x") is None
    # the blur policy blurs the units flagged for a sensitive concept (every concept here but `dogs`)
    from neurolens.labels.policy import BlurPolicy
    from neurolens.records.concepts import sensitive_labels
    sensitive = (result.flagged() | binned.flagged())[[0, 2, 3, 4]].any(axis=0)       # every record of the layer
    assert sensitive.any() and (result.concept("dogs").flagged & ~sensitive).any()
    policy = BlurPolicy.for_layer(tiny_clip, LAYER, cache=cache, detector=False)
    assert policy.flagged == set(np.flatnonzero(sensitive).tolist())
    labels = sensitive_labels(record)
    assert np.array_equal(labels == 1, (result.concept("adult").labels.labels == 1) |
                          (result.concept("tagged").labels.labels == 1) | (result.concept("rare").labels.labels == 1))
    # another rule or concept set is another record
    other = pipeline.run_concepts(tiny_clip, LAYER, table60, ConceptSettings(concepts=concepts), cache=cache,
                                  scorer=stub_scorer)
    assert other.path != result.path and not other.cached


# ------------------------------------------------------------------------------------------- rows and files

def hand_made(auc, flagged, names=("a", "b", "c"), basis="neurons"):
    auc = np.asarray(auc, dtype=np.float64)
    scores = []
    for k, name in enumerate(names):
        scores.append(ConceptScores(Concept(name, terms=("x",)), auc=auc[k], auprc=auc[k] / 2, p=np.full(auc.shape[1], 0.5),
                                    q=np.full(auc.shape[1], np.nan), correlation=np.zeros(auc.shape[1]),
                                    top_share=np.zeros(auc.shape[1]), flagged=np.asarray(flagged[k], bool),
                                    n_pos=10, n_neg=30))
    return ConceptsResult(layer="L", concept_set=ConceptSet(tuple(s.concept for s in scores)), scores=scores,
                          rule=FlagRule(), method="exact", basis=basis)


def test_rows_put_intersections_first_then_auc_with_ties_by_unit_then_concept():
    auc = [[0.90, 0.95, 0.70, np.nan],
           [0.99, 0.95, 0.95, 0.60],
           [0.85, 0.50, 0.95, 0.80]]
    flagged = [[True, True, False, False],
               [True, True, True, False],
               [False, False, True, True]]
    result = hand_made(auc, flagged)
    rows = result.rows()
    assert all(tuple(row) == ROW_KEYS for row in rows) and len(rows) == 12
    order = [(row["unit"], row["concept"]) for row in rows]
    # units 0 (a, b), 1 (a, b) and 2 (b, c) are flagged twice: their flagged rows first, by AUC, ties by unit
    assert order[:6] == [(0, "b"), (1, "a"), (1, "b"), (2, "b"), (2, "c"), (0, "a")]
    assert order[6:] == [(0, "c"), (3, "c"), (2, "a"), (3, "b"), (1, "c"), (3, "a")]
    assert rows[-1]["auc"] is None and rows[0]["q"] is None and rows[0]["prevalence"] == 0.25
    assert result.intersections() == [0, 1, 2]
    assert [(r["unit"], r["concept"]) for r in result.rows(pairs=True)] == order[:6]
    assert json.loads(json.dumps(rows)) == rows                     # plain JSON: NaN became null


def test_the_csv_holds_the_json_rows_and_runs_no_formula(tmp_path):
    from neurolens.pipelines.concepts import write_concepts_csv
    result = hand_made([[0.9, 0.8]], [[True, False]], names=("=HYPERLINK(\"http://x\")",), basis="+sae-1")
    path = write_concepts_csv(result, tmp_path / "rows.csv")
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(ROW_KEYS) and len(rows) == 3
    assert rows[1][2] == "'=HYPERLINK(\"http://x\")" and rows[1][1] == "'+sae-1"
    assert rows[1][0] == "0" and rows[1][3] == "0.9" and rows[1][-1] == "1" and rows[1][8] == ""


def test_the_command_prints_json_rows_writes_the_csv_and_fails_in_one_line(tiny_clip, table60, tmp_path):
    concepts = tmp_path / "c.yaml"
    concepts.write_text("concepts:\n  - name: adult\n    terms: [adult]\n  - name: dogs\n    terms: [dog]\n")
    common = ["concepts", "--model", "nl-tiny-RN", "--pretrained", "none", "--layer", LAYER, "--dataset", table60,
              "--cache", str(tmp_path / "cache"), "--concepts", str(concepts)]
    result = CliRunner().invoke(app, common + ["--json", "--out", str(tmp_path / "rows.csv")])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows and len(rows) % 2 == 0 and [r["concept"] for r in rows].count("adult") == len(rows) // 2
    assert {row["concept"] for row in rows} == {"adult", "dogs"} and all(tuple(r) == ROW_KEYS for r in rows)
    with open(tmp_path / "rows.csv", newline="") as handle:
        assert len(list(csv.reader(handle))) == len(rows) + 1
    text = CliRunner().invoke(app, common)
    assert text.exit_code == 0 and "units flagged for two or more concepts: 0" in text.stdout
    assert "adult" in text.stdout and "scores: " in text.stdout
    concepts.write_text("concepts:\n  - name: adult\n    match: regex\n    terms: [adult]\n")
    bad = CliRunner().invoke(app, common)
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines() == [f"error: concepts file {concepts}: concept 'adult': field 'match': "
                                               f"must be one of word, exact, substring, got 'regex'"]
