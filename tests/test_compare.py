"""neurolens compare: layers matched across architectures, the caption audit of concepts, rows equal to each
model's own concept audit and to the random-weights audit of its architecture, cached second runs, the report
files (self-contained HTML whose every crop is the blur of the raw crop, JSON with provenance, formula-safe
CSV), one-line errors, --train-captions and SAE features with their baseline SAE."""
import base64
import csv
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from neurolens.cli import app
from neurolens.datasets.decode import preprocess
from neurolens.datasets.open import open_dataset
from neurolens.display.figures import crop_around_cell
from neurolens.errors import NeurolensError
from neurolens.labels.blur import blur_pixels
from neurolens.labels.concepts import parse_concept_set
from neurolens.labels.lexicon import caption_nsfw_matches
from neurolens.models.build import load_clip
from neurolens.models.match import match_layers
from neurolens.pipelines.settings import ConceptSettings
from neurolens.storage.cache import Cache

import compare_data
from compare_data import CONCEPTS, LOOSE
from sweep_data import LAYER, synthetic

KEYS = ("model", "layer", "model_layer", "concept", "basis", "units", "n_flagged", "share_flagged", "best_auc",
        "n_auc_095", "baseline_n_flagged", "baseline_share_flagged", "baseline_best_auc", "baseline_n_auc_095",
        "concept_prevalence", "train_prevalence", "model_based")


# ------------------------------------------------------------------------------------------- layer matching

def specs(*names):
    return [SimpleNamespace(name=name, order=i) for i, name in enumerate(names)]


def test_layers_match_by_name_else_by_the_nearest_relative_depth():
    from neurolens.models.match import depth_chain
    rn50x4 = depth_chain(specs("image_stem", *[f"image_block_{s}_{b}" for s, n in zip(range(1, 5), (4, 6, 10, 6))
                                               for b in range(n)], "image_block_4_5_relu", "image_embedding"))
    rn50 = depth_chain(specs(*[f"image_block_{s}_{b}" for s, n in zip(range(1, 5), (3, 4, 6, 3)) for b in range(n)]))
    vit = depth_chain(specs(*[f"image_resblock_{i}" for i in range(12)], "image_embedding"))
    assert len(rn50x4) == 26 and len(rn50) == 16 and len(vit) == 12
    names = [{n: n for n in chain} | {"image_embedding": "image_embedding"} for chain in (rn50x4, rn50, vit)]
    names[0]["image_block_4_5_Add_6_0"] = "image_block_4_5"
    found = match_layers("image_block_4_5_Add_6_0", [rn50x4, rn50, vit], names)
    assert [(m.layer, m.how) for m in found] == [("image_block_4_5", "name"), ("image_block_4_2", "depth"),
                                                 ("image_resblock_11", "depth")]
    middle = match_layers("image_block_3_9", [rn50x4, rn50, vit], names)
    assert [m.layer for m in middle] == ["image_block_3_9", "image_block_3_4", "image_resblock_8"]
    assert middle[1].depth == pytest.approx(11 / 15) and middle[1].target == pytest.approx(19 / 25)
    # the second model has it by name: the depth comes from the first that does, others match it
    assert [m.layer for m in match_layers("image_block_1_0", [vit, rn50], names[2:0:-1])] == \
        ["image_resblock_0", "image_block_1_0"]
    assert [m.how for m in match_layers("image_embedding", [rn50x4, vit], [names[0], names[2]])] == ["name", "name"]
    with pytest.raises(NeurolensError, match="no model of the comparison has a layer 'nope'"):
        match_layers("nope", [rn50, vit], names[1:])
    with pytest.raises(NeurolensError, match="not a block"):
        match_layers("image_embedding", [rn50x4, rn50], [names[0], {n: n for n in rn50}])


# ------------------------------------------------------------------------------------------- caption audit

def test_the_caption_audit_of_concepts_matches_captions_as_the_probe_labels_do(tmp_path):
    from neurolens.audit.captions import concept_prevalence
    rng = np.random.default_rng(0)
    words = ["sex", "Sexy", "sexual", "photo", "hot", "shot", "porn.", "pornography", "f*ck", "fück", "a.b", "car",
             "cars", "card", "x-ray", "(sex)", "\nsex", "é", "Éxxx", "xxx", "adults", "hotter", "50%", "a_b"]
    captions = [" ".join(rng.choice(words, size=rng.integers(0, 5))) for _ in range(800)] + [None]
    pq.write_table(pa.table({"TEXT": captions, "other": list(range(len(captions)))}), tmp_path / "c.parquet")
    lexicons = [("a", ["sex", "hot", "f*ck"], "word"), ("b", ["car", "porn", "a.b", "50%"], "exact"),
                ("c", ["xxx", "sex", "x-ray", "a_b"], "substring"), ("d", ["(sex)"], "word")]
    found = concept_prevalence([str(tmp_path / "c.parquet")], lexicons)
    assert [f.rows for f in found] == [801] * 4
    assert [f.n_match for f in found] == [int(caption_nsfw_matches(captions, t, m).sum()) for _, t, m in lexicons]
    assert all(0 < f.n_match < 801 for f in found)
    with open(tmp_path / "c.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["image", "caption"]] + [[f"{i}.png", c or ""] for i, c in enumerate(captions)])
    again = concept_prevalence([str(tmp_path / "c.csv")], lexicons[:1], text_column="caption")
    assert again[0].n_match == found[0].n_match
    with pytest.raises(NeurolensError, match="no caption column 'nope'"):
        concept_prevalence([str(tmp_path / "c.parquet")], lexicons, text_column="nope")


# ------------------------------------------------------------------------------------------- the pipeline

@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    return compare_data.write_probe(tmp_path_factory.mktemp("probe"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_clip):
    return compare_data.write_checkpoints(tmp_path_factory.mktemp("ckpt"), tiny_clip)


def concept_settings():
    return ConceptSettings(concepts=parse_concept_set({"concepts": CONCEPTS}, name="test"), rule=LOOSE, top_k=8)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, checkpoints, probe):
    from neurolens.pipelines.compare import CompareModel, CompareSettings, run_compare, write_report
    root = tmp_path_factory.mktemp("compare")
    models = [CompareModel("=alpha", checkpoint=checkpoints[0]), CompareModel("beta", checkpoint=checkpoints[1]),
              CompareModel("vit", model="nl-tiny-ViT", pretrained="none")]
    settings = CompareSettings(layers=(LAYER,), concepts=concept_settings(), worst=2, crops=3)
    result = run_compare(models, probe, settings, cache=root / "cache", device="cpu", workers=0)
    files = write_report(result, root / "out")
    return SimpleNamespace(result=result, files=files, root=root, models=models, settings=settings)


def test_rows_are_each_models_audit_beside_random_weights_of_its_architecture(compared, checkpoints, probe):
    from neurolens.pipelines.concepts import run_concepts
    result, cache = compared.result, Cache(compared.root / "cache")
    rows = result.rows()
    assert [tuple(row) for row in rows] == [KEYS] * 6
    assert [(r["model"], r["concept"]) for r in rows] == [(m, c) for m in ("=alpha", "beta", "vit")
                                                          for c in ("adult", "dogs")]
    assert {r["layer"] for r in rows} == {LAYER}
    vit_layer = rows[-1]["model_layer"]
    assert re.fullmatch(r"image_resblock_\d+", vit_layer) and rows[0]["model_layer"] == LAYER
    assert any("vit: image_block_4_0 is image_resblock" in note and "relative depth" in note for note in result.notes)
    settings = concept_settings()
    clips = [load_clip(checkpoint=path, device="cpu") for path in checkpoints] + [load_clip("nl-tiny-ViT", "none",
                                                                                            device="cpu")]
    randoms = {"nl-tiny-RN": load_clip("nl-tiny-RN", "none", device="cpu"), "nl-tiny-ViT": clips[2]}
    for m, clip in enumerate(clips):
        layer = rows[2 * m]["model_layer"]
        own = run_concepts(clip, layer, probe, settings, cache=cache)
        base = run_concepts(randoms[clip.name], layer, probe, settings, cache=cache)
        assert own.cached and base.cached                        # compare made exactly these audits
        for k, name in enumerate(("adult", "dogs")):
            row, scores, base_scores = rows[2 * m + k], own.concept(name), base.concept(name)
            assert row["units"] == len(scores.auc) and row["basis"] == "neurons"
            assert row["n_flagged"] == int(scores.flagged.sum()) and row["baseline_n_flagged"] == int(
                base_scores.flagged.sum())
            assert row["share_flagged"] == pytest.approx(row["n_flagged"] / row["units"])
            assert row["best_auc"] == pytest.approx(float(np.nanmax(scores.auc)))
            assert row["n_auc_095"] == int((scores.auc >= 0.95).sum())
            assert row["baseline_n_auc_095"] == int((base_scores.auc >= 0.95).sum())
            assert row["concept_prevalence"] == pytest.approx({"adult": 12 / 48, "dogs": 16 / 48}[name])
            assert row["train_prevalence"] is None and row["model_based"] is False
    assert sum(r["n_flagged"] for r in rows) > 0
    # the ViT model is its own random-weights model: its baseline is itself
    assert [r["n_flagged"] for r in rows[4:]] == [r["baseline_n_flagged"] for r in rows[4:]]


def test_a_second_run_reads_every_audit_from_the_cache(compared, probe):
    from neurolens.pipelines.compare import run_compare
    again = run_compare(compared.models, probe, compared.settings, cache=compared.root / "cache", device="cpu")
    assert all(item.audit.cached and item.baseline.cached for item in again.audits)
    assert again.rows() == compared.result.rows()


def test_report_json_csv_and_plot(compared, probe):
    files, rows = compared.files, compared.result.rows()
    document = json.loads(files.json.read_text())
    assert document["rows"] == json.loads(json.dumps(rows))
    assert document["neurolens"] and document["dataset"]["images"] == 48 and document["dataset"]["name"] == "data.csv"
    assert document["dataset"]["identity"] == open_dataset(probe).identity
    assert document["settings"]["concept_set"]["concepts"] == ["adult", "dogs"]
    fingerprints = [m["fingerprint"] for m in document["models"]]
    assert len(set(fingerprints)) == 3 and all(len(f) >= 16 for f in fingerprints)
    assert [m["checkpoint"] for m in document["models"]] == ["=alpha.pt", "beta.pt", None]
    assert {b["model"] for b in document["baselines"]} == {"nl-tiny-RN", "nl-tiny-ViT"}
    with open(files.csv, newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0] == list(KEYS) and len(table) == 7
    assert table[1][0] == "'=alpha"                                  # a formula-looking label is defused
    chart = Image.open(files.charts[LAYER])
    assert chart.size == (860, 380) and len(set(chart.convert("RGB").getdata())) > 5
    for path in (files.json, files.html):
        assert str(compared.root) not in path.read_text()               # no absolute local path


def raw_crop(scan, unit, rank, dataset):
    index = int(scan.top_indices[unit, rank - 1])
    return crop_around_cell(preprocess(dataset.load(index), scan.image_size), scan.top_cells[unit, rank - 1],
                            scan.grid, 96), index


def test_the_html_is_self_contained_and_every_crop_is_the_blur_of_the_raw_crop(compared, probe):
    html = compared.files.html.read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html
    sources = re.findall(r'src="([^"]*)"', html)
    assert sources and all(s.startswith(("data:image/jpeg;base64,", "data:image/png;base64,")) for s in sources)
    crops = re.findall(r'<img class="crop"[^>]*data-model="([^"]*)" data-layer="([^"]*)" data-basis="([^"]*)" '
                       r'data-unit="(\d+)" data-rank="(\d+)" data-index="(\d+)" src="data:image/jpeg;base64,([^"]*)"',
                       html)
    assert len(crops) == 3 * 2 * 2 * 3                       # models x concepts x worst units x crops
    dataset = open_dataset(probe)
    scans = {(a.model.label, a.match.layer): a.audit.scan for a in compared.result.audits}
    for model, layer, basis, unit, rank, index, body in crops:
        raw, expected_index = raw_crop(scans[(model, layer)], int(unit), int(rank), dataset)
        assert int(index) == expected_index and basis == "neurons"
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(body))).convert("RGB"), dtype=np.float64)
        top = shown.shape[0] - 16                               # above the label band of blur_with_label
        blurred = np.asarray(blur_pixels(raw), dtype=np.float64)
        assert np.abs(shown[:top] - blurred[:top]).mean() < 3.0
        assert np.abs(shown[:top] - np.asarray(raw, dtype=np.float64)[:top]).mean() > 3.0


# ------------------------------------------------------------------------------------------- the command

def test_the_command_prints_the_rows_puts_training_captions_beside_them_and_fails_in_one_line(
        compared, checkpoints, probe, tmp_path):
    concepts = tmp_path / "c.yaml"
    concepts.write_text(compare_data.CONCEPTS_YAML)
    captions = ["an adult photo", "a dog", "adult dog", "nothing", None, "dogs"]
    pq.write_table(pa.table({"caption": captions}), tmp_path / "train.parquet")
    common = ["compare", "--checkpoint", checkpoints[0], "--checkpoint", checkpoints[1], "--layer", LAYER,
              "--dataset", probe, "--concepts", str(concepts), "--max-q", "1", "--min-auc", "0.6", "--top-k", "8",
              "--cache", str(compared.root / "cache"), "--device", "cpu", "--workers", "0"]
    result = CliRunner().invoke(app, common + ["--out", str(tmp_path / "out"), "--json", "--label", "a", "--label",
                                               "b", "--train-captions", f"b={tmp_path / 'train.parquet'}"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [tuple(r) for r in rows] == [KEYS] * 4 and [r["model"] for r in rows] == ["a", "a", "b", "b"]
    assert [r["train_prevalence"] for r in rows] == [None, None, 2 / 6, 3 / 6]
    assert [r["n_flagged"] for r in rows] == [r["n_flagged"] for r in compared.result.rows()[:4]]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["rows"] == rows
    text = CliRunner().invoke(app, common + ["--out", str(tmp_path / "text")])
    assert text.exit_code == 0 and "report: " in text.stdout and "=alpha" in text.stdout
    for extra, message in (
            (["--label", "x", "--label", "x"], "error: two models are labelled 'x'; labels must be unique"),
            (["--label", "x"], "error: 1 --label for 2 models"),
            (["--train-captions", "nobody=x.parquet"], "error: --train-captions names no model 'nobody'"),
            (["--train-captions", "beta"], "error: --train-captions 'beta': give LABEL=PATH"),
            (["--sae", "a", "--sae", "b", "--sae", "c"], "error: 3 --sae for 2 models"),
            (["--model", "nl-tiny-RN", "--model", "nl-tiny-ViT", "--pretrained", "none", "--pretrained", "none",
              "--pretrained", "none"], "error: 2 --model but 3 --pretrained"),
            (["--layer", "image_embedding_nope"], "error: no model of the comparison has a layer "
                                                  "'image_embedding_nope'")):
        bad = CliRunner().invoke(app, common + ["--out", str(tmp_path / "bad")] + extra)
        assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1, bad.output
        assert bad.output.startswith(message), bad.output
    same = CliRunner().invoke(app, ["compare", "--checkpoint", checkpoints[0], "--checkpoint", checkpoints[0],
                                    "--layer", LAYER, "--dataset", probe, "--out", str(tmp_path / "bad")])
    assert same.exit_code == 2 and same.output.strip() == ("error: two models are labelled '=alpha'; labels must be "
                                                           "unique: give each model its own --label (in the order of "
                                                           "the models: --checkpoint ones first, then --model ones)")


# ------------------------------------------------------------------------------------------- SAE features

def test_sae_features_are_compared_beside_an_sae_trained_the_same_way_on_random_weights(compared, checkpoints,
                                                                                         probe, tmp_path):
    from neurolens.pipelines.compare import CompareModel, CompareSettings, run_compare
    from neurolens.pipelines.sae import run_sae_train
    from neurolens.sae.train import SaeTrainSettings
    cache = Cache(tmp_path / "cache")
    small = SaeTrainSettings(features="2x", k=4, epochs=1, batch_size=64, held_out=0.2)
    clip = load_clip(checkpoint=checkpoints[1], device="cpu")
    trained = run_sae_train(clip, LAYER, probe, small, name="mine", cache=cache, workers=0)
    models = [CompareModel("beta", checkpoint=checkpoints[1], sae="mine")]
    settings = CompareSettings(layers=(LAYER,), concepts=concept_settings(), worst=1, crops=1)
    result = run_compare(models, probe, settings, cache=cache, device="cpu", workers=0)
    rows = result.rows()
    assert {r["basis"] for r in rows} == {trained.basis} and rows[0]["units"] == trained.features
    baseline = result.audits[0].baseline
    assert baseline is not None and baseline.basis.startswith("sae-") and baseline.basis != trained.basis
    assert rows[0]["baseline_n_flagged"] == int(baseline.scores[0].flagged.sum())
    from neurolens.sae.registry import list_saes
    random = load_clip("nl-tiny-RN", "none", device="cpu")
    assert len(list_saes(random, LAYER, cache)) == 1                 # the baseline SAE, trained with `small`
    # an SAE trained on other images: no baseline, and the note says why
    other = tmp_path / "other"
    other.mkdir()
    for i in range(12):
        synthetic(900 + i).save(other / f"o{i}.png")
    run_sae_train(clip, LAYER, str(other), small, name="elsewhere", cache=cache, workers=0)
    elsewhere = run_compare([CompareModel("beta", checkpoint=checkpoints[1], sae="elsewhere")], probe, settings,
                            cache=cache, device="cpu", workers=0)
    assert elsewhere.audits[0].baseline is None
    assert all(r["baseline_n_flagged"] is None for r in elsewhere.rows())
    assert any("which is not the probe dataset; give that dataset with --sae-data" in n for n in elsewhere.notes)
    given = run_compare([CompareModel("beta", checkpoint=checkpoints[1], sae="elsewhere")], probe,
                        CompareSettings(layers=(LAYER,), concepts=concept_settings(), worst=1, crops=1,
                                        sae_data=str(other)), cache=cache, device="cpu", workers=0)
    assert given.audits[0].baseline is not None and not given.notes
