"""Datasets from strangers (issue 20, docs/security.md): only regular files are read, at most the per-image byte
limit, for folders, tables, tar shards and cache keys alike; a FIFO, a device or an oversize file is a skipped,
listed item and never blocks or fills memory; and decoding is bounded: an extremely elongated image (1 x 20,000)
is cropped to 4:1 before the resize, for scans, crops and probe uploads, and probes decode on a bounded pool."""
import asyncio
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neurolens.datasets.decode import BadImage, decode_image, decode_item, preprocess, preprocess_array
from neurolens.datasets.open import dataset_from_keys, open_dataset
from hostile_data import FifoWatchdog, hostile_folder, tall_png
from scan_data import write_images

LAYER = "image_block_3_0"
TINY = ["--model", "nl-tiny-RN", "--pretrained", "none", "--device", "cpu"]


@pytest.fixture()
def bounded_resize(monkeypatch):
    """Records the size of every PIL resize; one making more than 16 million pixels fails at once (before
    allocating them: the unbounded code asked for 224 x 4,480,000)."""
    sizes = []
    real = Image.Image.resize

    def resize(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        assert size[0] * size[1] <= 16_000_000, f"resize to {size}: {size[0] * size[1]} pixels"
        return real(self, size, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "resize", resize)
    return sizes


def test_one_by_twenty_thousand_png_is_cropped_before_the_resize(tmp_path, bounded_resize):
    data = tall_png()
    assert len(data) < 200_000
    image = decode_image(data)
    assert image.size == (1, 20_000)
    out = preprocess(image, 224)
    assert out.size == (224, 224)
    assert max(w * h for w, h in bounded_resize) <= 4 * 224 * 224       # at most 4:1 before the crop
    wide = preprocess(decode_image(tall_png(20_000, 1)), 224)
    assert wide.size == (224, 224) and max(w * h for w, h in bounded_resize) <= 4 * 224 * 224
    # a scan's decoding of the same file (a DataLoader worker's job)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "tall.png").write_bytes(data)
    array, reason = decode_item(open_dataset(str(tmp_path / "d")), 0, 224)
    assert reason == "" and array.shape == (3, 224, 224) and array.dtype == np.uint8


def test_images_within_four_to_one_are_preprocessed_exactly_as_before():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (90, 350, 3), dtype=np.uint8))      # 3.9 : 1
    width, height = image.size
    new_w, new_h = max(64, int(64 * width / height)), 64
    resized = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - 64) / 2.0)), int(round((new_h - 64) / 2.0))
    expected = np.asarray(resized.crop((left, top, left + 64, top + 64)))
    assert np.array_equal(np.asarray(preprocess(image, 64)), expected)


def test_probe_upload_of_a_tall_png_is_bounded_and_probes_use_a_bounded_pool(bounded_resize):
    from neurolens.serve.probe import PROBE_WORKERS, Prober, decode_upload
    image = decode_upload(tall_png())
    assert preprocess_array(image, 224).shape == (3, 224, 224)
    assert max(w * h for w, h in bounded_resize) <= 4 * 224 * 224

    prober = Prober(clip=None)
    running, most = [0], [0]
    lock = threading.Lock()

    def work():
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return 1

    async def many():
        return await asyncio.gather(*(prober.run(work) for _ in range(24)))
    assert sum(asyncio.run(many())) == 24
    assert most[0] == PROBE_WORKERS == 2


def test_scan_of_a_folder_with_a_fifo_dev_zero_and_an_oversize_file_finishes_and_lists_them(tmp_path, tiny_clip):
    from neurolens.pipelines.scan_find import find_scan
    from neurolens.storage.cache import Cache
    bad = hostile_folder(tmp_path / "data")
    env = dict(os.environ, OMP_NUM_THREADS="1", NEUROLENS_MAX_IMAGE_BYTES="64K")
    command = [sys.executable, "-m", "neurolens", "scan", *TINY, "--layer", LAYER, "--dataset",
               str(tmp_path / "data"), "--cache", str(tmp_path / "cache"), "--top-k", "2", "--workers", "0",
               "--json"]

    def limit_memory():            # a reader of /dev/zero must not take the machine down with it
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (8 * 2 ** 30, 8 * 2 ** 30))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, preexec_fn=limit_memory)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["images"] == 3 and summary["skipped"] == 3
    assert sorted(Path(p).name for p in summary["skipped_paths"]) == sorted(bad)
    result = find_scan(tiny_clip, LAYER, open_dataset(str(tmp_path / "data")), top_k=2,
                       cache=Cache(tmp_path / "cache"))
    reasons = {Path(p).name: r for p, r in zip(result.skipped_paths, result.skipped_reasons)}
    for name, words in bad.items():
        assert words in reasons[name], reasons


def test_tables_keys_and_tar_members_obey_the_same_rules(tmp_path, monkeypatch):
    folder = tmp_path / "files"
    good = write_images(folder, 1, start_seed=7)[0]
    fifo = folder / "pipe.jpg"
    os.mkfifo(fifo)
    zero = folder / "zero.jpg"
    os.symlink("/dev/zero", zero)
    table = tmp_path / "t.csv"
    table.write_text(f"image,caption\n{good},one\n{fifo},two\n{zero},three\n")
    watchdog = FifoWatchdog(fifo)
    try:
        for dataset in (open_dataset(str(table)), dataset_from_keys([str(good), str(fifo), str(zero)])):
            assert dataset.load(0).size == (96, 80)
            with pytest.raises(BadImage, match="FIFO"):
                dataset.load(1)
            with pytest.raises(BadImage, match="character device"):
                dataset.load(2)
    finally:
        watchdog.stop()
    assert not watchdog.fired, "reading the FIFO blocked"

    shard = tmp_path / "s.tar"
    rng = np.random.default_rng(3)
    with tarfile.open(shard, "w") as archive:
        for name, side in (("small.png", 8), ("big.png", 300)):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
            info = tarfile.TarInfo(name)
            info.size = len(buffer.getvalue())
            archive.addfile(info, io.BytesIO(buffer.getvalue()))
    monkeypatch.setenv("NEUROLENS_MAX_IMAGE_BYTES", "100K")
    dataset = open_dataset(str(shard))
    names = [key.rsplit(":", 1)[1] for key in dataset.keys]
    assert dataset.load(names.index("small.png")).size == (8, 8)
    with pytest.raises(BadImage, match="tar member too large"):
        dataset.load(names.index("big.png"))
    keys_dataset = dataset_from_keys(dataset.keys)          # the same shard found again from a record's keys
    with pytest.raises(BadImage, match="tar member too large"):
        keys_dataset.load(names.index("big.png"))
    monkeypatch.setenv("NEUROLENS_MAX_IMAGE_BYTES", "1 MB please")
    from neurolens.errors import NeurolensError
    with pytest.raises(NeurolensError, match="NEUROLENS_MAX_IMAGE_BYTES"):
        open_dataset(str(shard))
