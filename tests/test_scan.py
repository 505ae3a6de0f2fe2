"""The one-pass scan of all units: equality with brute force (also across interrupt/resume, kill -9, shards
and worker counts), the cache, bad inputs, embeddings, precision, and the scan/samples commands."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from neurolens.cli import app
from neurolens.datasets.decode import BadImage, preprocess_array
from neurolens.datasets.open import open_dataset
from neurolens.activations.hooks import hook_count
from neurolens.models.layer_table import resolve_layer
from neurolens.pipelines.scan_find import find_scan
from neurolens.pipelines.scan import run_scan
from neurolens.activations.stats import ScanStats
from neurolens.activations.forward import brute_force_maxima, rank_order
from neurolens.engines.local import scan_shard
from neurolens.storage.cache import Cache
from scan_data import assert_identical, make_bad_corpus, write_images

LAYER = "image_block_3_0"   # nl-tiny-RN: a 4x4 grid at 64 px, so cells matter
TINY = ["--model", "nl-tiny-RN", "--pretrained", "none", "--device", "cpu"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """On the shared 2-core CI machine two OpenMP threads spin against other processes: a tiny-model
    forward took 60x longer with 2 threads than with 1. Restored after this module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """23 readable synthetic images with one zero-byte file in the middle (index order is by name)."""
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, 12, start_seed=0)
    write_images(folder / "more", 11, start_seed=50, fmt="png")
    (folder / "img_0005_zero.jpg").write_bytes(b"")
    return folder


def brute_force(clip, layer, dataset, k):
    """Top-k per unit by a direct computation: one forward over every readable image, then a full sort."""
    spec = resolve_layer(clip, layer)
    readable, arrays = [], []
    for i in range(len(dataset)):
        try:
            arrays.append(preprocess_array(dataset.load(i), clip.image_size))
            readable.append(i)
        except BadImage:
            pass
    images = torch.from_numpy(np.stack(arrays)).float() / 255.0
    values, cells = brute_force_maxima(clip, spec, images)
    readable = np.asarray(readable)
    units = values.shape[1]
    top_values = np.full((units, k), -np.inf, np.float32)
    top_indices = np.full((units, k), -1, np.int64)
    top_cells = np.full((units, k, 2), -1, np.int32)
    for unit in range(units):
        order = rank_order(values[:, unit], readable)[:k]
        top_values[unit, :len(order)] = values[order, unit]
        top_indices[unit, :len(order)] = readable[order]
        top_cells[unit, :len(order)] = np.stack([cells[order, unit] // spec.width, cells[order, unit] % spec.width], -1)
    per_image = np.full((len(dataset), units), np.nan, np.float32)
    per_image[readable] = values
    with torch.no_grad():
        from neurolens.activations.hooks import forward_to
        acts = forward_to(clip.model, clip.normalize(images), [spec])[spec.name].double()
    return dict(values=top_values, indices=top_indices, cells=top_cells, per_image=per_image,
                mean=values.astype(np.float64).mean(0), var=values.astype(np.float64).var(0),
                mean_map=acts.mean(0).numpy())


def assert_matches_brute(result, brute):
    np.testing.assert_array_equal(result.top_indices, brute["indices"])
    np.testing.assert_array_equal(result.top_cells, brute["cells"])
    np.testing.assert_allclose(result.top_values, brute["values"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.mean, brute["mean"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.var, brute["var"], rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(result.mean_map, brute["mean_map"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.per_image_max(), brute["per_image"], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tiny_clip, image_folder, tmp_path_factory):
    """An uninterrupted scan (batch 5, 2 workers) and the brute-force answer."""
    dataset = open_dataset(str(image_folder))
    cache = Cache(tmp_path_factory.mktemp("reference-cache"))
    result = run_scan(tiny_clip, LAYER, dataset, top_k=6, batch_size=5, workers=2, cache=cache)
    return result, brute_force(tiny_clip, LAYER, dataset, 6), dataset


def test_scan_equals_brute_force_and_is_cached(tiny_clip, reference, image_folder):
    result, brute, dataset = reference
    assert result.count == 23 and result.skipped == 1 and result.skipped_paths[0].endswith("img_0005_zero.jpg")
    assert result.skipped_reasons == ["zero-byte file"]
    assert result.top_values.dtype == np.float32 and result.top_indices.dtype == np.int64
    assert result.mean_map.shape == (result.channels, 4, 4)
    assert np.all(np.diff(result.top_values, axis=1) <= 0)
    assert_matches_brute(result, brute)
    assert hook_count(tiny_clip.model) == 0
    seen = []
    again = run_scan(tiny_clip, LAYER, str(image_folder), top_k=6, batch_size=5, workers=0,
                     cache=result._cache, progress=lambda done, total: seen.append(done))
    assert again.cached and again.path == result.path and seen == [len(dataset)]
    assert_identical(again, result)


def test_worker_count_and_batch_size_do_not_change_the_result(tiny_clip, reference, tmp_path):
    result, brute, dataset = reference
    other = run_scan(tiny_clip, LAYER, dataset, top_k=6, batch_size=7, workers=0, cache=Cache(tmp_path))
    np.testing.assert_array_equal(other.top_indices, result.top_indices)
    np.testing.assert_array_equal(other.top_cells, result.top_cells)
    np.testing.assert_allclose(other.top_values, result.top_values, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("checkpoint_every", [1, 2])
def test_interrupted_scan_resumes_to_the_same_result(tiny_clip, reference, tmp_path, checkpoint_every):
    result, brute, dataset = reference
    cache = Cache(tmp_path)
    batch = 5

    def stop_at_batch_3(done, total):   # what Ctrl-C does: KeyboardInterrupt inside the loop
        if done >= 3 * batch:
            raise KeyboardInterrupt()

    with pytest.raises(KeyboardInterrupt):
        run_scan(tiny_clip, LAYER, dataset, top_k=6, batch_size=batch, workers=2, cache=cache,
                 checkpoint_every=checkpoint_every, progress=stop_at_batch_3)
    assert find_scan(tiny_clip, LAYER, dataset, 6, cache=cache) is None
    checkpoints = list(cache.records("scan-checkpoint"))
    assert len(checkpoints) == 1
    expected_next = 15 if checkpoint_every == 1 else 10      # checkpoints after batches 1,2,3 / after batch 2
    assert cache.read(checkpoints[0]).attrs["next_index"] == expected_next

    starts = []
    resumed = run_scan(tiny_clip, LAYER, dataset, top_k=6, batch_size=batch, workers=2, cache=cache,
                       progress=lambda done, total: starts.append(done))
    assert resumed.resumed_from == [expected_next] and starts[0] == expected_next
    assert_identical(resumed, result)                        # bit for bit, per-image maxima included
    assert_matches_brute(resumed, brute)
    assert list(cache.records("scan-checkpoint")) == []
    chunk_files = sorted(p.name for p in cache.records("scan-chunk"))
    assert chunk_files == sorted(f"{p.name}" for p in resumed._chunk_paths)  # no stale chunk left


def test_shards_merge_to_the_whole(tiny_clip, reference):
    result, brute, dataset = reference
    spec = resolve_layer(tiny_clip, LAYER)
    options = dict(top_k=6, batch_size=4, workers=0)
    first = scan_shard(tiny_clip, spec, dataset, 0, 9, **options)
    second = scan_shard(tiny_clip, spec, dataset, 9, 17, **options)
    third = scan_shard(tiny_clip, spec, dataset, 17, len(dataset), **options)
    # merge in any order, also through a saved state (how shards from other machines come back)
    restored = ScanStats.empty(spec, 6)
    restored.load_state_dict(third.state_dict())
    merged = second.merge(restored).merge(first)
    np.testing.assert_array_equal(merged.topk.indices.numpy(), brute["indices"])
    np.testing.assert_array_equal(merged.cells_rc(), brute["cells"])
    np.testing.assert_allclose(merged.topk.values.numpy(), brute["values"], rtol=1e-5, atol=1e-6)
    assert merged.count == result.count and [i for i, _ in merged.skipped] == [dataset.keys.index(result.skipped_paths[0])]
    np.testing.assert_allclose(merged.moments.mean.numpy(), result.mean, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(merged.moments.variance.numpy(), result.var, rtol=1e-3, atol=1e-12)
    np.testing.assert_allclose(merged.mean_map.mean.numpy(), result.mean_map, rtol=1e-5, atol=1e-7)


def test_kill_9_mid_scan_keeps_cache_readable_and_resumes(tiny_clip, tmp_path):
    folder = tmp_path / "many"
    write_images(folder, 400, start_seed=1000, size=(128, 112))
    cache_root = tmp_path / "cache"
    cache = Cache(cache_root)
    dataset = open_dataset(str(folder))
    earlier = run_scan(tiny_clip, "image_block_4_0", open_dataset(None), top_k=3, workers=0, cache=cache)
    earlier_bytes = earlier.path.read_bytes()

    command = [sys.executable, "-m", "neurolens", "scan", *TINY, "--layer", LAYER, "--dataset", str(folder),
               "--cache", str(cache_root), "--top-k", "5", "--batch-size", "4", "--workers", "1",
               "--checkpoint-every", "1", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 240
    progress_at_kill = 0
    try:
        while time.time() < deadline and process.poll() is None:
            found = list(cache.records("scan-checkpoint"))
            record = cache.read(found[0]) if found else None
            if record is not None and record.attrs["next_index"] >= 40:
                progress_at_kill = record.attrs["next_index"]
                break
            time.sleep(0.01)
        assert process.poll() is None, "the scan ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL and 40 <= progress_at_kill < len(dataset)

    assert earlier.path.read_bytes() == earlier_bytes                     # an earlier result is untouched
    for path in cache.records():
        assert cache.read(path) is not None, f"{path} unreadable after kill -9"
    assert find_scan(tiny_clip, LAYER, dataset, 5, cache=cache) is None   # unfinished: not a result

    resumed = run_scan(tiny_clip, LAYER, dataset, top_k=5, batch_size=4, workers=0, cache=cache)
    assert resumed.resumed_from and resumed.resumed_from[0] >= progress_at_kill
    fresh = run_scan(tiny_clip, LAYER, dataset, top_k=5, batch_size=4, workers=0, cache=Cache(tmp_path / "fresh"))
    assert_identical(resumed, fresh)
    assert resumed.count == 400
    assert all(not p.name.startswith(".") for p in cache.records())     # a killed write's temp file is no record


def test_bad_corpus_scans_to_completion_via_cli(tmp_path):
    info = make_bad_corpus(tmp_path / "corpus")
    runner = CliRunner()
    args = ["scan", *TINY, "--layer", LAYER, "--dataset", str(tmp_path / "corpus"), "--cache", str(tmp_path / "c"),
            "--top-k", "4", "--batch-size", "3"]
    out = runner.invoke(app, args + ["--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    assert set(summary) == {"images", "skipped", "skipped_paths"}
    assert summary["images"] == len(info["readable"]) and summary["skipped"] == len(info["bad"])
    assert sorted(Path(p).name for p in summary["skipped_paths"]) == info["bad"]
    text = runner.invoke(app, args)                                      # cache hit, human output
    assert text.exit_code == 0
    skip_lines = [line for line in text.stdout.splitlines() if line.startswith("skipped")]
    assert len(skip_lines) == 1 and skip_lines[0].startswith(f"skipped {len(info['bad'])} unreadable item(s)")
    assert "cached" in text.stdout


def test_no_readable_image_is_a_clear_error(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"")
    (tmp_path / "bad" / "b.png").write_text("text")
    out = CliRunner().invoke(app, ["scan", *TINY, "--layer", LAYER, "--dataset", str(tmp_path / "bad"),
                                   "--cache", str(tmp_path / "c")])
    assert out.exit_code == 2
    assert "no readable image" in out.stderr and "Traceback" not in out.output
    # nothing of the scan is left (the model card of the model it loaded is not a result: records/models.py)
    assert [p for p in Cache(tmp_path / "c").records() if "model-card" not in p.parts] == []


def test_embeddings_are_normalized_full_forward(tiny_clip, tmp_path):
    dataset = open_dataset(None)
    cache = Cache(tmp_path)
    with_emb = run_scan(tiny_clip, LAYER, dataset, top_k=4, workers=0, cache=cache, embeddings=True)
    emb = with_emb.embeddings
    assert emb.shape == (20, tiny_clip.model.visual.output_dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    pixels = torch.from_numpy(np.stack([preprocess_array(dataset.load(i), 64) for i in range(20)])).float() / 255
    with torch.no_grad():
        direct = torch.nn.functional.normalize(tiny_clip.model.encode_image(tiny_clip.normalize(pixels)), dim=-1)
    np.testing.assert_allclose(emb, direct.numpy(), atol=1e-5)
    plain = run_scan(tiny_clip, LAYER, dataset, top_k=4, workers=0, cache=cache)   # answered by the same record
    assert plain.cached and plain.path == with_emb.path
    truncated = run_scan(tiny_clip, LAYER, dataset, top_k=4, workers=0, cache=Cache(tmp_path / "t"))
    assert truncated.embeddings is None
    np.testing.assert_array_equal(truncated.top_indices, with_emb.top_indices)
    np.testing.assert_allclose(truncated.top_values, with_emb.top_values, rtol=1e-5)


def test_bf16_scan_is_cached_apart_and_close(tiny_clip, tmp_path):
    dataset = open_dataset(None)
    cache = Cache(tmp_path)
    fp32 = run_scan(tiny_clip, LAYER, dataset, top_k=4, workers=0, cache=cache)
    bf16 = run_scan(tiny_clip, LAYER, dataset, top_k=4, workers=0, cache=cache, precision="bf16")
    assert bf16.path != fp32.path and bf16.precision == "bf16"
    spread = fp32.per_image_max().std(0).mean()
    assert np.abs(bf16.per_image_max() - fp32.per_image_max()).mean() < 0.2 * spread


def test_samples_command_json_grid_and_blur(tiny_clip, tmp_path, fake_detector):
    from neurolens.datasets.decode import preprocess
    runner = CliRunner()
    base = ["samples", *TINY, "--layer", LAYER, "--unit", "3", "--cache", str(tmp_path / "c"), "--top-k", "5"]
    fake = fake_detector(lambda rgb: True)         # fires on everything: every crop of the grid is blurred
    out = runner.invoke(app, base + ["--json", "--out", str(tmp_path / "blurred.png")])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert [set(r) for r in rows] == [{"unit", "rank", "score", "path", "cell"}] * 5
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5] and rows[0]["unit"] == 3
    assert all(a["score"] >= b["score"] for a, b in zip(rows, rows[1:]))
    scan = find_scan(tiny_clip, LAYER, None, 5, cache=tmp_path / "c")
    assert [r["path"] for r in rows] == [scan.keys[i] for i in scan.top_indices[3]]
    assert [r["cell"] for r in rows] == scan.top_cells[3].tolist()
    assert (tmp_path / "blurred.png").is_file() and len(fake.seen) == 5     # every source image was judged

    # the detector fires on the brighter half of the unit's top images (by red channel): exactly those are blurred
    sources = [preprocess(open_dataset(None).load(int(i)), 64) for i in scan.top_indices[3]]
    reds = [float(np.asarray(im)[..., 0].mean()) for im in sources]
    cut = float(np.median(reds))
    fake_detector(lambda rgb: float(rgb[..., 0].mean()) > cut)
    expected = [red > cut for red in reds]
    assert any(expected) and not all(expected)
    from neurolens.pipelines.samples import run_samples
    samples = run_samples(tiny_clip, LAYER, 3, None, top_k=5, out=tmp_path / "mixed.png", cache=tmp_path / "c")
    assert samples.blurred == expected and "NudeNet" in samples.blur_note

    raw = runner.invoke(app, base + ["--no-blur", "--out", str(tmp_path / "raw.png")])
    assert raw.exit_code == 0 and "NOT BLURRED" in raw.stdout and "cell (" in raw.stdout
    assert not (tmp_path / "raw.png").exists() and (tmp_path / "raw_noblur.png").is_file()
    mixed_px = np.asarray(Image.open(tmp_path / "mixed.png"))
    raw_px = np.asarray(Image.open(tmp_path / "raw_noblur.png"))
    assert mixed_px.shape == raw_px.shape and not np.array_equal(mixed_px, raw_px)

    bad_unit = runner.invoke(app, base[:-4] + ["--unit", "99999", "--cache", str(tmp_path / "c")])
    assert bad_unit.exit_code == 2 and "out of range" in bad_unit.stderr


def test_tar_shards_scan_like_the_same_images_in_a_folder(tiny_clip, tmp_path):
    import io
    import tarfile
    paths = write_images(tmp_path / "folder", 7, start_seed=300)
    for shard, group in enumerate((paths[:4], paths[4:])):
        with tarfile.open(tmp_path / f"part-{shard}.tar", "w") as archive:
            for path in group:
                data = path.read_bytes()
                info = tarfile.TarInfo(path.stem + ".jpg")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    from_folder = run_scan(tiny_clip, LAYER, str(tmp_path / "folder"), top_k=3, batch_size=3, workers=2,
                           cache=Cache(tmp_path / "c1"))
    from_tar = run_scan(tiny_clip, LAYER, str(tmp_path / "part-{0..1}.tar"), top_k=3, batch_size=3, workers=2,
                        cache=Cache(tmp_path / "c2"))
    assert from_tar.keys[0].endswith("part-0.tar:img_0000.jpg") and from_tar.count == 7
    np.testing.assert_array_equal(from_tar.top_indices, from_folder.top_indices)
    np.testing.assert_array_equal(from_tar.top_values, from_folder.top_values)


def test_vit_token_layers_and_vector_layers_scan(tiny_vit, tmp_path):
    dataset = open_dataset(None)
    grid = tuple(tiny_vit.model.visual.grid_size)
    tokens = run_scan(tiny_vit, "image_resblock_0", dataset, top_k=3, workers=0, cache=Cache(tmp_path))
    assert tokens.grid == grid and tokens.mean_map.shape[1:] == grid
    assert_matches_brute(tokens, brute_force(tiny_vit, "image_resblock_0", dataset, 3))
    vector = run_scan(tiny_vit, "image_embedding", dataset, top_k=3, workers=0, cache=Cache(tmp_path))
    assert vector.grid == (1, 1) and (vector.top_cells[vector.top_indices >= 0] == 0).all()
    assert hook_count(tiny_vit.model) == 0


def test_no_ray_needed_for_the_single_process_scan(tmp_path):
    """With Ray not importable, the in-process scan works and --engine ray says what to install."""
    script = f"""
import sys
sys.modules["ray"] = None
from neurolens.models.build import load_clip
from neurolens.pipelines.scan import run_scan, run_ray_scan
from neurolens.errors import NeurolensError
clip = load_clip("nl-tiny-RN", "none", device="cpu")
result = run_scan(clip, "{LAYER}", None, top_k=2, batch_size=8, workers=0, cache={str(tmp_path)!r})
assert result.count > 0
try:
    run_ray_scan(clip, "{LAYER}", None, top_k=2, cache={str(tmp_path)!r})
except NeurolensError as exc:
    print("error:", exc)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pip install 'neurolens[ray]'" in done.stdout
