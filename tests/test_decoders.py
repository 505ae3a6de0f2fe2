"""The two image decoders of a scan (issue 23, docs/scan.md `--decode`): `torchvision` (batched
torchvision.io.decode_jpeg, torch resize) ranks images as `pil` does, on photo-like JPEGs of several sizes and
aspect ratios mixed with PNGs, a CMYK, a progressive and broken JPEGs (which go to PIL: same skips, same
reasons, same pixels); the decode limits hold for both; the decoder is in the record and (unless pil) in its
key; and nothing is copied to the host per batch."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hostile_data import FifoWatchdog, hostile_folder, tall_png
from neurolens.activations.forward import layer_forward
from neurolens.datasets.decode import decode_image, prepare_item, preprocess_array, resolve_decoder
from neurolens.datasets.jpeg import batchable, read_header
from neurolens.datasets.open import open_dataset
from neurolens.engines.decode import assemble, decode_jpegs, to_input
from neurolens.engines.timing import STAGES, StageClock
from neurolens.models.layer_table import resolve_layer
from neurolens.pipelines.scan_find import find_scan
from neurolens.pipelines.scan import run_scan
from neurolens.pipelines.topmaps import run_top_maps
from neurolens.records.scan import scan_key
from neurolens.sae.buffer import ActivationStream
from neurolens.storage.cache import Cache, settings_key
from scan_data import photo_like

LAYER = "image_block_3_0"
# LAION-like sizes and aspect ratios; 700 x 150 and 120 x 600 are beyond 4:1 (cropped before the resize)
SIZES = [(500, 400), (400, 500), (640, 360), (333, 250), (90, 350), (60, 48), (1024, 768), (250, 333),
         (700, 150), (120, 600)]
FALLBACKS = ("q0.png", "q1.png", "q2.png", "c_cmyk.jpg", "c_progressive.jpg")


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """36 photo-like baseline JPEGs, 3 PNGs, a CMYK, a progressive and a grayscale JPEG, and 3 broken JPEGs."""
    folder = tmp_path_factory.mktemp("mixed")
    for i in range(36):
        (folder / f"p{i:03d}.jpg").write_bytes(_jpeg(photo_like(i, SIZES[i % len(SIZES)])))
    for i in range(3):
        photo_like(100 + i, SIZES[i]).save(folder / f"q{i}.png")
    (folder / "c_cmyk.jpg").write_bytes(_jpeg(photo_like(200).convert("CMYK")))
    (folder / "c_progressive.jpg").write_bytes(_jpeg(photo_like(201), progressive=True))
    (folder / "c_gray.jpg").write_bytes(_jpeg(photo_like(202, (320, 240)).convert("L")))
    good = bytearray(_jpeg(photo_like(203)))
    (folder / "t_truncated.jpg").write_bytes(bytes(good[: len(good) // 2]))
    (folder / "t_zero.jpg").write_bytes(b"")
    good[len(good) // 2:len(good) // 2 + 400] = np.random.default_rng(0).integers(0, 256, 400, np.uint8).tobytes()
    (folder / "t_corrupt.jpg").write_bytes(bytes(good))      # header and end marker intact, garbage inside
    return folder


@pytest.fixture(scope="module")
def scans(mixed, tiny_clip, tmp_path_factory):
    cache = Cache(tmp_path_factory.mktemp("cache"))
    dataset = open_dataset(str(mixed))
    pil = run_scan(tiny_clip, LAYER, dataset, top_k=8, batch_size=8, workers=0, cache=cache, decoder="pil")
    tv = run_scan(tiny_clip, LAYER, dataset, top_k=8, batch_size=8, workers=2, cache=cache, decoder="torchvision")
    return {"pil": pil, "torchvision": tv, "dataset": dataset, "cache": cache}


def test_only_complete_baseline_jpegs_go_to_the_batched_decoder(mixed):
    dataset = open_dataset(str(mixed))
    names = [os.path.basename(key) for key in dataset.keys]
    for i, name in enumerate(names):
        item = prepare_item(dataset, i, 64, "torchvision")
        if name.startswith("p") or name == "c_gray.jpg" or name == "t_corrupt.jpg":
            assert item.jpeg is not None and item.array is None and item.reason == "", name
        elif name in FALLBACKS:
            assert item.jpeg is None and item.array is not None and item.reason == "", name
        else:
            assert item.jpeg is None and item.reason == prepare_item(dataset, i, 64, "pil").reason != "", name
    header = read_header((mixed / "p000.jpg").read_bytes())
    assert (header.width, header.height, header.components, header.sequential) == (500, 400, 3, True)
    assert not read_header((mixed / "c_progressive.jpg").read_bytes()).sequential
    assert read_header((mixed / "c_cmyk.jpg").read_bytes()).components == 4
    # a header claiming 50,000 x 50,000 pixels goes to PIL, which refuses it as the pil decoder does
    data = bytearray((mixed / "p001.jpg").read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (50_000).to_bytes(2, "big") * 2
    assert read_header(bytes(data)).width == 50_000 and not batchable(bytes(data), 89_478_485)
    (mixed.parent / "bomb").mkdir(exist_ok=True)
    (mixed.parent / "bomb" / "bomb.jpg").write_bytes(bytes(data))
    bomb = open_dataset(str(mixed.parent / "bomb"))
    reason = prepare_item(bomb, 0, 64, "torchvision").reason
    assert "decompression bomb" in reason and reason == prepare_item(bomb, 0, 64, "pil").reason


def test_torch_preprocessing_is_within_two_grey_levels_of_pil(mixed, tiny_clip):
    """The documented tolerance (docs/scan.md): preprocessed pixels at most 2 grey levels apart (on a few % of
    the values), activations of the tiny random model within 1 % of the layer's largest value."""
    blobs = [(mixed / f"p{i:03d}.jpg").read_bytes() for i in range(36)] + [(mixed / "c_gray.jpg").read_bytes()]
    size = tiny_clip.image_size
    pil = np.stack([preprocess_array(decode_image(blob), size) for blob in blobs])
    torch_side = torch.stack([to_input(image, size) for image in decode_jpegs(blobs, "cpu")]).numpy()
    difference = np.abs(pil.astype(int) - torch_side.astype(int))
    assert difference.max() <= 2
    assert (difference > 0).mean() < 0.05
    spec = resolve_layer(tiny_clip, LAYER)
    acts_pil, _ = layer_forward(tiny_clip, spec, torch.from_numpy(pil).float() / 255)
    acts_tv, _ = layer_forward(tiny_clip, spec, torch.from_numpy(torch_side).float() / 255)
    assert float((acts_pil - acts_tv).abs().max()) <= 0.01 * float(acts_pil.abs().max())


def test_torchvision_scan_ranks_like_pil_and_falls_back_per_image(scans):
    pil, tv = scans["pil"], scans["torchvision"]
    k = 8
    overlap = np.mean([len(set(a[:k]) & set(b[:k])) / k
                       for a, b in zip(pil.top_indices.tolist(), tv.top_indices.tolist())])
    assert overlap >= 0.99
    assert (pil.count, pil.skipped_paths, pil.skipped_reasons) == (tv.count, tv.skipped_paths, tv.skipped_reasons)
    assert sorted(os.path.basename(p) for p in tv.skipped_paths) == ["t_corrupt.jpg", "t_truncated.jpg", "t_zero.jpg"]
    a, b = pil.per_image_max(), tv.per_image_max()
    valid = pil.valid
    assert float(np.abs(a[valid] - b[valid]).max()) <= 0.01 * float(np.abs(a[valid]).max())
    names = [os.path.basename(key) for key in pil.keys]
    for name in FALLBACKS:                         # decoded by PIL in both scans: the same values, bit for bit
        np.testing.assert_array_equal(a[names.index(name)], b[names.index(name)], err_msg=name)
    assert (pil.decoder, tv.decoder) == ("pil", "torchvision") and pil.path != tv.path


def test_decoder_is_in_the_record_and_only_a_non_pil_decoder_changes_the_key(scans, tiny_clip):
    dataset, cache = scans["dataset"], scans["cache"]
    spec = resolve_layer(tiny_clip, LAYER)
    before = settings_key("scan", 1, dataset.identity, spec.name, spec.hook_module, spec.capture,
                          tiny_clip.image_size, list(tiny_clip.mean), list(tiny_clip.std), "fp32", 8, False)
    assert scan_key(tiny_clip, spec, dataset, 8, "fp32", False) == before                 # old caches stay valid
    assert scan_key(tiny_clip, spec, dataset, 8, "fp32", False, decoder="pil") == before
    assert scan_key(tiny_clip, spec, dataset, 8, "fp32", False, decoder="torchvision") != before
    assert scans["pil"].path.stem == before
    assert resolve_decoder("auto", torch.device("cpu")) == "pil" and resolve_decoder("auto", "cuda") == "torchvision"
    assert find_scan(tiny_clip, LAYER, dataset, 8, cache=cache).path == scans["pil"].path      # auto on CPU
    assert find_scan(tiny_clip, LAYER, dataset, 8, cache=cache, decoder="torchvision").path == scans["torchvision"].path
    assert cache.read(scans["torchvision"].path).attrs["decoder"] == "torchvision"


def test_top_maps_recompute_with_the_scan_decoder(scans, tiny_clip):
    maps = run_top_maps(tiny_clip, LAYER, scan=scans["torchvision"], dataset=scans["dataset"],
                        cache=scans["cache"], workers=0)
    assert maps.mismatched == 0 and maps.unreadable == 0


def test_decode_limits_apply_to_the_torchvision_decoder(tmp_path, tiny_clip, monkeypatch):
    sizes = []
    real = torch.nn.functional.interpolate

    def interpolate(tensor, size=None, **options):
        sizes.append(tuple(size))
        assert size[0] * size[1] <= 16_000_000, f"resize to {size}"
        return real(tensor, size=size, **options)
    monkeypatch.setattr(torch.nn.functional, "interpolate", interpolate)
    folder = tmp_path / "tall"
    folder.mkdir()
    (folder / "tall.jpg").write_bytes(tall_png(1, 20_000, fmt="JPEG"))
    (folder / "wide.jpg").write_bytes(tall_png(20_000, 1, fmt="JPEG"))
    dataset = open_dataset(str(folder))
    items = [prepare_item(dataset, i, 224, "torchvision") for i in range(2)]
    assert all(item.jpeg is not None for item in items)         # the batched decoder takes them
    built = assemble(items, 224)
    assert built.pixels.shape == (2, 3, 224, 224) and built.skipped == []
    assert max(h * w for h, w in sizes) <= 4 * 224 * 224        # cropped to 4:1 before the resize

    bad = hostile_folder(tmp_path / "data")
    monkeypatch.setenv("NEUROLENS_MAX_IMAGE_BYTES", "64K")
    watchdog = FifoWatchdog(tmp_path / "data" / "a.jpg")
    try:
        results = {decoder: run_scan(tiny_clip, LAYER, str(tmp_path / "data"), top_k=2, workers=0,
                                     cache=tmp_path / "cache", decoder=decoder) for decoder in ("pil", "torchvision")}
    finally:
        watchdog.stop()
    assert not watchdog.fired, "reading the FIFO blocked"
    for result in results.values():
        assert result.count == 3
        reasons = {os.path.basename(p): r for p, r in zip(result.skipped_paths, result.skipped_reasons)}
        for name, words in bad.items():
            assert words in reasons[name], reasons
    assert results["pil"].skipped_reasons == results["torchvision"].skipped_reasons


def _count_host_copies(monkeypatch) -> dict:
    counts = {"calls": 0}
    for name in ("cpu", "item", "tolist", "numpy"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, **kwargs):
            counts["calls"] += 1
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def test_no_copy_to_the_host_per_batch(mixed, tiny_clip, tmp_path, monkeypatch):
    """Host copies (.cpu, .item, .tolist, .numpy) during a scan do not grow with the number of batches: per-image
    values are copied once per chunk."""
    dataset = open_dataset(str(mixed))
    counts = _count_host_copies(monkeypatch)
    calls = []
    for batch_size, cache in ((16, "a"), (4, "b")):       # 3 batches, then 12
        counts["calls"] = 0
        run_scan(tiny_clip, LAYER, dataset, top_k=4, batch_size=batch_size, workers=0, cache=tmp_path / cache,
                 checkpoint_every=1000, embeddings=True)
        calls.append(counts["calls"])
    assert calls[0] == calls[1], calls


def test_stage_clock_times_every_stage(mixed, tiny_clip, tmp_path):
    clock = StageClock("cpu")
    run_scan(tiny_clip, LAYER, str(mixed), top_k=4, batch_size=8, workers=1, cache=tmp_path, decoder="torchvision",
             clock=clock)
    seconds = clock.totals()
    assert set(seconds) == set(STAGES)
    assert all(seconds[name] > 0 for name in ("decode", "resize", "collate", "forward", "stats", "writes"))


def test_sae_training_vectors_come_through_the_same_decoders(mixed, tiny_clip):
    dataset = open_dataset(str(mixed))
    spec = resolve_layer(tiny_clip, LAYER)
    vectors = {}
    for decoder in ("pil", "torchvision"):
        stream = ActivationStream(tiny_clip, spec, dataset, np.arange(len(dataset)), 10_000, seed=0, workers=0,
                                  decoder=decoder)
        vectors[decoder], skipped = stream._vectors(stream.indices)
        assert sorted(os.path.basename(dataset.keys[i]) for i, _ in skipped) == ["t_corrupt.jpg", "t_truncated.jpg",
                                                                                 "t_zero.jpg"]
    assert vectors["pil"].shape == vectors["torchvision"].shape
    scale = float(vectors["pil"].abs().max())
    assert float((vectors["pil"] - vectors["torchvision"]).abs().max()) <= 0.01 * scale


def test_an_unknown_decoder_is_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "neurolens", "scan", "--model", "nl-tiny-RN", "--pretrained", "none",
                           "--decode", "nvjpeg", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "unknown --decode 'nvjpeg'" in done.stderr and "Traceback" not in done.stderr
    assert not done.stdout.strip() or json.loads(done.stdout) is None
