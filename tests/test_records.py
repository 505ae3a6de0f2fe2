"""neurolens.records: every record kind written by its pipeline and read back through every consumer (the
records module itself, without a model; the pipeline's cache-or-compute reader; the blur policy; the web
app's cache index and layer data), at the paths and keys caches written before this layout have."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from neurolens.datasets.open import open_dataset
from neurolens.labels import nudenet
from neurolens.labels.policy import BlurPolicy
from neurolens.labels.sources import nudenet_scores
from neurolens.models.layer_table import resolve_layer
from neurolens.pipelines.scan_find import find_scan
from neurolens.pipelines.scan import run_scan
from neurolens.pipelines.text import find_text, run_text
from neurolens.pipelines.topmaps import run_top_maps
from neurolens.pipelines.visualize import resolved_settings, run_visualize
from neurolens.records import labels as label_records
from neurolens.records import maps as map_records
from neurolens.records import sae as sae_records
from neurolens.records import scan as scan_records
from neurolens.records import shards as shard_records
from neurolens.records import text as text_records
from neurolens.records import visualize as fv_records
from neurolens.records.keys import NEURONS, as_basis, as_cache, basis_id, basis_parts
from neurolens.sae.model import SaeConfig, SparseAutoencoder
from neurolens.sae.registry import list_saes, locate
from neurolens.sae.basis import load_basis
from neurolens.sae.io import save_sae
from neurolens.serve.layer import LayerData
from neurolens.records.index import index_cache
from neurolens.records.sae import trained_saes
from neurolens.storage.cache import Cache, Record, read_attrs, settings_key, written_at
from neurolens.types import RenderSettings
from scan_data import write_images

LAYER = "image_block_4_0"
RENDER = RenderSettings(steps=2, seeds=(0,))
VOCAB = ["a red square", "a blue circle", "green stripes", "a yellow star", "grey noise", "an orange disk"]


class _Basis:
    """What keys and file names see of a basis: its id and name."""
    def __init__(self, name, id):
        self.name, self.id = name, id


@pytest.fixture(scope="module")
def built(tiny_clip, tmp_path_factory):
    """A cache with every kind of a layer, for the neurons and an SAE's features, made by the pipelines."""
    root = tmp_path_factory.mktemp("records")
    cache = Cache(root / "cache")
    images = root / "images"
    write_images(images, 10)
    dataset = open_dataset(str(images))
    spec = resolve_layer(tiny_clip, LAYER)
    sae = SparseAutoencoder(SaeConfig(d_in=spec.channels, d_sae=6, k=2))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(spec.channels, 6, generator=generator))
        sae.W_dec.copy_(torch.nn.functional.normalize(sae.W_enc.t(), dim=1))
    save_sae(sae, sae_records.sae_folder(cache, tiny_clip.fingerprint, spec.name, "hand"))
    basis = load_basis(tiny_clip, LAYER, "hand", cache)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    scan = run_scan(tiny_clip, LAYER, dataset, top_k=3, cache=cache, embeddings=True, workers=0)
    features = run_scan(tiny_clip, LAYER, dataset, top_k=3, cache=cache, embeddings=True, workers=0, basis=basis)
    ranking = run_text(tiny_clip, LAYER, str(vocab), top_k=4, scan=scan, cache=cache)
    visualized = run_visualize(tiny_clip, LAYER, [1, 4], RENDER, cache=cache)
    feature_fv = run_visualize(tiny_clip, LAYER, [2], RENDER, cache=cache, basis=basis)
    maps = run_top_maps(tiny_clip, LAYER, scan=scan, dataset=dataset, cache=cache, workers=0)
    return dict(cache=cache, dataset=dataset, spec=spec, basis=basis, vocab=str(vocab), scan=scan,
                features=features, ranking=ranking, visualized=visualized, feature_fv=feature_fv, maps=maps)


def _relative(cache, path):
    return path.relative_to(cache.root).parts


# ------------------------------------------------------------------------------------------- keys

def test_basis_keys_leave_the_neurons_keys_as_they_were():
    sae = _Basis("x", "sae-x-0123456789ab")
    assert as_basis(None) is None and as_basis(_Basis("", NEURONS)) is None and as_basis(sae) is sae
    assert basis_id(None) == "neurons" and basis_id(_Basis("", NEURONS)) == "neurons" and basis_id(sae) == sae.id
    assert basis_parts(None) == [] and basis_parts(sae) == ["sae-x-0123456789ab"]
    cache = Cache("somewhere")
    assert as_cache(cache) is cache and as_cache("elsewhere").root.name == "elsewhere"


# ------------------------------------------------------------------------------------------- scan

def test_scan_record_reads_back_without_a_model_and_through_every_reader(built, tiny_clip):
    cache, spec, scan, dataset = built["cache"], built["spec"], built["scan"], built["dataset"]
    key = settings_key("scan", 1, dataset.identity, spec.name, spec.hook_module, spec.capture, tiny_clip.image_size,
                       list(tiny_clip.mean), list(tiny_clip.std), "fp32", 3, True)    # the key scans always had
    assert _relative(cache, scan.path) == ("scan", tiny_clip.fingerprint[:16], LAYER, f"{key}.h5")
    assert scan_records.scan_key(tiny_clip, spec, dataset, 3, "fp32", True) == key

    # the records module alone: no clip, no layer spec
    newest = scan_records.newest_scan(cache, tiny_clip.fingerprint, LAYER)
    assert newest.path == scan.path and newest.basis == "neurons" and newest.cached
    np.testing.assert_array_equal(newest.top_indices, scan.top_indices)
    np.testing.assert_array_equal(newest.per_image_max(), scan.per_image_max())
    assert newest.embeddings.shape[0] == len(dataset) and np.isfinite(newest.embeddings).all()
    assert newest.per_image_max().shape == (10, spec.channels)
    # each image's top value is its row's spatial max: the chunk agrees with the top-k
    top = newest.top_indices[:, 0]
    np.testing.assert_allclose(newest.per_image_max()[top, np.arange(spec.channels)], newest.top_values[:, 0],
                               rtol=1e-5)

    # the pipeline's reader (a scan with embeddings answers one without)
    found = find_scan(tiny_clip, LAYER, dataset, top_k=3, cache=cache)
    assert found.path == scan.path and found.cached

    # the web app: the layer is indexed from the record's attrs, and its page data is the same scan
    entry = next(e for e in index_cache(cache) if e.basis == "neurons")
    assert entry.model == tiny_clip.name and entry.layer == LAYER and entry.paths["scan"] == [scan.path]
    data = LayerData(cache, entry).load()
    np.testing.assert_array_equal(data.top_indices, scan.top_indices)
    record = cache.read(scan.path)
    assert data.chunk_paths == scan_records.chunk_paths(cache, record) == scan._chunk_paths
    assert data.top_examples(0)[0]["index"] == int(scan.top_indices[0, 0])
    assert data.histogram(0).count == 10


def test_feature_scan_record_is_found_by_basis(built, tiny_clip):
    cache, basis, features, scan = built["cache"], built["basis"], built["features"], built["scan"]
    assert features.basis == basis.id and features.channels == 6 and features.path != scan.path
    newest = scan_records.newest_scan(cache, tiny_clip.fingerprint, LAYER, basis)
    assert newest.path == features.path and newest.summary()["basis"] == basis.id
    assert scan_records.newest_scan(cache, tiny_clip.fingerprint, LAYER).path == scan.path
    assert read_attrs(features.path)["basis_info"]["name"] == "hand"
    entry = next(e for e in index_cache(cache) if e.basis == basis.id)
    assert entry.sae_name == "hand" and entry.paths["scan"] == [features.path]
    assert LayerData(cache, entry).load().units == 6


def test_checkpoint_and_chunks_round_trip(tmp_path):
    cache = Cache(tmp_path)
    fingerprint, layer, key = "f" * 40, "block", "key"
    name = scan_records.chunk_name(key, 0)
    assert name == "key-0000000000"
    scan_records.write_chunk(cache, fingerprint, layer, name, np.arange(3), np.ones((3, 2), np.float32), 0, 3)
    state = {"topk/values": np.zeros((2, 1), np.float32)}
    scan_records.write_checkpoint(cache, fingerprint, layer, key, state, 3, 3, {"neurons": [name]}, [], 9)
    checkpoint = scan_records.read_checkpoint(cache, fingerprint, layer, key)
    assert (checkpoint.next_index, checkpoint.batch_size, checkpoint.streams) == (3, 3, {"neurons": [name]})
    np.testing.assert_array_equal(checkpoint.state["topk/values"], state["topk/values"])
    path = scan_records.checkpoint_path(cache, fingerprint, layer, key)
    assert _relative(cache, path) == ("scan-checkpoint", "f" * 16, "block", "key.h5")
    # a checkpoint written before bases existed lists its chunks under `chunks`
    cache.write(path, Record(arrays={}, attrs={"next_index": 3, "batch_size": 3, "chunks": [name]}))
    assert scan_records.read_checkpoint(cache, fingerprint, layer, key).streams == {"neurons": [name]}
    # a chunk it lists is gone: there is nothing to resume
    scan_records.remove_chunks(cache, fingerprint, layer, [name])
    assert scan_records.read_checkpoint(cache, fingerprint, layer, key) is None
    # stale chunks of a key go, those of another key and the kept ones stay
    for chunk in ("key-0000000000", "key-0000000003", "other-0000000000"):
        scan_records.write_chunk(cache, fingerprint, layer, chunk, np.arange(1), np.ones((1, 2)), 0, 1)
    scan_records.remove_stale_chunks(cache, fingerprint, layer, "key", ["key-0000000003"])
    left = sorted(p.name for p in cache.folder("scan-chunk", fingerprint, layer).iterdir())
    assert left == ["key-0000000003.h5", "other-0000000000.h5"]


# ------------------------------------------------------------------------------------------- text

def test_text_records_read_back_through_the_pipeline_and_the_web_app(built, tiny_clip):
    cache, spec, scan, ranking = built["cache"], built["spec"], built["scan"], built["ranking"]
    vocab_identity, reference = ranking.vocab_identity, ranking.reference
    fp = tiny_clip.fingerprint
    rankings_key = settings_key("text-rankings", 1, spec.hook_module, spec.capture, vocab_identity, reference, 4)
    assert _relative(cache, ranking.path) == ("text-rankings", fp[:16], LAYER, f"{rankings_key}.h5")
    embeddings_key = settings_key("text-embeddings", 1, vocab_identity)
    assert _relative(cache, text_records.embeddings_path(cache, fp, vocab_identity)) == \
        ("text-embeddings", fp[:16], "text", f"{embeddings_key}.h5")
    directions_path = text_records.directions_path(cache, fp, spec, reference)
    directions_key = settings_key("text-directions", 1, spec.hook_module, spec.capture, reference)
    assert directions_path.name == f"{directions_key}.h5"

    indices, scores = text_records.read_ranking(cache, ranking.path, spec.channels, 4)
    np.testing.assert_array_equal(indices, ranking.top_indices)
    assert text_records.read_ranking(cache, ranking.path, spec.channels, 5) is None          # another top-k
    embeddings = text_records.read_embeddings(cache, text_records.embeddings_path(cache, fp, vocab_identity), 6)
    directions = text_records.read_directions(cache, directions_path, spec.channels)
    assert embeddings.shape[0] == 6 and directions.shape == (spec.channels, embeddings.shape[1])
    norms = np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)   # dead units: zero direction
    cosines = directions / norms @ embeddings.T
    np.testing.assert_allclose(np.sort(cosines, axis=1)[:, ::-1][:, :4], scores, atol=1e-4)

    found = find_text(tiny_clip, LAYER, built["vocab"], top_k=4, scan=scan, cache=cache)
    assert found.cached and found.rows(0, 1)[0]["text"] == VOCAB[int(indices[0, 0])]
    entry = next(e for e in index_cache(cache) if e.basis == "neurons")
    data = LayerData(cache, entry).load()
    assert [row["text"] for row in data.top_texts(0)] == [VOCAB[int(i)] for i in indices[0]]
    assert data.directions_record_path == directions_path and len(data.similar_units(0)) > 0


# ------------------------------------------------------------------------------------------- visualize

def test_visualization_names_are_written_and_parsed_in_one_place(built, tiny_clip):
    cache, basis = built["cache"], built["basis"]
    settings = resolved_settings(tiny_clip, RENDER)
    path = fv_records.record_path(cache, tiny_clip, LAYER, 4, settings)
    assert path.name.startswith("unit4_") and fv_records.parse_name(path) == (NEURONS, 4)
    feature_path = fv_records.record_path(cache, tiny_clip, LAYER, 2, settings, basis)
    assert feature_path.name.startswith("sae-hand_feature2_") and fv_records.parse_name(feature_path) == ("hand", 2)
    tricky = _Basis("my_feature_x", "sae-my_feature_x-0123456789ab")
    assert fv_records.parse_name(f"{fv_records.unit_tag(12, tricky)}_abc123.h5") == ("my_feature_x", 12)
    for other in ("unit_abc.h5", "unitx_abc.h5", "sae-x_abc.h5", "notes.h5"):
        assert fv_records.parse_name(other) is None
    assert basis.tag(2) == fv_records.unit_tag(2, basis) and fv_records.unit_tag(2) == "unit2"

    assert sorted(fv_records.layer_records(cache, tiny_clip.fingerprint, LAYER)) == [1, 4]
    assert fv_records.layer_records(cache, tiny_clip.fingerprint, LAYER, "hand") == {2: [feature_path]}
    record = fv_records.read_visualization(cache, path, names=["activations"], basis=NEURONS)
    assert record.attrs["unit"] == 4 and record.attrs["settings"]["steps"] == 2
    np.testing.assert_allclose(record.arrays["activations"], built["visualized"][1].activations)
    assert fv_records.read_visualization(cache, feature_path, basis=NEURONS) is None     # another basis's unit

    again = run_visualize(tiny_clip, LAYER, [4], RENDER, cache=cache)[0]
    assert again.cached
    neurons = next(e for e in index_cache(cache) if e.basis == "neurons")
    assert neurons.paths["visualize"] == sorted(p for paths in fv_records.layer_records(
        cache, tiny_clip.fingerprint, LAYER).values() for p in paths)
    assert len(LayerData(cache, neurons).load().visualizations(4)) == 1
    features = next(e for e in index_cache(cache) if e.basis == basis.id)
    assert features.paths["visualize"] == [feature_path]
    assert [v.record for v in LayerData(cache, features).load().visualizations(2)] == [feature_path]


# ------------------------------------------------------------------------------------------- top maps

def test_top_maps_record_reads_back_through_the_pipeline_and_the_web_app(built, tiny_clip):
    cache, scan, maps = built["cache"], built["scan"], built["maps"]
    path = map_records.top_maps_path(cache, tiny_clip.fingerprint, LAYER, scan.path)
    assert maps.path == path and _relative(cache, path) == ("top-maps", tiny_clip.fingerprint[:16], LAYER,
                                                            scan.path.name)
    found = map_records.read_top_maps(cache, path, scan.top_indices.shape)
    assert found.cached and found.images == maps.images
    assert map_records.read_top_maps(cache, path, (1, 1)) is None                      # made for another scan
    peaks = np.nanmax(found.maps.reshape(*found.maps.shape[:2], -1), axis=2)
    np.testing.assert_allclose(peaks, scan.top_values, rtol=1e-3, atol=1e-4)        # where the unit fired
    again = run_top_maps(tiny_clip, LAYER, cache=cache)                              # the newest scan's maps
    assert again.cached and again.path == path
    entry = next(e for e in index_cache(cache) if e.basis == "neurons")
    np.testing.assert_array_equal(LayerData(cache, entry).maps(), found.maps)
    assert read_attrs(path)["scan_record"] == scan.path.name


# ------------------------------------------------------------------------------------------- labels

def _reddish(rgb):
    return float(rgb[..., 0].mean()) > 128


def test_the_blur_policys_score_records_are_read_by_a_new_policy(tmp_path, fake_detector):
    fake = fake_detector(_reddish)
    cache = Cache(tmp_path)
    red = Image.new("RGB", (32, 32), (230, 20, 20))
    assert BlurPolicy(cache=cache).detector_score(red) == pytest.approx(0.93)
    [path] = list(cache.records("nudenet"))
    assert path.parent.name == "images" and label_records.read_score(cache, path) == pytest.approx(0.93)
    seen = len(fake.seen)
    assert BlurPolicy(cache=cache).reason_fv(0, red) == "NudeNet 0.93" and len(fake.seen) == seen   # no detector run


def test_nudenet_chunk_records_are_read_back(tmp_path, fake_detector):
    fake_detector(_reddish)
    images = tmp_path / "images"
    write_images(images, 3)
    dataset = open_dataset(str(images))
    cache = Cache(tmp_path / "cache")
    scores = nudenet_scores(dataset, cache)
    key = label_records.nudenet_chunk_key(nudenet.version(), nudenet.EXPOSED)
    path = label_records.nudenet_chunk_path(cache, dataset.identity, key, 0)
    assert _relative(cache, path)[0] == "labels-nudenet" and path.is_file()
    np.testing.assert_array_equal(label_records.read_nudenet_chunk(cache, path, 3), scores)
    assert label_records.read_nudenet_chunk(cache, path, 4) is None


# ------------------------------------------------------------------------------------------- shards, SAE

def test_shard_listing_round_trip(tmp_path):
    cache = Cache(tmp_path)
    shard = str(tmp_path / "00000.tar")
    path = shard_records.listing_path(cache, shard)
    assert _relative(cache, path)[:3] == ("dataset-listing", "tar", "shards")
    assert shard_records.read_listing(cache, path) is None
    shard_records.write_listing(cache, path, shard, ["a.jpg", "b.jpg"], ["one", "two"], ["p1", "p2"])
    assert shard_records.read_listing(cache, path) == (["p1", "p2"], 2)
    assert shard_records.listing_keys_and_captions(cache, path) == (["a.jpg", "b.jpg"], ["one", "two"])


def test_sae_folder_is_listed_by_the_registry_and_the_web_app(built, tiny_clip):
    cache = built["cache"]
    folder = sae_records.sae_folder(cache, tiny_clip.fingerprint, LAYER, "hand")
    assert _relative(cache, folder) == ("sae", tiny_clip.fingerprint[:16], LAYER, "hand")
    assert sae_records.is_complete(folder) and json.loads((folder / sae_records.CFG_NAME).read_text())["d_sae"] == 6
    assert sae_records.saved_names(cache, tiny_clip.fingerprint, LAYER) == ["hand"]
    assert list_saes(tiny_clip, LAYER, cache) == ["hand"]
    assert locate(tiny_clip, LAYER, "hand", cache) == (folder, "hand", True)
    assert [s.name for s in trained_saes(cache, tiny_clip.fingerprint[:16], LAYER)] == ["hand"]
    with pytest.raises(Exception, match="not usable"):
        sae_records.check_name("../escape")


# ------------------------------------------------------------------------------------------- opening files

def test_every_reader_survives_a_file_that_is_not_a_record(tmp_path):
    cache = Cache(tmp_path)
    good = cache.write(cache.path("scan", "f" * 16, "block", "good"), Record(arrays={"x": np.arange(3)},
                                                                              attrs={"complete": True}))
    bad = cache.path("scan", "f" * 16, "block", "bad")
    bad.write_bytes(b"not hdf5")
    assert cache.read(bad) is None and written_at(bad) == 0.0
    assert read_attrs(good) == {"complete": True} and written_at(good) > 0
    assert cache.layer_records("scan", "f" * 16, "block") == [bad, good]
    assert scan_records.newest_scan(cache, "f" * 16, "other") is None
