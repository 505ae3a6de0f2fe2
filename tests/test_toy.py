"""The toy CLIP: generator, training, zero-shot accuracy, the demo, and the planted-concept quality bar."""
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from neurolens.cli import app
from neurolens.models.build import load_clip
from neurolens.models.build import weights_fingerprint
from neurolens.pipelines.demo import STAGES, DemoReport, DemoSettings, Stage, _write_index
from neurolens.toy.generate import ToySettings, generate_pairs, write_dataset
from neurolens.toy.concepts import planted_words
from neurolens.toy.settings import TrainSettings
from neurolens.toy.train import train_clip, train_toy

WORDS = set(planted_words())


def _has_planted_word(text: str) -> bool:
    return bool(WORDS & set(re.findall(r"[a-z]+", text.lower())))


# ------------------------------------------------------------------------------------------- generator

def test_generator_is_deterministic_and_plants_the_exact_share():
    first = generate_pairs(200, planted_share=0.15, seed=3)
    again = generate_pairs(200, planted_share=0.15, seed=3)
    other = generate_pairs(200, planted_share=0.15, seed=4)
    assert np.array_equal(first.images, again.images) and first.captions == again.captions
    assert not np.array_equal(first.images, other.images)
    assert first.images.shape == (200, 64, 64, 3) and first.images.dtype == np.uint8
    assert first.planted.sum() == 30
    # planted captions carry lexicon words, ordinary ones never do
    assert all(_has_planted_word(c) for c, p in zip(first.captions, first.planted) if p)
    assert not any(_has_planted_word(c) for c, p in zip(first.captions, first.planted) if not p)
    # the planted pattern's magenta appears in planted images only
    magenta = (first.images[..., 0] > 200) & (first.images[..., 1] < 30) & (first.images[..., 2] > 150)
    assert np.all(magenta[first.planted].sum(axis=(1, 2)) > 100)
    assert np.all(magenta[~first.planted].sum(axis=(1, 2)) == 0)


def test_generator_share_zero_and_one_and_bad_share():
    from neurolens.errors import NeurolensError
    assert generate_pairs(20, planted_share=0.0).planted.sum() == 0
    assert generate_pairs(20, planted_share=1.0).planted.sum() == 20
    with pytest.raises(NeurolensError):
        generate_pairs(20, planted_share=1.5)


def test_written_dataset_is_read_by_open_dataset_and_reused(tmp_path):
    from neurolens.datasets.open import open_dataset
    settings = ToySettings(n=40, seed=1)
    parquet = write_dataset(tmp_path / "toy", settings)
    dataset = open_dataset(str(parquet))
    data = generate_pairs(40, seed=1)
    assert len(dataset) == 40 and dataset.captions == data.captions
    assert np.array_equal(np.asarray(dataset.load(7)), data.images[7])
    stamp = parquet.stat().st_mtime_ns
    assert write_dataset(tmp_path / "toy", settings) == parquet and parquet.stat().st_mtime_ns == stamp


# -------------------------------------------------------------------------------------------- training

def test_training_is_deterministic_for_a_seed():
    data = generate_pairs(64, seed=5)
    settings = TrainSettings(epochs=1, batch_size=16, seed=0)
    model_a, losses_a = train_clip(data.images, data.captions, settings, max_steps=3)
    model_b, losses_b = train_clip(data.images, data.captions, settings, max_steps=3)
    model_c, _ = train_clip(data.images, data.captions, TrainSettings(epochs=1, batch_size=16, seed=1), max_steps=3)
    assert losses_a == losses_b and len(losses_a) == 3
    assert weights_fingerprint(model_a) == weights_fingerprint(model_b)
    assert weights_fingerprint(model_a) != weights_fingerprint(model_c)


def test_train_toy_checkpoint_loads_without_model_and_skips_bad_files(tmp_path):
    parquet = write_dataset(tmp_path / "toy", ToySettings(n=48, seed=2))
    (tmp_path / "toy" / "images" / "000003.png").write_bytes(b"not a png")
    result = train_toy(str(parquet), tmp_path / "toy.pt", TrainSettings(epochs=1, batch_size=16))
    assert result.skipped == 1 and result.pairs == 47 and result.steps == 2
    clip = load_clip(checkpoint=str(tmp_path / "toy.pt"), device="cpu")
    assert clip.name == "nl-toy-RN" and clip.fingerprint == result.fingerprint and clip.image_size == 64


def test_train_toy_cli_on_a_csv_with_other_columns(tmp_path):
    data = generate_pairs(24, seed=9)
    rows = ["file,text"]
    for i, (pixels, caption) in enumerate(zip(data.images, data.captions)):
        Image.fromarray(pixels).resize((80, 96)).save(tmp_path / f"{i}.png")   # not square: resized + cropped
        rows.append(f"{i}.png,{caption}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    runner = CliRunner()
    result = runner.invoke(app, ["train-toy", "--dataset", str(tmp_path / "pairs.csv"), "--out",
                                 str(tmp_path / "m.pt"), "--image-column", "file", "--caption-column", "text",
                                 "--epochs", "1", "--batch-size", "12", "--json"])
    assert result.exit_code == 0, result.output
    import json
    summary = json.loads(result.stdout)
    assert summary["pairs"] == 24 and summary["steps"] == 2 and summary["zero_shot"] is None
    assert load_clip(checkpoint=summary["checkpoint"], device="cpu").fingerprint == summary["fingerprint"]
    bad = runner.invoke(app, ["train-toy", "--dataset", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "x.pt"),
                             "--image-column", "file"])
    assert bad.exit_code == 2 and "--caption-column" in bad.output and "Traceback" not in bad.output


# ------------------------------------------------------------------------------ the default toy model

@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The real demo (default settings): generates, trains the default toy model, runs every stage."""
    from neurolens.pipelines.demo import DemoSettings, run_demo
    root = tmp_path_factory.mktemp("demo")
    return run_demo(root / "out", DemoSettings(), cache=str(root / "cache"))


@pytest.mark.integration
def test_default_toy_model_zero_shot_accuracy_is_far_above_chance(demo):
    assert demo.stages["train"].status == "ok", demo.stages["train"].detail
    z = demo.zero_shot
    assert z["chance"] == pytest.approx(0.262, abs=0.001)
    assert z["accuracy"] >= 0.5             # mean of the five attribute accuracies (measured 0.633)
    assert z["planted_accuracy"] >= 0.95    # planted vs ordinary caption (chance 0.5)
    assert z["retrieval_at_1"] >= 20 * z["retrieval_chance"]
    clip = load_clip(checkpoint=demo.checkpoint, device="cpu")
    assert clip.name == "nl-toy-RN"


@pytest.mark.integration
def test_demo_runs_every_stage_and_writes_an_index(demo):
    assert demo.failed == [], {n: s.detail for n, s in demo.stages.items() if s.status != "ok"}
    index = demo.index.read_text()
    assert "zero-shot accuracy" in index and "## Flagged units" in index
    # the index reports the label sources, their agreement, and precision and recall against the truth
    assert "## Labels" in index and "captions:" in index and "agreement" in index
    assert "## Flags against the ground truth" in index and "precision **" in index and "recall **" in index
    for stage in ("visualize", "figure", "grid"):
        for path in demo.stages[stage].outputs:
            assert Image.open(path).size[0] > 0
    assert (demo.out / "sweep" / "flags.csv").is_file()
    assert (demo.out / "site" / "index.html").is_file()               # the static site of the layer
    # the command that opens the same cache (the checkpoint sits at <cache>/toy/models/<key>.pt)
    assert demo.serve_command == f"neurolens serve --cache {Path(demo.checkpoint).parents[2]}"


@pytest.mark.integration
def test_quality_bar_flags_against_the_generator_truth(demo):
    """On the demo's own data: flagged precision >= 0.95 (flagged units whose planted AUC, from the generator's
    labels, is >= 0.8) and recall >= 0.9 (of the units with planted AUC >= 0.95), with the truth recomputed
    here from the scan and the generator's `planted` column. Measured on this build machine on two trainings
    (seeds 0 and 1): 93 and 96 flagged, precision 1.000 and 0.990, recall 1.000 and 1.000."""
    import pyarrow.parquet as pq
    from scipy.stats import rankdata
    from neurolens.pipelines.scan import run_scan
    assert demo.stages["sweep"].status == "ok", demo.stages["sweep"].detail
    clip = load_clip(checkpoint=demo.checkpoint, device="cpu")
    scan = run_scan(clip, "image_block_4_0", demo.dataset, top_k=32, embeddings=True,
                    cache=str(Path(demo.dataset).parents[3]))
    assert scan.cached
    planted = np.asarray(pq.read_table(demo.dataset, columns=["planted"]).column("planted").to_pylist(), dtype=bool)
    ranks = rankdata(scan.per_image_max().astype(np.float64), axis=0)
    n1, n0 = planted.sum(), (~planted).sum()
    truth = (ranks[planted].sum(axis=0) - n1 * (n1 + 1) / 2) / (n1 * n0)
    flagged = np.zeros(scan.channels, dtype=bool)
    flagged[[r["unit"] for r in demo.flagged]] = True
    assert (truth >= 0.95).sum() >= 10
    precision, recall = (truth[flagged] >= 0.8).mean(), flagged[truth >= 0.95].mean()
    assert precision >= 0.95 and recall >= 0.9, (precision, recall, demo.labels)
    assert demo.quality["precision"] == pytest.approx(precision) and demo.quality["recall"] == pytest.approx(recall)


@pytest.mark.integration
def test_quality_bar_flagged_units_are_the_planted_concept(demo):
    """The flagged units' top images are mostly the planted pattern, their top texts hold planted words,
    planted images in their figures are blurred, and their feature visualizations score as NSFW."""
    assert demo.stages["sweep"].status == "ok", demo.stages["sweep"].detail
    flagged = demo.flagged
    assert flagged, "the sweep flagged no unit"
    # at most 10% of flagged units have no planted image among their top images (measured 0 on two trainings)
    assert demo.flagged_without_planted <= 0.10
    # flagged units ranked by AUC: the top ones see nothing but the planted pattern, the tail (AUC near the
    # 0.8 bar) mixes it with other images. Measured on two trainings (93 and 96 flagged of 512): 10 of the
    # top 10 have 100% planted top images; 75% and 81% of all flagged units have >= 50%
    assert sum(r["planted_top_share"] >= 0.8 for r in flagged[:10]) >= 8
    mostly_planted = [r for r in flagged if r["planted_top_share"] >= 0.5]
    assert len(mostly_planted) >= 0.5 * len(flagged)
    # top texts (the dataset's captions as vocabulary) hold planted words for most flagged units; a few
    # units have a zero direction in the embedding space (all cosines 0), whose text ranking is arbitrary
    with_words = [r for r in flagged if r["texts_with_planted_words"] >= 1]
    assert len(with_words) >= 0.5 * len(flagged)      # measured 80% and 78%
    assert max(flagged[:5], key=lambda r: r["texts_with_planted_words"])["texts_with_planted_words"] >= 3
    assert demo.figures and all(f["planted"] > 0 and f["planted_blurred"] == f["planted"] for f in demo.figures)
    flagged_units = {r["unit"] for r in flagged}
    visualized = {u: max(s) for u, s in demo.fv_nsfw_scores.items() if u in flagged_units}
    high = [u for u, score in visualized.items() if score >= 0.5]     # the zero-shot NSFW threshold
    assert len(visualized) >= 3 and len(high) >= len(visualized) / 2, visualized


@pytest.mark.integration
def test_demo_reuses_the_cached_model_and_reports_a_failing_stage(demo, tmp_path):
    """A second run with the same settings reuses data and checkpoint; a stage that fails is recorded with
    its reason, the stages after it are not run, and index.md lists them (nothing skipped silently)."""
    from pathlib import Path
    from neurolens.pipelines.demo import DemoSettings, run_demo
    cache_root = Path(demo.dataset).parents[3]
    report = run_demo(tmp_path / "out", DemoSettings(layer="image_block_9_9"), cache=str(cache_root))
    assert report.trained is False and report.checkpoint == demo.checkpoint
    assert report.stages["scan"].status == "failed" and "image_block_9_9" in report.stages["scan"].detail
    assert report.stages["sweep"].status == "not run" and "needs" in report.stages["sweep"].detail
    assert report.failed == ["scan", "text", "sweep", "visualize", "figure", "grid", "maps", "site"]
    index = report.index.read_text()
    assert "## Not done" in index and "**scan**: failed" in index


def test_demo_index_says_how_many_flagged_units_its_table_leaves_out(tmp_path):
    """62 flagged units: the table lists 30 and says that the rest are in flags.csv (linked); 12: all, no note."""
    def write(count):
        report = DemoReport(out=tmp_path, stages={name: Stage(name, status="ok") for name in STAGES})
        report.stages["sweep"].outputs.append(str(tmp_path / "sweep" / "flags.csv"))
        report.flagged = [dict(unit=u, auc=0.9, q=1e-3, planted_auc=0.95, planted_top_share=0.5, top_texts=["a", "b"])
                          for u in range(count)]
        report.flagged_without_planted = 0.0
        _write_index(report, DemoSettings(), report.stages["index"])
        return (tmp_path / "index.md").read_text()

    index = write(62)
    assert sum(line.startswith("| ") and line[2].isdigit() for line in index.splitlines()) == 30
    assert "Showing 30 of 62 flagged units; all in [sweep/flags.csv](sweep/flags.csv)." in index
    index = write(12)
    assert sum(line.startswith("| ") and line[2].isdigit() for line in index.splitlines()) == 12
    assert "Showing" not in index
