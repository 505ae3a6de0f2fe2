"""The compare report in a real browser (Debian's chromium through Playwright, as tests/test_serve_browser.py):
it opens from file:// with nothing beside it, makes no request but the page itself, every image is decoded and
shown, there is no reveal, and every crop the page shows is the blur of the raw crop (the pixels the browser
was given, checked against the raw crop remade here)."""
import base64
import io
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from neurolens.cli import app
from neurolens.datasets.decode import preprocess
from neurolens.datasets.open import open_dataset
from neurolens.display.figures import crop_around_cell
from neurolens.labels.blur import blur_pixels
from neurolens.labels.concepts import parse_concept_set
from neurolens.models.build import load_clip
from neurolens.pipelines.concepts import run_concepts
from neurolens.pipelines.settings import ConceptSettings

import compare_data
from sweep_data import LAYER

pytestmark = pytest.mark.integration   # a real browser (chromium through Playwright)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_clip):
    root = tmp_path_factory.mktemp("compare_browser")
    probe = compare_data.write_probe(root)
    checkpoints = compare_data.write_checkpoints(root, tiny_clip)
    (root / "c.yaml").write_text(compare_data.CONCEPTS_YAML)
    result = CliRunner().invoke(app, ["compare", "--checkpoint", checkpoints[0], "--checkpoint", checkpoints[1],
                                      "--model", "nl-tiny-ViT", "--pretrained", "none", "--layer", LAYER,
                                      "--dataset", probe, "--concepts", str(root / "c.yaml"), "--max-q", "1",
                                      "--min-auc", "0.6", "--top-k", "8", "--cache", str(root / "cache"),
                                      "--device", "cpu", "--workers", "0", "--worst", "2", "--out",
                                      str(root / "out")])
    assert result.exit_code == 0, result.output
    return root, probe, checkpoints


def test_the_report_opens_from_file_url_with_every_image_blurred(report):
    from playwright.sync_api import sync_playwright
    root, probe, checkpoints = report
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1360, "height": 900})
        requests, errors = [], []
        page.on("request", lambda request: requests.append(request.url))
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto((root / "out" / "report.html").resolve().as_uri())
        page.wait_for_load_state("load")
        assert page.eval_on_selector_all("img", "imgs => imgs.length > 0 && imgs.every(i => i.complete && "
                                                "i.naturalWidth > 0)")
        crops = page.eval_on_selector_all("img.crop", "imgs => imgs.map(i => [i.dataset.model, i.dataset.layer, "
                                                      "Number(i.dataset.unit), Number(i.dataset.rank), "
                                                      "Number(i.dataset.index), i.src])")
        assert page.locator(".reveal").count() == 0 and page.locator("script").count() == 0
        assert "nl-tiny-ViT-none" in page.text_content("body") and "baseline" in page.text_content("body")
        browser.close()
    assert [u for u in requests if not u.startswith("data:")] == [(root / "out" / "report.html").resolve().as_uri()]
    assert errors == []
    assert len(crops) == 3 * 2 * 2 * 4                 # models x concepts x worst units x crops
    settings = ConceptSettings(concepts=parse_concept_set({"concepts": compare_data.CONCEPTS}), top_k=8,
                               rule=compare_data.LOOSE)
    clips = {"=alpha": load_clip(checkpoint=checkpoints[0], device="cpu"),
             "beta": load_clip(checkpoint=checkpoints[1], device="cpu"),
             "nl-tiny-ViT-none": load_clip("nl-tiny-ViT", "none", device="cpu")}
    dataset = open_dataset(probe)
    scans = {}
    for model, layer, unit, rank, index, src in crops:
        if (model, layer) not in scans:
            scans[(model, layer)] = run_concepts(clips[model], layer, probe, settings, cache=root / "cache").scan
        scan = scans[(model, layer)]
        assert int(scan.top_indices[unit, rank - 1]) == index
        raw = crop_around_cell(preprocess(dataset.load(index), scan.image_size), scan.top_cells[unit, rank - 1],
                               scan.grid, 96)
        assert src.startswith("data:image/jpeg;base64,")
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"), float)
        top = shown.shape[0] - 16
        assert np.abs(shown[:top] - np.asarray(blur_pixels(raw), float)[:top]).mean() < 3.0
        assert np.abs(shown[:top] - np.asarray(raw, float)[:top]).mean() > 3.0
