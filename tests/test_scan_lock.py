"""One writer per scan key (issue 20, neurolens.records.scan_lock.key_lock): two `neurolens scan` processes of the same
layer, dataset and settings never write at once. The second stops with one line (exit 2) without touching the
first one's files, or with --wait waits and reads the first one's result, which equals a scan run alone. A lock
left by a killed run is recovered by the next run, and reading a finished scan takes no lock."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from neurolens.datasets.open import open_dataset
from neurolens.pipelines.scan_find import find_scan
from neurolens.pipelines.scan import run_scan
from neurolens.storage.cache import Cache
from scan_data import write_images

LAYER = "image_block_3_0"
TINY = ["--model", "nl-tiny-RN", "--pretrained", "none", "--device", "cpu"]
IMAGES = 400


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lock") / "many"
    write_images(folder, IMAGES, start_seed=500, size=(64, 64))
    return folder


def scan_command(folder: Path, cache: Path, *extra: str, workers: int = 0) -> list:
    return [sys.executable, "-m", "neurolens", "scan", *TINY, "--layer", LAYER, "--dataset", str(folder),
            "--cache", str(cache), "--top-k", "5", "--batch-size", "4", "--workers", str(workers),
            "--checkpoint-every", "1", "--json", *extra]


def start(command: list) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_progress(process: subprocess.Popen, cache: Cache, at_least: int, timeout: float = 240) -> int:
    """The running scan's checkpoint index once it reaches `at_least` (the process must still be running)."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        found = list(cache.records("scan-checkpoint"))
        record = cache.read(found[0]) if found else None
        if record is not None and record.attrs["next_index"] >= at_least:
            return int(record.attrs["next_index"])
        time.sleep(0.02)
    raise AssertionError(f"the first scan did not get to image {at_least} (exit {process.poll()}): "
                         f"{process.stderr.read()[-2000:] if process.poll() is not None else ''}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=60)


def written_files(cache: Path) -> set:
    return {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()}


def waiting_on_a_lock(pid: int, timeout: float = 240) -> bool:
    """Whether process `pid` is blocked waiting for a file lock (Linux lists blocked waiters in /proc/locks as
    `N: -> POSIX ADVISORY WRITE <pid> ...`)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()
            if "->" in fields and ("POSIX" in fields or "FLOCK" in fields) and str(pid) in fields:
                return True
        time.sleep(0.05)
    return False


def test_two_scans_of_one_key_never_write_at_once(many, tmp_path, tiny_clip):
    """The first scan is paused (SIGSTOP) while it holds its key, so the others meet it mid-scan whatever the
    machine's speed; a second one stops with one line, a third one with --wait blocks on the lock, then reads
    the first one's result once it is resumed and done."""
    cache_root = tmp_path / "cache"
    cache = Cache(cache_root)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    first = start(scan_command(many, cache_root))
    waiting = None
    try:
        wait_for_progress(first, cache, 8)
        os.kill(first.pid, signal.SIGSTOP)
        before = written_files(cache_root)
        busy = subprocess.run(scan_command(many, cache_root), capture_output=True, text=True, timeout=240, env=env)
        assert busy.returncode == 2, busy.stderr[-2000:]
        errors = [line for line in busy.stderr.splitlines() if not line.startswith("note: ")]
        assert len(errors) == 1 and errors[0].startswith("error: another scan of this layer"), errors
        assert f"process {first.pid}" in errors[0] and "--wait" in errors[0] and "Traceback" not in busy.stderr
        assert before == written_files(cache_root)            # nothing of the first scan deleted, nothing added
        waiting = start(scan_command(many, cache_root, "--wait"))
        assert waiting_on_a_lock(waiting.pid), "the --wait scan never waited for the lock"
        os.kill(first.pid, signal.SIGCONT)
        out_first, err_first = first.communicate(timeout=600)
        out_waiting, err_waiting = waiting.communicate(timeout=600)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
        stop(first)
        if waiting is not None:
            stop(waiting)
    assert first.returncode == 0, err_first[-2000:]
    assert waiting.returncode == 0, err_waiting[-2000:]
    assert json.loads(out_first) == json.loads(out_waiting) == {"images": IMAGES, "skipped": 0, "skipped_paths": []}

    dataset = open_dataset(str(many))
    shared = find_scan(tiny_clip, LAYER, dataset, top_k=5, cache=cache)
    alone = run_scan(tiny_clip, LAYER, dataset, top_k=5, batch_size=4, workers=0, cache=Cache(tmp_path / "alone"))
    np.testing.assert_array_equal(shared.top_indices, alone.top_indices)
    np.testing.assert_array_equal(shared.top_values, alone.top_values)
    np.testing.assert_array_equal(shared.per_image_max(), alone.per_image_max())   # every chunk it lists is there


def test_a_killed_scans_lock_is_recovered_and_reading_takes_no_lock(many, tmp_path, tiny_clip):
    cache_root = tmp_path / "cache"
    cache = Cache(cache_root)
    first = start(scan_command(many, cache_root, workers=1))      # a DataLoader worker outlives a kill -9 a while
    try:
        progress = wait_for_progress(first, cache, 8)
        os.kill(first.pid, signal.SIGKILL)
    finally:
        stop(first)
    locks = list(cache_root.rglob("*.lock"))
    assert len(locks) == 1 and locks[0].read_text().strip() == str(first.pid)     # left by the killed run

    dataset = open_dataset(str(many))
    resumed = run_scan(tiny_clip, LAYER, dataset, top_k=5, batch_size=4, workers=0, cache=cache)   # no wait
    assert resumed.count == IMAGES and resumed.resumed_from and resumed.resumed_from[0] >= progress

    for lock in cache_root.rglob("*.lock"):
        lock.unlink()
    again = run_scan(tiny_clip, LAYER, dataset, top_k=5, batch_size=4, workers=0, cache=cache)
    assert again.cached and list(cache_root.rglob("*.lock")) == []      # a finished scan is read without a lock
