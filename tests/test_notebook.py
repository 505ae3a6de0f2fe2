"""Notebook display: views blur what the blur policy blurs, embed images as data URIs, and .reveal() makes a NEW
object with raw pixels; neurolens.open's handle answers a cached unit without loading the model."""
import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

import neurolens
from neurolens.display.notebook import Gallery, Picture
from neurolens.labels.blur import DETAIL_BOUND, detail_retained, label_band_height, maybe_blur
from neurolens.pipelines.model import LazyClip
from neurolens.pipelines.settings import LabelSettings, SweepSettings
from neurolens.scoring.flags import FlagRule
from neurolens.types import RenderSettings

import sweep_data

DATA_URI = re.compile(r"data:image/png;base64,([A-Za-z0-9+/=]+)")


def _images(html):
    return [Image.open(io.BytesIO(base64.b64decode(found))).convert("RGB") for found in DATA_URI.findall(html)]


def _same(a, b):
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def _detail(raw, shown):
    """Fine detail kept, measured above the blur label's band (as tests/test_blur.py measures it)."""
    band = label_band_height(raw.height)
    box = (0, 0, raw.width, raw.height - band)
    return detail_retained(raw.crop(box), shown.crop(box))


def test_every_public_name_resolves():
    for name in neurolens.__all__:
        assert getattr(neurolens, name) is not None, name
    assert neurolens.open.__name__ == "open_handle"


def test_a_gallery_shows_blurred_pixels_until_revealed():
    raws = [sweep_data.synthetic(seed, size=96) for seed in range(3)]
    pictures = tuple(Picture.of(raw, reason, f"#{i}") for i, (raw, reason) in
                     enumerate(zip(raws, ["flagged unit", None, "NSFW label 1.00"])))
    gallery = Gallery("crops", pictures, width=96)
    shown = _images(gallery._repr_html_())
    assert len(shown) == 3
    assert _same(shown[0], maybe_blur(raws[0], "flagged unit")) and _detail(raws[0], shown[0]) < DETAIL_BOUND
    assert _same(shown[1], raws[1])                         # no reason: shown as it is
    assert _same(shown[2], maybe_blur(raws[2], "NSFW label 1.00"))
    png = Image.open(io.BytesIO(gallery._repr_png_())).convert("RGB")
    assert not any(_same(png.crop((4, 26, 100, 122)), raw) for raw in raws[::2])   # the PNG form is blurred too

    revealed = gallery.reveal()
    assert revealed is not gallery and revealed.revealed and not gallery.revealed
    assert all(_same(a, b) for a, b in zip(_images(revealed._repr_html_()), raws))
    assert "RAW PIXELS" in revealed._repr_html_() and "RAW PIXELS" not in gallery._repr_html_()
    assert _same(_images(gallery._repr_html_())[0], shown[0])      # the original still blurred


@pytest.fixture()
def toy_cache(tmp_path, tiny_clip, no_detector):
    """A tiny model's layer swept with a loose rule (AUC >= 0.5 flags), so that some units are flagged."""
    data = tmp_path / "data"
    data.mkdir()
    table = sweep_data.write_table(data)
    vocab = sweep_data.write_vocab(tmp_path / "vocab.txt")
    settings = SweepSettings(vocab=vocab, top_k=4, text_top_k=5, rule=FlagRule(max_q=1.0, min_auc=0.5),
                             labels=LabelSettings(sources=("captions",)))
    options = dict(model="nl-tiny-RN", pretrained="none", layer="image_block_4_0", dataset=table, sweep=settings,
                   render=RenderSettings(steps=2, size=64), examples=4, device="cpu", progress=False)
    return tmp_path / "cache", options


def test_a_handle_blurs_a_flagged_unit_and_answers_again_from_the_cache(toy_cache):
    cache, options = toy_cache
    handle = neurolens.open(cache, **options)
    layer = handle.layer()                     # sweeps now (nothing cached yet)
    flags = handle.sweep().scores.flagged
    flagged, unflagged = handle.sweep().flagged_units[0], int(np.flatnonzero(~flags)[0])   # the top flagged unit
    assert "<table" in layer._repr_html_() and f">{flagged}<" in layer._repr_html_()

    dashboard = handle.unit(flagged)
    assert dashboard.flagged is True
    pictures = dashboard.visualizations.pictures + dashboard.samples.pictures
    assert {p.reason for p in pictures} == {"flagged unit"}
    html = dashboard._repr_html_()
    shown = _images(html)
    assert len(shown) == len(pictures) > 0
    for picture, image in zip(pictures, shown):
        assert _same(image, maybe_blur(picture.raw, "flagged unit"))
        assert _detail(picture.raw, image) < DETAIL_BOUND

    revealed = dashboard.reveal()
    assert revealed is not dashboard and dashboard._repr_html_() == html
    assert all(_same(image, picture.raw) for picture, image in zip(pictures, _images(revealed._repr_html_())))

    other = handle.unit(unflagged)
    assert other.flagged is False
    # captions label the other images negative: judged, so shown as they are; positives blurred by their label
    assert {p.reason for p in other.samples.pictures} <= {None, "NSFW label 1.00"}

    again = neurolens.open(cache, **options)
    assert isinstance(again.clip, LazyClip)
    repeat = again.unit(flagged)
    assert not again.clip.loaded                # scan, visualization, texts, sweep and scores all cached
    assert DATA_URI.findall(repeat._repr_html_()) == DATA_URI.findall(html)
    assert "cached: 2 steps" in repeat._repr_html_() and "model: not loaded" in repeat._repr_html_()


def test_the_sae_quality_report_renders_its_numbers():
    from neurolens.display.notebook import SaeQuality
    report = {"explained_variance": 0.9123, "l0": 31.5, "dead_share": None, "held_out_images": 12}
    html = SaeQuality("SAE x on image_block_4_0", report, (("name", "x"), ("k", "32")))._repr_html_()
    assert "0.9123" in html and "31.5" in html and "explained variance" in html and "–" in html
    assert "no quality report" in SaeQuality("SAE y", None)._repr_html_()
