"""similarity equals a direct open_clip computation; the matrix figure shows values, threshold and blur."""
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from neurolens.datasets.builtin import BUILTIN_DESCRIPTIONS, builtin_image
from neurolens.cli import app
from neurolens.audit.similarity import (LabeledImage, builtin_pairs, cosine_matrix, image_text_similarity,
                                        pair_scores, similarity_matrix)

TINY = ["--model", "nl-tiny-RN", "--pretrained", "none", "--device", "cpu"]
TEXTS = ["This is a portrait of an astronaut with the American flag",
         "This is a photograph of a smiling housewife in an orange jumpsuit with the American flag"]


def _direct_cosines(clip, images, texts):
    """What a user of open_clip would write: the factory's eval transform, encode, normalize, dot."""
    _, _, preprocess = open_clip.create_model_and_transforms("nl-tiny-RN", pretrained=None)
    tokenizer = open_clip.get_tokenizer("nl-tiny-RN")
    with torch.no_grad():
        img = clip.model.encode_image(torch.stack([preprocess(im) for im in images]))
        txt = clip.model.encode_text(tokenizer(texts))
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img @ txt.T).numpy()


def test_cli_json_equals_direct_open_clip(tiny_clip, tmp_path):
    photo = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 80, 3), dtype=np.uint8)).save(photo)
    result = CliRunner().invoke(app, ["similarity", "--image", "sample:astronaut", "--image", str(photo),
                                      "--text", TEXTS[0], "--text", TEXTS[1], "--threshold", "0.0", "--json", *TINY])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    expected = _direct_cosines(tiny_clip, [builtin_image("astronaut"), Image.open(photo).convert("RGB")], TEXTS)
    assert [(r["image"], r["text"]) for r in rows] == [(i, t) for i in ("sample:astronaut", str(photo)) for t in TEXTS]
    got = np.array([r["cosine"] for r in rows]).reshape(2, 2)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [r["passes"] for r in rows] == [bool(c >= 0.0) for c in expected.ravel()]
    assert all(set(r) == {"image", "text", "cosine", "passes"} for r in rows)


def test_api_and_threshold_rule(tiny_clip):
    scores = image_text_similarity(tiny_clip, ["sample:coffee"], TEXTS, threshold=0.3)
    direct = _direct_cosines(tiny_clip, [builtin_image("coffee")], TEXTS)[0]
    assert [s.cosine for s in scores] == pytest.approx(direct.tolist(), abs=1e-5)
    # passes is cosine >= threshold, inclusive at the threshold itself.
    at = pair_scores(["x"], ["a", "b"], np.array([[0.3, 0.2999]], np.float32), threshold=np.float32(0.3))
    assert [s.passes for s in at] == [True, False]


def test_text_output_and_bad_input(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["similarity", "--image", "sample:astronaut", "--text", TEXTS[0], *TINY])
    assert ok.exit_code == 0 and "sample:astronaut" in ok.stdout and ("PASS" in ok.stdout or "fail" in ok.stdout)
    stray = runner.invoke(app, ["similarity", "--images", str(tmp_path), "--text", "x", *TINY])
    assert stray.exit_code == 2 and "--matrix" in stray.output
    no_text = runner.invoke(app, ["similarity", "--image", "sample:astronaut", *TINY])
    assert no_text.exit_code == 2 and "--text" in no_text.output
    missing = runner.invoke(app, ["similarity", "--image", str(tmp_path / "none.jpg"), "--text", "x", *TINY])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    unknown = runner.invoke(app, ["similarity", "--image", "sample:unicorn", "--text", "x", *TINY])
    assert unknown.exit_code == 2 and "unknown built-in image" in unknown.output
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    junk = runner.invoke(app, ["similarity", "--image", str(tmp_path / "junk.jpg"), "--text", "x", *TINY])
    assert junk.exit_code == 2 and "not a readable image" in junk.output and "Traceback" not in junk.output


def test_builtin_matrix_figure(tiny_clip, tmp_path):
    out = tmp_path / "figs" / "similarity.png"
    result = CliRunner().invoke(app, ["similarity", "--matrix", "--out", str(out), "--threshold", "-1", "--json", *TINY])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    n = len(BUILTIN_DESCRIPTIONS)
    assert len(rows) == n * n and all(r["passes"] for r in rows)  # threshold -1: every pair passes
    images, captions = builtin_pairs()
    assert captions[0] == "This is " + BUILTIN_DESCRIPTIONS["astronaut"]
    direct = _direct_cosines(tiny_clip, [im.image for im in images], captions)
    np.testing.assert_allclose(np.array([r["cosine"] for r in rows]).reshape(n, n), direct, atol=1e-5)
    figure = Image.open(out)
    assert figure.width > n * 60 and figure.height > n * 60


def _thumb_region(result, index, cell=72):
    """Pixels of thumbnail `index`: the thumbnails are the only non-white pixels of the band below the title."""
    band = np.asarray(result.figure)[44 + 2:44 + 42].astype(int)
    first = np.where((band != 255).any(axis=(0, 2)))[0][0]
    left = first + index * cell
    return band[:, left:left + cell - 4]


def test_user_images_are_shown_as_the_blur_policy_says(tiny_clip, tmp_path, fake_detector, monkeypatch):
    rng = np.random.default_rng(1)
    noisy = Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))
    images = [LabeledImage("mine.png", noisy, False), LabeledImage("sample:coffee", builtin_image("coffee"), True)]
    captions = ["noise", "This is a cup of coffee on a saucer"]
    fake_detector(lambda rgb: True)                     # the detector fires on everything: user images blurred
    blurred = similarity_matrix(tiny_clip, images, captions, threshold=0.3)
    clear = similarity_matrix(tiny_clip, images, captions, threshold=0.3, blur_user_images=False)
    assert blurred.blur_reasons == ["NudeNet 0.93", None] and clear.blurred == [False, False]
    np.testing.assert_allclose(blurred.cosines, cosine_matrix(tiny_clip, [noisy, builtin_image("coffee")], captions))
    # Blurring removes the noise's pixel-to-pixel variation; the built-in thumbnail is identical in both.
    rough = lambda a: np.abs(np.diff(a, axis=1)).mean()  # noqa: E731  (rows above the blur label)
    assert rough(_thumb_region(blurred, 0)) < 0.2 * rough(_thumb_region(clear, 0))
    np.testing.assert_array_equal(_thumb_region(blurred, 1), _thumb_region(clear, 1))
    # the detector judged the image and found nothing: shown as it is
    fake_detector(lambda rgb: False)
    assert similarity_matrix(tiny_clip, images, captions).blur_reasons == [None, None]
    # nothing can judge it (no detector, random weights): blurred as not judged
    from neurolens.labels import nudenet
    monkeypatch.setattr(nudenet, "available", lambda: False)
    assert similarity_matrix(tiny_clip, images, captions).blur_reasons == ["not judged", None]


def test_matrix_from_a_folder(tmp_path, no_detector):
    folder = tmp_path / "imgs"
    folder.mkdir()
    builtin_image("astronaut").resize((80, 80)).save(folder / "a.png")
    builtin_image("rocket").resize((80, 80)).save(folder / "b.png")
    (folder / "c.png").write_bytes(b"broken")
    (folder / "a.txt").write_text("an astronaut")
    runner = CliRunner()
    out = tmp_path / "m.png"
    no_caps = runner.invoke(app, ["similarity", "--matrix", "--images", str(folder), "--out", str(out), *TINY])
    assert no_caps.exit_code == 2 and "b.png" in no_caps.output and "--captions" in no_caps.output
    (folder / "b.txt").write_text("a rocket")
    paired = runner.invoke(app, ["similarity", "--matrix", "--images", str(folder), "--out", str(out), "--json", *TINY])
    assert paired.exit_code == 0, paired.output
    rows = json.loads(paired.stdout)
    assert [r["text"] for r in rows] == ["an astronaut", "a rocket"] * 2
    assert "skipped unreadable image" in paired.output and "blurred" in paired.output and out.is_file()
    caps = tmp_path / "caps.txt"
    caps.write_text("one\n\ntwo\nthree\n")
    listed = runner.invoke(app, ["similarity", "--matrix", "--images", str(folder), "--captions", str(caps),
                                 "--no-blur", "--out", str(out), "--json", *TINY])
    assert listed.exit_code == 0 and len(json.loads(listed.stdout)) == 6 and "blurred" not in listed.output
    assert (tmp_path / "m_noblur.png").is_file()          # raw pixels never replace the blurred figure


def test_image_files_go_through_the_dataset_decoder(tmp_path):
    from neurolens.audit.similarity import load_image_folder, load_image_ref
    from neurolens.errors import NeurolensError
    from scan_data import bomb_png
    rgba = Image.new("RGBA", (6, 4), (10, 200, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))            # fully transparent black: composited on white
    rgba.putpixel((1, 0), (0, 0, 0, 128))          # half transparent black: mid grey
    rgba.save(tmp_path / "a_transparent.png")
    (tmp_path / "b_bomb.png").write_bytes(bomb_png(12000, 12000))   # 144 MP header, a few bytes of data
    (tmp_path / "c_junk.jpg").write_bytes(b"not an image")
    ref = load_image_ref(str(tmp_path / "a_transparent.png"))
    pixels = np.asarray(ref.image)
    assert ref.image.mode == "RGB"
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    assert all(120 <= v <= 135 for v in pixels[0, 1])
    assert tuple(pixels[2, 3]) == (10, 200, 30)
    with pytest.raises(NeurolensError, match="decompression bomb"):
        load_image_ref(str(tmp_path / "b_bomb.png"))
    images, captions, bad = load_image_folder(str(tmp_path))
    assert [Path(i.label).name for i in images] == ["a_transparent.png"]
    assert np.array_equal(np.asarray(images[0].image), pixels)
    reasons = {Path(b.split(" (")[0]).name: b for b in bad}
    assert set(reasons) == {"b_bomb.png", "c_junk.jpg"}
    assert "decompression bomb" in reasons["b_bomb.png"] and "not an image" in reasons["c_junk.jpg"]


def test_cli_says_why_an_image_is_refused_and_skips_bad_folder_images(tmp_path):
    from scan_data import bomb_png
    (tmp_path / "bomb.png").write_bytes(bomb_png(12000, 12000))
    runner = CliRunner()
    refused = runner.invoke(app, ["similarity", "--image", str(tmp_path / "bomb.png"), "--text", "x", *TINY])
    assert refused.exit_code == 2 and "decompression bomb" in refused.output and "Traceback" not in refused.output
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(bomb_png(12000, 12000))
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(folder / "clear.png")
    (folder / "clear.txt").write_text("a white square")
    out = tmp_path / "matrix.png"
    result = runner.invoke(app, ["similarity", "--matrix", "--images", str(folder), "--out", str(out),
                                 "--json", *TINY])
    assert result.exit_code == 0, result.output
    assert "skipped unreadable image" in result.stderr and "bomb.png" in result.stderr
    assert "decompression bomb" in result.stderr
    assert [row["image"] for row in json.loads(result.stdout)] == [str(folder / "clear.png")]
