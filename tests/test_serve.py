"""The web app's server, without a browser: what the pages and endpoints return, the blur, reveals, probes,
the security rules (traversal, tokens, host check, uploads), the static site, and the top-k maps job.

One `neurolens serve` subprocess (127.0.0.1, --port 0, the tiny model loaded for probes) serves the test
cache (tests/serve_fixture.py) for the module and is stopped at the end; every request is bounded."""
import http.client
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import serve_fixture
from scan_data import bomb_png
from neurolens.labels.blur import blur_pixels, detail_retained
from neurolens.datasets.open import open_dataset
from neurolens.datasets.decode import preprocess
from neurolens.display.figures import crop_around_cell
from neurolens.pipelines.scan_find import find_scan
from neurolens.storage.cache import Cache

TIMEOUT = 60
PROBE = {"X-Neurolens-Probe": "1"}


def request(server, method, path, body=None, headers=None, host=None):
    """(status, headers, body bytes) of one request sent exactly as written (no path normalization)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", host or f"127.0.0.1:{server.port}")
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def fx(serve_cache):
    return serve_cache


@pytest.fixture(scope="module")
def before(fx):
    return serve_fixture.snapshot(fx.cache)


@pytest.fixture(scope="module")
def server(fx, before):
    running = serve_fixture.start_server(fx.cache, "--model", "nl-tiny-RN", "--pretrained", "none")
    yield running
    serve_fixture.stop_server(running)


@pytest.fixture(scope="module")
def scan(fx, tiny_clip):
    return find_scan(tiny_clip, fx.layer, open_dataset(str(fx.dataset)), top_k=8, cache=Cache(fx.cache))


@pytest.fixture(scope="module")
def layer_id(fx, tiny_clip):
    return f"{tiny_clip.fingerprint[:16]}-{fx.layer}"


@pytest.fixture(scope="module")
def basis(fx, tiny_clip):
    from neurolens.sae.basis import load_basis
    return load_basis(tiny_clip, fx.layer, fx.sae, Cache(fx.cache))


@pytest.fixture(scope="module")
def feature_scan(fx, tiny_clip, basis):
    return find_scan(tiny_clip, fx.layer, open_dataset(str(fx.dataset)), top_k=8, cache=Cache(fx.cache), basis=basis)


@pytest.fixture(scope="module")
def feature_id(fx, tiny_clip):
    """The layer id of the SAE's features: the neurons' id, then '~' and the basis id."""
    return f"{tiny_clip.fingerprint[:16]}-{fx.layer}~{fx.basis}"


def payload(page: bytes) -> dict:
    return json.loads(re.search(rb'<script type="application/json" id="units-data">(.*?)</script>', page, re.S).group(1))


def raw_crop(fx, scan, unit, rank, pixels=128):
    """The crop the unit page shows at `rank` (1 = top), made here from the dataset file."""
    dataset = open_dataset(str(fx.dataset))
    index = int(scan.top_indices[unit, rank - 1])
    source = preprocess(dataset.load(index), 64)
    return crop_around_cell(source, scan.top_cells[unit, rank - 1], scan.grid, pixels)


def picture(data):
    return Image.open(io.BytesIO(data)).convert("RGB")


def assert_blurred(shown, original, label_rows):
    """The shown pixels are the blur primitive's output on the original (JPEG error aside), above the label
    band that blur_with_label writes at the bottom."""
    top = shown.height - label_rows
    expected = np.asarray(blur_pixels(original), dtype=np.float64)[:top]
    assert np.abs(np.asarray(shown, dtype=np.float64)[:top] - expected).mean() < 3.0


# ------------------------------------------------------------------------------------------------ pages

def test_startup_line_names_the_url(server):
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", server.url)
    assert server.port > 0


def test_pages_answer_and_list_every_unit(server, fx, layer_id):
    status, _, home = request(server, "GET", "/")
    assert status == 200 and layer_id.encode() in home and b"nl-tiny-RN" in home
    status, _, page = request(server, "GET", f"/L/{layer_id}/index.html")
    assert status == 200
    payload = re.search(rb'<script type="application/json" id="units-data">(.*?)</script>', page, re.S).group(1)
    rows = json.loads(payload)["units"]
    assert [row[0] for row in rows] == list(range(fx.units))
    assert {row[0] for row in rows if row[1]} == set(fx.flagged)
    for unit in (0, fx.flagged[0], fx.units - 1):
        status, _, body = request(server, "GET", f"/L/{layer_id}/u/{unit}.html")
        assert status == 200 and f"Unit {unit}".encode() in body
    assert request(server, "GET", f"/L/{layer_id}/u/{fx.units}.html")[0] == 404


def test_banner_names_the_reveal_button_that_the_unit_page_has(server, fx, layer_id):
    _, _, home = request(server, "GET", "/")
    banner = re.search(rb'<span class="safety"[^>]*>(.*?)</span>', home, re.S).group(1).decode()
    assert "reveal button" in banner and "click one" not in banner
    _, _, unit_page = request(server, "GET", f"/L/{layer_id}/u/{fx.flagged[0]}.html")
    assert b'<button class="reveal"' in unit_page


def test_every_shown_image_is_blurred_and_raw_needs_a_confirmed_reveal(server, fx, scan, layer_id):
    unit = fx.flagged[0]
    shown = picture(request(server, "GET", f"/img/{layer_id}/crop/{unit}-1.jpg")[2])
    original = raw_crop(fx, scan, unit, 1)
    band = 108                                   # rows above the label the blur writes at the bottom
    assert_blurred(shown, original, 20)
    assert detail_retained(original.crop((0, 0, 128, band)), shown.crop((0, 0, 128, band))) < 0.05
    # without the reveal header (an <img> tag or a plain link): refused
    status, _, body = request(server, "GET", f"/raw/{layer_id}/crop/{unit}-1.png")
    assert status == 403 and b"reveal" in body
    status, headers, body = request(server, "GET", f"/raw/{layer_id}/crop/{unit}-1.png",
                                    headers={"X-Neurolens-Reveal": "1"})
    assert status == 200 and headers["cache-control"] == "no-store"
    assert np.array_equal(np.asarray(picture(body)), np.asarray(original))
    # an unflagged unit's crops and every tile are blurred too (blur_all before a reveal)
    other = next(u for u in range(fx.units) if u not in fx.flagged and u not in fx.visualized)
    shown = picture(request(server, "GET", f"/img/{layer_id}/crop/{other}-1.jpg")[2])
    assert_blurred(shown, raw_crop(fx, scan, other, 1), 20)
    tile = picture(request(server, "GET", f"/img/{layer_id}/tile/{other}.jpg")[2])   # no visualization: the top crop
    assert_blurred(tile, raw_crop(fx, scan, other, 1, 112), 17)
    # tiles are never sent raw
    assert request(server, "GET", f"/raw/{layer_id}/tile/{other}.png", headers={"X-Neurolens-Reveal": "1"})[0] == 404


def test_feature_visualizations_are_served_blurred(server, fx, layer_id):
    unit = fx.visualized[0]
    status, _, blurred = request(server, "GET", f"/img/{layer_id}/fv/{unit}-0.jpg")
    raw = request(server, "GET", f"/raw/{layer_id}/fv/{unit}-0.png", headers={"X-Neurolens-Reveal": "1"})[2]
    assert status == 200
    assert_blurred(picture(blurred), picture(raw), 30)


# ------------------------------------------------------------------------------------------------ security

TRAVERSALS = [
    "/static/../serve/app.py", "/static/..%2f..%2fapp.py", "/static/%2e%2e/%2e%2e/store.py", "/static/....//app.py",
    "/../../../../etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/static//etc/passwd",
    "/img/../../../../etc/passwd", "/img/{id}/crop/..%2f..%2f..%2fetc%2fpasswd", "/img/{id}/crop/0-1.jpg/../../x",
    "/img/{id}/../../../etc/passwd", "/img/%2e%2e/crop/0-1.jpg", "/img/{id}/crop/%00.jpg",
    "/img/{id}/crop/-1-1.jpg", "/img/{id}/fv/0-99.jpg", "/img/{id}/tile/99999.jpg",
    "/img/{id}/{keypath}", "/raw/{id}/crop/..%2f..%2f..%2fetc%2fpasswd", "/L/..%2f..%2fetc/index.html",
    "/L/{id}/u/..%2f..%2f..%2fetc%2fpasswd.html", "/L/{id}/u/-1.html", "/L/..%2f{id}/index.html",
    "/api/{id}/../../etc/passwd",
]


def test_path_traversal_gets_400_or_404_and_never_file_content(server, fx, scan, layer_id):
    keypath = scan.keys[0].lstrip("/")               # a real dataset file's path, tried as an image name
    secrets = [b"root:", b"import ", b"def ", b"\x89PNG"]
    for template in TRAVERSALS:
        path = template.replace("{id}", layer_id).replace("{keypath}", keypath)
        for headers in ({}, {"X-Neurolens-Reveal": "1"}):
            status, _, body = request(server, "GET", path, headers=headers)
            assert status in (400, 404), (path, status)
            assert not any(secret in body for secret in secrets), path


def test_host_header_must_be_loopback(server):
    assert request(server, "GET", "/", host="attacker.example")[0] == 400
    assert request(server, "GET", "/", host=f"localhost:{server.port}")[0] == 200


def test_responses_carry_a_content_security_policy(server):
    _, headers, _ = request(server, "GET", "/")
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"


# ------------------------------------------------------------------------------------------------ probes

def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def probe_upload(server, tiny_clip, fx, layer_id, unit, upload):
    """The server's probe answer for `upload`, and the layer's activations on it computed here."""
    from neurolens.models.layer_table import resolve_layer
    from neurolens.activations.forward import layer_forward
    status, _, body = request(server, "POST", f"/api/{layer_id}/probe?unit={unit}", body=png_bytes(upload),
                              headers={"Content-Type": "application/octet-stream", **PROBE})
    assert status == 200, body
    pixels = torch.from_numpy(np.asarray(preprocess(upload, 64)).transpose(2, 0, 1).copy())[None].float() / 255
    acts, _ = layer_forward(tiny_clip, resolve_layer(tiny_clip, fx.layer), pixels)
    return json.loads(body), acts


def test_probe_upload_answers_the_units_map_value_and_percentile(server, fx, tiny_clip, scan, layer_id):
    unit = fx.flagged[0]
    upload = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8))
    answer, acts = probe_upload(server, tiny_clip, fx, layer_id, unit, upload)
    expected = acts[0, unit].numpy()
    assert answer["grid"] == [4, 4]
    assert np.allclose(np.asarray(answer["map"]), expected, atol=1e-5)
    assert answer["value"] == pytest.approx(float(expected.max()), abs=1e-5)
    values = scan.per_image_max()[:, unit]
    share_below = 100.0 * float((values < answer["value"]).mean())
    assert abs(answer["percentile"] - share_below) <= 100.0 / 40 * 2 + 1e-6     # within two of 40 bins
    assert answer["preview"].startswith("data:image/jpeg;base64,")


def test_probe_of_a_dataset_item_matches_the_scan(server, fx, scan, layer_id):
    unit = fx.flagged[0]
    index = int(scan.top_indices[unit, 0])
    status, _, body = request(server, "POST", f"/api/{layer_id}/probe?unit={unit}&index={index}", body=b"",
                              headers=PROBE)
    assert status == 200, body
    assert json.loads(body)["value"] == pytest.approx(float(scan.top_values[unit, 0]), abs=1e-5)


@pytest.mark.parametrize("upload, reason", [
    (b"this is not an image", "not a usable image"),
    (b"", "empty"),
    (bomb_png(), "decompression bomb"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "not a usable image"),
])
def test_bad_upload_gets_400_with_one_line(server, layer_id, upload, reason):
    status, _, body = request(server, "POST", f"/api/{layer_id}/probe?unit=0", body=upload, headers=PROBE)
    assert status == 400
    message = json.loads(body)["error"]
    assert reason in message and "\n" not in message and "Traceback" not in message


def test_oversized_upload_is_refused_before_it_is_read(server, layer_id):
    status, _, body = request(server, "POST", f"/api/{layer_id}/probe?unit=0", body=b"\0" * (10 * 2 ** 20 + 1),
                              headers=PROBE)
    assert status == 400 and "larger than 10 MB" in json.loads(body)["error"]


def test_probe_needs_its_header(server, layer_id):
    """A page on another site could POST a simple request to the server; without the header it is refused."""
    status, _, body = request(server, "POST", f"/api/{layer_id}/probe?unit=0&index=0", body=b"",
                              headers={"Content-Type": "text/plain"})
    assert status == 400 and "X-Neurolens-Probe".lower() in json.loads(body)["error"].lower()


def test_probe_errors_for_a_bad_unit_or_index(server, fx, layer_id):
    for query in (f"unit={fx.units}&index=0", "unit=0&index=100000", "unit=x&index=0", "index=0"):
        status, _, body = request(server, "POST", f"/api/{layer_id}/probe?{query}", body=b"", headers=PROBE)
        assert status == 400 and json.loads(body)["error"], query


def test_requests_never_write_to_the_cache(server, fx, before, layer_id):
    for path in ("/", f"/L/{layer_id}/index.html", f"/L/{layer_id}/u/{fx.flagged[0]}.html",
                 f"/img/{layer_id}/tile/3.jpg", f"/img/{layer_id}/crop/3-2.jpg"):
        assert request(server, "GET", path)[0] == 200
    assert request(server, "POST", f"/api/{layer_id}/probe?unit=0&index=0", body=b"", headers=PROBE)[0] == 200
    assert serve_fixture.snapshot(fx.cache) == before


# ------------------------------------------------------------------------------------------------ SAE features

def test_home_lists_each_basis_of_the_layer_with_the_saes_quality_report(server, fx, layer_id, feature_id):
    status, _, home = request(server, "GET", "/")
    assert status == 200
    cards = re.findall(rb'<a class="layer-card[^"]*" href="L/([^/"]+)/index.html"[^>]*data-basis="([^"]+)"', home)
    assert [(c.decode(), b.decode()) for c, b in cards] == [(layer_id, "neurons"), (feature_id, fx.basis)]
    feature_card = home[home.index(b'data-basis="' + fx.basis.encode()):]
    feature_card = feature_card[:feature_card.index(b"</a>")].decode()
    assert f"SAE {fx.sae}" in feature_card and f"<strong>{fx.features}</strong> features" in feature_card
    assert f"{len(fx.feature_flagged)} flagged" in feature_card
    config = json.loads((fx.cache / "sae" / fx.clip.fingerprint[:16] / fx.layer / fx.sae / "cfg.json").read_text())
    quality = config["metadata"]["neurolens"]["quality"]
    shown = dict(re.findall(r"<dt>([^<]+)</dt><dd>([^<]+)", feature_card))
    assert float(shown["explained variance"]) == pytest.approx(quality["explained_variance"], abs=5e-4)
    assert float(shown["L0"]) == pytest.approx(quality["l0"], rel=5e-3)
    assert shown["dead"] == f"{100 * quality['dead_share']:.0f}%"
    assert float(shown["embedding cosine"]) == pytest.approx(quality["embedding_cosine"], abs=5e-5)
    assert "model loaded with this SAE" in feature_card                    # probes load the SAE too


def test_feature_layer_page_lists_every_feature_with_the_feature_sweeps_flags(server, fx, feature_id):
    status, _, page = request(server, "GET", f"/L/{feature_id}/index.html")
    assert status == 200
    text = page.decode()
    assert f"features of SAE {fx.sae}" in text and f"{fx.features} features" in text
    data = payload(page)
    assert data["unit_word"] == "feature" and [row[0] for row in data["units"]] == list(range(fx.features))
    assert {row[0] for row in data["units"] if row[1]} == set(fx.feature_flagged)
    # the layer's neurons are one click away, and the neuron page links back to the features
    assert f'href="../../L/{feature_id.split("~")[0]}/index.html"' in text
    neurons = request(server, "GET", f"/L/{feature_id.split('~')[0]}/index.html")[2].decode()
    assert f'href="../../L/{feature_id}/index.html">SAE {fx.sae}</a>' in neurons


def test_feature_unit_page_shows_the_features_records(server, fx, tiny_clip, basis, feature_scan, feature_id):
    from neurolens.models.layer_table import resolve_layer
    from neurolens.pipelines.text import find_text, unit_directions_cached
    feature = fx.feature_visualized[-1]
    status, _, body = request(server, "GET", f"/L/{feature_id}/u/{feature}.html")
    assert status == 200
    page = body.decode()
    # a reader sees at once that this is an SAE feature, not a neuron
    assert f"<title>feature {feature} of SAE {fx.sae} · nl-tiny-RN" in page
    assert f"Feature {feature} <span class=\"of-sae\">of SAE {fx.sae}</span>" in page
    assert f"<span>feature {feature}</span>" in page and "Unit " not in page
    # crops: the feature scan's top images, in order, with their activations and the feature's maps
    shots = re.findall(r'data-kind="crop"[^>]*data-index="(\d+)" data-rank="\d+" data-value="([^"]+)"', page)
    assert [int(i) for i, _ in shots] == [int(i) for i in feature_scan.top_indices[feature]]
    assert np.allclose([float(v) for _, v in shots], feature_scan.top_values[feature], rtol=1e-5)
    assert page.count('<svg class="mini"') == len(shots)
    # feature visualizations of every seed
    assert f"fv/{feature}-0.jpg" in page and f"fv/{feature}-1.jpg" in page
    # texts: the feature ranking's (decoder directions)
    ranking = find_text(tiny_clip, fx.layer, f"{fx.dataset}:caption", top_k=10, scan=feature_scan,
                        cache=Cache(fx.cache), basis=basis)
    texts = re.findall(r'<li class="[^"]*" data-score="([^"]+)" data-rank="\d+">\s*<span class="tbar"[^>]*></span>\s*'
                       r'<span class="t">([^<]*)</span>', page)
    assert [t for _, t in texts] == [ranking.entries[int(i)] for i in ranking.top_indices[feature]]
    # histogram: the feature scan's per-image maxima
    bars = [int(c) for c in re.findall(r'<rect class="bar[^"]*"[^>]*data-count="(\d+)"', page)]
    assert sum(bars) == feature_scan.count
    # similar features: by cosine of the features' text directions
    directions, cached = unit_directions_cached(tiny_clip, resolve_layer(tiny_clip, fx.layer), feature_scan,
                                                Cache(fx.cache), basis=basis)
    assert cached
    norms = np.linalg.norm(directions, axis=1)
    cosines = directions @ directions[feature] / np.maximum(norms * norms[feature], 1e-12)
    cosines[feature] = -np.inf
    similar = [int(u) for u in re.findall(r'<li><a href="(\d+)\.html">feature \d+</a>', page)]
    assert similar == [int(u) for u in np.argsort(-cosines, kind="stable")[:8]]
    # the feature sweep's evidence
    assert ("Why it is flagged" in page) == (feature in fx.feature_flagged)


def test_features_and_neurons_link_through_the_saes_decoder(server, fx, basis, layer_id, feature_id):
    """A feature page lists the neurons its decoder row weighs most, linked to their pages; a neuron page lists
    the features whose decoder rows weigh it most, linked back."""
    decoder = basis.sae.W_dec.detach().numpy()                  # (features, neurons)
    feature = fx.feature_flagged[0]
    page = request(server, "GET", f"/L/{feature_id}/u/{feature}.html")[2].decode()
    card = page[page.index('data-basis-links="neurons"'):]
    card = card[:card.index("</section>")]
    shown = re.findall(r'<a href="\.\./\.\./([^/]+)/u/(\d+)\.html">unit \d+</a><span class="muted" data-weight="([^"]+)"',
                       card)
    assert {target for target, _, _ in shown} == {layer_id}
    expected = np.argsort(-np.abs(decoder[feature]), kind="stable")[:8]
    assert [int(u) for _, u, _ in shown] == [int(u) for u in expected]
    assert np.allclose([float(w) for _, _, w in shown], decoder[feature, expected], atol=1e-6)
    neuron = int(expected[0])
    page = request(server, "GET", f"/L/{layer_id}/u/{neuron}.html")[2].decode()
    card = page[page.index('data-basis-links="features"'):]
    card = card[:card.index("</section>")]
    assert f"Features of SAE {fx.sae} on this neuron" in card
    linked = [int(u) for u in re.findall(r'<a href="\.\./\.\./' + re.escape(feature_id) + r'/u/(\d+)\.html">feature \d+</a>', card)]
    assert linked == [int(f) for f in np.argsort(-np.abs(decoder[:, neuron]), kind="stable")[:8]]


def test_no_decoder_links_without_the_very_same_sae(fx, basis):
    from dataclasses import replace
    from neurolens.serve.layer import LayerData
    from neurolens.records.index import index_cache
    [entry] = [e for e in index_cache(Cache(fx.cache)) if e.basis == fx.basis]
    assert np.array_equal(LayerData(Cache(fx.cache), entry).decoder(), basis.sae.W_dec.detach().numpy())
    retrained = replace(entry, basis=f"sae-{fx.sae}-000000000000")
    data = LayerData(Cache(fx.cache), retrained)
    assert data.decoder() is None and data.strongest_neurons(0) == []


def test_feature_images_are_blurred_with_the_feature_sweeps_flags_only(server, fx, feature_scan, feature_id):
    """Neuron flags and feature flags never mix: a feature's crops say "flagged unit" exactly when the sweep of
    the SAE's features flags it, whatever the neuron of the same number did."""
    from neurolens.serve.images import LayerImages
    from neurolens.serve.server import select_layers
    images = LayerImages(select_layers(Cache(fx.cache), [feature_id])[feature_id])
    flagged_by_reason = {f for f in range(fx.features)
                         if images.reason(f, int(feature_scan.top_indices[f, 0])) == "flagged unit"}
    assert flagged_by_reason == set(fx.feature_flagged)
    assert flagged_by_reason != set(fx.flagged) & set(range(fx.features))   # mixing would show here
    feature = fx.feature_flagged[0]
    page = request(server, "GET", f"/L/{feature_id}/u/{feature}.html")[2].decode()
    assert set(re.findall(r'data-kind="crop"[^>]*data-reason="([^"]*)"', page)) == {"flagged unit"}
    shown = picture(request(server, "GET", f"/img/{feature_id}/crop/{feature}-1.jpg")[2])
    original = raw_crop(fx, feature_scan, feature, 1)
    assert_blurred(shown, original, 20)
    assert request(server, "GET", f"/raw/{feature_id}/crop/{feature}-1.png")[0] == 403
    status, _, body = request(server, "GET", f"/raw/{feature_id}/crop/{feature}-1.png",
                              headers={"X-Neurolens-Reveal": "1"})
    assert status == 200 and np.array_equal(np.asarray(picture(body)), np.asarray(original))
    fv = request(server, "GET", f"/img/{feature_id}/fv/{feature}-0.jpg")
    raw_fv = request(server, "GET", f"/raw/{feature_id}/fv/{feature}-0.png", headers={"X-Neurolens-Reveal": "1"})
    assert fv[0] == 200 and raw_fv[0] == 200
    assert_blurred(picture(fv[2]), picture(raw_fv[2]), 30)
    assert request(server, "GET", f"/L/{feature_id}/u/{fx.features}.html")[0] == 404


def test_feature_top_maps_are_the_features_maps(fx, tiny_clip, basis, feature_scan, scan):
    from neurolens.errors import NeurolensError
    from neurolens.pipelines.topmaps import run_top_maps
    result = run_top_maps(tiny_clip, fx.layer, cache=Cache(fx.cache), basis=basis)   # the newest feature scan
    assert result.cached and result.mismatched == 0 and result.maps.shape == (fx.features, 8, 4, 4)
    assert result.path != run_top_maps(tiny_clip, fx.layer, scan=scan, cache=Cache(fx.cache)).path
    filled = feature_scan.top_indices >= 0
    flat = result.maps.reshape(fx.features, 8, -1)
    assert np.allclose(flat.max(axis=2)[filled], feature_scan.top_values[filled], atol=1e-5)
    cells = flat.argmax(axis=2)
    assert np.array_equal((cells // 4)[filled], feature_scan.top_cells[..., 0][filled])
    assert np.array_equal((cells % 4)[filled], feature_scan.top_cells[..., 1][filled])
    with pytest.raises(NeurolensError, match="pass the scan of the same basis"):
        run_top_maps(tiny_clip, fx.layer, scan=scan, cache=Cache(fx.cache), basis=basis)


def test_maps_command_takes_an_sae(fx):
    from typer.testing import CliRunner
    from neurolens.cli import app
    result = CliRunner().invoke(app, ["maps", "--model", "nl-tiny-RN", "--pretrained", "none", "--layer", fx.layer,
                                      "--sae", fx.sae, "--cache", str(fx.cache), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["basis"] == fx.basis and summary["cached"] is True and summary["mismatched"] == 0


def test_probe_of_a_feature_computes_the_features_map(server, fx, tiny_clip, basis, feature_scan, feature_id):
    feature = fx.feature_flagged[0]
    upload = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    answer, acts = probe_upload(server, tiny_clip, fx, feature_id, feature, upload)
    expected = basis.activations(acts)[0, feature].numpy()
    assert answer["unit_word"] == "feature" and answer["grid"] == [4, 4]
    assert np.allclose(np.asarray(answer["map"]), expected, atol=1e-5)
    top, maxima = answer["top_units"], basis.activations(acts)[0].amax(dim=(1, 2)).numpy()
    assert top and len({u["unit"] for u in top}) == len(top)
    for u in top:
        assert 0 <= u["unit"] < fx.features and u["value"] == pytest.approx(float(maxima[u["unit"]]), abs=1e-5)
    index = int(feature_scan.top_indices[feature, 0])
    status, _, body = request(server, "POST", f"/api/{feature_id}/probe?unit={feature}&index={index}", body=b"",
                              headers=PROBE)
    assert status == 200 and json.loads(body)["value"] == pytest.approx(float(feature_scan.top_values[feature, 0]),
                                                                         abs=1e-5)
    status, _, body = request(server, "POST", f"/api/{feature_id}/probe?unit={fx.features}&index=0", body=b"",
                              headers=PROBE)
    assert status == 400 and "feature" in json.loads(body)["error"]


def test_a_feature_layer_is_not_probed_without_the_very_same_sae(fx, tiny_clip):
    """Probes of features need the SAE the records were made with: another SAE under the name is refused."""
    from dataclasses import replace
    from neurolens.serve.probe import Prober
    from neurolens.serve.layer import LayerData
    from neurolens.records.index import index_cache
    [entry] = [e for e in index_cache(Cache(fx.cache)) if e.basis == fx.basis]
    prober = Prober(tiny_clip, Cache(fx.cache))
    assert prober.matches(LayerData(Cache(fx.cache), entry))
    retrained = replace(entry, basis=f"sae-{fx.sae}-000000000000")
    assert not prober.matches(LayerData(Cache(fx.cache), retrained))
    assert f"SAE {fx.sae}" in prober.reasons[retrained.id] and "same weights" in prober.reasons[retrained.id]


# ------------------------------------------------------------------------------------------------ options

def test_no_reveal_never_sends_raw_pixels(fx, layer_id):
    running = serve_fixture.start_server(fx.cache, "--no-reveal")
    try:
        status, _, body = request(running, "GET", f"/raw/{layer_id}/crop/{fx.flagged[0]}-1.png",
                                  headers={"X-Neurolens-Reveal": "1"})
        assert status == 403 and b"--no-reveal" in body
        page = request(running, "GET", f"/L/{layer_id}/u/{fx.flagged[0]}.html")[2]
        assert b'class="reveal"' not in page and b"reveals off" in page
        assert b'id="probe"' not in page                     # no model loaded: no probe box
    finally:
        serve_fixture.stop_server(running)


def test_any_other_host_needs_the_token(fx, layer_id):
    """127.0.0.2 is on the loopback network (the test stays local) but is not the default host: a token is
    generated and printed, and every request without it is refused."""
    running = serve_fixture.start_server(fx.cache, "--host", "127.0.0.2")
    try:
        assert running.url.startswith("http://127.0.0.2:") and "?token=" in running.url
        token = running.url.split("?token=")[1]

        def get(path, headers=None):
            connection = http.client.HTTPConnection("127.0.0.2", running.port, timeout=TIMEOUT)
            try:
                connection.request("GET", path, headers=headers or {})
                response = connection.getresponse()
                return response.status, dict(response.getheaders()), response.read()
            finally:
                connection.close()

        for path in ("/", f"/L/{layer_id}/index.html", f"/img/{layer_id}/tile/0.jpg", "/static/style.css",
                     f"/L/{layer_id}/u/0.html?token=wrong-token"):
            assert get(path)[0] == 403, path
        status, headers, _ = get(f"/?token={token}")
        assert status == 303 and headers["location"] == "/" and "HttpOnly" in headers["set-cookie"]
        cookie = headers["set-cookie"].split(";")[0]
        assert get(f"/L/{layer_id}/index.html", {"Cookie": cookie})[0] == 200
        assert get("/", {"Authorization": f"token {token}"})[0] == 200
        status, headers, _ = get(f"/x%0d%0aX-Evil:%201?token={token}")   # no header injection via the redirect
        assert status == 303 and "x-evil" not in {k.lower() for k in headers} and "\n" not in headers["location"]
    finally:
        serve_fixture.stop_server(running)


def test_access_rules():
    from neurolens.errors import NeurolensError
    from neurolens.serve.access import access_for
    assert access_for("127.0.0.1").token is None
    assert access_for("localhost").token is None
    generated = access_for("0.0.0.0")
    assert generated.token and len(generated.token) >= 24
    assert access_for("0.0.0.0").token != generated.token
    open_access = access_for("0.0.0.0", no_token=True)
    assert open_access.token is None and "without a token" in open_access.warning
    assert access_for("0.0.0.0", token="my-secret-token").token == "my-secret-token"
    for bad in ("short", "with space in it", "semi;colon;token"):
        with pytest.raises(NeurolensError):
            access_for("0.0.0.0", token=bad)
    with pytest.raises(NeurolensError):
        access_for("0.0.0.0", token="my-secret-token", no_token=True)


def test_empty_cache_is_one_clear_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "neurolens", "serve", "--cache", str(tmp_path), "--port", "0"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "nothing to show" in lines[0] and "neurolens demo" in lines[0]


def test_busy_port_is_one_clear_line(server, fx):
    out = subprocess.run([sys.executable, "-m", "neurolens", "serve", "--cache", str(fx.cache), "--port",
                          str(server.port)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 2 and "--port 0" in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------------------------------------ records

@pytest.mark.parametrize("which", ["neurons", "features"])
def test_histogram_is_the_scans_per_image_maxima(fx, scan, feature_scan, which):
    from neurolens.serve.layer import LayerData
    from neurolens.records.index import index_cache
    entries = {entry.basis: entry for entry in index_cache(Cache(fx.cache))}
    assert sorted(entries) == sorted(["neurons", fx.basis])
    entry = entries["neurons" if which == "neurons" else fx.basis]
    scan = scan if which == "neurons" else feature_scan
    data = LayerData(Cache(fx.cache), entry)
    values = scan.per_image_max()
    for unit in (0, scan.channels - 1):
        hist = data.histogram(unit)
        assert hist.count == scan.count == int(hist.counts.sum())
        expected, _ = np.histogram(values[:, unit], bins=hist.edges)
        assert np.array_equal(hist.counts, expected)
        assert hist.percentile(float(values[:, unit].max()) + 1.0) == 100.0
        assert hist.percentile(float(values[:, unit].min()) - 1.0) == 0.0


def test_top_maps_peak_where_the_scan_found_the_top_value(fx, scan, tiny_clip):
    from neurolens.pipelines.topmaps import run_top_maps
    result = run_top_maps(tiny_clip, fx.layer, scan=scan, cache=Cache(fx.cache))
    assert result.cached and result.mismatched == 0 and result.unreadable == 0
    maps = result.maps
    assert maps.shape == (fx.units, 8, 4, 4)
    filled = scan.top_indices >= 0
    peaks = maps.reshape(fx.units, 8, -1).max(axis=2)
    assert np.allclose(peaks[filled], scan.top_values[filled], atol=1e-5)
    cells = maps.reshape(fx.units, 8, -1).argmax(axis=2)
    rows, cols = cells // 4, cells % 4
    assert np.array_equal(rows[filled], scan.top_cells[..., 0][filled])
    assert np.array_equal(cols[filled], scan.top_cells[..., 1][filled])


def test_static_site_has_every_unit_and_only_blurred_images(fx, scan, tmp_path, layer_id):
    from neurolens.serve.site import write_site
    result = write_site(Cache(fx.cache), tmp_path / "site", examples=4)
    # home, the search page, two layer pages, units
    assert result.pages == 1 + 1 + 2 + fx.units + fx.features and not result.cached
    for basis_id in (layer_id, f"{layer_id}~{fx.basis}"):
        assert (tmp_path / "site" / "L" / basis_id / "find-index.js").is_file()
    page = (tmp_path / "site" / "L" / layer_id / "index.html").read_text()
    payload = re.search(r'<script type="application/json" id="units-data">(.*?)</script>', page, re.S).group(1)
    assert [row[0] for row in json.loads(payload)["units"]] == list(range(fx.units))
    assert not (tmp_path / "site" / "raw").exists()
    unit_page = (tmp_path / "site" / "L" / layer_id / "u" / f"{fx.flagged[0]}.html").read_text()
    assert 'class="reveal"' not in unit_page and "/raw/" not in unit_page
    for unit in (fx.flagged[0], 0):
        crop = Image.open(tmp_path / "site" / "img" / layer_id / "crop" / f"{unit}-1.jpg").convert("RGB")
        assert_blurred(crop, raw_crop(fx, scan, unit, 1), 20)
    assert not list((tmp_path / "site").rglob("*.png"))           # raw images are PNGs; the site has none
    again = write_site(Cache(fx.cache), tmp_path / "site", examples=4)
    assert again.cached and again.pages == result.pages


def test_site_pages_and_site_json_name_no_absolute_local_path(fx, tmp_path):
    """The fixture's records name its dataset table and vocabulary by absolute paths; the published site shows
    them by their last component only (issue 20), site.json included."""
    from neurolens.serve.site import write_site
    write_site(Cache(fx.cache), tmp_path / "site", examples=2)
    local = [str(fx.dataset.parent), str(fx.cache), str(Path.home()), "/tmp/"]
    for path in (tmp_path / "site").rglob("*"):
        if path.is_file() and path.suffix in (".html", ".json", ".js", ".css"):
            text = path.read_text(encoding="utf-8")
            for prefix in local:
                assert prefix not in text, (path, prefix)
    home = (tmp_path / "site" / "index.html").read_text()
    assert f"table {fx.dataset.name} (" in home


def test_site_of_one_basis_writes_only_its_pages(fx, tmp_path, layer_id, feature_id):
    """`site --basis tiny`: the SAE's feature pages only; its feature pages name their strongest neurons without
    links (the neuron pages are not in this site); an unknown basis is one clear line."""
    from typer.testing import CliRunner
    from neurolens.cli import app
    out = tmp_path / "site"
    result = CliRunner().invoke(app, ["site", "--out", str(out), "--basis", fx.sae, "--examples", "2",
                                      "--cache", str(fx.cache), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["layers"] == 1 and summary["pages"] == 1 + 1 + 1 + fx.features     # home, find, layer, features
    assert sorted(p.name for p in (out / "L").iterdir()) == [feature_id]
    page = (out / "L" / feature_id / "u" / f"{fx.feature_flagged[0]}.html").read_text()
    card = page[page.index('data-basis-links="neurons"'):]
    assert re.search(r"<span>unit \d+</span>", card) and layer_id + "/" not in card
    assert 'class="bases"' not in page                       # one basis in this site: no switch
    bad = CliRunner().invoke(app, ["site", "--out", str(tmp_path / "bad"), "--basis", "nope", "--cache", str(fx.cache)])
    assert bad.exit_code == 2 and "no basis named nope" in bad.output and f"neurons, {fx.sae}" in bad.output


def test_site_is_written_again_when_the_sae_changes(fx, tmp_path):
    """The feature-neuron links come from the SAE's weights: a site made before the SAE's files changed is
    not left as it is."""
    import os
    import shutil
    from neurolens.serve.site import write_site
    cache = tmp_path / "cache"
    shutil.copytree(fx.cache, cache)
    first = write_site(Cache(cache), tmp_path / "site", examples=1, bases=[fx.sae])
    assert not first.cached and write_site(Cache(cache), tmp_path / "site", examples=1, bases=[fx.sae]).cached
    weights = cache / "sae" / fx.clip.fingerprint[:16] / fx.layer / fx.sae / "sae_weights.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert not write_site(Cache(cache), tmp_path / "site", examples=1, bases=[fx.sae]).cached


def test_pages_of_a_layer_with_only_feature_visualizations(tmp_path, tiny_clip):
    """A layer with visualize records but no scan, sweep or texts: every page renders and says what is missing."""
    from neurolens.pipelines.visualize import run_visualize
    from neurolens.serve.images import LayerImages
    from neurolens.serve.pages import Pages
    from neurolens.serve.server import select_layers
    from neurolens.types import RenderSettings
    cache = Cache(tmp_path / "cache")
    run_visualize(tiny_clip, "image_block_4_0", [2, 5], RenderSettings(steps=2, seeds=(0,)), cache=cache)
    layers = select_layers(cache)
    [layer_id] = layers
    pages = Pages(layers, images={layer_id: LayerImages(layers[layer_id])})
    home = pages.home()
    assert "not computed" in home and "<strong>2</strong> visualized units" in home
    rows = json.loads(re.search(r'id="units-data">(.*?)</script>', pages.layer(layer_id), re.S).group(1))
    assert rows["crops"] is False and [(r[0], r[4]) for r in rows["units"]] == [(2, 1), (5, 1)]
    page = pages.unit(layer_id, 5)
    assert "No scan of this layer" in page and "No sweep of this layer" in page and "fv/5-0.jpg" in page
    images = LayerImages(layers[layer_id])
    assert images.shown("tile", 5) is not None and images.shown("tile", 3) is None


def test_site_on_a_full_disk_is_one_error_and_no_half_file(fx, tmp_path, full_disk):
    from neurolens.errors import NeurolensError
    from neurolens.serve.site import write_site
    disk = full_disk(when=lambda path: "site" in str(path), skip=20)
    with pytest.raises(NeurolensError, match="no space left"):
        write_site(Cache(fx.cache), tmp_path / "site", examples=2)
    assert disk.failed and not (tmp_path / "site" / "site.json").exists()
    assert not [p for p in (tmp_path / "site").rglob("*") if p.name.endswith(".tmp")]


def test_serve_without_the_serve_extra_says_what_to_install(fx, monkeypatch):
    from neurolens.errors import NeurolensError
    from neurolens.serve.server import serve
    monkeypatch.setitem(sys.modules, "uvicorn", None)           # as if the serve extra were not installed
    with pytest.raises(NeurolensError, match=r"pip install 'neurolens\[serve\]'"):
        serve(Cache(fx.cache), port=0)


@pytest.mark.parametrize("missing", ["starlette", "uvicorn"])
def test_serve_without_the_web_packages_says_so_in_one_line(tmp_path, missing):
    """An install without the web app's packages (they are base dependencies, but a user may remove them): one
    line naming the package and the extra, exit code 2, no traceback; the static site still builds."""
    blocked = (f"import runpy, sys; sys.modules[{missing!r}] = None; sys.argv = ['neurolens'] + sys.argv[1:]; "
               "runpy.run_module('neurolens', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", blocked, "serve", "--port", "0", "--cache", str(tmp_path)],
                         capture_output=True, text=True, timeout=TIMEOUT)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1 and f"needs {missing}," in lines[0] and "neurolens[serve]" in lines[0], lines
    out = subprocess.run([sys.executable, "-c", blocked, "site", "--out", str(tmp_path / "site"), "--cache",
                          str(tmp_path)], capture_output=True, text=True, timeout=TIMEOUT)
    assert "Traceback" not in out.stderr and "ModuleNotFoundError" not in out.stderr, out.stderr


# ------------------------------------------------------------------------------------------ concepts

def unit_page(server, layer_id, unit):
    status, _, body = request(server, "GET", f"/L/{layer_id}/u/{unit}.html")
    assert status == 200
    return body.decode()


def test_unit_page_shows_the_description_and_every_concepts_scores(server, fx, layer_id):
    from neurolens.records.descriptions import newest_descriptions
    described = newest_descriptions(Cache(fx.cache), fx.clip.fingerprint, fx.layer)
    unit = fx.intersections[0]
    body = unit_page(server, layer_id, unit)
    table = re.search(r'<section class="card" id="concepts">(.*?)</section>', body, re.S).group(1)
    rows = re.findall(r'<tr class="[^"]*" data-concept="([^"]+)" data-flagged="(\d)"', table)
    scores = {s.name: s for s in described.concepts.scores}
    assert [name for name, _ in rows] == ["nsfw", "pattern", "circles"]
    for name, flagged in rows:
        assert bool(int(flagged)) == bool(scores[name].flagged[unit])
        assert f"{scores[name].auc[unit]:.3f}" in table
    assert rows[0][1] == rows[1][1] == "1"                       # an intersection: nsfw and pattern
    description = re.search(r'<section class="card" id="description">(.*?)</section>', body, re.S).group(1)
    row = described.row(unit)
    assert html_text(row["summary"]) in description and "nsfw (AUC" in row["summary"]
    for caption in row["captions"]:
        assert f'data-ngram="{html_text(caption["ngram"])}"' in description
    assert 'name="q"' in body and 'action="../../../find.html"' in body     # the search box, on this page too


def html_text(text):
    import html
    return html.escape(text, quote=True)


def test_layer_page_carries_the_concept_filter_and_each_units_concepts(server, fx, layer_id):
    status, _, page = request(server, "GET", f"/L/{layer_id}/index.html")
    payload = json.loads(re.search(rb'<script type="application/json" id="units-data">(.*?)</script>', page,
                                   re.S).group(1))
    concepts = payload["concepts"]
    assert [c["name"] for c in concepts["concepts"]] == ["nsfw", "pattern", "circles"]
    assert [c["sensitive"] for c in concepts["concepts"]] == [True, False, False]
    both = [u for u, flags in enumerate(concepts["flags"]) if len(flags) >= 2]
    assert sorted(both) == sorted(fx.intersections) and concepts["intersections"] == len(both)
    assert b'<select id="concept"' in page and b'value="pairs"' in page


def test_search_page_and_index_answer_for_every_basis(server, fx, layer_id):
    """find.html lists every layer; each layer's find-index.js holds the same caption matches as `neurolens find`."""
    from neurolens.pipelines.find import find, locate
    status, headers, body = request(server, "GET", "/find.html")
    assert status == 200 and b'id="find-results"' in body and layer_id.encode() in body
    status, headers, script = request(server, "GET", f"/L/{layer_id}/find-index.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    prefix = f"window.neurolensFind[{json.dumps(layer_id)}] = "
    index = json.loads(script.decode().split(prefix, 1)[1].rstrip().rstrip(";"))
    located = locate(Cache(fx.cache), fx.layer, fingerprint=fx.clip.fingerprint)
    top = located.top_indices
    for query in ("nsfw", "pattern", "circles"):
        entry = index["queries"][query]
        result = find(located, query)
        hits, unknown = set(entry["hits"]), set(entry["unknown"])
        for row in result.rows[:20]:
            local = index["top"][row["unit"]]
            known = [i for i in local if i not in unknown]
            share = sum(i in hits for i in known) / len(known) if known else None
            assert share == pytest.approx(row["caption_share"])
        assert len(index["top"]) == fx.units and len(index["top"][0]) == top.shape[1]
    assert request(server, "GET", f"/L/{layer_id}~{fx.basis}/find-index.js")[0] == 200
    assert request(server, "GET", "/L/no-such-layer/find-index.js")[0] == 404


def test_images_labelled_with_a_sensitive_concept_are_blurred_for_that_reason(server, fx, layer_id):
    """The concept audit's sensitive labels reach the blur policy: an unflagged unit's top image that the nsfw
    lexicon labels is blurred as 'sensitive label'; one labelled only with a non-sensitive concept is not."""
    from neurolens.records.concepts import newest_result
    from neurolens.serve.images import LayerImages
    from neurolens.serve.server import select_layers
    audit = newest_result(Cache(fx.cache), fx.clip.fingerprint, fx.layer)
    nsfw, circles = audit.concept("nsfw").labels.labels, audit.concept("circles").labels.labels
    images = LayerImages(select_layers(Cache(fx.cache), [layer_id])[layer_id])
    concept_flagged = set(np.flatnonzero(audit.concept("nsfw").flagged))
    assert concept_flagged <= images.flagged
    checked = {"sensitive": 0, "other": 0}
    data = images.data
    for unit in range(fx.units):
        if unit in images.flagged:
            continue
        for index in data.top_indices[unit]:
            reason = images.reason(unit, int(index))
            if nsfw[index] == 1:
                assert reason == "sensitive label 1.00"
                checked["sensitive"] += 1
            elif circles[index] == 1:
                assert reason == "hidden until revealed"
                checked["other"] += 1
    assert checked["sensitive"] and checked["other"], checked
