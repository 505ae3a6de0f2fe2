"""The safety blur makes images unrecognizable (measured against the original) and leaves others untouched."""
import numpy as np
import pytest
from PIL import Image, ImageDraw

from neurolens.labels import blur
from neurolens.datasets.builtin import builtin_samples


def _synthetic_patterns(size):
    rng = np.random.default_rng(1)
    checker = (np.indices((size, size)).sum(0) // max(1, size // 8) % 2 * 255).astype(np.uint8)
    shapes = Image.new("RGB", (size, size), (240, 240, 240))
    draw = ImageDraw.Draw(shapes)
    draw.ellipse([size * 0.2, size * 0.1, size * 0.6, size * 0.5], fill=(200, 60, 60))
    draw.rectangle([size * 0.5, size * 0.5, size * 0.9, size * 0.95], fill=(30, 30, 160))
    draw.line([0, size - 1, size - 1, 0], fill=(0, 0, 0), width=max(1, size // 20))
    draw.text((4, 4), "TEXT", fill=(0, 0, 0))
    return [Image.fromarray(np.stack([checker] * 3, -1)), shapes,
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 255, (size, size // 2, 3), dtype=np.uint8))]


def _images():
    for size in (48, 96, 224):
        for _, image, _ in builtin_samples():
            yield image.resize((size, size))
        yield from _synthetic_patterns(size)


@pytest.mark.parametrize("labelled", [False, True])
def test_every_blurred_image_is_below_the_recognizability_bounds(labelled):
    worst_detail, worst_edges = 0.0, -1.0
    for original in _images():
        blurred = blur.blur_with_label(original, "flagged unit") if labelled else blur.blur_pixels(original)
        assert blurred.size == original.size and blurred.mode == "RGB"
        keep = original.height - (blur.label_band_height(original.height) if labelled else 0)
        top = (0, 0, original.width, keep)
        worst_detail = max(worst_detail, blur.detail_retained(original.crop(top), blurred.crop(top)))
        worst_edges = max(worst_edges, blur.edge_correlation(original.crop(top), blurred.crop(top)))
    # the bounds (measured worst cases: detail 0.033, edges 0.51; see neurolens/blur.py)
    assert worst_detail < 0.05, worst_detail
    assert worst_edges < 0.6, worst_edges


def test_the_label_is_drawn_on_the_pixels():
    original = Image.new("RGB", (96, 96), (128, 128, 128))
    labelled = np.asarray(blur.blur_with_label(original, "NSFW score 0.91"))
    band = labelled[-blur.label_band_height(96):]
    assert (band == 0).any() and (band > 200).any()     # black band with white text
    assert np.abs(labelled[:40].astype(int) - 128).max() <= 1


def test_unflagged_images_are_returned_unchanged():
    original = _synthetic_patterns(64)[1]
    same = blur.maybe_blur(original, None)
    assert same is original
    assert np.array_equal(np.asarray(same), np.asarray(_synthetic_patterns(64)[1]))
    assert not np.array_equal(np.asarray(blur.maybe_blur(original, "x")), np.asarray(original))


def test_measures_are_sane_on_identical_images():
    image = _synthetic_patterns(64)[1]
    assert blur.detail_retained(image, image) == pytest.approx(1.0)
    assert blur.edge_correlation(image, image) == pytest.approx(1.0)
