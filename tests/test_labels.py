"""Label sources (neurolens.labels.sources) and their reliability check (neurolens.labels.reliability)."""
import csv

import numpy as np
import pytest
from PIL import Image

from neurolens.errors import NeurolensError
from neurolens.labels.reliability import check_reliability, combine, source_auc
from neurolens.labels.spec import LabelSource, LabelSpec, parse_labels
from neurolens.labels.sources import captions_source, column_source, resolve_specs

from sweep_data import LAYER


def source(kind, scores, threshold=0.5, explicit=False, column=None):
    return LabelSource(LabelSpec(kind, column=column, explicit=explicit), np.asarray(scores, np.float32), threshold)


def test_parse_labels():
    assert parse_labels(None) == ([], True)
    named, auto = parse_labels(["captions", "column:NSFW=NSFW,UNSURE", "auto", "nudenet", "zero-shot", "captions"])
    assert auto and [s.name for s in named] == ["captions", "column:NSFW=NSFW,UNSURE", "nudenet", "zero-shot"]
    assert named[1].column == "NSFW" and named[1].values == ("NSFW", "UNSURE") and all(s.explicit for s in named)
    assert parse_labels(["column:punsafe"])[0][0].values == ()
    for bad, words in (("clip", "unknown label source"), ("column:", "names no column"), ("column:X=", "no value")):
        with pytest.raises(NeurolensError, match=words):
            parse_labels([bad])


def test_auto_resolution(tiny_clip):
    specs, notes = resolve_specs([], True, has_captions=True, clip=tiny_clip, detector=False)
    assert [s.name for s in specs] == ["captions"] and not specs[0].explicit
    assert any("random weights" in n for n in notes) and any("nudenet: not used" in n for n in notes)
    specs, _ = resolve_specs([LabelSpec("zero-shot")], True, has_captions=False, clip=None, detector=False,
                             scorer=lambda c, e: e[:, 0])
    assert [(s.name, s.explicit) for s in specs] == [("zero-shot", True)]
    with pytest.raises(NeurolensError, match="no label source"):
        resolve_specs([], True, has_captions=False, clip=tiny_clip, detector=False)


def test_captions_source_marks_missing_captions_unknown():
    keys = ["a.png", "b.png", "c.png", "https://freexxxvideos.example/d.jpg", "e.png"]
    captions = ["a nude figure", "a red circle", "", "", "Sexy photo"]
    got = captions_source(LabelSpec("captions"), keys, captions).scores
    assert got[0] == 1 and got[1] == 0 and np.isnan(got[2]) and got[3] == 1 and got[4] == 1
    # the paper's 7 terms only: "nude" is not one of them
    assert captions_source(LabelSpec("captions"), keys, captions, terms=["porn", "sex"]).scores[0] == 0


def test_column_source_values_numbers_and_errors(tmp_path):
    from neurolens.datasets.open import open_dataset
    from PIL import Image
    rows = [("NSFW", "0.9", "true"), ("UNLIKELY", "0.1", "false"), ("UNSURE", "", ""), ("", "0.6", "yes")]
    with open(tmp_path / "t.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption", "NSFW", "punsafe", "flag"])
        for i, row in enumerate(rows):
            Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
            writer.writerow([f"{i}.png", "x", *row])
    data = open_dataset(str(tmp_path / "t.csv"))
    nsfw = column_source(parse_labels(["column:NSFW=nsfw,UNSURE"])[0][0], data).scores
    assert nsfw[:3].tolist() == [1, 0, 1] and np.isnan(nsfw[3])
    punsafe = column_source(parse_labels(["column:punsafe"])[0][0], data)
    assert punsafe.labels[[0, 1, 3]].tolist() == [1, 0, 1] and np.isnan(punsafe.labels[2])
    assert column_source(parse_labels(["column:flag"])[0][0], data).labels[[0, 1, 3]].tolist() == [1, 0, 1]
    with pytest.raises(NeurolensError, match="name the positive ones"):
        column_source(parse_labels(["column:NSFW"])[0][0], data)
    with pytest.raises(NeurolensError, match="no column 'nope'"):
        column_source(parse_labels(["column:nope"])[0][0], data)


def test_combine_never_lets_the_model_add_positives():
    captions = source("captions", [1, 0, 0, np.nan, 0])
    zero_shot = source("zero-shot", [0.9, 0.9, 0.1, 0.9, 0.2])
    got = combine([captions, zero_shot])
    assert got[0] == 1 and np.isnan(got[1]) and got[2] == 0 and np.isnan(got[3]) and got[4] == 0
    nudenet = source("nudenet", [0.0, 0.0, 0.6, 0.0, np.nan], threshold=0.4)
    got = combine([captions, nudenet])
    assert got.tolist() == [1, 0, 1, 0, 0]         # image 3: unknown to the captions, negative to NudeNet
    alone = combine([zero_shot])
    assert alone.tolist() == [1, 1, 0, 1, 0]


def test_reliability_check_drops_a_useless_source_and_keeps_a_good_one():
    rng = np.random.default_rng(0)
    n = 2000
    truth = rng.random(n) < 0.12
    captions = source("captions", (truth & (rng.random(n) < 0.7)).astype(float))      # misses 30 %
    good = source("nudenet", np.clip(0.3 + 0.5 * truth + rng.normal(0, 0.15, n), 0, 1), threshold=0.4)
    useless = source("zero-shot", rng.random(n))                                      # shuffled prompts
    checked = check_reliability([captions, good, useless], min_agreement=0.75)
    assert checked.used == ["captions", "nudenet"] and checked.dropped == ["zero-shot"]
    agreement = checked.agreements
    assert agreement["zero-shot"].reference == ["captions", "nudenet"] and agreement["zero-shot"].auc < 0.6
    assert agreement["nudenet"].auc > 0.9 and "DROPPED" in agreement["zero-shot"].note
    assert checked.pairwise["nudenet"]["captions"] == pytest.approx(source_auc(good.scores, captions.labels))
    np.testing.assert_array_equal(checked.labels, combine([captions, good]))
    # named explicitly, the useless source is kept (and said so); its positives only leave the negatives
    explicit = source("zero-shot", useless.scores, explicit=True)
    checked = check_reliability([captions, good, explicit], min_agreement=0.75)
    assert "zero-shot" in checked.used and "named explicitly" in checked.agreements["zero-shot"].note
    assert (checked.labels == 1).sum() == (combine([captions, good]) == 1).sum()


def test_the_model_never_judges_an_independent_source():
    """A zero-shot score that agrees with the captions is kept, but the captions are not checked against it
    (it labels many more images positive than the captions do, which would look like disagreement)."""
    rng = np.random.default_rng(1)
    truth = rng.random(3000) < 0.1
    captions = source("captions", truth.astype(float))
    zero_shot = source("zero-shot", np.clip(0.45 + 0.4 * truth + rng.normal(0, 0.1, 3000), 0, 1))
    checked = check_reliability([captions, zero_shot])
    assert checked.used == ["captions", "zero-shot"]
    assert checked.agreements["captions"].reference == [] and "no other independent source kept" in \
        checked.agreements["captions"].note


def test_a_sparse_but_precise_yes_no_source_is_kept_and_a_wrong_one_dropped():
    """Captions that name only 30 % of the positives agree with a good detector (the images they name are the
    ones it scores high); captions that name random images do not."""
    rng = np.random.default_rng(2)
    n = 3000
    truth = rng.random(n) < 0.1
    detector = source("nudenet", np.clip(0.2 + 0.5 * truth + rng.normal(0, 0.1, n), 0, 1), threshold=0.4)
    sparse = source("captions", (truth & (rng.random(n) < 0.3)).astype(float))
    checked = check_reliability([sparse, detector])
    assert checked.used == ["captions", "nudenet"]
    assert checked.agreements["captions"].auc == pytest.approx(checked.agreements["nudenet"].auc) or \
        checked.agreements["captions"].auc > 0.9
    # two sources that disagree: the less trusted one goes (NudeNet before captions before columns)
    wrong = source("captions", (rng.random(n) < 0.05).astype(float))
    assert check_reliability([wrong, detector]).used == ["captions"]
    # with a third, the wrong one is outvoted
    column = source("column", truth.astype(float), column="NSFW")
    checked = check_reliability([wrong, detector, column])
    assert checked.used == ["nudenet", "column:NSFW"] and checked.agreements["captions"].auc < 0.6


def test_nudenet_runs_offline_its_scores_reach_the_sweep_record_and_are_cached(tiny_clip, dataset_table, vocab_file,  # noqa: F811
                                                                              tmp_path, monkeypatch):
    """The plumbing, not the detector's accuracy: NudeNet's per-image scores of the synthetic images are the
    nudenet source of the sweep record, and a second sweep (another rule: a new record) does not run it."""
    from neurolens.datasets.open import open_dataset
    from neurolens.labels import nudenet
    from neurolens.pipelines.sweep import run_sweep
    from neurolens.storage.cache import Cache
    from neurolens.scoring.flags import FlagRule
    cache = Cache(tmp_path / "cache")
    ticks, notes = [], []

    def progress(done, total):
        ticks.append((done, total))
    progress.note = notes.append          # as the CLI's bar: the line says what runs and how to skip it
    kw = dict(vocab=vocab_file, top_k=8, text_top_k=10, cache=cache, labels=["captions", "nudenet"], write_csv=False)
    result = run_sweep(tiny_clip, LAYER, dataset_table, progress=progress, **kw)
    assert notes == ["NudeNet: scoring 36 images (the independent NSFW detector; --labels captions skips it)", None]
    scores = result.source_scores("nudenet")
    dataset = open_dataset(dataset_table)
    direct = nudenet.image_scores([dataset.load(i) for i in (0, 7, 35)])
    np.testing.assert_allclose(scores[[0, 7, 35]], direct, atol=1e-6)
    assert np.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()
    record = cache.read(result.path)
    names = [s["name"] for s in record.attrs["labels"]["sources"]]
    np.testing.assert_array_equal(record.arrays["source_scores"][names.index("nudenet")], scores)
    assert list(cache.records("labels-nudenet")) and (36, 36) in ticks

    def must_not_run(images):
        raise AssertionError("NudeNet ran again")
    monkeypatch.setattr(nudenet, "image_scores", must_not_run)
    notes.clear()
    again = run_sweep(tiny_clip, LAYER, dataset_table, rule=FlagRule(min_auc=0.9), progress=progress, **kw)
    assert not again.cached and np.array_equal(again.source_scores("nudenet"), scores)
    assert notes == []                    # nothing left to score: no NudeNet line


def test_nudenet_loads_its_model_once_per_process(monkeypatch):
    """The detector's ONNX session is built once and reused by every later image (a sweep scores thousands)."""
    import nudenet as package
    from neurolens.labels import nudenet
    built = []

    class Detector:
        def __init__(self):
            built.append(self)

        def detect(self, image):
            return [{"class": "FACE_FEMALE", "score": 0.9, "box": [0, 0, 4, 4]}]

    monkeypatch.setattr(package, "NudeDetector", Detector)
    nudenet._detector.cache_clear()
    try:
        scores = nudenet.image_scores([Image.new("RGB", (32, 32)) for _ in range(5)])
        nudenet.detections(Image.new("RGB", (32, 32)))
    finally:
        nudenet._detector.cache_clear()   # the next user builds the real detector
    assert len(built) == 1 and scores.tolist() == [0.0] * 5   # a face is not an exposed class


def test_column_source_reads_the_json_members_of_tar_shards(tmp_path):
    """LAION's webdataset shards carry the NSFW column in each sample's .json member."""
    import io
    import json
    import tarfile
    from PIL import Image
    from neurolens.datasets.open import open_dataset
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as archive:
        for i, value in enumerate(["NSFW", "UNLIKELY", None, "UNSURE"]):
            buffer = io.BytesIO()
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(buffer, format="PNG")
            meta = json.dumps({"caption": f"image {i}"} | ({"NSFW": value} if value else {})).encode()
            for name, data in ((f"{i:04d}.png", buffer.getvalue()), (f"{i:04d}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    data = open_dataset(str(shard))
    scores = column_source(parse_labels(["column:NSFW=NSFW,UNSURE"])[0][0], data).scores
    assert scores[[0, 1, 3]].tolist() == [1, 0, 1] and np.isnan(scores[2])
    with pytest.raises(NeurolensError, match="no sample"):
        column_source(parse_labels(["column:punsafe"])[0][0], data)
