"""The one blur policy (neurolens.labels.policy): every branch, the NudeNet plumbing, the _noblur naming, and
the visualize command's blur path. No explicit imagery: the detector is replaced by a stand-in that fires on
synthetic images where a test says (conftest.FakeNudeDetector), and zero-shot scores are injected."""
import dataclasses
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from neurolens.labels import blur, zero_shot as safety
from neurolens.labels import nudenet
from neurolens.labels.policy import BlurPolicy
from neurolens.pipelines import visualize as job
from neurolens.storage.cache import Cache
from neurolens.types import RenderSettings

LAYER = "image_block_4_0"
RENDER = RenderSettings(steps=3, seeds=(0, 1))
RED = Image.new("RGB", (64, 48), (230, 20, 20))
BLUE = Image.new("RGB", (64, 48), (20, 20, 230))


def _reddish(rgb):
    return float(rgb[..., 0].mean()) > 128


def _is_blurred(original: Image.Image, written: Image.Image) -> bool:
    """Below the recognizability bounds that tests/test_blur.py measures (label band excluded)."""
    keep = (0, 0, written.width, written.height - blur.label_band_height(written.height))
    return (blur.detail_retained(original.crop(keep), written.crop(keep)) < 0.05
            and blur.edge_correlation(original.crop(keep), written.crop(keep)) < 0.6)


def _trained(clip):
    """The tiny model as if it were trained (a checkpoint): the policy then trusts its zero-shot score."""
    return dataclasses.replace(clip, pretrained="checkpoint:trained.pt")


# --------------------------------------------------------------------------------------------- NudeNet

def test_a_nudenet_detection_reaches_the_score_and_the_blur(fake_detector):
    fake = fake_detector(_reddish)
    found = nudenet.detections(RED)
    assert found == [{"label": "FEMALE_BREAST_EXPOSED", "score": 0.93, "box": (1, 2, 8, 9)}]   # covered face dropped
    assert fake.seen[-1].shape == (48, 64, 3) and fake.seen[-1][0, 0].tolist() == [20, 20, 230]  # BGR, as NudeNet reads
    assert nudenet.detections(BLUE) == []
    assert nudenet.image_scores([RED, BLUE]).tolist() == pytest.approx([0.93, 0.0])
    policy = BlurPolicy()
    assert policy.detector_score(RED) == pytest.approx(0.93)
    assert policy.reason_fv(3, RED) == "NudeNet 0.93" and policy.reason_image(3, 0, RED) == "NudeNet 0.93"
    assert policy.reason_fv(3, BLUE) is None and policy.reason_image(3, 0, BLUE) is None  # judged: nothing found
    shown, reason = policy.fv(3, RED)
    assert reason == "NudeNet 0.93" and _is_blurred(RED, shown)
    # a weak detection does not fire (NudeNet's fire threshold is 0.4)
    fake_detector(_reddish, score=0.3)
    assert BlurPolicy().reason_fv(3, RED) is None


@pytest.mark.skipif(not nudenet.available(), reason="NudeNet extra not installed (optional)")
def test_the_real_nudenet_runs_offline_and_finds_nothing_in_a_gradient():
    gradient = np.linspace(0, 255, 320 * 320 * 3).reshape(320, 320, 3).astype(np.uint8)
    assert nudenet.detections(Image.fromarray(gradient)) == []
    assert nudenet.image_scores([Image.fromarray(gradient)]).tolist() == [0.0]


# ------------------------------------------------------------------------------------------ zero-shot

def _inject_zero_shot(monkeypatch, calls):
    def scores(clip, images, prompts=None, *args, **kwargs):
        calls.append(len(images))
        return np.array([0.9 if _reddish(np.asarray(im)) else 0.1 for im in images], np.float32)
    monkeypatch.setattr(safety, "nsfw_scores_for_images", scores)


def test_a_trained_models_zero_shot_score_blurs_and_is_kept_in_the_cache(tiny_clip, tmp_path, monkeypatch,
                                                                         no_detector):
    calls = []
    _inject_zero_shot(monkeypatch, calls)
    cache = Cache(tmp_path)
    policy = BlurPolicy(clip=_trained(tiny_clip), cache=cache)
    assert policy.reason_fv(5, RED) == "NSFW score 0.90" and policy.reason_fv(5, BLUE) is None
    assert policy.reason_image(5, 7, RED) == "NSFW score 0.90" and policy.reason_image(5, 7, BLUE) is None
    assert calls == [1, 1]                                  # once per image, then from memory
    again = BlurPolicy(clip=_trained(tiny_clip), cache=cache)
    assert again.zero_shot_score(RED) == pytest.approx(0.9) and calls == [1, 1]   # from the cache: no forward


def test_a_random_models_zero_shot_score_is_never_used(tiny_clip, monkeypatch, no_detector):
    def fail(*args, **kwargs):
        raise AssertionError("a random-weights model's zero-shot score was computed")
    monkeypatch.setattr(safety, "nsfw_scores_for_images", fail)
    policy = BlurPolicy(clip=tiny_clip)
    assert tiny_clip.pretrained == "none" and policy.zero_shot_score(RED) is None
    assert policy.reason_fv(5, RED) is None                 # no judge for a feature visualization: shown
    assert policy.reason_image(5, 7, RED) == "not judged"   # an image nothing vouched for: blurred
    assert BlurPolicy(clip=tiny_clip, zero_shot=True).zero_shot_score(RED) is None


# ---------------------------------------------------------------------------------- labels and flags

def test_flagged_units_and_labels(tiny_clip, no_detector):
    labels = np.array([0.8, 0.1, np.nan])
    policy = BlurPolicy(clip=tiny_clip, flagged=[4], image_labels=labels)
    assert policy.reason_fv(4, BLUE) == "flagged unit" and policy.reason_image(4, 1, BLUE) == "flagged unit"
    assert policy.reason_image(5, 0, BLUE) == "NSFW label 0.80"
    assert policy.reason_image(5, 1, BLUE) is None          # labelled negative
    assert policy.reason_image(5, 2, BLUE) == "not judged"  # no label, no detector, random weights
    assert policy.reason_image(5, 9, BLUE) == "not judged"  # outside the labels
    assert policy.reason_image(5, None, BLUE, bundled=True) is None   # neurolens's own sample images


def test_an_unlabelled_image_is_judged_by_the_detector(tiny_clip, fake_detector):
    fake_detector(_reddish)
    policy = BlurPolicy(clip=tiny_clip, image_labels=np.array([np.nan]))
    assert policy.reason_image(5, 0, BLUE) is None and policy.reason_image(5, 0, RED) == "NudeNet 0.93"


def test_raw_pixels_only_on_request_and_noblur_names(tiny_clip, fake_detector, tmp_path):
    fake_detector(lambda rgb: True)
    raw = BlurPolicy(blur=False, clip=tiny_clip, flagged=[4])
    assert raw.reason_fv(4, RED) is None and raw.reason_image(4, 0, RED) is None
    assert raw.output_path(tmp_path / "a.png") == tmp_path / "a_noblur.png"
    assert raw.output_path(tmp_path / "a_noblur.png") == tmp_path / "a_noblur.png"
    assert BlurPolicy().output_path(tmp_path / "a.png") == tmp_path / "a.png"
    assert BlurPolicy(blur_all=True, detector=False).reason_fv(1, BLUE) == "hidden until revealed"


# ------------------------------------------------------------------------------------ visualize (API)

def test_run_visualize_writes_blurred_pngs_by_default_and_raw_ones_beside_them(tiny_clip, tmp_path, fake_detector):
    fake_detector(lambda rgb: True)
    cache = Cache(tmp_path / "cache")
    [result] = job.run_visualize(tiny_clip, LAYER, [3], RENDER, cache=cache, out_dir=tmp_path / "png")
    assert result.blurred == ("NudeNet 0.93", "NudeNet 0.93")
    blurred_bytes = {}
    for path, image in zip(result.paths, result.images):
        assert not path.endswith("_noblur.png")
        assert _is_blurred(Image.fromarray(image), Image.open(path).convert("RGB"))
        blurred_bytes[path] = open(path, "rb").read()
    [raw] = job.run_visualize(tiny_clip, LAYER, [3], RENDER, cache=cache, out_dir=tmp_path / "png", blur=False)
    assert raw.blurred == (None, None) and all(p.endswith("_noblur.png") for p in raw.paths)
    for path, image in zip(raw.paths, raw.images):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), image)
    for path, content in blurred_bytes.items():                # the blurred files are untouched
        assert open(path, "rb").read() == content
    assert len(list((tmp_path / "png").iterdir())) == 4


def test_run_visualize_shows_a_visualization_nothing_objects_to(tiny_clip, tmp_path, fake_detector):
    fake_detector(lambda rgb: False)
    [result] = job.run_visualize(tiny_clip, LAYER, [3], RENDER, cache=Cache(tmp_path / "c"), out_dir=tmp_path)
    assert result.blurred == (None, None) and len(result.paths) == 2
    for path, image in zip(result.paths, result.images):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), image)


# ------------------------------------------------------------------------------------ visualize (CLI)

def test_visualize_command_blur_path(tmp_path, fake_detector):
    from neurolens.cli import app
    fake = fake_detector(lambda rgb: True)
    runner = CliRunner()
    args = ["visualize", "--model", "nl-tiny-RN", "--pretrained", "none", "--device", "cpu", "--layer", LAYER,
            "--unit", "3", "--steps", "3", "--seed", "0", "--out", str(tmp_path / "png"),
            "--cache", str(tmp_path / "cache")]
    blurred = runner.invoke(app, args + ["--json"])
    assert blurred.exit_code == 0, blurred.output
    [row] = json.loads(blurred.stdout)["results"]
    assert row["blurred"] == "NudeNet 0.93" and not row["path"].endswith("_noblur.png") and fake.seen
    cache = Cache(tmp_path / "cache")
    [record_path] = list(cache.records("visualize"))
    original = Image.fromarray(cache.read(record_path).arrays["images"][0])
    written = Image.open(row["path"]).convert("RGB")
    assert _is_blurred(original, written)
    blurred_bytes = open(row["path"], "rb").read()

    text = runner.invoke(app, args)
    assert text.exit_code == 0 and "(blurred: NudeNet 0.93)" in text.stdout

    raw = runner.invoke(app, args + ["--no-blur", "--json"])
    assert raw.exit_code == 0, raw.output
    assert "RAW pixels" in raw.stderr
    [raw_row] = json.loads(raw.stdout)["results"]
    assert raw_row["blurred"] is None and raw_row["path"].endswith("_noblur.png")
    assert np.array_equal(np.asarray(Image.open(raw_row["path"]).convert("RGB")), np.asarray(original))
    assert open(row["path"], "rb").read() == blurred_bytes
