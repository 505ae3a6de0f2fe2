"""The web app in a real browser: Debian's chromium driven by Playwright (its own browser download is not
reachable, so the system chromium is launched through executable_path; .ci/run installs it with apt).

Navigates home -> layer -> unit over the test cache (tests/serve_fixture.py), records every request the
page makes, and checks what a person sees: every unit listed, flagged units first, the unit page's crops,
texts and histogram equal to the cache, every image blurred with no raw request before a reveal, a reveal
that shows the raw pixels, a probe upload's heat map, the static site from file:// with the same unit
count, and an SAE's features browsed the same way (with the links to their strongest neurons and the basis
switch). Screenshots of the layer and unit pages (neurons and features) go to outputs/serve-screenshots/
(CI artifacts)."""
import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import serve_fixture
from neurolens.datasets.open import open_dataset
from neurolens.datasets.decode import preprocess
from neurolens.display.figures import crop_around_cell
from neurolens.pipelines.scan_find import find_scan
from neurolens.storage.cache import Cache

pytestmark = pytest.mark.integration   # a real browser (chromium through Playwright)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parents[1] / "outputs" / "serve-screenshots"
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def fx(serve_cache):
    return serve_cache


@pytest.fixture(scope="module")
def server(fx):
    running = serve_fixture.start_server(fx.cache, "--model", "nl-tiny-RN", "--pretrained", "none")
    yield running
    serve_fixture.stop_server(running)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(WAIT_MS)
    opened.requests = []
    opened.errors = []
    opened.on("request", lambda r: opened.requests.append(r.url))
    opened.on("pageerror", lambda e: opened.errors.append(str(e)))
    yield opened
    context.close()


@pytest.fixture(scope="module")
def scan(fx, tiny_clip):
    return find_scan(tiny_clip, fx.layer, open_dataset(str(fx.dataset)), top_k=8, cache=Cache(fx.cache))


def load_all_tiles(page, expected: int):
    """Scrolls (at most 40 times) until the grid holds `expected` tiles; returns their units in order."""
    for _ in range(40):
        if page.locator("#grid .tile").count() >= expected:
            break
        page.mouse.wheel(0, 20_000)
        page.wait_for_timeout(100)
    return [int(u) for u in page.eval_on_selector_all("#grid .tile", "tiles => tiles.map(t => t.dataset.unit)")]


def image_pixels(page, selector):
    """(H, W, 3) uint8 of what an <img> currently shows (blob: or http:), drawn on a canvas in the page."""
    width, height, data = page.eval_on_selector(selector, """img => {
        const canvas = document.createElement('canvas');
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        const context = canvas.getContext('2d');
        context.drawImage(img, 0, 0);
        const rgba = context.getImageData(0, 0, canvas.width, canvas.height).data;
        let text = ''; for (let i = 0; i < rgba.length; i++) text += String.fromCharCode(rgba[i]);
        return [canvas.width, canvas.height, btoa(text)]; }""")
    return np.frombuffer(base64.b64decode(data), dtype=np.uint8).reshape(height, width, 4)[..., :3]


def test_home_layer_unit_in_a_browser(page, server, fx, scan):
    page.goto(server.url)
    page.click(".layer-card")
    page.wait_for_selector("#grid .tile")
    # every unit of the layer is listed (tiles are added as the page scrolls)
    units = load_all_tiles(page, fx.units)
    assert sorted(units) == list(range(fx.units))
    # sorting by evidence (the default) puts every flagged unit first, by descending correlation
    flags = page.eval_on_selector_all("#grid .tile", "tiles => tiles.map(t => t.dataset.flagged === '1')")
    count = sum(flags)
    assert count == len(fx.flagged) > 0 and all(flags[:count]) and not any(flags[count:])
    assert units[:count] == fx.flagged                     # the sweep's ranking of flagged units
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(SCREENSHOTS / "layer.png"))
    # by unit id; flagged only; search over the top texts
    page.select_option("#sort", "unit")
    assert load_all_tiles(page, fx.units)[:5] == [0, 1, 2, 3, 4]
    page.check("#flagged")
    assert sorted(load_all_tiles(page, count)) == sorted(fx.flagged)
    page.uncheck("#flagged")
    page.fill("#search", "naked")
    page.wait_for_function("n => document.querySelectorAll('#grid .tile').length < n", arg=fx.units)
    found = load_all_tiles(page, fx.units)
    data = json.loads(page.text_content("#units-data"))["units"]
    expected = [row[0] for row in data if any("naked" in t.lower() for t in row[5])]
    assert found == expected and found
    page.fill("#search", "")
    page.select_option("#sort", "evidence")

    unit = fx.flagged[0]
    page.click(f'#grid .tile[data-unit="{unit}"]')
    page.wait_for_selector("#examples .shot")
    assert page.url.endswith(f"/u/{unit}.html")
    # the crops are the scan's top images of the unit, in order, with their activations
    shots = page.eval_on_selector_all("#examples .shot", "s => s.map(x => [+x.dataset.index, +x.dataset.value])")
    assert [i for i, _ in shots] == [int(i) for i in scan.top_indices[unit]]
    assert np.allclose([v for _, v in shots], scan.top_values[unit], rtol=1e-5)
    assert page.locator("#examples .shot svg.heat").count() == len(shots)
    # the texts are the ranking's, with its scores
    from neurolens.pipelines.text import find_text
    ranking = find_text(fx.clip, fx.layer, f"{fx.dataset}:caption", top_k=10, scan=scan, cache=Cache(fx.cache))
    texts = page.eval_on_selector_all("#texts li", "items => items.map(li => [li.querySelector('.t').textContent, +li.dataset.score])")
    assert [t for t, _ in texts] == [ranking.entries[int(i)] for i in ranking.top_indices[unit]]
    assert np.allclose([s for _, s in texts], ranking.top_scores[unit], atol=1e-6)
    # the histogram is the scan's per-image activations binned as the bars say
    bars = page.eval_on_selector_all(".hist rect.bar", "b => b.map(r => [+r.dataset.lo, +r.dataset.hi, +r.dataset.count])")
    values = scan.per_image_max()[:, unit]
    edges = [lo for lo, _, _ in bars] + [bars[-1][1]]
    counts, _ = np.histogram(values, bins=np.asarray(edges))
    assert [c for _, _, c in bars] == counts.tolist() and sum(counts) == scan.count
    page.screenshot(path=str(SCREENSHOTS / "unit.png"), full_page=True)
    assert page.errors == []


def test_editing_the_sort_in_the_url_hash_resorts_the_layer_page(page, server, fx):
    page.goto(server.url)
    page.click(".layer-card")
    page.wait_for_selector("#grid .tile")

    def first():
        return [int(u) for u in page.eval_on_selector_all("#grid .tile", "t => t.slice(0, 5).map(x => x.dataset.unit)")]
    assert first()[:len(fx.flagged[:5])] == fx.flagged[:5]   # the default: flagged units first
    sort_is = "s => document.getElementById('sort').value === s"
    page.evaluate("location.hash = 'sort=unit'")          # as a person edits the address bar
    page.wait_for_function(sort_is, arg="unit")
    assert first() == [0, 1, 2, 3, 4] and page.input_value("#sort") == "unit"
    page.evaluate("location.hash = 'flagged=1'")          # no sort in the hash: back to the default order
    page.wait_for_function(sort_is, arg="evidence")
    assert load_all_tiles(page, len(fx.flagged)) == fx.flagged and page.input_value("#sort") == "evidence"
    assert page.is_checked("#flagged")
    page.go_back()                                         # the back button is a hash change too
    page.wait_for_function(sort_is, arg="unit")
    assert page.input_value("#sort") == "unit" and not page.is_checked("#flagged")
    assert page.errors == []


def test_every_image_is_blurred_until_a_confirmed_reveal(page, server, fx, scan):
    unit = fx.flagged[0]
    page.goto(server.base + f"/L/{fx.clip.fingerprint[:16]}-{fx.layer}/u/{unit}.html")
    page.wait_for_load_state("networkidle")
    shown = "img:not(#probe-img)"                      # the probe's image slot is empty until a probe
    sources = page.eval_on_selector_all(shown, "imgs => imgs.map(i => i.getAttribute('src'))")
    assert len(sources) == len(scan.top_indices[unit]) + len(page.query_selector_all("#fvs img"))
    assert all("/img/" in s and s.endswith(".jpg") for s in sources)
    assert page.eval_on_selector_all(shown, "imgs => imgs.every(i => i.complete && i.naturalWidth > 0)")
    assert not [u for u in page.requests if "/raw/" in u]
    # what the page shows is the blurred image, not the crop
    original = crop_around_cell(preprocess(open_dataset(str(fx.dataset)).load(int(scan.top_indices[unit, 0])), 64),
                                scan.top_cells[unit, 0], scan.grid, 128)
    blurred = image_pixels(page, "#examples .shot img")
    assert np.abs(blurred.astype(float) - np.asarray(original, float)).mean() > 10

    first = page.locator("#examples .shot").first
    first.hover()
    first.locator(".reveal").click()                   # a click asks first ...
    assert page.is_visible("#confirm") and "flagged unit" in page.text_content("#confirm-reason")
    page.click("#confirm-no")                          # ... cancel sends nothing
    assert not page.is_visible("#confirm") and not [u for u in page.requests if "/raw/" in u]
    first.hover()
    first.locator(".reveal").click()
    page.click("#confirm-yes")                         # ... confirm fetches the raw pixels
    page.wait_for_function("() => document.querySelector('#examples .shot img').src.startsWith('blob:')")
    raw_requests = [u for u in page.requests if "/raw/" in u]
    assert len(raw_requests) == 1 and raw_requests[0].endswith(f"/crop/{unit}-1.png")
    page.wait_for_function("() => document.querySelector('#examples .shot img').complete")
    assert np.array_equal(image_pixels(page, "#examples .shot img"), np.asarray(original))
    # only that image: every other image is still the blurred one
    others = page.eval_on_selector_all("#fvs img, #examples .shot:not(:first-child) img", "imgs => imgs.map(i => i.src)")
    assert others and all("/img/" in s for s in others)
    first.locator(".reveal").click()                   # and it can be blurred again
    page.wait_for_function("() => document.querySelector('#examples .shot img').src.includes('/img/')")


def test_probe_upload_draws_a_heat_map(page, server, fx, tmp_path):
    unit = fx.flagged[0]
    page.goto(server.base + f"/L/{fx.clip.fingerprint[:16]}-{fx.layer}/u/{unit}.html")
    upload = tmp_path / "mine.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (70, 90, 3), dtype=np.uint8)).save(upload)
    page.set_input_files("#probe-file", str(upload))
    page.click("#probe-form button[type=submit]")
    page.wait_for_selector("#probe-result:not([hidden])")
    assert page.locator("#probe-heat rect").count() == 4 * 4
    value = float(page.get_attribute("#probe-result", "data-value"))
    assert page.text_content("#probe-value") == f"{value:.3g}" or abs(float(page.text_content("#probe-value")) - value) < 1e-3 * max(1, abs(value))
    assert page.text_content("#probe-pct").startswith("≈")
    assert page.locator("#probe-marker line").count() == 1
    assert page.get_attribute("#probe-img", "src").startswith("data:image/jpeg")
    assert not [u for u in page.requests if "/raw/" in u]
    # a bad upload: one line in the page, no result
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    page.set_input_files("#probe-file", str(bad))
    page.click("#probe-form button[type=submit]")
    page.wait_for_selector("#probe-error:not([hidden])")
    assert "not a usable image" in page.text_content("#probe-error")


def test_static_site_opens_from_file_url_with_the_same_units(page, fx, tmp_path):
    from neurolens.serve.site import write_site
    result = write_site(Cache(fx.cache), tmp_path / "site", examples=4)
    page.goto(result.index.resolve().as_uri())
    page.click(".layer-card")
    page.wait_for_selector("#grid .tile")
    assert sorted(load_all_tiles(page, fx.units)) == list(range(fx.units))
    assert page.text_content("#count") == f"{fx.units} units"
    page.click(f'#grid .tile[data-unit="{fx.flagged[0]}"]')
    page.wait_for_selector("#examples .shot")
    page.wait_for_load_state("load")
    assert page.eval_on_selector_all("img", "imgs => imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator(".reveal").count() == 0 and page.locator("#probe").count() == 0
    assert page.requests and all(u.startswith("file://") for u in page.requests)
    assert page.errors == []


def test_sae_features_in_a_browser(page, server, fx, tiny_clip):
    """Home -> the SAE's card -> every feature listed, the feature sweep's flags first -> a feature page with
    the feature scan's crops, all blurred with no raw request -> its strongest neuron -> back through the basis
    switch. Screenshots of the feature layer and feature pages go with the others."""
    from neurolens.sae.basis import load_basis
    basis = load_basis(tiny_clip, fx.layer, fx.sae, Cache(fx.cache))
    feature_scan = find_scan(tiny_clip, fx.layer, open_dataset(str(fx.dataset)), top_k=8, cache=Cache(fx.cache),
                             basis=basis)
    page.goto(server.url)
    page.click(f'.layer-card[data-basis="{fx.basis}"]')
    page.wait_for_selector("#grid .tile")
    features = load_all_tiles(page, fx.features)
    assert sorted(features) == list(range(fx.features))
    assert page.text_content("#count") == f"{fx.features} features"
    flags = page.eval_on_selector_all("#grid .tile", "tiles => tiles.map(t => t.dataset.flagged === '1')")
    count = sum(flags)
    assert count == len(fx.feature_flagged) > 0 and all(flags[:count]) and not any(flags[count:])
    assert sorted(features[:count]) == sorted(fx.feature_flagged)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(SCREENSHOTS / "feature-layer.png"))

    feature = fx.feature_flagged[0]
    page.click(f'#grid .tile[data-unit="{feature}"]')
    page.wait_for_selector("#examples .shot")
    page.wait_for_load_state("networkidle")
    assert page.text_content("h1").startswith(f"Feature {feature}")
    shots = page.eval_on_selector_all("#examples .shot", "s => s.map(x => +x.dataset.index)")
    assert shots == [int(i) for i in feature_scan.top_indices[feature]]
    sources = page.eval_on_selector_all("img:not(#probe-img)", "imgs => imgs.map(i => i.getAttribute('src'))")
    assert sources and all("/img/" in s and s.endswith(".jpg") for s in sources)
    assert not [u for u in page.requests if "/raw/" in u]
    page.screenshot(path=str(SCREENSHOTS / "feature.png"), full_page=True)

    strongest = int(np.argmax(np.abs(basis.sae.W_dec.detach().numpy()[feature])))
    page.click('[data-basis-links="neurons"] li:first-child a')
    page.wait_for_selector("#examples .shot")
    assert page.url.endswith(f"{fx.clip.fingerprint[:16]}-{fx.layer}/u/{strongest}.html")
    assert page.text_content("h1").startswith(f"Unit {strongest}")
    page.click(".bases a.basis")                          # the switch: this layer's features
    page.wait_for_selector("#grid .tile")
    assert page.text_content("#count") == f"{fx.features} features"
    assert not [u for u in page.requests if "/raw/" in u] and page.errors == []


# ------------------------------------------------------------------------------------------ concepts and search

def found_rows(page, layer_id):
    """[(unit, share, lower end of its interval)] of the search page's results for one layer, best first."""
    page.wait_for_selector("body[data-ready='1']")
    rows = page.eval_on_selector_all(f".find-layer[data-layer='{layer_id}'] tr[data-unit]",
                                     "rows => rows.map(r => [+r.dataset.unit, r.dataset.share, r.dataset.low])")
    return [(u, None if s == "" else round(float(s), 9), None if low == "" else round(float(low), 9))
            for u, s, low in rows]


def expected_rows(fx, query, count=50):
    from neurolens.pipelines.find import find, locate
    located = locate(Cache(fx.cache), fx.layer, fingerprint=fx.clip.fingerprint)
    result = find(located, query)
    return [(r["unit"], None if r["caption_share"] is None else round(r["caption_share"], 9),
             None if r["ci_low"] is None else round(r["ci_low"], 9)) for r in result.rows[:count]]


def test_search_box_on_every_page_ranks_like_find(page, server, fx):
    """The top bar's search box on the home, layer and unit pages opens the search page, which ranks the units
    of the layer as `neurolens find` does: a concept name, a lexicon word of it, free text."""
    from neurolens.toy.concepts import planted_words
    layer_id = f"{fx.clip.fingerprint[:16]}-{fx.layer}"
    page.goto(server.url)
    assert page.locator("form.find-box input[name=q]").count() == 1
    page.goto(f"{server.base}/L/{layer_id}/u/{fx.intersections[0]}.html")
    page.fill("form.find-box input[name=q]", "nsfw")
    page.press("form.find-box input[name=q]", "Enter")
    page.wait_for_url("**/find.html?**")
    assert found_rows(page, layer_id) == expected_rows(fx, "nsfw")
    assert page.eval_on_selector(f".find-layer[data-layer='{layer_id}']", "s => s.dataset.kind") == "concept"
    page.screenshot(path=str(SCREENSHOTS / "find.png"), full_page=True)
    word = planted_words()[0]
    for query, kind in ((word, "lexicon"), ("striped background", "free text"), ("CIRCLES", "concept")):
        page.goto(f"{server.base}/find.html?q={query}&layer={layer_id}")
        assert found_rows(page, layer_id) == expected_rows(fx, query), query
        assert page.eval_on_selector(f".find-layer[data-layer='{layer_id}']", "s => s.dataset.kind") == kind
    # every layer (the neurons and the SAE's features) when none is chosen; images are the blurred tiles only
    page.goto(f"{server.base}/find.html?q=nsfw")
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator(".find-layer").count() == 2
    assert not [u for u in page.requests if "/raw/" in u]
    assert page.errors == []


def test_layer_page_filters_by_concept_with_intersections_first(page, server, fx):
    layer_id = f"{fx.clip.fingerprint[:16]}-{fx.layer}"
    page.goto(f"{server.base}/L/{layer_id}/index.html")
    page.wait_for_selector("#grid .tile")
    concepts = json.loads(page.text_content("#units-data"))["concepts"]
    page.select_option("#concept", "pairs")
    page.wait_for_function("n => document.querySelectorAll('#grid .tile').length <= n", arg=len(fx.intersections))
    assert sorted(load_all_tiles(page, len(fx.intersections))) == sorted(fx.intersections)
    page.select_option("#concept", "2")                  # circles: flagged units, intersections first, by its AUC
    flagged = [u for u, flags in enumerate(concepts["flags"]) if 2 in flags]
    units = load_all_tiles(page, len(flagged))
    assert sorted(units) == sorted(flagged)
    both = [len(concepts["flags"][u]) >= 2 for u in units]
    assert both == sorted(both, reverse=True)
    page.select_option("#concept", "0")                  # nsfw: every flagged unit is an intersection here
    units = load_all_tiles(page, len(fx.intersections))
    aucs = [concepts["auc"][0][u] for u in units]
    assert sorted(units) == sorted(u for u, f in enumerate(concepts["flags"]) if 0 in f) and aucs == sorted(aucs, reverse=True)
    assert page.eval_on_selector(f'#grid .tile[data-unit="{units[0]}"]', "t => t.dataset.concepts") == "nsfw,pattern"
    page.click(f'#grid .tile[data-unit="{units[0]}"]')
    page.wait_for_selector("#description")
    assert page.locator("#concepts tr[data-flagged='1']").count() == 2
    assert page.locator("#examples .shot").count() > 0 and not [u for u in page.requests if "/raw/" in u]
    page.screenshot(path=str(SCREENSHOTS / "unit-concepts.png"), full_page=True)
    assert page.errors == []


def test_static_site_search_works_from_file_url(page, fx, tmp_path):
    from neurolens.serve.site import write_site
    layer_id = f"{fx.clip.fingerprint[:16]}-{fx.layer}"
    result = write_site(Cache(fx.cache), tmp_path / "site", examples=2)
    page.goto((result.out / "find.html").resolve().as_uri() + f"?q=nsfw&layer={layer_id}")
    assert found_rows(page, layer_id) == expected_rows(fx, "nsfw")
    assert page.requests and all(u.startswith("file://") for u in page.requests)
    assert page.errors == []
