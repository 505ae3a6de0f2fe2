"""Per-unit NSFW scores and the sweep pipeline, against brute force on a tiny model and synthetic data."""
import csv

import numpy as np
import pytest

from neurolens.labels.prompts import Prompts, load_prompts
from neurolens.scoring.flags import FlagRule, apply_rule
from neurolens.scoring.units import top_share
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

    # texts: shares agree with the per-text NSFW marks of the top 10 texts; texts alone never flag; a unit whose
    # top texts all have cosine 0 has no text evidence (NaN share, no text flag), never a share
    zero = ~(np.abs(result.text_scores[:, :10]) >= 1e-6).any(axis=1)
    for unit in range(0, result.scan.channels, 50):
        marks = [nsfw for _, _, nsfw in result.top_texts(unit, 10)]
        if zero[unit]:
            assert np.isnan(result.scores.text_nsfw_share[unit]) and not result.scores.text_flag[unit]
            continue
        assert result.scores.text_nsfw_share[unit] == pytest.approx(np.mean(marks))
        assert result.scores.text_flag[unit] == (np.mean(marks) >= 0.3)
    # a random-weights model's texts are marked by the lexicon only, and the record says so
    assert set(np.unique(result.text_mark_source)) <= {0, 1}
    assert np.array_equal(result.text_mark_source > 0, result.text_nsfw)

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


# ------------------------------------------------------------------------------- settings and engines

def test_the_cli_sweep_options_build_one_sweep_settings(tmp_path):
    from neurolens.cli.options import SWEEP, uses
    from neurolens.errors import NeurolensError
    from neurolens.pipelines.settings import LabelSettings, SweepSettings
    seen = {}

    @uses(settings=SWEEP)
    def command(settings: SweepSettings = None):
        seen["settings"] = settings

    defaults = {name: default for name, _, default in SWEEP.options}
    command(**defaults)
    assert seen["settings"] == SweepSettings()
    terms, unsafe = tmp_path / "terms.txt", tmp_path / "unsafe.txt"
    terms.write_text("zebra\n# a comment\nokapi\n")
    unsafe.write_text("a bad photo\n")
    command(**{**defaults, "vocab": "v.txt", "top_k": 5, "labels": ["captions", "column:NSFW=NSFW"],
               "min_agreement": 0.6, "max_q": 0.05, "min_auc": 0.7, "min_text_share": 0.5,
               "unsafe_prompts": str(unsafe), "caption_terms": str(terms), "caption_match": "substring",
               "auc_memory": 1})
    settings = seen["settings"]
    assert settings == SweepSettings(
        vocab="v.txt", top_k=5, rule=FlagRule(max_q=0.05, min_auc=0.7, min_text_share=0.5), auc_memory=2 ** 20,
        labels=LabelSettings(sources=("captions", "column:NSFW=NSFW"), min_agreement=0.6, caption_mode="substring",
                             caption_terms=("zebra", "okapi"), unsafe_prompts=("a bad photo",)))
    prompts = settings.labels.prompts()
    assert prompts.unsafe == ["a bad photo"] and prompts.safe == load_prompts().safe
    assert settings.labels.terms() == ["zebra", "okapi"]
    for option, value, words in [("min_auc", 0.3, "--min-auc"), ("max_q", 0.0, "--max-q"),
                                 ("min_text_share", 2.0, "--min-text-share"), ("caption_match", "fuzzy", "caption-match"),
                                 ("min_agreement", 0.2, "--min-agreement"), ("labels", ["bogus"], "unknown label source"),
                                 ("auc_memory", -1, "--auc-memory"), ("caption_terms", str(tmp_path / "no.txt"), "no.txt")]:
        with pytest.raises(NeurolensError, match=words):
            command(**{**defaults, option: value})


def test_older_keyword_arguments_map_onto_sweep_settings():
    from neurolens.pipelines.settings import LabelSettings, SweepSettings, sweep_settings
    rule = FlagRule(max_q=0.2, min_auc=0.9)
    old = sweep_settings(vocab="v.txt", top_k=4, text_top_k=3, rule=rule, labels="captions", min_agreement=0.7,
                         detector=False, caption_terms=["zebra"], caption_mode="off", text_zero_shot=False,
                         prompts=Prompts(["u"], ["s"]), auc_memory=0)
    assert old == SweepSettings(vocab="v.txt", top_k=4, text_top_k=3, rule=rule, text_zero_shot=False, auc_memory=0,
                                labels=LabelSettings(sources=("captions",), min_agreement=0.7, detector=False,
                                                     caption_terms=("zebra",), caption_mode="off",
                                                     unsafe_prompts=("u",), safe_prompts=("s",)))
    # keyword arguments apply over a settings object; prompts=None is the shipped lists again
    assert sweep_settings(old, top_k=9, prompts=None).labels.unsafe_prompts is None
    assert sweep_settings(old, top_k=9).top_k == 9 and sweep_settings(old, top_k=9).labels == old.labels
    with pytest.raises(TypeError, match="top_kk"):
        sweep_settings(top_kk=3)


def test_settings_and_older_keyword_arguments_find_the_same_record(tiny_clip, dataset_table, vocab_file, tmp_path):
    from neurolens.pipelines.settings import LabelSettings, SweepSettings
    from neurolens.pipelines.sweep import run_sweep
    from neurolens.storage.cache import Cache
    cache = Cache(tmp_path / "c")
    old = run_sweep(tiny_clip, LAYER, dataset_table, vocab=vocab_file, top_k=8, text_top_k=10, cache=cache,
                    labels=["captions"], rule=FlagRule(max_q=1.0, min_auc=0.75), write_csv=False)
    settings = SweepSettings(vocab=vocab_file, top_k=8, text_top_k=10, rule=FlagRule(max_q=1.0, min_auc=0.75),
                             labels=LabelSettings(sources=("captions",)))
    new = run_sweep(tiny_clip, LAYER, dataset_table, settings, cache=cache, write_csv=False)
    assert not old.cached and new.cached and new.path == old.path
    np.testing.assert_array_equal(new.scores.flagged, old.scores.flagged)
    with pytest.raises(TypeError, match="SweepSettings"):
        run_sweep(tiny_clip, LAYER, dataset_table, vocab_file)


def test_both_engines_run_the_one_sweep_code_path(monkeypatch):
    """run_sweep and run_ray_sweep differ only in the engine they hand to `sweep` (no Ray needed to see it)."""
    from neurolens.pipelines import sweep as module
    from neurolens.pipelines.settings import SweepSettings
    calls = []
    monkeypatch.setattr(module, "sweep", lambda *args, **kwargs: calls.append((args, kwargs)))
    module.run_sweep("clip", LAYER, "data", top_k=5, labels=["captions"], workers=0, out="o")
    module.run_ray_sweep("clip", LAYER, "data", top_k=5, labels=["captions"], out="o", warmup=8)
    (local_args, local_kw), (ray_args, ray_kw) = calls
    assert isinstance(local_args[4], module.LocalEngine) and isinstance(ray_args[4], module.RayEngine)
    assert local_args[:4] == ray_args[:4] == ("clip", LAYER, "data", SweepSettings(top_k=5).updated(labels=["captions"]))
    assert local_kw["out"] == ray_kw["out"] == "o" and ray_args[4].warmup == 8


def test_label_results_read_back_from_a_fused_record_give_the_same_sweep(tiny_clip, dataset_table, vocab_file,
                                                                          tmp_path):
    """The Ray engine's ending: its label set and statistics come back from a `sweep-fused` record; fed those
    (here: the in-process ones, written and read back), the shared ending gives the in-process sweep."""
    from types import SimpleNamespace
    from neurolens.pipelines.settings import LabelSettings, SweepSettings
    from neurolens.pipelines.sweep import LocalEngine, sweep
    from neurolens.records import sweep as records
    from neurolens.storage.cache import Cache
    settings = SweepSettings(vocab=vocab_file, top_k=8, text_top_k=10, labels=LabelSettings(sources=("captions",)))
    cache = Cache(tmp_path / "c")
    local = sweep(tiny_clip, LAYER, dataset_table, settings, LocalEngine(workers=0), cache=cache, write_csv=False)

    class Replayed(LocalEngine):
        """In-process scan; label results through a fused record, as RayEngine reads them."""
        def open(self, job, dataset):
            opened = super().open(job, dataset)

            class Wrapped:
                def __enter__(inner):
                    run = opened.__enter__()
                    computed = run.labels

                    def labels(scan):
                        label_set, statistics = computed(scan)
                        outcome = SimpleNamespace(statistics=statistics, label_set=label_set, counts=None,
                                                  warmup_images=len(label_set.labels))
                        path = cache.write(tmp_path / "fused.h5", records.fused_record(outcome, 8192, 128))
                        fused = cache.read(path)
                        return records.label_set_from_record(fused), records.statistics_from_record(fused)
                    run.labels, run.method = labels, lambda scan: "replayed"
                    return run

                def __exit__(inner, *exc):
                    return opened.__exit__(*exc)
            return Wrapped()

    replayed = sweep(tiny_clip, LAYER, dataset_table, settings, Replayed(workers=0), cache=cache, write_csv=False)
    assert replayed.path != local.path and not replayed.cached
    for name in ("auc", "p", "q", "correlation", "top_nsfw_share", "text_nsfw_share", "flagged", "text_flag"):
        np.testing.assert_array_equal(getattr(replayed.scores, name), getattr(local.scores, name))
    np.testing.assert_array_equal(replayed.image_labels, local.image_labels)
    assert replayed.labels.as_attrs() == local.labels.as_attrs() and replayed.lines() == local.lines()


def test_sweep_record_readers_answer_for_new_and_old_records(tiny_clip, dataset_table, vocab_file, tmp_path):
    from neurolens.records.sweep import flagged_in_cache
    from neurolens.pipelines.sweep import run_sweep
    from neurolens.records import sweep as records
    from neurolens.storage.cache import Cache, Record
    cache = Cache(tmp_path / "c")
    result = run_sweep(tiny_clip, LAYER, dataset_table, vocab=vocab_file, top_k=8, text_top_k=10, cache=cache,
                       labels=["captions"], rule=FlagRule(max_q=1.0, min_auc=0.75), write_csv=False)
    record = cache.read(result.path)
    units = result.scan.channels
    assert records.sweep_paths(cache, tiny_clip.fingerprint, LAYER) == [result.path]
    assert flagged_in_cache(cache, tiny_clip.fingerprint, LAYER) == set(result.flagged_units) != set()
    assert flagged_in_cache(cache, tiny_clip.fingerprint, LAYER, "sae-other-0123456789ab") == set()
    np.testing.assert_array_equal(records.flagged(record, units), result.scores.flagged)
    assert records.evidence_name(record) == "AUC" and records.unit_count(record) == units
    np.testing.assert_array_equal(records.evidence_values(record, units), result.scores.auc)
    np.testing.assert_array_equal(records.image_labels(record), result.image_labels)
    unit = result.flagged_units[0]
    evidence = records.unit_evidence(record, unit)
    assert evidence["flagged"] and evidence["n_images"] == 36
    assert evidence["rule_text"] == ("flagged when q <= 1 and AUC >= 0.75; text_flag when at least 30% of the top "
                                     "10 texts are NSFW")
    assert [c["passed"] for c in evidence["checks"][:2]] == [True, True]
    # a record from before the AUC rule: a correlation rule, no auc, no labels
    old = Record(arrays={"flagged": np.array([True, False]), "correlation": np.array([0.4, 0.1]),
                         "image_scores": np.array([0.9, 0.1])},
                 attrs={"rule": {"min_correlation": 0.3, "noise_z": 3.0, "min_top_share": 0.5, "min_text_share": 0.3,
                                 "text_k": 10}})
    assert records.evidence_name(old) == "correlation" and records.image_labels(old).tolist() == [0.9, 0.1]
    evidence = records.unit_evidence(old, 0)
    assert evidence["n_images"] is None and evidence["checks"][0]["label"] == "NSFW correlation"
    assert evidence["rule_text"].startswith("flagged when the NSFW correlation reaches max(0.3, 3.0/sqrt(N))")
    assert records.unit_evidence(None, 0) is None and not records.flagged(None, 3).any()


def test_text_marks_come_from_the_lexicon_or_from_a_checked_zero_shot_score(tiny_clip, monkeypatch, tmp_path):
    """The model's zero-shot score marks a text only when the reliability check kept the zero-shot image source,
    and the mark says which; all-zero cosines are no text evidence, whatever the marks."""
    from types import SimpleNamespace
    from neurolens.pipelines import sweep as sweep_module
    from neurolens.records.sweep import MARK_LEXICON, MARK_NONE, MARK_ZERO_SHOT
    from neurolens.scoring.units import text_shares
    texts = ["benthos", "porn site", "heterotroph", "mortal"]
    zero_shot = {"benthos": 0.9, "porn site": 0.2, "heterotroph": 0.7, "mortal": 0.1}

    def scores(clip, entries, embeddings=None, prompts=None, terms=None, zero_shot=True):
        lexicon = np.array(["porn" in t for t in entries], dtype=np.float32)
        return np.maximum(lexicon, [zero_shot_of[t] for t in entries]) if zero_shot else lexicon
    zero_shot_of = zero_shot
    monkeypatch.setattr(sweep_module.safety, "text_nsfw_scores", scores)
    monkeypatch.setattr(sweep_module, "text_embeddings", lambda clip, vocab, cache: (np.zeros((4, 2)), None, None))
    ranking = SimpleNamespace(entries=texts, top_indices=np.array([[0, 1, 2, 3], [3, 2, -1, -1]]),
                              top_scores=np.array([[0.3, 0.2, 0.1, 0.0], [0, 0, 0, 0]], np.float32))
    job = SimpleNamespace(clip=tiny_clip, zero_shot_texts=True, settings=SimpleNamespace(vocab=texts), cache=None,
                          prompts=load_prompts())
    _, _, unchecked = sweep_module._text_part(job, ranking, zero_shot_kept=False)
    assert unchecked.tolist() == [[MARK_NONE, MARK_LEXICON, MARK_NONE, MARK_NONE], [MARK_NONE, MARK_NONE, 0, 0]]
    _, _, checked = sweep_module._text_part(job, ranking, zero_shot_kept=True)
    assert checked.tolist() == [[MARK_ZERO_SHOT, MARK_LEXICON, MARK_ZERO_SHOT, MARK_NONE],
                                [MARK_NONE, MARK_ZERO_SHOT, 0, 0]]
    shares = text_shares(checked > 0, 2, FlagRule(text_k=4), ranking.top_scores)
    assert shares[0] == pytest.approx(0.75) and np.isnan(shares[1])      # unit 1: all cosines 0, no evidence
    assert np.isnan(text_shares(None, 3, FlagRule())).all()               # no texts at all: no evidence either
